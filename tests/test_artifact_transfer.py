"""Artifact transfer: codec strictness, the sender, and whole transfers through a lossy network."""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnode.artifacts.store import ArtifactStore
from swarmnode.artifacts.transfer import (
    DEFAULT_CHUNK,
    MAX_BODY,
    MAX_CHUNK,
    MAX_CHUNKS,
    MAX_TRANSFER,
    MESSAGE_TYPES,
    REPLY_TYPES,
    REQUEST_TYPES,
    ChunkReply,
    Done,
    Failed,
    GetChunk,
    GetManifest,
    Manifest,
    ManifestReply,
    Message,
    NotFound,
    Receiver,
    Refused,
    Send,
    Sender,
    TransferError,
    Verify,
    Write,
    build_manifest,
    chunk_size_for,
    decode,
    encode,
    pack,
    unpack,
)

CS = 1024
DATA = random.Random(7).randbytes(64 * CS + 100)  # 65 chunks, the last one short
D = hashlib.sha256(DATA).hexdigest()
H32 = b"\x11" * 32


def _manifest_of(data: bytes, cs: int = CS, digest: str | None = None) -> Manifest:
    hashes = tuple(hashlib.sha256(data[i : i + cs]).digest() for i in range(0, len(data), cs))
    return Manifest(digest or hashlib.sha256(data).hexdigest(), len(data), cs, hashes)


# ---------------------------------------------------------------------------------------------
# Codec

SAMPLES: list[Message] = [
    GetManifest(D),
    ManifestReply(_manifest_of(DATA)),
    ManifestReply(_manifest_of(b"")),
    GetChunk(D, 0),
    GetChunk(D, MAX_CHUNKS - 1),
    ChunkReply(D, 3, b"abc"),
    ChunkReply(D, 0, b""),
    NotFound(D),
    Refused(D, "bad_index"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg
    type_str, body = pack(msg)
    assert type_str in MESSAGE_TYPES
    assert unpack(type_str, body) == msg
    assert (type_str in REQUEST_TYPES) == isinstance(msg, GetManifest | GetChunk)
    assert REQUEST_TYPES | REPLY_TYPES == MESSAGE_TYPES


def test_largest_messages_fit_a_frame() -> None:
    big = Manifest(D, MAX_TRANSFER, MAX_CHUNK, (H32,) * MAX_CHUNKS)
    for msg in (ManifestReply(big), ChunkReply(D, MAX_CHUNKS - 1, b"x" * MAX_CHUNK)):
        t, body = pack(msg)
        assert len(body) <= MAX_BODY < (1 << 20) - 4096  # room for the signed envelope
        assert unpack(t, body) == msg


def test_chunk_size_for() -> None:
    assert chunk_size_for(0) == DEFAULT_CHUNK
    assert chunk_size_for(4 << 30) == DEFAULT_CHUNK
    assert chunk_size_for((4 << 30) + 1) == 2 * DEFAULT_CHUNK
    assert chunk_size_for(MAX_TRANSFER) == MAX_CHUNK
    assert chunk_size_for(10_000, 1024) == 1024
    with pytest.raises(TransferError):
        chunk_size_for(MAX_TRANSFER + 1)


@pytest.mark.parametrize(
    "fields",
    [
        {"digest": "x" * 64},
        {"digest": D.upper()},
        {"size": -1},
        {"size": MAX_TRANSFER + 1},
        {"size": True},
        {"chunk_size": 1000},
        {"chunk_size": 512},
        {"chunk_size": 2 * MAX_CHUNK},
        {"chunk_hashes": ()},
        {"chunk_hashes": (H32,) * 66},
        {"chunk_hashes": (b"short",) * 65},
        {"chunk_hashes": [H32] * 65},
    ],
)
def test_manifest_is_checked_on_construction(fields: dict[str, Any]) -> None:
    good = _manifest_of(DATA)
    args = {
        "digest": good.digest,
        "size": good.size,
        "chunk_size": good.chunk_size,
        "chunk_hashes": good.chunk_hashes,
    }
    with pytest.raises(TransferError):
        Manifest(**{**args, **fields})


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        {"k": "nope", "digest": D},
        {"k": "get_manifest"},
        {"k": "get_manifest", "digest": D, "extra": 1},
        {"k": "get_chunk", "digest": D, "index": -1},
        {"k": "get_chunk", "digest": D, "index": MAX_CHUNKS},
        {"k": "get_chunk", "digest": D, "index": True},
        {"k": "get_chunk", "digest": D, "index": 1.0},
        {"k": "chunk", "digest": D, "index": 0, "data": "text"},
        {"k": "chunk", "digest": D, "index": 0, "data": b"x" * (MAX_CHUNK + 1)},
        {"k": "refused", "digest": D, "reason": ""},
        {"k": "refused", "digest": D, "reason": "r" * 65},
        {"k": "refused", "digest": D, "reason": "two\nlines"},
        {"k": "refused", "digest": D, "reason": "Busy"},
        {"k": "manifest", "digest": D, "size": 10, "chunk_size": 1024, "hashes": b"x" * 31},
        {"k": "manifest", "digest": D, "size": 10, "chunk_size": 1024, "hashes": b""},
        {"k": "manifest", "digest": D, "size": 0, "chunk_size": 1024, "hashes": H32},
    ],
)
def test_decode_rejects(obj: object) -> None:
    with pytest.raises(TransferError):
        decode(obj)


