"""Pulling one artifact in verified chunks from the members that have it, sans-I/O.

The receiver asks every source for the artifact's `Manifest` (size, chunk size, sha256 of each
chunk), then requests chunks with `GetChunk`, at most a window of them in flight per source,
spread over the sources, retried elsewhere after a timeout. The node carries the messages in
its signed envelopes (`pack`/`unpack`), writes chunks where `Write` says and hashes the result
when told to (`Verify`); nothing here touches a socket, a file or a clock.

Why the manifest is not trusted, and how lies are caught. An artifact's digest is the plain
sha256 of its bytes -- the same name as in the store, in `sha256sum` and in build metadata --
so a manifest cannot be checked against the digest until the whole file is there. Chunk hashes
still pay off: a chunk that does not match is caught on arrival, and the check is attributable.
Chunks are only requested from sources whose own manifest equals the one in use, so a bad
chunk proves its sender inconsistent with itself (dropped, reason ``bad_chunk``) and the chunk
is fetched from another source. A sender can also lie consistently (a manifest describing
other bytes, and those bytes); only the final full-file hash catches that. When it fails, every
source that vouched for that manifest is dropped (``bad_manifest``), the manifest is never
accepted again, and the transfer continues with another manifest variant, keeping every chunk
whose hash that variant shares (in the common case of one wrong chunk, only that chunk is
fetched again). Among variants the one vouched for by the most live sources is used, so a lone
liar cannot stall the honest majority for long. Sources with a different manifest are kept
idle in reserve rather than accused: until the final hash, nobody can tell which side lied.

Flow control is per source: a congestion window starting at `window`, halved when a request
times out although later ones were answered (a lost message), cut to one request when the
source fell silent, and grown back by one per good chunk. A source silent through
`max_strikes` timeout periods in a row is dropped (``timeout``); lost messages alone never
drop a source that keeps answering. The transfer ends with `Done`, or `Failed` once no source is
left, with every source's reason in `Receiver.failures`.

Frames stay under the transport's 1 MiB: chunks are at most `MAX_CHUNK` (512 KiB) and
manifests list at most `MAX_CHUNKS` (16,384) hashes, so `chunk_size_for` grows the chunk size
from 256 KiB for objects over 4 GiB, and one transfer carries at most 8 GiB (`MAX_TRANSFER`).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .store import ArtifactStore, ObjectMissing, check_digest, is_digest

__all__ = [
    "DEFAULT_CHUNK",
    "MAX_CHUNK",
    "MAX_CHUNKS",
    "MAX_TRANSFER",
    "MESSAGE_TYPES",
    "MIN_CHUNK",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "ChunkReply",
    "Done",
    "Failed",
    "GetChunk",
    "GetManifest",
    "Manifest",
    "ManifestReply",
    "Message",
    "NotFound",
    "Receiver",
    "Refused",
    "Send",
    "Sender",
    "TransferError",
    "Verify",
    "Write",
    "build_manifest",
    "chunk_size_for",
    "decode",
    "encode",
    "pack",
    "unpack",
]

DEFAULT_CHUNK = 256 << 10
MIN_CHUNK = 1 << 10
MAX_CHUNK = 512 << 10
MAX_CHUNKS = 16384
MAX_TRANSFER = MAX_CHUNKS * MAX_CHUNK
HASH_LEN = 32
MAX_REASON = 64
_REASON_RE = re.compile(r"[a-z0-9][a-z0-9_.:-]*")
MAX_BODY = MAX_CHUNK + 1024
"""The largest body: a full chunk plus its small map (a full manifest is 512 KiB + change)."""
TYPE_PREFIX = "artifact."


class TransferError(ValueError):
    """An object or body that is not a valid transfer message."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_size_for(size: int, base: int = DEFAULT_CHUNK) -> int:
    """The chunk size for an object of `size` bytes: `base`, doubled until the chunks fit."""
    cs = base
    while cs < MAX_CHUNK and _chunks(size, cs) > MAX_CHUNKS:
        cs *= 2
    if _chunks(size, cs) > MAX_CHUNKS:
        raise TransferError(f"{size} bytes is more than one transfer carries ({MAX_TRANSFER})")
    return cs


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a sender says the artifact is. Constructing one checks its internal consistency."""

    digest: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not is_digest(self.digest):
            raise TransferError("manifest.digest: not a sha256 hex digest")
        if type(self.size) is not int or not 0 <= self.size <= MAX_TRANSFER:
            raise TransferError(f"manifest.size: expected int in [0, {MAX_TRANSFER}]")
        cs = self.chunk_size
        if type(cs) is not int or not MIN_CHUNK <= cs <= MAX_CHUNK or not _is_pow2(cs):
            raise TransferError("manifest.chunk_size: expected a power of two in range")
        if type(self.chunk_hashes) is not tuple or len(self.chunk_hashes) != _chunks(self.size, cs):
            raise TransferError("manifest.chunk_hashes: wrong number of hashes for the size")
        if len(self.chunk_hashes) > MAX_CHUNKS:
            raise TransferError("manifest.chunk_hashes: too many chunks")
        for h in self.chunk_hashes:
            if type(h) is not bytes or len(h) != HASH_LEN:
                raise TransferError("manifest.chunk_hashes: expected 32-byte hashes")

    @property
    def count(self) -> int:
        return len(self.chunk_hashes)

    def offset(self, index: int) -> int:
        return index * self.chunk_size

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True, slots=True)
class GetManifest:
    digest: str


@dataclass(frozen=True, slots=True)
class ManifestReply:
    manifest: Manifest

    @property
    def digest(self) -> str:
        return self.manifest.digest


@dataclass(frozen=True, slots=True)
class GetChunk:
    digest: str
    index: int


@dataclass(frozen=True, slots=True)
class ChunkReply:
    digest: str
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class NotFound:
    """The sender does not have (a sound copy of) the artifact."""

    digest: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The sender will not answer: reason is e.g. ``bad_index``, ``too_large``, ``io_error``."""

    digest: str
    reason: str


