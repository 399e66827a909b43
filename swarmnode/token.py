"""Join tokens: a short-lived invitation, signed by the member that issued it.

``swarmnode init`` / ``swarmnode token`` print one; ``swarmnode join TOKEN`` needs nothing else,
because the token carries the cluster id and name and the addresses the issuer reported for
itself. A token is a *claim signed by an admitted member*, so any member can check it without
shared state: the signature proves which member issued it, the verifier's own membership view
says whether that member is (still) admitted, and the expiry bounds how long a leaked token is
useful. The 16 random nonce bytes make every token distinct (two tokens issued in the same
second are still different, and a member may remember nonces it has seen used).

Wire form: ``"swn1." + base64url-without-padding(msgpack([cluster_id, cluster_name, issuer,
[address, ...], expires, nonce, signature]))``, the signature being the issuer's Ed25519
signature over ``DOMAIN + msgpack([cluster_id, cluster_name, issuer, [address, ...], expires,
nonce])``. The domain keeps a token signature from ever being valid as an envelope signature or
anything else the same key signs. Parsing is strict and canonical: one token has exactly one
text, so changing any character of it makes it invalid.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

from net.addresses import MAX_REPORTED, MAX_WIRE_ADDRESS, is_wire_address
from swarmnode import identity as _identity
from swarmnode.identity import Identity

__all__ = [
    "DEFAULT_TTL",
    "DOMAIN",
    "MAX_TTL",
    "PREFIX",
    "Token",
    "TokenError",
    "is_founder",
    "issue",
    "new_cluster_id",
    "parse",
    "parse_duration",
    "verify",
]

PREFIX = "swn1."
DOMAIN = b"swarmnode-join-token-v1"
DEFAULT_TTL = 24 * 3600
# A token is a bearer credential: whoever holds it can join. Cap its lifetime so a forgotten
# token in a chat log or shell history stops working. Verifiers enforce the cap too (with
# `CLOCK_SKEW` slack), so a modified client cannot mint long-lived tokens either.
MAX_TTL = 30 * 24 * 3600
CLOCK_SKEW = 300
NONCE_LEN = 16
SIGNATURE_LEN = 64
MAX_ADDRESSES = MAX_REPORTED
MAX_NAME_LEN = 64
MAX_ADDRESS_LEN = MAX_WIRE_ADDRESS
# Comfortably above the largest well-formed token (16 longest addresses: about 6 KiB of text).
MAX_TOKEN_CHARS = 8192

_CLUSTER_ID_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_B64_RE = re.compile(r"[A-Za-z0-9_-]*")
_DURATION_RE = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?"
)
_MAX_DURATION_CHARS = 32
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class TokenError(ValueError):
    """A token that cannot be used. `reason` is a short machine-readable tag: not_token,
    version, corrupt, bad_signature, expired, too_long, wrong_cluster, not_member."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Token:
    cluster_id: str
    cluster_name: str
    issuer: str
    addresses: tuple[str, ...]
    expires: int
    nonce: bytes
    signature: bytes

    def claim(self) -> list[Any]:
        return [
            self.cluster_id,
            self.cluster_name,
            self.issuer,
            list(self.addresses),
            self.expires,
            self.nonce,
        ]

    def signed_bytes(self) -> bytes:
        """What the issuer signs."""
        return DOMAIN + _pack(self.claim())

    def encode(self) -> str:
        payload = _pack([*self.claim(), self.signature])
        return PREFIX + base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=")

    def __str__(self) -> str:
        return self.encode()


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


_FOUNDER_DOMAIN = b"swarmnode-cluster-founder-v1"


def new_cluster_id(founder: str) -> str:
    """A fresh cluster id that names its founder: 32 lower-case hex characters, a 4-byte
    random salt and the first 12 bytes of sha256(domain, salt, founder id).

    Anyone holding the id can tell the one true founder from a member (or a stranger) that
    signs itself a founder's admission: forging one takes a key whose hash matches 96 bits.
    """
    salt = secrets.token_bytes(4)
    return (salt + _founder_hash(salt, founder)).hex()


