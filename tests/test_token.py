"""Join tokens and durations."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import re

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmnode.identity import Identity
from swarmnode.token import (
    DEFAULT_TTL,
    MAX_TTL,
    PREFIX,
    Token,
    TokenError,
    is_founder,
    issue,
    new_cluster_id,
    parse,
    parse_duration,
    verify,
)

ISSUER = Identity.generate()
OTHER = Identity.generate()
CLUSTER = new_cluster_id(ISSUER.id)
NOW = 1_700_000_000
ADDRS = ("192.0.2.10:7946", "[2001:db8::1]:7946", "build-01.example.org:7946")


def _issue(**kw: object) -> Token:
    args: dict[str, object] = {
        "identity": ISSUER,
        "cluster_id": CLUSTER,
        "cluster_name": "lab",
        "addresses": ADDRS,
        "ttl_seconds": DEFAULT_TTL,
        "now": NOW,
    }
    args.update(kw)
    return issue(**args)  # type: ignore[arg-type]


def _member(node_id: str) -> bool:
    return node_id == ISSUER.id


def _verify(token: Token, now: float = NOW + 60, cluster_id: str = CLUSTER) -> None:
    verify(token, now=now, cluster_id=cluster_id, is_member=_member)


def _payload(text: str) -> bytes:
    body = text[len(PREFIX) :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _text(payload: bytes) -> str:
    return PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _reason(text: object) -> str:
    with pytest.raises(TokenError) as info:
        parse(text)  # type: ignore[arg-type]
    return info.value.reason


def test_roundtrip() -> None:
    token = _issue()
    text = token.encode()
    assert text.startswith("swn1.")
    assert re.fullmatch(r"swn1\.[A-Za-z0-9_-]+", text)
    parsed = parse(text)
    assert parsed == token
    assert parsed.cluster_id == CLUSTER
    assert parsed.cluster_name == "lab"
    assert parsed.issuer == ISSUER.id
    assert parsed.addresses == ADDRS
    assert parsed.expires == NOW + DEFAULT_TTL
    assert len(parsed.nonce) == 16
    _verify(parsed)
    assert parse(f"  {text}\n") == token  # pasted with whitespace
    assert str(token) == text


def test_wire_layout() -> None:
    token = _issue()
    items = msgpack.unpackb(_payload(token.encode()), raw=False)
    assert items == [
        CLUSTER,
        "lab",
        ISSUER.id,
        list(ADDRS),
        NOW + DEFAULT_TTL,
        token.nonce,
        token.signature,
    ]


def test_every_token_distinct() -> None:
    assert len({_issue().encode() for _ in range(20)}) == 20


def test_new_cluster_id_names_its_founder() -> None:
    ids = {new_cluster_id(ISSUER.id) for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert all(is_founder(i, ISSUER.id) and not is_founder(i, OTHER.id) for i in ids)
    assert not is_founder("zz", ISSUER.id) and not is_founder(None, ISSUER.id)


def test_expiry() -> None:
    token = _issue(ttl_seconds=3600)
    _verify(token, now=NOW)
    _verify(token, now=NOW + 3599.9)
    for late in (NOW + 3600, NOW + 10**6):
        with pytest.raises(TokenError) as info:
            _verify(token, now=late)
        assert info.value.reason == "expired"
        assert "2023-11-14 23:13:20 UTC" in str(info.value)  # says when


def test_lifetime_cap() -> None:
    _issue(ttl_seconds=MAX_TTL)
    for ttl in (0, -1, MAX_TTL + 1, 1.5, True):
        with pytest.raises(ValueError):
            _issue(ttl_seconds=ttl)
    # A verifier refuses a token whose remaining lifetime exceeds the cap (modified issuer),
    # even though its signature is fine.
    far = _issue(ttl_seconds=MAX_TTL)
    with pytest.raises(TokenError) as info:
        _verify(far, now=NOW - 3600)
    assert info.value.reason == "too_long"


def test_wrong_cluster() -> None:
    token = _issue()
    with pytest.raises(TokenError) as info:
        _verify(token, cluster_id=new_cluster_id(OTHER.id))
    assert info.value.reason == "wrong_cluster"
    assert "'lab'" in str(info.value)


def test_non_member_issuer() -> None:
    token = _issue(identity=OTHER)
    assert parse(token.encode()) == token  # well-formed and signed, just not by a member
    with pytest.raises(TokenError) as info:
        _verify(token)
    assert info.value.reason == "not_member"
    assert OTHER.id in str(info.value)


def test_verify_checks_signature_of_constructed_token() -> None:
    token = _issue()
    for change in (
        {"expires": token.expires + 10**5},
        {"cluster_name": "other"},
        {"addresses": ("203.0.113.9:1",)},
        {"nonce": bytes(16)},
        {"issuer": OTHER.id},
        {"signature": bytes(64)},
    ):
        with pytest.raises(TokenError) as info:
            _verify(dataclasses.replace(token, **change))  # type: ignore[arg-type]
        assert info.value.reason == "bad_signature"


def test_forged_by_other_key() -> None:
    token = _issue()
    forged = dataclasses.replace(token, signature=OTHER.sign(token.signed_bytes()))
    assert _reason(forged.encode()) == "bad_signature"


def test_tampering_any_character() -> None:
    text = _issue().encode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for i in range(len(text)):
        for repl in {alphabet[(alphabet.index(text[i]) + k) % len(alphabet)] for k in (1, 17)}:
            bad = text[:i] + repl + text[i + 1 :]
            with pytest.raises(TokenError):
                _verify(parse(bad))


def test_tampering_any_payload_byte() -> None:
    token = _issue()
    payload = _payload(token.encode())
    for i in range(len(payload)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(payload)
            bad[i] ^= mask
            with pytest.raises(TokenError):
                _verify(parse(_text(bytes(bad))))


def test_truncated_and_extended() -> None:
    text = _issue().encode()
    for n in range(len(text)):
        with pytest.raises(TokenError):
            parse(text[:n])
    assert _reason(text + "A") == "corrupt"
    assert _reason(_text(_payload(text) + b"\x00")) == "corrupt"


def test_non_canonical_base64_rejected() -> None:
    text = _issue().encode()
    body = text[len(PREFIX) :]
    assert len(body) % 4 != 0  # the last character carries unused bits
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twins = [c for c in last if c != body[-1] and _payload(text[:-1] + c) == _payload(text)]
    assert twins
    for c in twins:
        assert _reason(text[:-1] + c) == "corrupt"


def test_error_reasons_and_messages() -> None:
    text = _issue().encode()
    cases = {
        "hello": "not_token",
        "": "not_token",
        "swnX." + text[5:]: "not_token",
        "https://example.org/swn1.abc": "not_token",
        "swn2." + text[5:]: "version",
        "swn1.": "corrupt",
        "swn1.!!!!": "corrupt",
        "swn1.a": "corrupt",
        "swn1." + "A" * 10_000: "corrupt",
        text.replace("swn1.", "swn1.=", 1): "corrupt",
    }
    for value, reason in cases.items():
        assert _reason(value) == reason, value
    assert _reason(None) == "not_token"
    assert _reason(b"swn1.abc") == "not_token"
    with pytest.raises(TokenError, match="unsupported join token version 'swn2'"):
        parse("swn2.abcd")
    with pytest.raises(TokenError, match="not a swarmnode join token"):
        parse("hello")


def _encoded(items: list[object]) -> str:
    return _text(msgpack.packb(items, use_bin_type=True))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, "ABCDEF" * 5 + "AB"),  # upper-case hex
        (0, "abc"),
        (1, ""),
        (1, "x" * 65),
        (1, "bad\x1bname"),
        (1, "naïve"),
        (2, "not-an-id"),
        (3, []),
        (3, ["nohost"]),
        (3, ["host:0"]),
        (3, ["host:65536"]),
        (3, ["host:-1"]),
        (3, ["::1:80"]),
        (3, ["[fe80::1%eth0]:80"]),
        (3, ["[nonsense]:80"]),
        (3, ["-bad-.example:80"]),
        (3, ["a b:80"]),
        (3, ["h:1"] * 17),
        (3, "h:1"),
        (4, -1),
        (4, 1.5),
        (4, True),
        (5, b"short"),
        (6, b"x" * 63),
        (6, "sig"),
    ],
)
def test_bad_fields_are_corrupt(index: int, value: object) -> None:
    token = _issue()
    items: list[object] = [*token.claim(), token.signature]
    items[index] = value
    assert _reason(_encoded(items)) == "corrupt"


def test_issue_validates_inputs() -> None:
    for kw in (
        {"cluster_id": "nothex"},
        {"cluster_name": "bad name"},
        {"addresses": ()},
        {"addresses": ("no-port",)},
    ):
        with pytest.raises(ValueError):
            _issue(**kw)


@given(st.text(max_size=300))
def test_fuzz_parse_text(text: str) -> None:
    with contextlib.suppress(TokenError):
        parse(text)


@given(st.binary(max_size=300))
def test_fuzz_parse_payload(payload: bytes) -> None:
    with contextlib.suppress(TokenError):
        parse(_text(payload))


_VALID = _issue().encode()


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(_VALID)),
            st.integers(0, 3),
            st.text(max_size=4),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_mutated_tokens(edits: list[tuple[int, int, str]]) -> None:
    text = _VALID
    for pos, cut, insert in edits:
        text = text[:pos] + insert + text[pos + cut :]
    try:
        token = parse(text)
    except TokenError:
        return
    assert text.strip() == _VALID  # only the original text parses
    assert token == parse(_VALID)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400),
        ("90m", 5400),
        ("30s", 30),
        ("7d", 604800),
        ("1h30m", 5400),
        ("3600", 3600),
        ("1d2h3m4s", 93784),
        (" 2h ", 7200),
        ("0h30m", 1800),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "0",
        "0s",
        "0h0m",
        "-5",
        "-1h",
        "h",
        "1x",
        "1.5h",
        "30m1h",
        "1h1h",
        "1 h",
        "١٢",
        "9" * 40,
        "1e3",
        "+5",
    ],
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_messages() -> None:
    with pytest.raises(ValueError, match="longer than zero"):
        parse_duration("0m")
    with pytest.raises(ValueError, match="positive"):
        parse_duration("-3h")
    with pytest.raises(ValueError, match=r"bad duration 'soon'"):
        parse_duration("soon")
    with pytest.raises(ValueError):
        parse_duration(5)  # type: ignore[arg-type]


@given(st.text(max_size=40))
def test_fuzz_duration(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) > 0