Message = GetManifest | ManifestReply | GetChunk | ChunkReply | NotFound | Refused
Request = GetManifest | GetChunk

_KINDS: dict[type, str] = {
    GetManifest: "get_manifest",
    ManifestReply: "manifest",
    GetChunk: "get_chunk",
    ChunkReply: "chunk",
    NotFound: "not_found",
    Refused: "refused",
}
_CLASSES = {kind: cls for cls, kind in _KINDS.items()}
MESSAGE_TYPES = frozenset(TYPE_PREFIX + k for k in _CLASSES)
REQUEST_TYPES = frozenset({TYPE_PREFIX + "get_manifest", TYPE_PREFIX + "get_chunk"})
"""Envelope types the node routes to its `Sender`; the rest go to the digest's `Receiver`."""
REPLY_TYPES = MESSAGE_TYPES - REQUEST_TYPES
_FIELDS: dict[type, tuple[str, ...]] = {
    GetManifest: ("digest",),
    ManifestReply: ("digest", "size", "chunk_size", "hashes"),
    GetChunk: ("digest", "index"),
    ChunkReply: ("digest", "index", "data"),
    NotFound: ("digest",),
    Refused: ("digest", "reason"),
}
_KEYS = {cls: frozenset({"k", *names}) for cls, names in _FIELDS.items()}

# ---------------------------------------------------------------------------------------------
# Codec


def encode(msg: Message) -> dict[str, Any]:
    """The plain (msgpack-able) form: {"k": kind, field: value, ...}."""
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"not a transfer message: {msg!r:.80}")
    if type(msg) is ManifestReply:
        m = msg.manifest
        return {
            "k": kind,
            "digest": m.digest,
            "size": m.size,
            "chunk_size": m.chunk_size,
            "hashes": b"".join(m.chunk_hashes),
        }
    plain: dict[str, Any] = {"k": kind}
    for name in _FIELDS[type(msg)]:
        plain[name] = getattr(msg, name)
    return plain