def test_unpack_rejects_bad_envelopes() -> None:
    t, body = pack(GetChunk(D, 1))
    with pytest.raises(TransferError):
        unpack("artifact.get_manifest", body)  # kind does not match the type string
    with pytest.raises(TransferError):
        unpack("election.heartbeat", body)
    with pytest.raises(TransferError):
        unpack(t, b"\x00" * (MAX_BODY + 1))
    with pytest.raises(TransferError):
        unpack(t, body[:-1])
    with pytest.raises(TransferError):
        unpack(t, body + b"\x00")
    with pytest.raises(TransferError):
        unpack(t, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode("not a message")  # type: ignore[arg-type]


_digests = st.binary(min_size=32, max_size=32).map(bytes.hex)
_indices = st.integers(0, MAX_CHUNKS - 1)


@st.composite
def _manifests(draw: st.DrawFn) -> Manifest:
    cs = draw(st.sampled_from([1024, 4096, 65536, MAX_CHUNK]))
    size = draw(st.integers(0, 20 * cs))
    n = -(-size // cs)
    hashes = draw(st.lists(st.binary(min_size=32, max_size=32), min_size=n, max_size=n))
    return Manifest(draw(_digests), size, cs, tuple(hashes))


_messages = st.one_of(
    st.builds(GetManifest, _digests),
    st.builds(ManifestReply, _manifests()),
    st.builds(GetChunk, _digests, _indices),
    st.builds(ChunkReply, _digests, _indices, st.binary(max_size=3000)),
    st.builds(NotFound, _digests),
    st.builds(Refused, _digests, st.from_regex(r"[a-z0-9][a-z0-9_.:-]{0,63}", fullmatch=True)),
)


@settings(max_examples=300, deadline=None)
@given(_messages)
def test_hypothesis_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg
    assert unpack(*pack(msg)) == msg


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=70)
    | st.binary(max_size=70)
    | _digests,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)
_kinds = st.sampled_from(["get_manifest", "manifest", "get_chunk", "chunk", "not_found", "refused"])
_shaped = st.builds(
    lambda k, d, extra: {"k": k, "digest": d, **extra},
    _kinds,
    _digests | _plain,
    st.dictionaries(
        st.sampled_from(["index", "data", "reason", "size", "chunk_size", "hashes"]), _plain
    ),
)


def _only_transfer_errors(fn: Callable[[], object]) -> None:
    with contextlib.suppress(TransferError):
        fn()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_plain | _shaped)
def test_garbage_objects_raise_only_transfer_error(obj: object) -> None:
    _only_transfer_errors(lambda: decode(obj))
    try:
        body = msgpack.packb(obj)
    except (TypeError, ValueError, OverflowError):
        return
    for t in sorted(MESSAGE_TYPES):
        _only_transfer_errors(lambda t=t: unpack(t, body))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([*sorted(MESSAGE_TYPES), "", "x" * 100]))
