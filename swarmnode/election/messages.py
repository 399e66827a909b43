"""Election and replication messages: frozen dataclasses and a strict codec.

`encode` gives a msgpack-friendly plain dict (with its kind under "k") and `decode` turns any
object back into a fully validated message or raises `MessageError` -- never another exception,
whatever the input -- so the state machine can trust field types and bounds. `pack`/`unpack`
wrap the same forms for the signed envelope (type string "election.<kind>", msgpack body).

A field named `term` always carries the sender's current term, so the receiver can apply Raft's
"a higher term wins" rule uniformly. `PreVote` has no `term` on purpose: it asks about a term
nobody holds yet and must not move anyone's term.

Heartbeats are `AppendEntries` (with no entries when the follower is up to date): one message
both keeps the leader's authority and probes where the follower's log matches, so a follower
that missed entries is found by the next heartbeat, not by a separate timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .log import MAX_ENTRY
from .proof import MAX_PROOF_VOTERS, SIGNATURE_BYTES

MAX_U63 = (1 << 63) - 1
MAX_ID = 64
"""Node ids are opaque strings; 64 is the envelope's longest string (the 52-char id fits)."""
MAX_BODY = 1024
"""Every message without entries or snapshot data is a few dozen bytes."""
MAX_BULK_BODY = 960 * 1024
"""AppendEntries and InstallSnapshot bodies: the 1 MiB wire frame minus the envelope."""
MAX_APPEND_ENTRIES = 4096
"""Entries in one AppendEntries (the leader also caps a batch's bytes: max_append_bytes)."""
MAX_CHUNK = 256 * 1024
"""Snapshot bytes in one InstallSnapshot."""
MAX_PROOF_BODY = 4096
"""A `LeaderProof` names at most MAX_PROOF_VOTERS voters and as many signed votes: about 1.6 KiB."""
TYPE_PREFIX = "election."


class MessageError(ValueError):
    """An object or body that is not a valid election message."""


@dataclass(frozen=True, slots=True)
class PreVote:
    """Asks "would you vote for me in `next_term`?" (the sender's term + 1); changes nothing.
    Carries the candidate's last log position because a voter only says yes to a log at least
    as up to date as its own, exactly as it would in the real vote."""

    next_term: int
    candidate: str
    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    """`next_term` echoes the question; `term` is the replier's own, so a laggard catches up."""

    next_term: int
    granted: bool
    term: int


@dataclass(frozen=True, slots=True)
class RequestVote:
    """The vote restriction's input: a voter refuses a candidate whose log ends at a lower
    (last_term, last_index) than its own, so a leader always holds every committed entry."""

    term: int
    candidate: str
    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True)
class VoteReply:
    term: int
    granted: bool


@dataclass(frozen=True, slots=True)
class AppendEntries:
    """The leader's heartbeat and log replication in one. `entries` are (term, data) for the
    indexes prev_index + 1, ...; the follower accepts them only if its log holds prev_index
    with prev_term (log matching). `seq` grows with every heartbeat round of one leadership: a
    reply names the round it answers, so the leader knows when that round was sent (its lease
    starts then). `commit` is the leader's commit index."""

    term: int
    leader: str
    seq: int
    prev_index: int
    prev_term: int
    commit: int
    entries: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class AppendReply:
    """Acknowledges round `seq` when `term` equals the leader's (a higher `term` deposes it).
    `success`: the follower's log matches the leader's through `index`. Otherwise `index` is
    where the leader should try next (the follower's log is shorter, or conflicts from there)."""

    term: int
    seq: int
    success: bool
    index: int


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """One chunk of the leader's snapshot, for a follower that needs entries the leader has
    compacted away. Chunks go one at a time, each after the previous one is acknowledged."""

    term: int
    leader: str
    seq: int
    index: int
    snap_term: int
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class SnapshotReply:
    """The follower holds `offset` bytes of snapshot `index` and wants the rest (a completed
    install is acknowledged with an `AppendReply` instead)."""

    term: int
    seq: int
    index: int
    offset: int