def _digest(v: object) -> str:
    if not is_digest(v):
        raise TransferError("digest: expected 64 lowercase hex characters")
    return v  # type: ignore[return-value]


def _index(v: object) -> int:
    if type(v) is not int or not 0 <= v < MAX_CHUNKS:
        raise TransferError(f"index: expected int in [0, {MAX_CHUNKS})")
    return v


def _bytes(v: object, what: str, maxlen: int) -> bytes:
    if type(v) is not bytes or len(v) > maxlen:
        raise TransferError(f"{what}: expected bytes of at most {maxlen}")
    return v


def decode(obj: object) -> Message:
    """Strictly rebuild a message from its plain form; raises TransferError (only)."""
    if type(obj) is not dict:
        raise TransferError("message: expected a map")
    kind = obj.get("k")
    cls = _CLASSES.get(kind) if type(kind) is str else None
    if cls is None:
        raise TransferError(f"message: unknown kind {kind!r:.40}")
    if obj.keys() != _KEYS[cls]:
        raise TransferError(f"{kind}: expected keys {sorted(_KEYS[cls])}")
    digest = _digest(obj["digest"])
    if cls is GetManifest:
        return GetManifest(digest)
    if cls is NotFound:
        return NotFound(digest)
    if cls is GetChunk:
        return GetChunk(digest, _index(obj["index"]))
    if cls is ChunkReply:
        return ChunkReply(digest, _index(obj["index"]), _bytes(obj["data"], "data", MAX_CHUNK))
    if cls is Refused:
        reason = obj["reason"]
        if type(reason) is not str or len(reason) > MAX_REASON or not _REASON_RE.fullmatch(reason):
            # A machine token, not prose: it ends up in logs and in `Failed.reason`.
            raise TransferError(f"reason: expected a token of [a-z0-9_.:-], at most {MAX_REASON}")
        return Refused(digest, reason)
    hashes = _bytes(obj["hashes"], "hashes", MAX_CHUNKS * HASH_LEN)
    if len(hashes) % HASH_LEN:
        raise TransferError("hashes: not a whole number of sha256 hashes")
    split = tuple(hashes[i : i + HASH_LEN] for i in range(0, len(hashes), HASH_LEN))
    return ManifestReply(Manifest(digest, obj["size"], obj["chunk_size"], split))


def pack(msg: Message) -> tuple[str, bytes]:
    """(envelope type string, msgpack body)."""
    plain = encode(msg)
    return TYPE_PREFIX + plain["k"], msgpack.packb(plain)