def test_garbage_bytes_raise_only_transfer_error(body: bytes, t: str) -> None:
    _only_transfer_errors(lambda: unpack(t, body))


@settings(max_examples=300, deadline=None)
@given(_messages, st.data())
def test_mutated_bodies_raise_only_transfer_error(msg: Message, data: st.DataObject) -> None:
    t, body = pack(msg)
    b = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(b)))
    _only_transfer_errors(lambda: unpack(t, bytes(b)))
    _only_transfer_errors(lambda: unpack(t, bytes(b[:cut])))


# ---------------------------------------------------------------------------------------------
# Sender


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    s = ArtifactStore(tmp_path / "src")
    s.put_bytes(DATA)
    return s


def test_sender_answers_from_the_store(store: ArtifactStore) -> None:
    sender = Sender(store, chunk_size=CS)
    reply = sender.handle("peer", GetManifest(D))
    assert reply == Send("peer", ManifestReply(_manifest_of(DATA)))
    out = sender.handle("peer", GetChunk(D, 64))
    assert out is not None and out.msg == ChunkReply(D, 64, DATA[64 * CS :])
    assert sender.handle("peer", GetChunk(D, 65)) == Send("peer", Refused(D, "bad_index"))
    missing = hashlib.sha256(b"nope").hexdigest()
    assert sender.handle("peer", GetManifest(missing)) == Send("peer", NotFound(missing))
    assert sender.handle("peer", GetChunk(missing, 0)) == Send("peer", NotFound(missing))
    assert sender.handle("peer", NotFound(D)) is None
    assert sender.counters["drop_unexpected"] == 1


def test_sender_serves_chunks_without_a_cached_manifest(store: ArtifactStore) -> None:
    out = Sender(store, chunk_size=CS).handle("p", GetChunk(D, 2))
    assert out is not None and out.msg == ChunkReply(D, 2, DATA[2 * CS : 3 * CS])


def test_sender_quarantines_a_corrupt_object(store: ArtifactStore) -> None:
    store.path(D).write_bytes(b"X" + DATA[1:])
    assert Sender(store, chunk_size=CS).handle("p", GetManifest(D)) == Send("p", NotFound(D))
    assert not store.has(D) and store.counters["quarantined"] == 1


def test_build_manifest(store: ArtifactStore) -> None:
    assert build_manifest(store, D, CS) == _manifest_of(DATA)
    assert build_manifest(store, D).chunk_size == DEFAULT_CHUNK  # type: ignore[union-attr]


