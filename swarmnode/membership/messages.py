"""Membership messages: frozen dataclasses and a strict msgpack codec.

Everything that arrives from the network goes through `decode`, which either returns a fully
validated message or raises `MessageError` -- never another exception, whatever the bytes -- so
the state machine can trust field types and bounds. Signed objects (records, cluster statements,
ack proofs) define their signed bytes here, next to their encoding, so both ends agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from net.addresses import MAX_REPORTED, MAX_WIRE_ADDRESS, is_wire_address

# --- bounds (enforced by the codec; generous for real use, tight enough to bound memory) ---
MAX_BODY = 32 * 1024 * 1024
MAX_U63 = (1 << 63) - 1
MAX_INT64_MIN = -(1 << 63)
MAX_NAME = 64
MAX_HOW = 64
MAX_ADDRESSES = MAX_REPORTED
MAX_ADDRESS = MAX_WIRE_ADDRESS
MAX_FACTS = 32
MAX_FACT_KEY = 32
MAX_FACT_VALUE = 256
MAX_SIG = 64
MAX_NONCE = 32
MIN_NONCE = 8
MAX_PIGGYBACK = 64
MAX_GOSSIP_ITEMS = 512
MAX_MEMBERS = 65536
MAX_STATEMENTS = 4 * MAX_MEMBERS
MAX_TOPIC = 32
MAX_NOTE_KEY = 128
MAX_NOTE_VALUE = 4096  # a signed release manifest is ~400 bytes; notes are small facts, not files

_ID_RE = re.compile(r"[a-z2-7]{52}")

MEMBER_STATES = ("alive", "suspect", "dead", "left")
LEFT_FACT = "left"
"""A record whose facts hold ("left", 1) is its node's goodbye: the signed form of a leave."""


class MessageError(ValueError):
    """A body that is not a valid membership message."""


class Crypto(Protocol):
    """The injected signer/verifier (e.g. `identity.Identity`)."""

    def sign(self, data: bytes) -> bytes: ...

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Records and broadcast items


@dataclass(frozen=True, slots=True)
class Record:
    """A node's self-description, signed by the node itself; newer incarnation wins."""

    id: str
    incarnation: int
    name: str
    addresses: tuple[str, ...]
    facts: tuple[tuple[str, str | int], ...]
    signature: bytes

    def body(self) -> bytes:
        """The signed bytes: canonical msgpack of every field except the signature."""
        return msgpack.packb(
            [
                "record",
                self.id,
                self.incarnation,
                self.name,
                list(self.addresses),
                [[k, v] for k, v in self.facts],
            ]
        )

    def facts_dict(self) -> dict[str, str | int]:
        return dict(self.facts)

    @property
    def is_goodbye(self) -> bool:
        """The node signed its leave at this incarnation (only it can: the record is its own)."""
        return (LEFT_FACT, 1) in self.facts


def make_record(
    crypto: Crypto,
    id: str,
    incarnation: int,
    name: str,
    addresses: tuple[str, ...] | list[str],
    facts: dict[str, str | int] | tuple[tuple[str, str | int], ...] | list[Any],
) -> Record:
    """Build and sign a record; facts are sorted by key so the signed body is canonical.

    Raises MessageError if the fields would not pass the codec (better here than at peers).
    """
    items = facts.items() if isinstance(facts, dict) else facts
    unsigned = Record(
        id=id,
        incarnation=incarnation,
        name=name,
        addresses=tuple(addresses),
        facts=tuple(sorted((str(k), v) for k, v in items)),
        signature=b"",
    )
    record_from_plain(record_to_plain(unsigned))  # validate
    return Record(
        unsigned.id,
        unsigned.incarnation,
        unsigned.name,
        unsigned.addresses,
        unsigned.facts,
        crypto.sign(unsigned.body()),
    )


@dataclass(frozen=True, slots=True)
class Alive:
    record: Record


@dataclass(frozen=True, slots=True)
class Suspect:
    id: str
    incarnation: int
    from_id: str


@dataclass(frozen=True, slots=True)
class Dead:
    """`from_id` declares `id` dead. A leave is not a Dead but a goodbye record (signed by the
    leaver); old nodes announced it as `from_id == id`, which nobody can check, so it is dropped."""

    id: str
    incarnation: int
    from_id: str