def unpack(type_str: str, body: bytes) -> Message:
    """Decode an envelope body; the type string must agree with the body's kind."""
    if type(type_str) is not str or type_str not in MESSAGE_TYPES:
        raise TransferError(f"unknown message type {type_str!r:.40}")
    if not isinstance(body, bytes | bytearray | memoryview) or len(body) > MAX_BODY:
        raise TransferError(f"body: expected bytes of at most {MAX_BODY}")
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=64,  # the digest and the reason; keys and kinds are shorter
            max_bin_len=MAX_CHUNK,
            max_array_len=0,
            max_map_len=8,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for hostile input; all mean malformed.
        raise TransferError(f"body: malformed msgpack ({type(exc).__name__})") from None
    msg = decode(obj)
    if TYPE_PREFIX + _KINDS[type(msg)] != type_str:
        raise TransferError("body: kind does not match the envelope type")
    return msg


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Write:
    """Write `data` at `offset` of the partial file (verified against the manifest in use)."""

    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Verify:
    """Every chunk is written: truncate the partial file to `size`, hash it, and report the
    result with `Receiver.verified` (e.g. ``verified(now, incoming.commit(size))``)."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Done:
    digest: str


@dataclass(frozen=True, slots=True)
class Failed:
    digest: str
    reason: str


Output = Send | Write | Verify | Done | Failed

# ---------------------------------------------------------------------------------------------
# Receiver

FETCHING = "fetching"
VERIFYING = "verifying"
DONE = "done"
FAILED = "failed"


@dataclass(slots=True)
class _Source:
    id: str
    order: int
    cwnd: int
    manifest: Manifest | None = None  # interned: equal manifests are the same object
    asked_at: float | None = None  # when the outstanding GetManifest went out
    inflight: dict[int, float] = field(default_factory=dict)  # chunk index -> sent at
    heard_at: float = -math.inf  # last valid reply
    strikes: int = 0  # silent timeouts since then
    struck_at: float = -math.inf


class Receiver:
    """Fetches one artifact from `sources`; see the module docstring for the protocol.

    Feed it `handle` (messages, sender authenticated by the transport), `tick` (time) and
    `verified` (the shell's full-file check after `Verify`); collect outputs with `drain`.
    `size`, when known from build metadata, rejects manifests of another size up front.
    """

    def __init__(
        self,
        digest: str,
        sources: list[str],
        now: float,
        *,
        window: int = 8,
        timeout: float = 10.0,
        max_strikes: int = 3,
        size: int | None = None,
        max_size: int = MAX_TRANSFER,
    ) -> None:
        if window < 1 or timeout <= 0 or max_strikes < 1:
            raise ValueError("window and max_strikes must be >= 1 and timeout > 0")
        self.digest = check_digest(digest)
        self.window = window
        self.timeout = timeout
        self.max_strikes = max_strikes
        self.expected_size = size
        self.max_size = max_size
        self.counters: Counter[str] = Counter()
        self.failures: dict[str, str] = {}
        self.state = FETCHING
        self._out: list[Output] = []
        self._sources: dict[str, _Source] = {}
        self._order = 0
        self._variants: list[Manifest] = []
        self._rejected: list[Manifest] = []
        self._manifest: Manifest | None = None
        self._got: dict[int, bytes] = {}  # chunk index -> hash of the data written there
        self._got_chunk_size = 0
        self._todo: list[int] = []  # heap of chunk indices to request (lazy deletion)
        self._todo_set: set[int] = set()
        self._avoid: dict[int, str] = {}  # chunk index -> source it just timed out on
        for s in sources:
            self.add_source(now, s)
        self._settle(now)

    # ------------------------------------------------------------------ public API

    @property
    def manifest(self) -> Manifest | None:
        """The manifest currently fetched against (None until one arrives)."""
        return self._manifest

    @property
    def sources(self) -> frozenset[str]:
        """Sources still in play."""
        return frozenset(self._sources)

    def in_flight(self) -> dict[str, int]:
        """Outstanding chunk requests per source (never above `window`)."""
        return {s.id: len(s.inflight) for s in self._sources.values()}

    def received(self) -> int:
        return len(self._got)

    def drain(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def add_source(self, now: float, source: str) -> None:
        """Another member that has the artifact (e.g. a binhost that just joined).

        A source dropped for silence may be added back (it reconnected); one caught serving
        bad data may not. A source still waited on for its manifest is asked again at once:
        being named again means it was just heard from, and the first ask may have gone down
        a connection that has died since (else it would cost a whole timeout).
        """
        if self.state in (DONE, FAILED):
            return
        known = self._sources.get(source)
        if known is not None:
            if known.manifest is None and known.asked_at is not None:
                self.counters["reasked"] += 1
                self._ask_manifest(now, known)
            return
        if self.failures.get(source, "timeout") != "timeout":
            return
        self.failures.pop(source, None)
        self._order += 1
        self._sources[source] = _Source(source, self._order, self.window)
        self._ask_manifest(now, self._sources[source])

    def remove_source(self, now: float, source: str, reason: str) -> None:
        """A source known to be gone (membership declared it dead): dropped now rather than
        after `max_strikes` timeouts of silence; the fetch fails at once if it was the last."""
        s = self._sources.get(source)
        if s is None or self.state in (DONE, FAILED):
            return
        self._drop(s, reason)
        self._settle(now)

    def handle(self, now: float, src: str, msg: Message) -> None:
        if self.state in (DONE, FAILED):
            self.counters["drop_late"] += 1
            return
        s = self._sources.get(src)
        if s is None:
            self.counters["drop_unknown_source"] += 1
            return
        if type(msg) not in _REPLY_HANDLERS:
            self.counters["drop_unexpected"] += 1
            return
        if msg.digest != self.digest:
            self.counters["drop_wrong_digest"] += 1
            return
        _REPLY_HANDLERS[type(msg)](self, now, s, msg)
        self._settle(now)

    def tick(self, now: float) -> None:
        """Time out manifest and chunk requests; retry them, elsewhere when possible."""
        if self.state != FETCHING:
            return
        for s in list(self._sources.values()):
            late = s.asked_at is not None and now - s.asked_at >= self.timeout
            if late:
                s.asked_at = None
            expired = [(i, t) for i, t in s.inflight.items() if now - t >= self.timeout]
            for i, _ in expired:
                del s.inflight[i]
                self._avoid[i] = s.id
                self._requeue(i)
            if late or expired:
                self.counters["timeouts"] += len(expired) + late
                # Silent: nothing heard since the request went out. A source that answered
                # later requests only lost a message: halve its window, no strike.
                silent = late or any(t >= s.heard_at for _, t in expired)
                s.cwnd = 1 if silent else max(1, s.cwnd // 2)
                if silent and now - s.struck_at >= self.timeout:  # one strike per period
                    s.strikes += 1
                    s.struck_at = now
                    if s.strikes >= self.max_strikes:
                        self._drop(s, "timeout")
                        continue
            if s.manifest is None and s.asked_at is None:
                self._ask_manifest(now, s)
        self._settle(now)

    def verified(self, now: float, ok: bool) -> None:
        """The shell's verdict on the assembled file after `Verify`."""
        if self.state != VERIFYING:
            raise RuntimeError(f"verified() in state {self.state}")
        if ok:
            self.state = DONE
            self._out.append(Done(self.digest))
            return
        bad = self._manifest
        assert bad is not None
        self.counters["bad_manifest"] += 1
        self._rejected.append(bad)
        self._variants = [v for v in self._variants if v is not bad]
        for s in list(self._sources.values()):
            if s.manifest is bad:
                self._drop(s, "bad_manifest")
        self._manifest = None
        self.state = FETCHING
        self._settle(now)

    def cancel(self, reason: str) -> None:
        """Give up (e.g. the partial file cannot be written): emits `Failed`."""
        if self.state not in (DONE, FAILED):
            self._fail(reason)

    # ------------------------------------------------------------------ replies

    def _on_manifest(self, now: float, s: _Source, msg: ManifestReply) -> None:
        m = msg.manifest
        if (
            m.size > self.max_size
            or (self.expected_size is not None and m.size != self.expected_size)
            or m in self._rejected
        ):
            self._drop(s, "bad_manifest")
            return
        if s.manifest is not None:
            if s.manifest != m:
                self._drop(s, "bad_manifest")  # two different stories from one source
            else:
                self.counters["drop_duplicate"] += 1
            return
        s.manifest = self._intern(m)
        s.asked_at = None
        self._heard(now, s)

    def _on_chunk(self, now: float, s: _Source, msg: ChunkReply) -> None:
        i = msg.index
        sent = s.inflight.pop(i, None)
        m = self._manifest
        if m is None or s.manifest is not m:
            self.counters["drop_unsolicited"] += 1  # not (or no longer) fetching from it
            self._requeue(i)
            return
        if (
            i >= m.count
            or len(msg.data) != m.chunk_len(i)
            or hashlib.sha256(msg.data).digest() != m.chunk_hashes[i]
        ):
            self._drop(s, "bad_chunk")
            self._requeue(i)
            return
        self._heard(now, s)
        s.cwnd = min(self.window, s.cwnd + 1)
        if i in self._got:
            self.counters["drop_duplicate"] += 1
            return
        if sent is None:
            self.counters["late_chunk"] += 1  # verified, so still useful
        self._got[i] = m.chunk_hashes[i]
        self._todo_set.discard(i)
        self.counters["chunks"] += 1
        self.counters["bytes"] += len(msg.data)
        self._out.append(Write(m.offset(i), msg.data))

    def _on_not_found(self, now: float, s: _Source, msg: NotFound) -> None:
        self._drop(s, "not_found")

    def _on_refused(self, now: float, s: _Source, msg: Refused) -> None:
        self._drop(s, f"refused: {msg.reason}")

    # ------------------------------------------------------------------ internals

    def _ask_manifest(self, now: float, s: _Source) -> None:
        s.asked_at = now
        self._out.append(Send(s.id, GetManifest(self.digest)))

    def _heard(self, now: float, s: _Source) -> None:
        s.heard_at = now
        s.strikes = 0

    def _intern(self, m: Manifest) -> Manifest:
        """Equal manifests become one object, so "same manifest" is an `is` test later."""
        for v in self._variants:
            if v == m:
                return v
        self._variants.append(m)
        return m

    def _drop(self, s: _Source, reason: str) -> None:
        del self._sources[s.id]
        self.failures[s.id] = reason
        self.counters["dropped_" + reason.split(":")[0]] += 1
        for i in s.inflight:
            self._requeue(i)

    def _requeue(self, i: int) -> None:
        m = self._manifest
        if m is None or i >= m.count or i in self._got or i in self._todo_set:
            return
        if any(i in s.inflight for s in self._sources.values() if s.manifest is m):
            return
        self._todo_set.add(i)
        heapq.heappush(self._todo, i)

    def _adopt(self, m: Manifest) -> None:
        """Fetch against `m` from now on, keeping every chunk it agrees with."""
        if m.chunk_size != self._got_chunk_size:
            self._got.clear()
            self._got_chunk_size = m.chunk_size
        self._got = {i: h for i, h in self._got.items() if i < m.count and m.chunk_hashes[i] == h}
        self._manifest = m
        busy = {i for s in self._sources.values() if s.manifest is m for i in s.inflight}
        # Sorted, so already a valid heap.
        self._todo = [i for i in range(m.count) if i not in self._got and i not in busy]
        self._todo_set = set(self._todo)
        self._avoid.clear()
        self.counters["manifests_adopted"] += 1

    def _settle(self, now: float) -> None:
        """Pick the manifest to fetch against, detect the end, and send what the windows allow."""
        if self.state in (DONE, FAILED, VERIFYING):
            return  # while verifying, losing sources does not matter unless the check fails
        if not self._sources:
            why = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())) or "no sources"
            self._fail(f"no source left ({why})")
            return
        votes: Counter[int] = Counter()
        for s in self._sources.values():
            if s.manifest is not None:
                votes[id(s.manifest)] += 1
        if votes:
            best_id, best = max(votes.items(), key=lambda kv: kv[1])
            current = votes.get(id(self._manifest), 0) if self._manifest is not None else 0
            if best > current:
                self._adopt(next(v for v in self._variants if id(v) == best_id))
        elif self._manifest is not None:
            self._manifest = None  # nobody serves it any more; wait for other manifests
        m = self._manifest
        if m is None:
            return
        if len(self._got) == m.count:
            self.state = VERIFYING
            self._out.append(Verify(self.digest, m.size))
            return
        self._pump(now, m)

    def _pump(self, now: float, m: Manifest) -> None:
        group = [s for s in self._sources.values() if s.manifest is m]
        while self._todo:
            i = self._todo[0]
            if i not in self._todo_set:
                heapq.heappop(self._todo)
                continue
            open_ = [s for s in group if len(s.inflight) < s.cwnd]
            if not open_:
                return
            avoid = self._avoid.get(i)
            if len(open_) > 1 and avoid is not None:
                open_ = [s for s in open_ if s.id != avoid]
            s = min(open_, key=lambda x: (len(x.inflight), x.order))
            heapq.heappop(self._todo)
            self._todo_set.discard(i)
            s.inflight[i] = now
            self._out.append(Send(s.id, GetChunk(self.digest, i)))

    def _fail(self, reason: str) -> None:
        self.state = FAILED
        self._out.append(Failed(self.digest, reason))