def is_founder(cluster_id: str | None, node_id: str) -> bool:
    """Whether `node_id` founded the cluster `cluster_id` (see `new_cluster_id`)."""
    if not _is_cluster_id(cluster_id):
        return False
    raw = bytes.fromhex(cluster_id)  # type: ignore[arg-type]
    return secrets.compare_digest(raw[4:], _founder_hash(raw[:4], node_id))


def _founder_hash(salt: bytes, founder: str) -> bytes:
    return hashlib.sha256(_FOUNDER_DOMAIN + salt + founder.encode()).digest()[:12]


def _is_cluster_id(value: object) -> bool:
    return isinstance(value, str) and _CLUSTER_ID_RE.fullmatch(value) is not None


def _is_name(value: object) -> bool:
    # Restricted to a plain ASCII set because it is printed on terminals of other machines.
    return (
        isinstance(value, str)
        and len(value) <= MAX_NAME_LEN
        and value.isascii()
        and _NAME_RE.fullmatch(value) is not None
    )



def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value < high  # not bool


def _check_fields(
    cluster_id: object,
    cluster_name: object,
    issuer: object,
    addresses: object,
    expires: object,
    nonce: object,
    signature: object,
) -> str | None:
    """What is wrong with these token fields, or None."""
    if not _is_cluster_id(cluster_id):
        return "bad cluster id"
    if not _is_name(cluster_name):
        return "bad cluster name"
    if not _identity.is_node_id(issuer):
        return "bad issuer id"
    if (
        not isinstance(addresses, list | tuple)
        or not 1 <= len(addresses) <= MAX_ADDRESSES
        or not all(is_wire_address(a) for a in addresses)
    ):
        return "bad address list"
    if not _is_int(expires, 0, 1 << 63):
        return "bad expiry"
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        return "bad nonce"
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        return "bad signature field"
    return None


def issue(
    identity: Identity,
    cluster_id: str,
    cluster_name: str,
    addresses: Iterable[str],
    ttl_seconds: int,
    now: float,
) -> Token:
    """A token for `cluster_id`, signed by `identity` (which must be an admitted member for
    anyone to accept it), valid for `ttl_seconds` from `now` (unix seconds)."""
    addresses = tuple(addresses)
    if not _is_int(ttl_seconds, 1, MAX_TTL + 1):
        raise ValueError(f"token lifetime must be between 1 s and {MAX_TTL} s, not {ttl_seconds}")
    expires = int(now) + ttl_seconds
    token = Token(
        cluster_id,
        cluster_name,
        identity.id,
        addresses,
        expires,
        secrets.token_bytes(NONCE_LEN),
        bytes(SIGNATURE_LEN),
    )
    problem = _check_fields(*token.claim(), token.signature)
    if problem:
        raise ValueError(f"cannot issue a token: {problem}")
    signature = identity.sign(token.signed_bytes())
    return Token(cluster_id, cluster_name, token.issuer, addresses, expires, token.nonce, signature)


def _corrupt(detail: str) -> TokenError:
    return TokenError("corrupt", f"corrupt join token ({detail}); copy it again in full")


