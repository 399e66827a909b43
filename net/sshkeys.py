"""The pure half of SSH: hops, their errors, and host key fingerprints (no paramiko).

Kept apart from net/ssh.py so the node can publish its host keys and read `jumps` from its
config without loading paramiko (and its crypto) into every node at start.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from net.addresses import split_hostport

DEFAULT_PORT = 22
_HOST_KEY_GLOB = "ssh_host_*_key.pub"


# --------------------------------------------------------------------------- errors
class SshError(Exception):
    """Any SSH failure; `hop` is the hop it happened on, when there is one."""

    def __init__(self, message: str, hop: Hop | None = None) -> None:
        super().__init__(message)
        self.hop = hop


class HopSyntaxError(SshError, ValueError):
    """A hop string that cannot be parsed (also a ValueError, like other parse errors)."""


class HostKeyError(SshError):
    """A hop's host key is unknown, mismatched or revoked; nothing was sent to it."""

    def __init__(self, message: str, hop: Hop, expected: set[str], got: str) -> None:
        super().__init__(message, hop)
        self.expected = expected
        self.got = got


class SshConnectError(SshError):
    """A hop could not be reached or refused authentication; `reason` says why."""

    def __init__(self, message: str, hop: Hop, reason: str) -> None:
        super().__init__(message, hop)
        self.reason = reason


# --------------------------------------------------------------------------- hops
@dataclass(frozen=True)
class Hop:
    """One SSH server of a chain; `fingerprints` pins its host key (else known_hosts)."""

    user: str
    host: str
    port: int = DEFAULT_PORT
    fingerprints: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.user or any(c.isspace() for c in self.user):
            raise HopSyntaxError(f"bad SSH user {self.user!r}")
        if not self.host or any(c.isspace() for c in self.host):
            raise HopSyntaxError(f"bad SSH host {self.host!r}")
        port = self.port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise HopSyntaxError(f"bad SSH port {port!r} for host {self.host}")
        if not isinstance(self.fingerprints, frozenset):  # accept any iterable of strings
            object.__setattr__(self, "fingerprints", frozenset(self.fingerprints))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH files this host's key under: `host`, or `[host]:port`."""
        host = self.host.lower()
        return host if self.port == DEFAULT_PORT else f"[{host}]:{self.port}"


def local_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError) as e:
        raise SshError(f"cannot tell the local user name ({e}); give user@host") from None


def parse_hop(text: str, default_user: str | None = None) -> Hop:
    """Parse `user@host`, `user@host:port`, `host` or `user@[v6addr]:port` into a Hop."""
    if not isinstance(text, str) or not text.strip():
        raise HopSyntaxError(f"empty SSH hop: {text!r}")
    value = text.strip()
    if any(c.isspace() for c in value):
        raise HopSyntaxError(f"spaces in SSH hop {text!r}")
    user, at, hostport = value.rpartition("@")  # like ssh: the host follows the last '@'
    if at and not user:
        raise HopSyntaxError(f"empty user in SSH hop {text!r}")
    try:
        host, port = split_hostport(hostport, DEFAULT_PORT)
    except ValueError as e:
        raise HopSyntaxError(f"bad SSH hop {text!r}: {e}") from None
    return Hop(user=user or default_user or local_user(), host=host, port=port)


# --------------------------------------------------------------------------- fingerprints
def blob_fingerprint(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii")
    return "SHA256:" + digest.rstrip("=")


def _blob_type(blob: bytes) -> str | None:
    """The key type named inside a public key blob, or None when it is not one."""
    if len(blob) < 4:
        return None
    (size,) = struct.unpack(">I", blob[:4])
    if size == 0 or size > 64 or len(blob) < 4 + size:
        return None
    try:
        return blob[4 : 4 + size].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_public_key(key_type: str, data: str) -> bytes | None:
    """Decode one `type base64` public key; None unless the blob really is that type."""
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return blob if _blob_type(blob) == key_type else None


def host_key_fingerprints(paths: Iterable[Path] | None = None) -> list[str]:
    """Fingerprints of this machine's sshd host keys, so peers can pin them; sorted.

    Files that are unreadable or are not public keys are skipped.
    """
    if paths is None:
        paths = sorted(Path("/etc/ssh").glob(_HOST_KEY_GLOB))
    found: set[str] = set()
    for path in paths:
        try:
            lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 2 and not line.lstrip().startswith("#"):
                blob = parse_public_key(fields[0], fields[1])
                if blob is not None:
                    found.add(blob_fingerprint(blob))
    return sorted(found)