def test_sender_refuses_what_it_cannot_serve(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sender = Sender(store, chunk_size=CS)
    monkeypatch.setattr(store, "size", lambda d: MAX_TRANSFER + 1)
    assert sender.handle("p", GetManifest(D)) == Send("p", Refused(D, "too_large"))
    assert sender.handle("p", GetChunk(D, 0)) == Send("p", Refused(D, "too_large"))
    monkeypatch.undo()

    def broken(d: str) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(store, "open", broken)
    assert sender.handle("p", GetManifest(D)) == Send("p", Refused(D, "io_error"))
    assert sender.handle("p", GetChunk(D, 0)) == Send("p", Refused(D, "io_error"))
    assert sender.counters["sent_refused"] == 4


def test_sender_rejects_bad_config(store: ArtifactStore) -> None:
    for cs in (1000, 512, 2 * MAX_CHUNK):
        with pytest.raises(ValueError):
            Sender(store, chunk_size=cs)


# ---------------------------------------------------------------------------------------------
# Whole transfers through an in-memory network

Handler = Callable[[str, Message], Message | None]


def _serve(sender: Sender) -> Handler:
    def handle(src: str, msg: Message) -> Message | None:
        out = sender.handle(src, msg)
        return out.msg if out is not None else None

    return handle


def _flip_chunks(inner: Handler, bad: set[int] | None = None) -> Handler:
    """Honest manifest, tampered chunk bytes (all chunks, or those in `bad`)."""

    def handle(src: str, msg: Message) -> Message | None:
        reply = inner(src, msg)
        if isinstance(reply, ChunkReply) and (bad is None or reply.index in bad) and reply.data:
            data = bytes([reply.data[0] ^ 1]) + reply.data[1:]
            return replace(reply, data=data)
        return reply

    return handle


def _consistent_liar(tmp_path: Path, changed: int) -> tuple[Handler, bytes]:
    """Serves other bytes under D (chunk `changed` altered), with a manifest to match them."""
    fake = bytearray(DATA)
    fake[changed * CS] ^= 0xFF
    store = ArtifactStore(tmp_path / "liar")
    fd = store.put_bytes(bytes(fake))
    inner = _serve(Sender(store, chunk_size=CS))

    def handle(src: str, msg: Message) -> Message | None:
        reply = inner(src, replace(msg, digest=fd))  # type: ignore[type-var]
        if isinstance(reply, ManifestReply):
            return ManifestReply(replace(reply.manifest, digest=D))
        return replace(reply, digest=D) if reply is not None else None  # type: ignore[type-var]

    return handle, bytes(fake)


class Net:
    """Seeded in-memory network: every message is packed and unpacked, may be lost or delayed
    (delays reorder), and nodes in `dead` vanish at the given time."""

    def __init__(
        self,
        senders: dict[str, Handler],
        seed: int = 1,
        loss: float = 0.0,
        delay: tuple[float, float] = (0.01, 0.05),
        dead: dict[str, float] | None = None,
        slow: dict[str, float] | None = None,
    ) -> None:
        self.senders = senders
        self.rng = random.Random(seed)
        self.loss = loss
        self.delay = delay
        self.dead = dead or {}
        self.slow = slow or {}
        self.queue: list[tuple[float, int, str, str, str, bytes]] = []
        self.seq = 0
        self.now = 0.0
        self.sink = bytearray()
        self.writes: Counter[int] = Counter()
        self.requests: Counter[str] = Counter()
        self.outstanding: Counter[str] = Counter()
        self.max_outstanding: Counter[str] = Counter()
        self.result: Done | Failed | None = None
        self.verifies = 0
        self.peak_in_flight = 0

    def _alive(self, node: str) -> bool:
        return self.now < self.dead.get(node, float("inf"))

    def _send(self, src: str, dst: str, msg: Message) -> None:
        if self.rng.random() < self.loss:
            return
        t = self.now + self.rng.uniform(*self.delay) + self.slow.get(dst if src == "r" else src, 0)
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, src, dst, *pack(msg)))

    def _flush(self, rx: Receiver) -> None:
        for out in rx.drain():
            if isinstance(out, Send):
                if isinstance(out.msg, GetChunk):
                    self.requests[out.to] += 1
                    self.outstanding[out.to] += 1
                    self.max_outstanding[out.to] = max(
                        self.max_outstanding[out.to], self.outstanding[out.to]
                    )
                self._send("r", out.to, out.msg)
            elif isinstance(out, Write):
                end = out.offset + len(out.data)
                if len(self.sink) < end:
                    self.sink.extend(bytes(end - len(self.sink)))
                self.sink[out.offset : end] = out.data
                self.writes[out.offset] += 1
            elif isinstance(out, Verify):
                self.verifies += 1
                del self.sink[out.size :]
                ok = hashlib.sha256(self.sink).hexdigest() == out.digest
                rx.verified(self.now, ok)
            else:
                assert isinstance(out, Done | Failed)
                self.result = out
        for n in rx.in_flight().values():
            assert n <= rx.window
            self.peak_in_flight = max(self.peak_in_flight, n)

    def run(self, rx: Receiver, until: float = 1000.0, tick: float = 0.25) -> Done | Failed:
        next_tick = tick
        self._flush(rx)
        while self.result is None and self.now < until:
            if self.queue and self.queue[0][0] <= next_tick:
                self.now, _, src, dst, t, body = heapq.heappop(self.queue)
                msg = unpack(t, body)
                if dst == "r":
                    if isinstance(msg, ChunkReply):
                        self.outstanding[src] -= 1
                    if self._alive(src):
                        rx.handle(self.now, src, msg)
                elif self._alive(dst):
                    reply = self.senders[dst](src, msg)
                    if reply is not None:
                        self._send(dst, "r", reply)
            else:
                self.now = next_tick
                next_tick += tick
                rx.tick(self.now)
            self._flush(rx)
        assert self.result is not None, "transfer did not finish"
        return self.result


