"""Seed addresses from the local Tailscale daemon (`tailscale status --json`).

mDNS does not cross routed hops, but a tailnet reaches every machine the operator owns, so
the other Linux machines on it are good first guesses for peers. The tailnet also holds
devices that never run swarmnode (phones, Macs) and machines that are offline; both are
skipped so a node does not waste its join attempts on them. Candidates are only guesses: the
admission handshake proves who answers, by node id.

Which OSes count: swarmnode runs on Linux (and is expected to work on FreeBSD); Tailscale
reports those as "linux" and "freebsd". Android, iOS, macOS and Windows devices are skipped.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from net.addresses import join_hostport

log = logging.getLogger(__name__)

SWARM_OSES = frozenset({"linux", "freebsd"})


@dataclass(frozen=True)
class Peer:
    """One other device of the tailnet, as the local daemon sees it."""

    hostname: str
    dns_name: str
    os: str
    ips: tuple[str, ...]
    online: bool


@dataclass(frozen=True)
class TailscaleStatus:
    """This device's Tailscale IPs and the other devices of the tailnet."""

    self_ips: tuple[str, ...]
    peers: list[Peer] = field(default_factory=list)
    backend_state: str = ""


def _field(obj: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"tailscale status: {where}.{key} must be {kind.__name__}, got {value!r}")
    return value


def _ips(obj: dict[str, Any], where: str) -> tuple[str, ...]:
    values = _field(obj, "TailscaleIPs", list, where, [])
    out: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"tailscale status: {where}.TailscaleIPs holds {value!r}")
        try:
            out.append(str(ipaddress.ip_address(value)))
        except ValueError as exc:
            raise ValueError(f"tailscale status: {where}.TailscaleIPs holds {value!r}") from exc
    return tuple(out)


def _peer(obj: Any, where: str) -> Peer:
    if not isinstance(obj, dict):
        raise ValueError(f"tailscale status: {where} must be an object")
    return Peer(
        hostname=_field(obj, "HostName", str, where, ""),
        dns_name=_field(obj, "DNSName", str, where, ""),
        os=_field(obj, "OS", str, where, ""),
        ips=_ips(obj, where),
        online=_field(obj, "Online", bool, where, False),
    )


def parse_status(text: str | bytes) -> TailscaleStatus:
    """Parse the JSON of `tailscale status --json`.

    Strict about the keys it uses (a wrong type or an invalid IP raises ValueError saying
    where) and silent about the many keys it does not use, which change between releases.
    `Peer` may be absent or null (no peers); the own IPs come from `Self`, falling back to the
    top-level `TailscaleIPs`.
    """
    try:
        data = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"tailscale status: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("tailscale status: top level must be an object")
    self_obj = data.get("Self")
    if self_obj is not None and not isinstance(self_obj, dict):
        raise ValueError("tailscale status: Self must be an object")
    self_ips = _ips(self_obj, "Self") if self_obj else ()
    if not self_ips:
        self_ips = _ips(data, "status")
    peers_obj = data.get("Peer") or {}
    if not isinstance(peers_obj, dict):
        raise ValueError("tailscale status: Peer must be an object keyed by node key")
    peers = [_peer(obj, f"Peer[{key}]") for key, obj in peers_obj.items()]
    backend = _field(data, "BackendState", str, "status", "")
    return TailscaleStatus(self_ips=self_ips, peers=peers, backend_state=backend)


def is_swarm_candidate(peer: Peer, self_ips: tuple[str, ...] = ()) -> bool:
    """Online, on an OS swarmnode runs on, and not this device itself."""
    return (
        peer.online
        and peer.os.lower() in SWARM_OSES
        and bool(peer.ips)
        and not set(peer.ips) & set(self_ips)
    )


def seed_candidates(status: TailscaleStatus, port: int) -> list[str]:
    """ "host:port" guesses for peers: every candidate's IPv4 first, then their IPv6.

    IPv4 first because it is what every node listens on by default (0.0.0.0). An empty list
    when the daemon is not running (its peers are then unreachable anyway).
    """
    if status.backend_state not in ("", "Running"):
        return []
    picked = [p for p in status.peers if is_swarm_candidate(p, status.self_ips)]
    out: list[str] = []
    for version in (4, 6):
        for peer in picked:
            for ip in peer.ips:
                if ipaddress.ip_address(ip).version == version:
                    entry = join_hostport(ip, port)
                    if entry not in out:
                        out.append(entry)
    return out


def query(timeout: float = 3.0, executable: str = "tailscale") -> TailscaleStatus | None:
    """Run `tailscale status --json`; None (logged) when Tailscale is absent or fails.

    Never raises: Tailscale is an optional source of seeds, and a node must start without it.
    """
    exe = shutil.which(executable)
    if exe is None:
        log.debug("tailscale not installed; no tailnet seeds")
        return None
    try:
        done = subprocess.run(
            [exe, "status", "--json"],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        log.warning("tailscale status did not answer within %.1fs", timeout)
        return None
    except OSError as exc:
        log.warning("cannot run tailscale: %s", exc)
        return None
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()
        log.warning("tailscale status failed (exit %d): %s", done.returncode, err[:200])
        return None
    try:
        return parse_status(done.stdout)
    except ValueError as exc:
        log.warning("%s", exc)
        return None