_REPLY_HANDLERS: dict[type, Any] = {
    ManifestReply: Receiver._on_manifest,
    ChunkReply: Receiver._on_chunk,
    NotFound: Receiver._on_not_found,
    Refused: Receiver._on_refused,
}

# ---------------------------------------------------------------------------------------------
# Sender


def build_manifest(
    store: ArtifactStore, digest: str, base_chunk: int = DEFAULT_CHUNK
) -> Manifest | None:
    """Hash the stored object chunk by chunk; None (and the object quarantined) if corrupt.

    Raises ObjectMissing if absent, TransferError if too large to transfer.
    """
    size = store.size(digest)
    cs = chunk_size_for(size, base_chunk)
    whole = hashlib.sha256()
    hashes: list[bytes] = []
    with store.open(digest) as f:
        while block := f.read(cs):
            whole.update(block)
            hashes.append(hashlib.sha256(block).digest())
    if whole.hexdigest() != digest or len(hashes) != _chunks(size, cs):
        store.quarantine(digest)
        return None
    return Manifest(digest, size, cs, tuple(hashes))


class Sender:
    """Serves `GetManifest`/`GetChunk` for any member from the store (the shell authorizes).

    Building a manifest reads and verifies the whole object (a corrupt one is quarantined and
    answered `NotFound`), so the last `cache` manifests are kept. Calls block on disk reads:
    the node runs them off its event loop.
    """

    def __init__(self, store: ArtifactStore, *, chunk_size: int = DEFAULT_CHUNK, cache: int = 16):
        if not (MIN_CHUNK <= chunk_size <= MAX_CHUNK and _is_pow2(chunk_size)) or cache < 1:
            raise ValueError("chunk_size must be a power of two in range; cache >= 1")
        self.store = store
        self.chunk_size = chunk_size
        self.counters: Counter[str] = Counter()
        self._cache: OrderedDict[str, Manifest] = OrderedDict()
        self._cache_max = cache

    def handle(self, src: str, msg: Message) -> Send | None:
        """The reply to a request from `src`; None (counted) for anything but a request."""
        if type(msg) is GetManifest:
            reply: Message = self._manifest_reply(msg.digest)
        elif type(msg) is GetChunk:
            reply = self._chunk_reply(msg.digest, msg.index)
        else:
            self.counters["drop_unexpected"] += 1
            return None
        self.counters["sent_" + _KINDS[type(reply)]] += 1
        return Send(src, reply)

    def _manifest(self, digest: str) -> Manifest | None:
        m = self._cache.get(digest)
        if m is not None:
            self._cache.move_to_end(digest)
            return m
        m = build_manifest(self.store, digest, self.chunk_size)
        if m is not None:
            self._cache[digest] = m
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return m

    def _manifest_reply(self, digest: str) -> Message:
        try:
            m = self._manifest(digest)
        except ObjectMissing:
            return NotFound(digest)
        except TransferError:
            return Refused(digest, "too_large")
        except OSError:
            return Refused(digest, "io_error")
        return NotFound(digest) if m is None else ManifestReply(m)

    def _chunk_reply(self, digest: str, index: int) -> Message:
        try:
            m = self._cache.get(digest)
            # The chunk size is a function of the size, so a chunk needs no manifest in cache.
            size = m.size if m is not None else self.store.size(digest)
            cs = m.chunk_size if m is not None else chunk_size_for(size, self.chunk_size)
            if index * cs >= size:
                return Refused(digest, "bad_index")
            want = min(cs, size - index * cs)
            with self.store.open(digest) as f:
                f.seek(index * cs)
                data = f.read(want)
        except ObjectMissing:
            return NotFound(digest)
        except TransferError:
            return Refused(digest, "too_large")
        except OSError:
            return Refused(digest, "io_error")
        if len(data) != want:
            return Refused(digest, "io_error")
        return ChunkReply(digest, index, data)