@pytest.fixture
def honest(store: ArtifactStore) -> Handler:
    return _serve(Sender(store, chunk_size=CS))


def _receiver(sources: list[str], **kw: Any) -> Receiver:
    return Receiver(D, sources, 0.0, **{"timeout": 2.0, **kw})


@pytest.mark.parametrize("seed", range(6))
def test_transfer_with_loss_and_reordering(honest: Handler, seed: int) -> None:
    net = Net({"a": honest, "b": honest, "c": honest}, seed=seed, loss=0.1, delay=(0.01, 0.5))
    rx = _receiver(["a", "b", "c"], window=4)
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert all(net.requests[s] > 0 for s in "abc")  # spread over the sources
    assert net.peak_in_flight <= 4
    assert rx.failures == {} or set(rx.failures.values()) == {"timeout"}
    assert rx.counters["timeouts"] > 0  # the loss was real


def test_lossless_transfer_keeps_every_window(honest: Handler) -> None:
    net = Net({"a": honest, "b": honest}, delay=(0.01, 0.3))
    rx = _receiver(["a", "b"], window=3, timeout=100.0)
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert net.peak_in_flight == 3  # the window was used ...
    assert max(net.max_outstanding.values()) == 3  # ... and never exceeded on the wire
    assert sum(net.requests.values()) == 65  # each chunk asked once
    assert set(net.writes.values()) == {1}  # and written once
    assert rx.counters["chunks"] == 65 and rx.counters["bytes"] == len(DATA)


def test_tampered_chunks_are_caught_and_refetched(honest: Handler) -> None:
    net = Net({"bad": _flip_chunks(honest, {5, 40}), "good": honest}, slow={"good": 0.2})
    rx = _receiver(["bad", "good"])
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert rx.failures == {"bad": "bad_chunk"}
    assert net.verifies == 1


def test_a_bad_chunk_is_asked_again_elsewhere() -> None:
    rx = _receiver(["bad", "good"])
    m = _manifest_of(DATA)
    rx.handle(0.0, "bad", ManifestReply(m))
    rx.handle(0.0, "good", ManifestReply(m))
    assert rx.in_flight() == {"bad": 8, "good": 8}
    for i in range(5):
        rx.handle(0.1, "bad", ChunkReply(D, i, DATA[i * CS : (i + 1) * CS]))
    rx.drain()
    rx.handle(0.1, "bad", ChunkReply(D, 5, b"?" * CS))
    assert rx.failures == {"bad": "bad_chunk"} and rx.drain() == []  # good's window is full
    rx.handle(0.2, "good", ChunkReply(D, 8, DATA[8 * CS : 9 * CS]))
    assert [o for o in rx.drain() if isinstance(o, Send)] == [Send("good", GetChunk(D, 5))]


def test_consistent_liar_is_caught_by_the_full_hash(tmp_path: Path, honest: Handler) -> None:
    liar, _ = _consistent_liar(tmp_path, changed=17)
    # The liar answers first and alone holds the manifest in use (1 vs 1 keeps the first).
    net = Net({"liar": liar, "good": honest}, slow={"good": 1.0})
    rx = _receiver(["liar", "good"], timeout=5.0)
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert rx.failures == {"liar": "bad_manifest"}
    assert net.verifies == 2
    assert net.requests["good"] == 1  # only the chunk the manifests disagree on
    assert net.writes[17 * CS] == 2 and sum(net.writes.values()) == 66


def test_majority_manifest_wins(tmp_path: Path, honest: Handler) -> None:
    liar, _ = _consistent_liar(tmp_path, changed=3)
    net = Net({"liar": liar, "g1": honest, "g2": honest}, slow={"g1": 0.3, "g2": 0.3})
    rx = _receiver(["liar", "g1", "g2"], window=2, timeout=5.0)
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert net.verifies == 1  # the honest pair outvoted the liar before the end
    assert "liar" not in rx.failures  # never proven wrong; simply not used


