"""Codec: round trips, strict rejection, and fuzzing (only MessageError, whatever the bytes)."""

from __future__ import annotations

import contextlib

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from net.addresses import MAX_REPORTED
from swarmnode.identity import Identity
from swarmnode.membership.messages import (
    MAX_NOTE_VALUE,
    MESSAGE_TYPES,
    Ack,
    Admit,
    Alive,
    Ban,
    Dead,
    Gossip,
    MemberState,
    MessageError,
    Nack,
    Note,
    Pending,
    Ping,
    PingReq,
    PushPull,
    PushPullReply,
    Rename,
    Suspect,
    admit_body,
    ban_body,
    decode,
    encode,
    make_record,
    note_body,
    rename_body,
)

A = Identity(nacl.signing.SigningKey(b"\x01" * 32))
B = Identity(nacl.signing.SigningKey(b"\x02" * 32))
REC_A = make_record(
    A, A.id, 3, "alpha", ["10.0.0.1:7946", "[fe80::1]:7946"], {"cores": 8, "os": "linux"}
)
REC_B = make_record(B, B.id, 0, "beta", ["b.example:1"], {})
ADMIT = Admit(B.id, A.id, "token", 5, A.sign(admit_body(B.id, A.id, "token", 5)))
BAN = Ban(B.id, A.id, 6, A.sign(ban_body(B.id, A.id, 6)))
RENAME = Rename(B.id, "bee", A.id, 7, A.sign(rename_body(B.id, "bee", A.id, 7)))
BIG = b"v" * MAX_NOTE_VALUE  # a release note with long commands is kilobytes, not bytes
NOTE = Note("release", "web", BIG, A.id, 8, A.sign(note_body("release", "web", BIG, A.id, 8)))
ITEMS = (
    Alive(REC_A),
    Suspect(B.id, 2, A.id),
    Dead(B.id, 2, B.id),
    ADMIT,
    BAN,
    RENAME,
    Pending(REC_B, "no token"),
    NOTE,
)
SAMPLES = [
    Ping(1, B.id, b"n" * 16, ITEMS),
    Ack(1, B.id, b"p" * 64, ITEMS[:2]),
    PingReq(9, A.id, b"x" * 16),
    Nack(9),
    Gossip(ITEMS),
    PushPull(True, (MemberState(REC_A, "suspect", 4), MemberState(REC_B, "alive", 0)), ITEMS[3:]),
    PushPullReply((MemberState(REC_B, "left", 1),), (ADMIT,)),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    kind, body = encode(msg)  # type: ignore[arg-type]
    assert kind in MESSAGE_TYPES
    assert decode(kind, body) == msg


def test_a_note_value_over_its_cap_is_refused() -> None:
    kind, body = encode(Gossip((NOTE,)))
    plain = msgpack.unpackb(body)
    (item,) = next(v for v in plain.values() if isinstance(v, list))
    item["v"] += b"v"
    with pytest.raises(MessageError):  # by the msgpack limit itself, before any field check
        decode(kind, msgpack.packb(plain))


def test_record_signature_and_facts() -> None:
    assert A.verify(A.id, REC_A.body(), REC_A.signature)
    assert not A.verify(B.id, REC_A.body(), REC_A.signature)
    assert REC_A.facts_dict() == {"cores": 8, "os": "linux"}
    # facts are sorted so the signed body is canonical whatever order they were given in
    again = make_record(A, A.id, 3, "alpha", REC_A.addresses, {"os": "linux", "cores": 8})
    assert again.body() == REC_A.body()


@pytest.mark.parametrize(
    "bad",
    [
        dict(addresses=["no-port"]),
        dict(addresses=["h:0"]),
        dict(addresses=["h:70000"]),
        dict(addresses=["h:1"] * (MAX_REPORTED + 1)),
        dict(addresses=["[fe80::1%eth0]:1"]),
        dict(name="x" * 65),
        dict(facts={"k": 1 << 64}),
        dict(facts={"k": True}),
        dict(facts={"": "v"}),
    ],
)
def test_make_record_rejects_invalid_fields(bad: dict) -> None:
    fields = dict(name="n", addresses=["h:1"], facts={})
    fields.update(bad)
    with pytest.raises(MessageError):
        make_record(A, A.id, 0, fields["name"], fields["addresses"], fields["facts"])


def _body(kind: str, plain: object) -> bytes:
    return msgpack.packb(plain)


def _plain(msg: object) -> tuple[str, dict]:
    kind, body = encode(msg)  # type: ignore[arg-type]
    return kind, msgpack.unpackb(body)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("seq"),  # missing key
        lambda m: m.update(extra=1),  # extra key
        lambda m: m.update(seq=-1),  # out of range
        lambda m: m.update(seq=1 << 63),  # out of range
        lambda m: m.update(seq=True),  # bool is not an int
        lambda m: m.update(seq=1.0),  # float is not an int
        lambda m: m.update(seq="1"),  # wrong type
        lambda m: m.update(target="1" * 52),  # not a node id (base32 has no 1)
        lambda m: m.update(nonce=b""),  # too short
        lambda m: m.update(nonce=b"x" * 33),  # too long
        lambda m: m.update(pb=[{"k": "alive"}]),  # item missing keys
        lambda m: m.update(pb=[{"k": "nope"}]),  # unknown item kind
        lambda m: m.update(pb=[{"k": "suspect", "id": A.id, "inc": 0, "from": A.id}] * 65),
        lambda m: m["pb"][0]["r"].update(sig=b"s" * 65),  # signature too long
        lambda m: m["pb"][0]["r"].update(facts=[["b", 1], ["a", 2]]),  # unsorted facts
        lambda m: m["pb"][0]["r"].update(name="n" * 65),  # name too long
    ],
)
def test_strict_rejections(mutate) -> None:  # type: ignore[no-untyped-def]
    kind, m = _plain(SAMPLES[0])
    mutate(m)
    with pytest.raises(MessageError):
        decode(kind, msgpack.packb(m))