@dataclass(frozen=True, slots=True)
class VoteProof:
    """The signature behind a granted vote: the voter's over `vote_payload(term, candidate)`.
    Sent just before the `VoteReply` it backs (a separate message, so a voter still elects a
    candidate of the previous release, which knows only `VoteReply`)."""

    term: int
    candidate: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class LeaderProof:
    """`leader` was elected in `term` by `voters`: `votes` are (voter, signature) pairs, at
    least a majority of `voters`. A follower accepts a leader's messages of a term only after
    it checked this (election/proof.py)."""

    term: int
    leader: str
    voters: tuple[str, ...]
    votes: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class ProofRequest:
    """A follower heard a leader of `term` it has no proof for (it restarted, or the proof was
    lost): please send the `LeaderProof` again."""

    term: int


Message = (
    PreVote
    | PreVoteReply
    | RequestVote
    | VoteReply
    | AppendEntries
    | AppendReply
    | InstallSnapshot
    | SnapshotReply
    | VoteProof
    | LeaderProof
    | ProofRequest
)

_KINDS: dict[type, str] = {
    PreVote: "pre_vote",
    PreVoteReply: "pre_vote_reply",
    RequestVote: "request_vote",
    VoteReply: "vote_reply",
    AppendEntries: "append_entries",
    AppendReply: "append_reply",
    InstallSnapshot: "install_snapshot",
    SnapshotReply: "snapshot_reply",
    VoteProof: "vote_proof",
    LeaderProof: "leader_proof",
    ProofRequest: "proof_request",
}
_CLASSES = {kind: cls for cls, kind in _KINDS.items()}
MESSAGE_CLASSES = frozenset(_KINDS)
"""Every election message class (for a simulator's dispatch)."""
MESSAGE_TYPES = frozenset(TYPE_PREFIX + kind for kind in _CLASSES)
"""Envelope type strings of election messages (for the shell's dispatch)."""

# Field name -> validator; the dataclass field order is the constructor order.
_INT = "int"
_BOOL = "bool"
_ID = "id"
_CHUNK = "chunk"
_ENTRIES = "entries"
_SIG = "sig"
_IDS = "ids"
_VOTES = "votes"
_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {
    PreVote: (("next_term", _INT), ("candidate", _ID), ("last_index", _INT), ("last_term", _INT)),
    PreVoteReply: (("next_term", _INT), ("granted", _BOOL), ("term", _INT)),
    RequestVote: (("term", _INT), ("candidate", _ID), ("last_index", _INT), ("last_term", _INT)),
    VoteReply: (("term", _INT), ("granted", _BOOL)),
    AppendEntries: (
        ("term", _INT),
        ("leader", _ID),
        ("seq", _INT),
        ("prev_index", _INT),
        ("prev_term", _INT),
        ("commit", _INT),
        ("entries", _ENTRIES),
    ),
    AppendReply: (("term", _INT), ("seq", _INT), ("success", _BOOL), ("index", _INT)),
    InstallSnapshot: (
        ("term", _INT),
        ("leader", _ID),
        ("seq", _INT),
        ("index", _INT),
        ("snap_term", _INT),
        ("offset", _INT),
        ("data", _CHUNK),
        ("done", _BOOL),
    ),
    SnapshotReply: (("term", _INT), ("seq", _INT), ("index", _INT), ("offset", _INT)),
    VoteProof: (("term", _INT), ("candidate", _ID), ("sig", _SIG)),
    LeaderProof: (("term", _INT), ("leader", _ID), ("voters", _IDS), ("votes", _VOTES)),
    ProofRequest: (("term", _INT),),
}
_KEYS = {cls: frozenset({"k", *(name for name, _ in spec)}) for cls, spec in _FIELDS.items()}
_BULK = {AppendEntries, InstallSnapshot}
_PROOFS = {VoteProof, LeaderProof}


def _is_u63(value: object) -> bool:
    # `type(...) is` because bool is an int subclass and must not pass as a term.
    return type(value) is int and 0 <= value <= MAX_U63


def _entries(value: object, what: str) -> tuple[tuple[int, bytes], ...]:
    if type(value) not in (list, tuple) or len(value) > MAX_APPEND_ENTRIES:  # type: ignore[arg-type]
        raise MessageError(f"{what}: expected a list of at most {MAX_APPEND_ENTRIES} entries")
    out = []
    for item in value:  # type: ignore[attr-defined]
        if (
            type(item) not in (list, tuple)
            or len(item) != 2
            or not _is_u63(item[0])
            or type(item[1]) is not bytes
            or len(item[1]) > MAX_ENTRY
        ):
            raise MessageError(f"{what}: expected [term, bytes] pairs")
        out.append((item[0], item[1]))
    return tuple(out)