def test_a_lone_liar_fails_the_transfer(tmp_path: Path) -> None:
    liar, _ = _consistent_liar(tmp_path, changed=0)
    net = Net({"liar": liar})
    result = net.run(_receiver(["liar"]))
    assert isinstance(result, Failed) and "liar: bad_manifest" in result.reason


def test_source_dying_mid_transfer(honest: Handler) -> None:
    net = Net({"a": honest, "b": honest, "c": honest}, delay=(0.05, 0.1), dead={"b": 0.5})
    rx = _receiver(["a", "b", "c"], window=2, max_strikes=1)
    assert net.run(rx) == Done(D)
    assert bytes(net.sink) == DATA
    assert rx.failures == {"b": "timeout"}
    assert set(net.writes.values()) == {1}  # nothing received twice: retried, not restarted
    assert 0 < net.requests["b"] < 20


def test_all_sources_failing(tmp_path: Path, honest: Handler) -> None:
    empty = _serve(Sender(ArtifactStore(tmp_path / "empty"), chunk_size=CS))

    def refuse(src: str, msg: Message) -> Message:
        return Refused(D, "busy")

    net = Net(
        {"gone": honest, "nope": empty, "flip": _flip_chunks(honest), "no": refuse},
        dead={"gone": 0.0},
    )
    rx = _receiver(["gone", "nope", "flip", "no"])
    result = net.run(rx)
    assert isinstance(result, Failed) and result.digest == D
    assert rx.failures == {
        "gone": "timeout",
        "nope": "not_found",
        "flip": "bad_chunk",
        "no": "refused: busy",
    }
    for source, reason in rx.failures.items():
        assert f"{source}: {reason}" in result.reason
    assert rx.sources == frozenset()


@pytest.mark.parametrize("seed", range(20))
def test_chaos_always_ends_correctly(tmp_path: Path, honest: Handler, seed: int) -> None:
    """Random mixes of honest, dying, tampering and lying sources over a lossy network."""
    rng = random.Random(seed)
    liar, _ = _consistent_liar(tmp_path, changed=rng.randrange(65))
    pool = {
        "h1": honest,
        "h2": honest,
        "flip": _flip_chunks(honest, {rng.randrange(65)}),
        "liar": liar,
        "dies": honest,
    }
    names = rng.sample(sorted(pool), rng.randint(1, len(pool)))
    loss = rng.choice([0.0, 0.05])
    net = Net(
        {n: pool[n] for n in names},
        seed=seed,
        loss=loss,
        delay=(0.01, rng.choice([0.05, 0.5])),
        dead={"dies": rng.uniform(0, 2)},
    )
    rx = _receiver(names, window=rng.choice([1, 3, 8]), max_strikes=rng.choice([2, 3]))
    result = net.run(rx, until=10_000)
    honest_present = {"h1", "h2"} & set(names)
    if isinstance(result, Done):
        assert bytes(net.sink) == DATA
    else:
        assert not honest_present or loss  # only message loss can defeat an honest source
    for n in honest_present:
        assert rx.failures.get(n, "timeout") == "timeout"  # honest sources are never accused
    assert rx.failures.get("liar") in (None, "bad_manifest", "timeout")
    assert rx.failures.get("flip") in (None, "bad_chunk", "timeout")


def test_no_sources_fails_at_once() -> None:
    rx = _receiver([])
    assert rx.drain() == [Failed(D, "no source left (no sources)")]


def test_empty_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "e")
    d = store.put_bytes(b"")
    net = Net({"a": _serve(Sender(store))})
    assert net.run(Receiver(d, ["a"], 0.0)) == Done(d)
    assert net.sink == b""