@dataclass(frozen=True, slots=True)
class Admit:
    """`by` vouches that `id` is a member; `how` says why (token, manual, founder, ...)."""

    id: str
    by: str
    how: str
    ts: int
    sig: bytes

    def body(self) -> bytes:
        return admit_body(self.id, self.by, self.how, self.ts)


@dataclass(frozen=True, slots=True)
class Ban:
    id: str
    by: str
    ts: int
    sig: bytes

    def body(self) -> bytes:
        return ban_body(self.id, self.by, self.ts)


@dataclass(frozen=True, slots=True)
class Rename:
    id: str
    name: str
    by: str
    ts: int
    sig: bytes

    def body(self) -> bytes:
        return rename_body(self.id, self.name, self.by, self.ts)


@dataclass(frozen=True, slots=True)
class Pending:
    """A guest's self-signed record, seen without a valid token; listed by every member."""

    record: Record
    how: str


@dataclass(frozen=True, slots=True)
class Note:
    """A value member `by` states under (topic, key), e.g. a push grant or a release.

    Membership spreads, syncs and persists notes like any other statement, keeping the newest
    (by `ts`) per (topic, key, author), but never reads `value`: the module that owns the topic
    decides what a note means and whose notes count (memberlist's delegate state, signed).
    Keeping one per author means a member without the right cannot overwrite a valid note.
    """

    topic: str
    key: str
    value: bytes
    by: str
    ts: int
    sig: bytes

    def body(self) -> bytes:
        return note_body(self.topic, self.key, self.value, self.by, self.ts)

    @property
    def slot(self) -> tuple[str, str, str]:
        return (self.topic, self.key, self.by)


Item = Alive | Suspect | Dead | Admit | Ban | Rename | Pending | Note
Statement = Admit | Ban | Rename | Pending | Note


def admit_body(id: str, by: str, how: str, ts: int) -> bytes:
    return msgpack.packb(["admit", id, by, how, ts])


def ban_body(id: str, by: str, ts: int) -> bytes:
    return msgpack.packb(["ban", id, by, ts])


def rename_body(id: str, name: str, by: str, ts: int) -> bytes:
    return msgpack.packb(["rename", id, name, by, ts])


def note_body(topic: str, key: str, value: bytes, by: str, ts: int) -> bytes:
    return msgpack.packb(["note", topic, key, value, by, ts])


def ack_body(seq: int, nonce: bytes, target_id: str) -> bytes:
    """What a probed node signs: binds its identity to the prober's (seq, nonce)."""
    return msgpack.packb([b"ack", seq, nonce, target_id])


# ---------------------------------------------------------------------------------------------
# Protocol messages