def _is_id(value: object) -> bool:
    return type(value) is str and 1 <= len(value) <= MAX_ID


def _is_sig(value: object) -> bool:
    return type(value) is bytes and len(value) == SIGNATURE_BYTES


def _list(value: object, what: str) -> list[Any]:
    if type(value) not in (list, tuple) or len(value) > MAX_PROOF_VOTERS:  # type: ignore[arg-type]
        raise MessageError(f"{what}: expected a list of at most {MAX_PROOF_VOTERS}")
    return list(value)  # type: ignore[call-overload]


def _ids(value: object, what: str) -> tuple[str, ...]:
    items = _list(value, what)
    if not all(_is_id(i) for i in items) or len(set(items)) != len(items):
        raise MessageError(f"{what}: expected distinct ids")
    return tuple(items)


def _votes(value: object, what: str) -> tuple[tuple[str, bytes], ...]:
    out = []
    for item in _list(value, what):
        if type(item) not in (list, tuple) or len(item) != 2 or not _is_id(item[0]) \
                or not _is_sig(item[1]):
            raise MessageError(f"{what}: expected [id, signature] pairs")
        out.append((item[0], item[1]))
    return tuple(out)


def _check(value: object, how: str, what: str) -> Any:
    if how == _ENTRIES:
        return _entries(value, what)
    if how == _IDS:
        return _ids(value, what)
    if how == _VOTES:
        return _votes(value, what)
    if how == _INT:
        ok = _is_u63(value)
    elif how == _BOOL:
        ok = type(value) is bool
    elif how == _CHUNK:
        ok = type(value) is bytes and len(value) <= MAX_CHUNK
    elif how == _SIG:
        ok = _is_sig(value)
    else:
        ok = _is_id(value)
    if not ok:
        raise MessageError(f"{what}: expected {how}")
    return value


def encode(msg: Message) -> dict[str, Any]:
    """The plain (msgpack-able) form: {"k": kind, field: value, ...}."""
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"not an election message: {msg!r}")
    plain: dict[str, Any] = {"k": kind}
    for name, how in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        plain[name] = [list(e) for e in value] if how in (_ENTRIES, _VOTES) else (
            list(value) if how == _IDS else value)
    return plain


def decode(obj: object) -> Message:
    """Strictly rebuild a message from its plain form; raises MessageError (only)."""
    if type(obj) is not dict:
        raise MessageError("message: expected a map")
    kind = obj.get("k")
    cls = _CLASSES.get(kind) if type(kind) is str else None
    if cls is None:
        raise MessageError(f"message: unknown kind {kind!r}")
    if obj.keys() != _KEYS[cls]:
        raise MessageError(f"{kind}: expected keys {sorted(_KEYS[cls])}")
    args = [_check(obj[name], how, f"{kind}.{name}") for name, how in _FIELDS[cls]]
    return cls(*args)


def pack(msg: Message) -> tuple[str, bytes]:
    """(envelope type string, msgpack body)."""
    plain = encode(msg)
    return TYPE_PREFIX + plain["k"], msgpack.packb(plain, use_bin_type=True)


def unpack(type_str: str, body: bytes) -> Message:
    """Decode an envelope body; the type string must agree with the body's kind."""
    if type(type_str) is not str or type_str not in MESSAGE_TYPES:
        raise MessageError(f"unknown message type {type_str!r}")
    cls = _CLASSES[type_str[len(TYPE_PREFIX) :]]
    bulk, proof = cls in _BULK, cls in _PROOFS
    limit = MAX_BULK_BODY if bulk else MAX_PROOF_BODY if proof else MAX_BODY
    if not isinstance(body, bytes | bytearray | memoryview) or len(body) > limit:
        raise MessageError("body: expected bytes within the size limit of its type")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_ID,
            max_bin_len=max(MAX_ENTRY, MAX_CHUNK) if bulk else SIGNATURE_BYTES if proof else 0,
            max_array_len=MAX_APPEND_ENTRIES if bulk else MAX_PROOF_VOTERS if proof else 0,
            max_map_len=10,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for hostile input; all mean malformed.
        raise MessageError(f"body: malformed msgpack ({type(exc).__name__})") from None
    msg = decode(obj)
    if TYPE_PREFIX + obj["k"] != type_str:
        raise MessageError("body: kind does not match the envelope type")
    return msg