def parse(text: str) -> Token:
    """The token in `text` (surrounding whitespace ignored); raises only `TokenError`.

    Checks that the issuer's signature is valid, but not expiry, cluster or membership: that
    is `verify`'s job, with the verifier's clock and view."""
    if not isinstance(text, str):
        raise TokenError("not_token", "not a swarmnode join token")
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise _corrupt("too long")
    head, dot, body = text.partition(".")
    if not dot or not re.fullmatch(r"swn[0-9]{1,4}", head):
        raise TokenError("not_token", "not a swarmnode join token (expected 'swn1.…')")
    if head + dot != PREFIX:
        raise TokenError(
            "version", f"unsupported join token version {head!r}; this swarmnode reads 'swn1'"
        )
    if not body.isascii() or not _B64_RE.fullmatch(body) or len(body) % 4 == 1:
        raise _corrupt("bad characters or length")
    try:
        payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise _corrupt("bad base64") from None
    # Unused low bits of the last character would let several texts decode to one token.
    if base64.urlsafe_b64encode(payload).decode("ascii").rstrip("=") != body:
        raise _corrupt("non-canonical base64")
    try:
        items = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=MAX_ADDRESS_LEN,
            max_bin_len=SIGNATURE_LEN,
            max_array_len=MAX_ADDRESSES,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception:
        # msgpack reports bad input through several exception types; all mean "corrupt".
        raise _corrupt("undecodable") from None
    if not isinstance(items, list) or len(items) != 7:
        raise _corrupt("wrong shape")
    problem = _check_fields(*items)
    if problem:
        raise _corrupt(problem)
    if _pack(items) != payload:
        raise _corrupt("non-canonical encoding")
    cluster_id, name, issuer, addresses, expires, nonce, signature = items
    token = Token(cluster_id, name, issuer, tuple(addresses), expires, nonce, signature)
    if not _identity.verify(issuer, token.signed_bytes(), signature):
        raise TokenError("bad_signature", "join token has a bad signature (altered or forged)")
    return token


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def verify(token: Token, *, now: float, cluster_id: str, is_member: Callable[[str], bool]) -> None:
    """Raise `TokenError` unless `token` admits a newcomer to `cluster_id` at time `now`.

    `is_member(node_id)` answers from the verifier's own membership view whether the issuer
    is an admitted member right now, so tokens from a removed member stop working.
    """
    problem = _check_fields(*token.claim(), token.signature)
    if problem:
        raise _corrupt(problem)
    if not _identity.verify(token.issuer, token.signed_bytes(), token.signature):
        raise TokenError("bad_signature", "join token has a bad signature (altered or forged)")
    if token.cluster_id != cluster_id:
        raise TokenError(
            "wrong_cluster",
            f"join token is for cluster {token.cluster_name!r} ({token.cluster_id}), "
            f"not this cluster ({cluster_id})",
        )
    if not is_member(token.issuer):
        raise TokenError(
            "not_member", f"join token was issued by {token.issuer}, which is not a member"
        )
    if now >= token.expires:
        ago = int(now - token.expires)
        raise TokenError(
            "expired",
            f"join token expired at {_when(token.expires)} ({ago} s ago); "
            "ask a member for a fresh one with 'swarmnode token'",
        )
    if token.expires - now > MAX_TTL + CLOCK_SKEW:
        raise TokenError(
            "too_long",
            f"join token is valid until {_when(token.expires)}, beyond the "
            f"{MAX_TTL // 86400}-day maximum lifetime",
        )


def parse_duration(text: str) -> int:
    """Seconds in a duration like ``24h``, ``90m``, ``30s``, ``7d``, ``1h30m`` or ``3600``.

    Units must come in the order d, h, m, s, each at most once; a bare number is seconds.
    Raises ValueError for anything else, and for a zero duration.
    """
    if not isinstance(text, str):
        raise ValueError(f"duration must be a string like '24h', not {text!r}")
    s = text.strip()
    if not s or len(s) > _MAX_DURATION_CHARS or not s.isascii():
        raise ValueError(f"bad duration {text!r}: use e.g. '24h', '90m', '7d', '1h30m' or '3600'")
    if s.startswith("-"):
        raise ValueError(f"duration {text!r} must be positive")
    if s.isdigit():
        seconds = int(s)
    else:
        match = _DURATION_RE.fullmatch(s)
        if not match:
            raise ValueError(
                f"bad duration {text!r}: use e.g. '24h', '90m', '7d', '1h30m' or '3600' "
                "(units d, h, m, s in that order)"
            )
        seconds = sum(int(v) * _UNITS[k] for k, v in match.groupdict().items() if v is not None)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero")
    return seconds