def test_end_to_end_between_stores(tmp_path: Path, store: ArtifactStore) -> None:
    """The node's wiring: chunks go into `Incoming`, `Verify` is `commit`."""
    dest = ArtifactStore(tmp_path / "dest")
    senders = {"a": Sender(store, chunk_size=CS), "b": Sender(store, chunk_size=CS)}
    rx = Receiver(D, ["a", "b"], 0.0)
    inc = dest.incoming(D)
    pending = rx.drain()
    while pending:
        out = pending.pop(0)
        if isinstance(out, Send):
            reply = senders[out.to].handle("r", unpack(*pack(out.msg)))
            assert reply is not None
            rx.handle(1.0, out.to, unpack(*pack(reply.msg)))
        elif isinstance(out, Write):
            inc.write(out.offset, out.data)
        elif isinstance(out, Verify):
            rx.verified(1.0, inc.commit(out.size))
        else:
            assert out == Done(D)
        pending += rx.drain()
    assert dest.has(D) and dest.verify(D)


def test_receiver_drops_what_it_did_not_ask_for(store: ArtifactStore) -> None:
    rx = _receiver(["a", "b"], size=len(DATA))
    rx.drain()
    other = hashlib.sha256(b"other").hexdigest()
    rx.handle(0.1, "stranger", ManifestReply(_manifest_of(DATA)))
    rx.handle(0.1, "a", NotFound(other))
    rx.handle(0.1, "a", GetChunk(D, 0))
    rx.handle(0.1, "a", ChunkReply(D, 0, DATA[:CS]))  # before any manifest
    assert rx.counters["drop_unknown_source"] == 1
    assert rx.counters["drop_wrong_digest"] == 1
    assert rx.counters["drop_unexpected"] == 1
    assert rx.counters["drop_unsolicited"] == 1
    assert rx.failures == {}
    # A manifest of the wrong size (known from build metadata) is refused at once.
    rx.handle(0.2, "b", ManifestReply(_manifest_of(DATA[:-1], digest=D)))
    assert rx.failures == {"b": "bad_manifest"}
    # Two different manifests from one source.
    rx.handle(0.2, "a", ManifestReply(_manifest_of(DATA)))
    rx.handle(0.2, "a", ManifestReply(_manifest_of(DATA, cs=2048)))
    assert rx.failures["a"] == "bad_manifest"
    assert isinstance(rx.drain()[-1], Failed)
    rx.handle(0.3, "a", NotFound(D))
    assert rx.counters["drop_late"] == 1


def test_manifest_requests_are_retried(honest: Handler) -> None:
    rx = _receiver(["a"], timeout=1.0, max_strikes=3)
    assert rx.drain() == [Send("a", GetManifest(D))]
    rx.tick(1.0)
    assert rx.drain() == [Send("a", GetManifest(D))]
    rx.tick(2.0)
    rx.drain()
    rx.tick(3.0)
    assert rx.drain() == [Failed(D, "no source left (a: timeout)")]


def test_slow_source_gets_a_smaller_window(honest: Handler) -> None:
    rx = _receiver(["a", "b"], window=4, timeout=1.0, max_strikes=10)
    rx.drain()
    m = _manifest_of(DATA)
    rx.handle(0.0, "a", ManifestReply(m))
    rx.handle(0.0, "b", ManifestReply(m))
    sent = [(o.to, o.msg) for o in rx.drain() if isinstance(o, Send)]
    assert sent == [(s, GetChunk(D, i)) for s, i in [("a", 0), ("a", 1), ("a", 2), ("a", 3)]] + [
        (s, GetChunk(D, i)) for s, i in [("b", 4), ("b", 5), ("b", 6), ("b", 7)]
    ]
    rx.tick(1.0)  # all eight time out
    assert rx.in_flight() == {"a": 1, "b": 1}  # back to one probe each
    # Lowest chunks first (not new ones); chunk 0 moves off `a`, chunk 1 takes what is open.
    assert [(o.to, o.msg) for o in rx.drain() if isinstance(o, Send)] == [
        ("b", GetChunk(D, 0)),
        ("a", GetChunk(D, 1)),
    ]
    rx.handle(1.1, "a", ChunkReply(D, 1, DATA[CS : 2 * CS]))
    assert rx.in_flight() == {"a": 2, "b": 1}  # a good chunk grows the window by one
    rx.handle(1.1, "a", ChunkReply(D, 2, b""))
    assert rx.failures == {"a": "bad_chunk"}


