"""The signed envelope and the replay guard."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from net.wire import (
    DOMAIN,
    MAX_FRAME,
    PROTOCOL_VERSION,
    DropCounter,
    Envelope,
    ReplayGuard,
    Sealer,
    WireError,
    open_envelope,
    seal,
)
from swarmnode.identity import Identity

ALICE = Identity.generate()
BOB = Identity.generate()


def _pack(items: list[object]) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


def _fields(frame: bytes) -> list[object]:
    return msgpack.unpackb(frame, raw=False)


def _signed(ident: Identity, items: list[object]) -> bytes:
    """A frame whose six first items are exactly `items`, correctly signed by `ident`."""
    return _pack([*items, ident.sign(DOMAIN + _pack(items))])


def _reason(frame: object, **kwargs: int) -> str:
    with pytest.raises(WireError) as info:
        open_envelope(frame, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_roundtrip() -> None:
    frame = seal(ALICE, "ping", b"\x00payload", epoch=1234, seq=7)
    env = open_envelope(frame)
    assert env == Envelope(PROTOCOL_VERSION, "ping", ALICE.id, 1234, 7, b"\x00payload")
    assert _fields(frame)[:6] == [1, "ping", ALICE.id, 1234, 7, b"\x00payload"]


def test_envelope_is_frozen() -> None:
    env = open_envelope(seal(ALICE, "ping", b"", 0, 0))
    with pytest.raises(AttributeError):
        env.seq = 1  # type: ignore[misc]


def test_signature_is_over_domain_and_first_six_items() -> None:
    frame = seal(ALICE, "ping", b"x", 5, 6)
    items = _fields(frame)
    assert ALICE.verify(ALICE.id, DOMAIN + _pack(items[:6]), items[6])
    assert not ALICE.verify(ALICE.id, _pack(items[:6]), items[6])


def test_accepts_bytearray_and_memoryview() -> None:
    frame = seal(ALICE, "ping", b"x", 5, 6)
    assert open_envelope(bytearray(frame)) == open_envelope(memoryview(frame))


def test_sealer_epoch_and_seq() -> None:
    sealer = Sealer(ALICE, clock=lambda: 1_700_000_000.5)
    assert sealer.epoch == 1_700_000_000_500
    envs = [open_envelope(sealer.seal("gossip", bytes([i]))) for i in range(3)]
    assert [(e.epoch, e.seq, e.body) for e in envs] == [
        (1_700_000_000_500, 0, b"\x00"),
        (1_700_000_000_500, 1, b"\x01"),
        (1_700_000_000_500, 2, b"\x02"),
    ]
    later = Sealer(ALICE, clock=lambda: 1_700_000_010.0)
    assert later.epoch > sealer.epoch


def test_sealer_does_not_burn_seq_on_refused_frame() -> None:
    sealer = Sealer(ALICE, clock=lambda: 1.0)
    with pytest.raises(WireError):
        sealer.seal("bad type!", b"")
    assert open_envelope(sealer.seal("ok", b"")).seq == 0


@pytest.mark.parametrize(
    ("type_", "body", "epoch", "seq"),
    [
        ("", b"", 0, 0),
        ("has space", b"", 0, 0),
        ("x" * 33, b"", 0, 0),
        ("ünï", b"", 0, 0),
        ("ping", "text", 0, 0),
        ("ping", b"", -1, 0),
        ("ping", b"", 0, 2**63),
        ("ping", b"", True, 0),
    ],
)
def test_seal_refuses_what_open_would_reject(type_: str, body: bytes, epoch: int, seq: int) -> None:
    with pytest.raises(WireError) as info:
        seal(ALICE, type_, body, epoch, seq)
    assert info.value.reason == "malformed"


def test_seal_refuses_oversized_body() -> None:
    with pytest.raises(WireError) as info:
        seal(ALICE, "big", bytes(MAX_FRAME), 0, 0)
    assert info.value.reason == "oversized"


def test_wrong_key() -> None:
    items = [1, "ping", ALICE.id, 1, 2, b"body"]
    forged = _pack([*items, BOB.sign(DOMAIN + _pack(items))])
    assert _reason(forged) == "bad_signature"


def test_unsigned() -> None:
    items = [1, "ping", ALICE.id, 1, 2, b"body"]
    assert _reason(_pack([*items, b""])) == "unsigned"


TAMPERED = [
    (1, "pong", "bad_signature"),
    (1, "p i n g", "malformed"),
    (1, "", "malformed"),
    (1, 7, "malformed"),
    (2, BOB.id, "bad_signature"),
    (2, "not-an-id", "malformed"),
    (2, ALICE.id.upper(), "malformed"),
    # The last character carries one key bit and four spare bits ('a' or 'q'): the next letter
    # sets a spare bit, an alias of the same key that must not count as an id.
    (2, ALICE.id[:-1] + chr(ord(ALICE.id[-1]) + 1), "malformed"),
    (3, 2, "bad_signature"),
    (3, -1, "malformed"),
    (3, 2**63, "malformed"),
    (3, True, "malformed"),
    (3, 1.0, "malformed"),
    (4, 3, "bad_signature"),
    (4, -5, "malformed"),
    (4, "3", "malformed"),
    (5, b"bodY", "bad_signature"),
    (5, b"", "bad_signature"),
    (5, "body", "malformed"),
    (5, [1], "malformed"),
    (6, bytes(64), "bad_signature"),
    (6, b"\x01" * 63, "malformed"),
    (6, b"\x01" * 65, "malformed"),
    (6, "sig", "malformed"),
]


@pytest.mark.parametrize(("index", "value", "reason"), TAMPERED)
def test_every_field_tampered(index: int, value: object, reason: str) -> None:
    items = _fields(seal(ALICE, "ping", b"body", 1, 2))
    items[index] = value
    assert _reason(_pack(items)) == reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_version(version: int) -> None:
    items = [version, "ping", ALICE.id, 1, 2, b"body"]
    assert _reason(_signed(ALICE, items)) == "version"
    # A future version may change the array shape: still reported as `version`.
    assert _reason(_pack([version, "anything"])) == "version"


def test_version_must_be_an_int() -> None:
    items = _fields(seal(ALICE, "ping", b"body", 1, 2))
    for bad in (True, "1", 1.0, None):
        items[0] = bad
        assert _reason(_pack(items)) == "malformed"


@pytest.mark.parametrize(
    "obj",
    [
        None,
        1,
        "ping",
        b"raw",
        [],
        {"version": 1},
        [1, "ping", ALICE.id, 1, 2, b"body"],
        [1, "ping", ALICE.id, 1, 2, b"body", bytes(64), b"extra"],
    ],
)
def test_wrong_shape(obj: object) -> None:
    assert _reason(_pack(obj)) == "malformed"  # type: ignore[arg-type]


def test_non_canonical_encoding_rejected() -> None:
    frame = seal(ALICE, "ping", b"body", 1, 2)
    # The same array with epoch 1 written as a uint64 (0xcf) instead of a positive fixint.
    recoded = frame.replace(b"\x01\x02\xc4", b"\xcf" + (1).to_bytes(8, "big") + b"\x02\xc4", 1)
    assert recoded != frame
    assert _fields(recoded) == _fields(frame)
    assert _reason(recoded) == "malformed"


def test_non_bytes_frame() -> None:
    assert _reason("text") == "malformed"
    assert _reason(None) == "malformed"


def test_oversized_checked_first() -> None:
    frame = seal(ALICE, "ping", bytes(100), 1, 2)
    assert _reason(frame, max_size=len(frame) - 1) == "oversized"
    assert open_envelope(frame, max_size=len(frame)).body == bytes(100)
    assert _reason(b"\xff" * (MAX_FRAME + 1)) == "oversized"


def test_truncated() -> None:
    frame = seal(ALICE, "ping", b"some body", 1, 2)
    for n in range(len(frame)):
        assert _reason(frame[:n]) == "malformed"


def test_trailing_bytes() -> None:
    frame = seal(ALICE, "ping", b"some body", 1, 2)
    assert _reason(frame + b"\x00") == "malformed"
    assert _reason(frame + frame) == "malformed"


def test_huge_declared_lengths_are_refused_cheaply() -> None:
    # Headers announcing 4 GiB strings / arrays / binaries in a tiny frame.
    for head in (b"\xdb", b"\xdd", b"\xc6", b"\xdf"):
        assert _reason(head + b"\xff\xff\xff\xff") == "malformed"
    # Deep nesting.
    assert _reason(b"\x91" * 100_000) == "malformed"


@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(WireError):
        open_envelope(data)


_VALID = seal(ALICE, "member.update", b"\x93\x01\x02\x03" * 8, 1_700_000_000_000, 42)

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(_VALID) * 8 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, len(_VALID) - 1)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("set"), st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(_VALID)), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, len(_VALID) - 1), st.integers(1, 8)),
)


def _mutate(frame: bytes, mutations: list[tuple]) -> bytes:
    data = bytearray(frame)
    for m in mutations:
        kind = m[0]
        if kind == "flip" and data:
            bit = m[1] % (len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            del data[m[1] :]
        elif kind == "extend":
            data += m[1]
        elif kind == "set" and data:
            data[m[1] % len(data)] = m[2]
        elif kind == "insert":
            data[m[1] : m[1]] = m[2]
        elif kind == "delete":
            del data[m[1] : m[1] + m[2]]
    return bytes(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_valid_frames(mutations: list[tuple]) -> None:
    data = _mutate(_VALID, mutations)
    try:
        env = open_envelope(data)
    except WireError as exc:
        assert exc.reason in {"malformed", "version", "unsigned", "bad_signature"}
    else:
        # Canonical decoding: only the untouched frame opens, and to the original envelope.
        assert data == _VALID
        assert env == open_envelope(_VALID)


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz._-", min_size=1, max_size=31),
    st.binary(max_size=256),
    st.integers(0, 2**63 - 1),
    st.integers(0, 2**63 - 1),
)
def test_roundtrip_property(suffix: str, body: bytes, epoch: int, seq: int) -> None:
    type_ = "t" + suffix
    env = open_envelope(seal(ALICE, type_, body, epoch, seq))
    assert (env.type, env.sender, env.epoch, env.seq, env.body) == (
        type_,
        ALICE.id,
        epoch,
        seq,
        body,
    )


# --- replay guard -----------------------------------------------------------------------------


def _replayed(guard: ReplayGuard, sender: str, epoch: int, seq: int) -> bool:
    try:
        guard.accept(sender, epoch, seq)
    except WireError as exc:
        assert exc.reason == "replay"
        return True
    return False


def test_replay_duplicate() -> None:
    guard = ReplayGuard()
    guard.accept("a", 10, 0)
    assert _replayed(guard, "a", 10, 0)
    guard.accept("a", 10, 1)
    assert _replayed(guard, "a", 10, 1)
    assert _replayed(guard, "a", 10, 0)
    guard.accept("b", 10, 0)  # other senders are independent


def test_replay_reordered_within_window_accepted_once() -> None:
    guard = ReplayGuard(window=64)
    order = [5, 1, 3, 0, 63, 2, 4, 62, 6]
    for seq in order:
        assert not _replayed(guard, "a", 1, seq)
    for seq in order:
        assert _replayed(guard, "a", 1, seq)
    for seq in range(7, 62):  # gaps stay acceptable
        assert not _replayed(guard, "a", 1, seq)


def test_replay_too_old_for_window() -> None:
    guard = ReplayGuard(window=16)
    guard.accept("a", 1, 100)
    assert not _replayed(guard, "a", 1, 85)  # age 15: inside
    assert _replayed(guard, "a", 1, 84)  # age 16: outside
    assert _replayed(guard, "a", 1, 0)
    guard.accept("a", 1, 1000)  # jump further than the window
    assert _replayed(guard, "a", 1, 100)
    assert not _replayed(guard, "a", 1, 999)


def test_replay_window_slides_exactly() -> None:
    guard = ReplayGuard(window=8)
    for seq in range(20):
        guard.accept("a", 1, seq)
    for seq in range(20):
        assert _replayed(guard, "a", 1, seq)


def test_replay_older_epoch() -> None:
    guard = ReplayGuard()
    guard.accept("a", 200, 5)
    assert _replayed(guard, "a", 199, 6)
    assert _replayed(guard, "a", 100, 0)


def test_replay_newer_epoch_resets_window() -> None:
    guard = ReplayGuard(window=16)
    guard.accept("a", 100, 500)
    guard.accept("a", 101, 0)  # restarted: seq starts again
    guard.accept("a", 101, 1)
    assert _replayed(guard, "a", 101, 0)
    assert _replayed(guard, "a", 100, 501)  # the old incarnation is over


def test_replay_refusal_records_nothing() -> None:
    guard = ReplayGuard(window=8)
    guard.accept("a", 5, 10)
    assert _replayed(guard, "a", 4, 11)
    assert not _replayed(guard, "a", 5, 11)


def test_replay_eviction_bound() -> None:
    guard = ReplayGuard(max_senders=3)
    for name in "abcd":
        guard.accept(name, 1, 0)
    assert len(guard) == 3
    assert "a" not in guard
    guard.accept("b", 1, 1)  # touching b makes c the least recently active
    guard.accept("e", 1, 0)
    assert "c" not in guard and "b" in guard
    assert _replayed(guard, "b", 1, 1)
    for i in range(10_000):
        guard.accept(f"s{i}", 1, 0)
    assert len(guard) == 3


def test_replay_check_is_accept() -> None:
    guard = ReplayGuard()
    guard.check("a", 1, 1)
    assert _replayed(guard, "a", 1, 1)


def test_replay_forget() -> None:
    guard = ReplayGuard()
    guard.accept("a", 1, 1)
    guard.forget("a")
    guard.forget("never-seen")
    assert "a" not in guard


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300)), max_size=200))
def test_replay_property_matches_model(events: list[tuple[int, int]]) -> None:
    """Against a model that remembers everything: never accepts a repeat, and only refuses a
    fresh (epoch, seq) for the documented reasons."""
    window = 32
    guard = ReplayGuard(window=window)
    seen: set[tuple[int, int]] = set()
    newest_epoch = -1
    top: dict[int, int] = {}
    for epoch, seq in events:
        refused = _replayed(guard, "a", epoch, seq)
        if (epoch, seq) in seen:
            assert refused
        elif not refused:
            seen.add((epoch, seq))
        else:
            assert epoch < newest_epoch or top[epoch] - seq >= window
        if not refused:
            newest_epoch = max(newest_epoch, epoch)
            top[epoch] = max(top.get(epoch, -1), seq)


def test_drop_counter() -> None:
    drops = DropCounter()
    drops.drop("replay")
    drops.drop("replay")
    drops.drop(WireError("bad_signature"))
    assert drops == {"replay": 2, "bad_signature": 1}
    assert drops["oversized"] == 0