@dataclass(frozen=True, slots=True)
class MemberState:
    record: Record
    state: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target_id: str
    nonce: bytes
    piggyback: tuple[Item, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    target_id: str
    proof: bytes
    piggyback: tuple[Item, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target_id: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Nack:
    seq: int


@dataclass(frozen=True, slots=True)
class Gossip:
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class PushPull:
    join: bool
    members: tuple[MemberState, ...]
    cluster: tuple[Statement, ...]


@dataclass(frozen=True, slots=True)
class PushPullReply:
    members: tuple[MemberState, ...]
    cluster: tuple[Statement, ...]


Message = Ping | Ack | PingReq | Nack | Gossip | PushPull | PushPullReply

# ---------------------------------------------------------------------------------------------
# Validation helpers (each raises MessageError)


def _fail(what: str) -> None:
    raise MessageError(what)


def _int(v: object, what: str, lo: int = 0, hi: int = MAX_U63) -> int:
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what}: expected int in [{lo}, {hi}]")
    return v  # type: ignore[return-value]


def _str(v: object, what: str, maxlen: int, minlen: int = 0) -> str:
    if type(v) is not str or not minlen <= len(v) <= maxlen:
        _fail(f"{what}: expected str of length {minlen}..{maxlen}")
    return v  # type: ignore[return-value]


def _bin(v: object, what: str, maxlen: int, minlen: int = 0) -> bytes:
    if type(v) is not bytes or not minlen <= len(v) <= maxlen:
        _fail(f"{what}: expected bytes of length {minlen}..{maxlen}")
    return v  # type: ignore[return-value]


def _nid(v: object, what: str) -> str:
    if type(v) is not str or _ID_RE.fullmatch(v) is None:
        _fail(f"{what}: not a node id")
    return v  # type: ignore[return-value]


def _map(v: object, what: str, keys: frozenset[str]) -> dict[str, Any]:
    if type(v) is not dict or v.keys() != keys:
        _fail(f"{what}: expected a map with keys {sorted(keys)}")
    return v  # type: ignore[return-value]


def _list(v: object, what: str, maxlen: int) -> list[Any]:
    if type(v) is not list or len(v) > maxlen:
        _fail(f"{what}: expected a list of at most {maxlen}")
    return v  # type: ignore[return-value]


def _address(v: object) -> str:
    s = _str(v, "address", MAX_ADDRESS, 3)
    if not is_wire_address(s):
        _fail("address: expected host:port (IPv4, DNS name or [IPv6], port 1-65535)")
    return s


# ---------------------------------------------------------------------------------------------
# Plain (msgpack-able) forms


_RECORD_KEYS = frozenset({"id", "inc", "name", "addrs", "facts", "sig"})


def record_to_plain(r: Record) -> dict[str, Any]:
    return {
        "id": r.id,
        "inc": r.incarnation,
        "name": r.name,
        "addrs": list(r.addresses),
        "facts": [[k, v] for k, v in r.facts],
        "sig": r.signature,
    }


def record_from_plain(v: object) -> Record:
    m = _map(v, "record", _RECORD_KEYS)
    addrs = tuple(_address(a) for a in _list(m["addrs"], "addresses", MAX_ADDRESSES))
    facts: list[tuple[str, str | int]] = []
    for f in _list(m["facts"], "facts", MAX_FACTS):
        pair = _list(f, "fact", 2)
        if len(pair) != 2:
            _fail("fact: expected [key, value]")
        key = _str(pair[0], "fact key", MAX_FACT_KEY, 1)
        val = pair[1]
        if type(val) is int:
            _int(val, "fact value", MAX_INT64_MIN, MAX_U63)
        else:
            _str(val, "fact value", MAX_FACT_VALUE)
        if facts and facts[-1][0] >= key:
            _fail("facts: keys must be unique and sorted")
        facts.append((key, val))
    return Record(
        id=_nid(m["id"], "record id"),
        incarnation=_int(m["inc"], "incarnation"),
        name=_str(m["name"], "name", MAX_NAME),
        addresses=addrs,
        facts=tuple(facts),
        signature=_bin(m["sig"], "signature", MAX_SIG),
    )


def item_to_plain(item: Item) -> dict[str, Any]:
    """The msgpack-able form of a broadcast item or statement (also used by snapshots)."""
    t = type(item)
    if t is Alive:
        return {"k": "alive", "r": record_to_plain(item.record)}  # type: ignore[union-attr]
    if t is Suspect or t is Dead:
        return {
            "k": "suspect" if t is Suspect else "dead",
            "id": item.id,  # type: ignore[union-attr]
            "inc": item.incarnation,  # type: ignore[union-attr]
            "from": item.from_id,  # type: ignore[union-attr]
        }
    if t is Admit:
        a: Admit = item  # type: ignore[assignment]
        return {"k": "admit", "id": a.id, "by": a.by, "how": a.how, "ts": a.ts, "sig": a.sig}
    if t is Ban:
        b: Ban = item  # type: ignore[assignment]
        return {"k": "ban", "id": b.id, "by": b.by, "ts": b.ts, "sig": b.sig}
    if t is Rename:
        r: Rename = item  # type: ignore[assignment]
        return {"k": "rename", "id": r.id, "name": r.name, "by": r.by, "ts": r.ts, "sig": r.sig}
    if t is Pending:
        p: Pending = item  # type: ignore[assignment]
        return {"k": "pending", "r": record_to_plain(p.record), "how": p.how}
    if t is Note:
        n: Note = item  # type: ignore[assignment]
        return {"k": "note", "t": n.topic, "key": n.key, "v": n.value, "by": n.by, "ts": n.ts,
                "sig": n.sig}
    raise TypeError(f"not a membership item: {item!r}")


_ITEM_KEYS = {
    "alive": frozenset({"k", "r"}),
    "suspect": frozenset({"k", "id", "inc", "from"}),
    "dead": frozenset({"k", "id", "inc", "from"}),
    "admit": frozenset({"k", "id", "by", "how", "ts", "sig"}),
    "ban": frozenset({"k", "id", "by", "ts", "sig"}),
    "rename": frozenset({"k", "id", "name", "by", "ts", "sig"}),
    "pending": frozenset({"k", "r", "how"}),
    "note": frozenset({"k", "t", "key", "v", "by", "ts", "sig"}),
}
STATEMENT_KINDS = frozenset({"admit", "ban", "rename", "pending", "note"})


def item_from_plain(v: object, kinds: frozenset[str] | None = None) -> Item:
    """Validate and build an item; `kinds` restricts which kinds are allowed here."""
    if type(v) is not dict:
        _fail("item: expected a map")
    kind = v.get("k")  # type: ignore[union-attr]
    if type(kind) is not str or kind not in _ITEM_KEYS or (kinds is not None and kind not in kinds):
        _fail("item: unknown kind")
    m = _map(v, "item", _ITEM_KEYS[kind])  # type: ignore[index]
    if kind == "alive":
        return Alive(record_from_plain(m["r"]))
    if kind in ("suspect", "dead"):
        cls = Suspect if kind == "suspect" else Dead
        return cls(_nid(m["id"], "id"), _int(m["inc"], "incarnation"), _nid(m["from"], "from"))
    if kind == "admit":
        return Admit(
            _nid(m["id"], "id"),
            _nid(m["by"], "by"),
            _str(m["how"], "how", MAX_HOW),
            _int(m["ts"], "ts"),
            _bin(m["sig"], "sig", MAX_SIG),
        )
    if kind == "ban":
        return Ban(
            _nid(m["id"], "id"),
            _nid(m["by"], "by"),
            _int(m["ts"], "ts"),
            _bin(m["sig"], "sig", MAX_SIG),
        )
    if kind == "rename":
        return Rename(
            _nid(m["id"], "id"),
            _str(m["name"], "name", MAX_NAME),
            _nid(m["by"], "by"),
            _int(m["ts"], "ts"),
            _bin(m["sig"], "sig", MAX_SIG),
        )
    if kind == "note":
        return Note(
            _str(m["t"], "topic", MAX_TOPIC, 1),
            _str(m["key"], "note key", MAX_NOTE_KEY),
            _bin(m["v"], "note value", MAX_NOTE_VALUE),
            _nid(m["by"], "by"),
            _int(m["ts"], "ts"),
            _bin(m["sig"], "sig", MAX_SIG),
        )
    return Pending(record_from_plain(m["r"]), _str(m["how"], "how", MAX_HOW))


def member_state_to_plain(s: MemberState) -> dict[str, Any]:
    return {"r": record_to_plain(s.record), "s": s.state, "i": s.incarnation}


_MS_KEYS = frozenset({"r", "s", "i"})


def member_state_from_plain(v: object) -> MemberState:
    m = _map(v, "member", _MS_KEYS)
    state = m["s"]
    if state not in MEMBER_STATES or type(state) is not str:
        _fail("member: bad state")
    rec = record_from_plain(m["r"])
    inc = _int(m["i"], "member incarnation")
    if inc < rec.incarnation:
        _fail("member: incarnation below its record's")
    return MemberState(rec, state, inc)


def _items(v: object, maxlen: int, kinds: frozenset[str] | None = None) -> tuple[Item, ...]:
    return tuple(item_from_plain(x, kinds) for x in _list(v, "items", maxlen))


# ---------------------------------------------------------------------------------------------
# Codec


def _enc(msg: Message) -> tuple[str, dict[str, Any]]:
    t = type(msg)
    if t is Ping:
        p: Ping = msg  # type: ignore[assignment]
        return "ping", {
            "seq": p.seq,
            "target": p.target_id,
            "nonce": p.nonce,
            "pb": [item_to_plain(i) for i in p.piggyback],
        }
    if t is Ack:
        a: Ack = msg  # type: ignore[assignment]
        return "ack", {
            "seq": a.seq,
            "target": a.target_id,
            "proof": a.proof,
            "pb": [item_to_plain(i) for i in a.piggyback],
        }
    if t is PingReq:
        r: PingReq = msg  # type: ignore[assignment]
        return "ping_req", {"seq": r.seq, "target": r.target_id, "nonce": r.nonce}
    if t is Nack:
        return "nack", {"seq": msg.seq}  # type: ignore[union-attr]
    if t is Gossip:
        return "gossip", {"items": [item_to_plain(i) for i in msg.items]}  # type: ignore[union-attr]
    if t is PushPull or t is PushPullReply:
        body = {
            "members": [member_state_to_plain(s) for s in msg.members],  # type: ignore[union-attr]
            "cluster": [item_to_plain(s) for s in msg.cluster],  # type: ignore[union-attr]
        }
        if t is PushPull:
            body["join"] = msg.join  # type: ignore[union-attr]
            return "push_pull", body
        return "push_pull_reply", body
    raise TypeError(f"not a membership message: {msg!r}")


def encode(msg: Message) -> tuple[str, bytes]:
    """(type string, msgpack body) for the wire envelope."""
    kind, body = _enc(msg)
    return kind, msgpack.packb(body)


def item_size(item: Item) -> int:
    """Encoded size of one broadcast item (for piggyback byte budgets)."""
    return len(msgpack.packb(item_to_plain(item)))


def _dec_ping(m: dict[str, Any]) -> Ping:
    return Ping(
        _int(m["seq"], "seq"),
        _nid(m["target"], "target"),
        _bin(m["nonce"], "nonce", MAX_NONCE, MIN_NONCE),
        _items(m["pb"], MAX_PIGGYBACK),
    )


def _dec_ack(m: dict[str, Any]) -> Ack:
    return Ack(
        _int(m["seq"], "seq"),
        _nid(m["target"], "target"),
        _bin(m["proof"], "proof", MAX_SIG),
        _items(m["pb"], MAX_PIGGYBACK),
    )


def _dec_ping_req(m: dict[str, Any]) -> PingReq:
    return PingReq(
        _int(m["seq"], "seq"),
        _nid(m["target"], "target"),
        _bin(m["nonce"], "nonce", MAX_NONCE, MIN_NONCE),
    )


def _dec_state(m: dict[str, Any]) -> tuple[tuple[MemberState, ...], tuple[Statement, ...]]:
    members = tuple(member_state_from_plain(x) for x in _list(m["members"], "members", MAX_MEMBERS))
    cluster = _items(m["cluster"], MAX_STATEMENTS, STATEMENT_KINDS)
    return members, cluster  # type: ignore[return-value]


def _dec_push_pull(m: dict[str, Any]) -> PushPull:
    if type(m["join"]) is not bool:
        _fail("join: expected bool")
    members, cluster = _dec_state(m)
    return PushPull(m["join"], members, cluster)


def _dec_push_pull_reply(m: dict[str, Any]) -> PushPullReply:
    members, cluster = _dec_state(m)
    return PushPullReply(members, cluster)


_DECODERS = {
    "ping": (frozenset({"seq", "target", "nonce", "pb"}), _dec_ping),
    "ack": (frozenset({"seq", "target", "proof", "pb"}), _dec_ack),
    "ping_req": (frozenset({"seq", "target", "nonce"}), _dec_ping_req),
    "nack": (frozenset({"seq"}), lambda m: Nack(_int(m["seq"], "seq"))),
    "gossip": (frozenset({"items"}), lambda m: Gossip(_items(m["items"], MAX_GOSSIP_ITEMS))),
    "push_pull": (frozenset({"join", "members", "cluster"}), _dec_push_pull),
    "push_pull_reply": (frozenset({"members", "cluster"}), _dec_push_pull_reply),
}
MESSAGE_TYPES = frozenset(_DECODERS)


def _unpack(body: object) -> object:
    if not isinstance(body, bytes | bytearray | memoryview):
        _fail("body: expected bytes")
    if len(body) > MAX_BODY:  # type: ignore[arg-type]
        _fail("body: too large")
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=4096,
            max_bin_len=MAX_NOTE_VALUE,  # the largest bin field (signatures are 64 bytes)
            max_array_len=MAX_STATEMENTS,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, StackError,
        # UnicodeDecodeError, ValueError, ...) for hostile input; all mean "malformed".
        raise MessageError(f"body: malformed msgpack ({type(exc).__name__})") from None


def decode(type_str: str, body: bytes) -> Message:
    """Strictly decode a message body; raises MessageError (only) for anything invalid."""
    spec = _DECODERS.get(type_str) if type(type_str) is str else None
    if spec is None:
        raise MessageError(f"unknown message type {type_str!r}")
    keys, fn = spec
    m = _map(_unpack(body), type_str, keys)
    try:
        return fn(m)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("body: nested too deeply") from None


def decode_item(body: bytes) -> Item:
    """Decode a single item encoded with msgpack (used by tests and snapshots)."""
    return item_from_plain(_unpack(body))