def test_rejects_wrong_container_types_and_unknown_type() -> None:
    with pytest.raises(MessageError):
        decode("nope", msgpack.packb({}))
    with pytest.raises(MessageError):
        decode("nack", msgpack.packb([1]))
    with pytest.raises(MessageError):
        decode("nack", msgpack.packb({"seq": 1}) + b"\x00")  # trailing data
    with pytest.raises(MessageError):
        decode("nack", "not bytes")  # type: ignore[arg-type]
    kind, m = _plain(SAMPLES[5])
    m["join"] = 1
    with pytest.raises(MessageError):
        decode(kind, msgpack.packb(m))
    kind, m = _plain(SAMPLES[5])
    m["cluster"] = [{"k": "suspect", "id": A.id, "inc": 0, "from": A.id}]  # not a statement
    with pytest.raises(MessageError):
        decode(kind, msgpack.packb(m))
    kind, m = _plain(SAMPLES[5])
    m["members"][0]["i"] = 0  # member incarnation below its record's (3)
    with pytest.raises(MessageError):
        decode(kind, msgpack.packb(m))


VALID = [encode(m) for m in SAMPLES]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_message_error(kind: object, body: object) -> None:
    with contextlib.suppress(MessageError):  # anything else propagates and fails the test
        decode(kind, body)  # type: ignore[arg-type]


@FUZZ
@given(st.sampled_from([*sorted(MESSAGE_TYPES), "", "x"]), st.binary(max_size=512))
def test_fuzz_random_bytes(kind: str, body: bytes) -> None:
    _only_message_error(kind, body)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated_valid_bodies(sample: tuple[str, bytes], data: st.DataObject) -> None:
    kind, body = sample
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 16))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    _only_message_error(kind, bytes(buf))


_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=60)
    | st.binary(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_structural_mutations(sample: tuple[str, bytes], data: st.DataObject) -> None:
    """Replace any value anywhere in a valid body with arbitrary msgpack data."""
    kind, body = sample
    plain = msgpack.unpackb(body)
    path = data.draw(st.sampled_from(_paths(plain)[1:]))
    node = plain
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(_junk)
    _only_message_error(kind, msgpack.packb(plain))


def test_deep_nesting_is_a_message_error() -> None:
    body = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(MessageError):
        decode("gossip", body)
