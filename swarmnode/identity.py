"""A node's identity: one Ed25519 key, from which its id and its CURVE key pair derive.

The node id *is* the public key (RFC 4648 base32, lower case, no padding: 52 characters), so
an id is self-certifying: anyone holding an id can check a signature by that node and can open
a CURVE connection that only that node can answer. Nothing is ever keyed by network address.
"""

from __future__ import annotations

import base64
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing
from zmq.utils import z85

KEY_FILE = "identity.key"
ID_LEN = 52


class IdentityError(ValueError):
    """An id or key file that cannot be used."""


def encode_id(public_key: bytes) -> str:
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def decode_id(node_id: str) -> bytes:
    """The 32-byte Ed25519 public key behind an id; raises IdentityError if it is not one."""
    if not isinstance(node_id, str) or len(node_id) != ID_LEN:
        raise IdentityError(f"not a node id: {node_id!r}")
    try:
        raw = base64.b32decode(node_id.upper() + "====")
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"not a node id: {node_id!r}") from exc
    if len(raw) != 32 or encode_id(raw) != node_id:  # one spelling per key, never aliases
        raise IdentityError(f"not a node id: {node_id!r}")
    return raw


def is_node_id(value: object) -> bool:
    return isinstance(value, str) and _is_id(value)


@functools.lru_cache(maxsize=4096)
def _is_id(value: str) -> bool:
    """Cached: every inbound message names its sender, nearly always a member."""
    try:
        decode_id(value)
    except IdentityError:
        return False
    return True


def verify(node_id: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `node_id`'s Ed25519 signature of `data`; never raises."""
    try:
        _verify_key(node_id).verify(data, signature)
    except (IdentityError, nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _verify_key(node_id: str) -> nacl.signing.VerifyKey:
    """Decoding an id into a key costs as much as the check itself; members sign every
    message, so their keys are kept (errors are not cached: they raise)."""
    return nacl.signing.VerifyKey(decode_id(node_id))


@functools.lru_cache(maxsize=4096)
def curve_public_key(node_id: str) -> bytes:
    """The Z85 CURVE public key of `node_id` (X25519, converted by libsodium). Cached: every
    inbound message is checked against it, and the conversion is not free."""
    pk = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(decode_id(node_id))
    return z85.encode(pk)


@dataclass(frozen=True)
class Identity:
    signing_key: nacl.signing.SigningKey

    @functools.cached_property
    def id(self) -> str:  # (every message sealed names it)
        return encode_id(bytes(self.signing_key.verify_key))

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool:
        return verify(node_id, data, signature)

    def curve_keypair(self) -> tuple[bytes, bytes]:
        """(public, secret) Z85 CURVE keys for ZeroMQ."""
        sk = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
            bytes(self.signing_key) + bytes(self.signing_key.verify_key)
        )
        return curve_public_key(self.id), z85.encode(sk)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())


def write_secret(path: Path, data: bytes) -> None:
    """Write a secrets file atomically with mode 0600 from its first byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create(home: Path) -> Identity:
    """The identity stored in `home`, made on first use (mode 0600)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / KEY_FILE
    if not path.exists():
        write_secret(path, bytes(Identity.generate().signing_key))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(f"{path} has mode {mode:o}; it holds a secret key and must be 0600")
    seed = path.read_bytes()
    if len(seed) != 32:
        raise IdentityError(f"{path} is not a 32-byte Ed25519 seed ({len(seed)} bytes)")
    return Identity(nacl.signing.SigningKey(seed))