def test_late_chunk_after_a_timeout_is_still_used(honest: Handler) -> None:
    rx = _receiver(["a", "b"], window=1, timeout=1.0)
    m = _manifest_of(DATA)
    rx.handle(0.0, "a", ManifestReply(m))
    rx.handle(0.0, "b", ManifestReply(m))
    rx.tick(1.0)  # chunk 0 times out on a, chunk 1 on b; they swap
    assert [(o.to, o.msg) for o in rx.drain() if isinstance(o, Send)][-2:] == [
        ("b", GetChunk(D, 0)),
        ("a", GetChunk(D, 1)),
    ]
    rx.handle(1.5, "a", ChunkReply(D, 0, DATA[:CS]))  # a's answer to the first request
    assert rx.counters["late_chunk"] == 1 and rx.received() == 1
    assert [o for o in rx.drain() if isinstance(o, Write)] == [Write(0, DATA[:CS])]
    rx.handle(1.6, "b", ChunkReply(D, 0, DATA[:CS]))  # the retry's answer: a duplicate
    assert rx.counters["drop_duplicate"] == 1
    assert rx.drain() == [Send("b", GetChunk(D, 2))]  # which still freed b's slot


def test_a_source_membership_declares_gone_is_dropped_at_once() -> None:
    """Not after three timeouts: the one left serves the rest, and a fetch whose last source
    is gone fails at once (the submitter then has the job built again)."""
    rx = _receiver(["a", "b"], window=1, timeout=10.0)
    m = _manifest_of(DATA)
    rx.handle(0.0, "a", ManifestReply(m))
    rx.handle(0.0, "b", ManifestReply(m))
    asked = {o.to: o.msg for o in rx.drain() if isinstance(o, Send)}
    assert asked == {"a": GetChunk(D, 0), "b": GetChunk(D, 1)}
    rx.remove_source(0.1, "a", "dead")
    assert rx.sources == {"b"} and rx.failures == {"a": "dead"}
    rx.handle(0.2, "b", ChunkReply(D, 1, DATA[CS:2 * CS]))  # b's slot frees: a's chunk next
    assert [(o.to, o.msg) for o in rx.drain() if isinstance(o, Send)] == [("b", GetChunk(D, 0))]
    rx.remove_source(0.2, "a", "dead")  # (twice: nothing more)
    rx.remove_source(0.2, "b", "left")
    assert [o for o in rx.drain() if isinstance(o, Failed)] == [
        Failed(D, "no source left (a: dead, b: left)")]


def test_verified_out_of_turn_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        _receiver(["a"]).verified(0.0, True)


def test_cancel_and_add_source(honest: Handler) -> None:
    rx = _receiver(["a"])
    rx.add_source(0.0, "a")  # named again while its manifest is awaited: asked again at once
    rx.add_source(0.0, "b")
    assert [o.to for o in rx.drain() if isinstance(o, Send)] == ["a", "a", "b"]
    assert rx.counters["reasked"] == 1
    rx.add_source(0.0, "c")
    rx.handle(0.0, "b", ManifestReply(_manifest_of(DATA)))
    rx.handle(0.0, "b", ChunkReply(D, 0, b"bad"))
    rx.add_source(0.0, "b")  # caught serving bad data: stays out
    rx.handle(1.5, "c", ManifestReply(_manifest_of(DATA)))
    rx.tick(2.0)
    rx.tick(4.0)
    rx.tick(6.0)
    assert rx.failures == {"a": "timeout", "b": "bad_chunk"}
    rx.add_source(6.0, "a")  # only fell silent: may come back
    assert rx.sources == {"a", "c"} and rx.failures == {"b": "bad_chunk"}
    rx.drain()
    rx.cancel("disk full")
    assert rx.drain() == [Failed(D, "disk full")]
    rx.add_source(1.0, "c")
    assert rx.drain() == []


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Receiver("nope", ["a"], 0.0)
    with pytest.raises(ValueError):
        Receiver(D, ["a"], 0.0, window=0)
