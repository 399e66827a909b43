"""Which addresses a node reports to its peers, and whether the address a message came from is one.

A member's addresses are data inside its self-signed record (never its key). They must be
addresses peers can actually dial: the operator's `--advertise` values first (they know about
port forwards and subnet routers we cannot see), then the specific address the node listens on,
or, when it listens on a wildcard, the addresses of its own interfaces. Comparing the source
address a message arrived from with that list is how a member behind a masquerading gateway is
recognised: the gateway's address shows up instead of any address the member reported.

Host/port strings use the usual "host:port" form with IPv6 literals bracketed ("[addr]:port"),
which is also what ZeroMQ endpoints expect after "tcp://".
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence

import ifaddr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TAILSCALE_V4 = ipaddress.IPv4Network("100.64.0.0/10")
TAILSCALE_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
# RFC 1918 only: Python's `is_private` also covers documentation and benchmark ranges, which
# are not what "the LAN" means when choosing which address to try first.
_LAN_V4 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
IPV4_WILDCARDS = frozenset({"0.0.0.0", "*", ""})
IPV6_WILDCARDS = frozenset({"::", "[::]"})

AdapterSource = Callable[[], Iterable[ifaddr.Adapter]]


def _parse_ip(value: str) -> IPAddress | None:
    """The address `value` spells (IPv4-mapped IPv6 unwrapped to IPv4), or None for a hostname."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    """True for a loopback address or `localhost` (a hostname otherwise is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_tailscale(ip: str) -> bool:
    """True for an address in Tailscale's CGNAT range or its IPv6 ULA prefix."""
    parsed = _parse_ip(ip)
    if isinstance(parsed, ipaddress.IPv4Address):
        return parsed in TAILSCALE_V4
    if isinstance(parsed, ipaddress.IPv6Address):
        return parsed in TAILSCALE_V6
    return False


def _usable(ip: IPAddress) -> bool:
    """Addresses a peer on another host could dial: no loopback, link-local, multicast, ::."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)


def _rank(ip: IPAddress) -> int:
    """Preference class: LAN IPv4 (cheapest path), then Tailscale (works anywhere), then rest."""
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in net for net in _LAN_V4):
        return 0
    if is_tailscale(str(ip)):
        return 1
    return 2


def local_addresses(adapters: AdapterSource = ifaddr.get_adapters) -> list[str]:
    """This host's usable interface addresses, best first.

    Order: private LAN IPv4, then Tailscale (IPv4 before IPv6), then everything else (public
    IPv4, global and ULA IPv6); within a class, IPv4 first and then the order the system lists
    interfaces in, so the result is stable between calls. `adapters` is injectable for tests.
    """
    found: list[IPAddress] = []
    for adapter in adapters():
        for entry in adapter.ips:
            raw = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            ip = _parse_ip(raw.split("%", 1)[0])
            if ip is not None and _usable(ip) and ip not in found:
                found.append(ip)
    order = {ip: i for i, ip in enumerate(found)}
    found.sort(key=lambda ip: (_rank(ip), ip.version, order[ip]))
    return [str(ip) for ip in found]


def host_of(address: str) -> str:
    """The host part of "host:port" (the text itself when it does not parse)."""
    try:
        return split_hostport(address, 1)[0]
    except ValueError:
        return address


def local_networks(adapters: AdapterSource = ifaddr.get_adapters) -> list[IPNetwork]:
    """The subnets this host's usable addresses sit in (what "same subnet" means for routes)."""
    nets: list[IPNetwork] = []
    for adapter in adapters():
        for entry in adapter.ips:
            raw = entry.ip if isinstance(entry.ip, str) else entry.ip[0]
            ip = _parse_ip(raw.split("%", 1)[0])
            if ip is None or not _usable(ip):
                continue
            net = ipaddress.ip_network(f"{ip}/{entry.network_prefix}", strict=False)
            if net not in nets:
                nets.append(net)
    return nets


def dial_order(addresses: Iterable[str], networks: Iterable[IPNetwork]) -> list[str]:
    """A member's reported addresses in the order to try them: one on a subnet this host is
    on first (one hop, no router), then Tailscale (works across networks), then the rest, each
    class in the member's own order."""
    nets = list(networks)

    def rank(entry: str) -> int:
        try:
            ip = _parse_ip(split_hostport(entry, 1)[0])
        except ValueError:
            return 3
        if ip is not None and any(ip.version == n.version and ip in n for n in nets):
            return 0
        return 1 if ip is not None and is_tailscale(str(ip)) else 2

    listed = list(addresses)
    return sorted(listed, key=lambda a: (rank(a), listed.index(a)))


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
    return port


def _check_host(host: str, original: str) -> str:
    if not host or any(c.isspace() for c in host) or any(c in host for c in "[]/@"):
        raise ValueError(f"bad host in address {original!r}")
    return host


def split_hostport(value: str, default_port: int | None = None,
                   any_port: bool = False) -> tuple[str, int]:
    """Split "host:port", "[v6]:port", "host", "[v6]" or a bare IPv6 literal into (host, port).

    A bare IPv6 literal ("fd00::1") has no port: its colons belong to the address, so an IPv6
    address with a port must be bracketed. Without a port, `default_port` is used; ValueError
    names the offending input when it cannot be parsed or a port is needed but missing. Port 0
    ("any free one") only for an address to listen on: `any_port`.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"empty address: {value!r}")
    text = value.strip()
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in address {value!r}")
        host, rest = text[1:end], text[end + 1 :]
        if _parse_ip(host.split("%", 1)[0]) is None or ":" not in host:
            raise ValueError(f"brackets must hold an IPv6 address: {value!r}")
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"unexpected text after ']' in address {value!r}")
    elif text.count(":") > 1:
        if _parse_ip(text.split("%", 1)[0]) is None:
            raise ValueError(
                f"bad address {value!r} (an IPv6 address with a port needs [brackets])"
            )
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    _check_host(host, value)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {value!r} has no port")
        return host, 0 if any_port and default_port == 0 else _check_port(default_port)
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"bad port in address {value!r}")
    port = int(port_text)
    if not (0 if any_port else 1) <= port <= 65535:
        raise ValueError(f"port out of range in address {value!r}")
    return host, port


def _canonical_host(host: str) -> str:
    """IP literals in their compressed form (so equal addresses compare equal), names lowered."""
    ip = _parse_ip(host)
    if ip is not None and "%" not in host:
        return str(ip)
    return host.lower()


def join_hostport(host: str, port: int) -> str:
    """The "host:port" form of a pair; IPv6 literals are bracketed."""
    host = host.strip("[]")
    _check_host(host, host)
    _check_port(port)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def reported_addresses(
    listen_host: str,
    port: int,
    advertise: Sequence[str] = (),
    *,
    detected: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """The "host:port" list a node puts in its self-signed record, best first, deduplicated.

    `advertise` values ("ADDR" or "ADDR:PORT"; ADDR may be a DNS name) come first. A specific
    `listen_host` is always included, loopback too, because a node bound to 127.0.0.5 can only be
    reached there (tests run several nodes on 127.0.0.x). On a wildcard, the interface addresses
    (`detected`, default `local_addresses()`) are added: IPv4 only for 0.0.0.0, both families
    for "::" (which is dual-stack on Linux).
    """
    _check_port(port)
    out: list[str] = []
    seen: set[tuple[str, int]] = set()

    def add(host: str, host_port: int) -> None:
        key = (_canonical_host(host), host_port)
        if key not in seen:
            seen.add(key)
            out.append(join_hostport(key[0], host_port))

    for value in advertise:
        add(*split_hostport(value, port))
    listen = listen_host.strip()
    if listen in IPV4_WILDCARDS or listen in IPV6_WILDCARDS:
        want_v6 = listen in IPV6_WILDCARDS
        for ip in local_addresses() if detected is None else detected:
            parsed = _parse_ip(ip)
            if parsed is None or (parsed.version == 6 and not want_v6):
                continue
            add(str(parsed), port)
    else:
        add(split_hostport(listen, port)[0], port)
    return tuple(out[:MAX_REPORTED])


def observed_matches(observed_host: str, reported: Iterable[str]) -> bool:
    """True when the source address of a message is one of the member's reported hosts.

    Only hosts are compared: the source port of an outgoing connection is ephemeral. The
    observed host may come bracketed or IPv4-mapped from a dual-stack socket. Reported entries
    that do not parse never match (they are the member's problem, not evidence of NAT).
    """
    try:
        host, _ = split_hostport(observed_host.strip(), default_port=1)
    except ValueError:
        host = observed_host.strip().strip("[]")
    want = _canonical_host(host)
    for entry in reported:
        try:
            reported_host, _ = split_hostport(entry, default_port=1)
        except ValueError:
            continue
        if _canonical_host(reported_host) == want:
            return True
    return False


def is_nat(observed_host: str, reported: Iterable[str]) -> bool:
    """A member is behind NAT (or a proxy) when it speaks from an address it did not report."""
    return not observed_matches(observed_host, reported)


#: Most addresses a node reports (best first). A Docker or LXC host can have dozens of bridge
#: addresses; peers only ever need a few, and the cap bounds every record and token.
MAX_REPORTED = 16
#: Longest "host:port" on the wire: a 253-character DNS name, ":" and a 5-digit port.
MAX_WIRE_ADDRESS = 261
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_wire_address(value: object) -> bool:
    """A reported address as it travels between nodes: `host:port`, where host is an IPv4
    address, a DNS name or a bracketed IPv6 address without a zone (a zone id is link-local:
    meaningless on another machine)."""
    if not isinstance(value, str) or not value.isascii() or len(value) > MAX_WIRE_ADDRESS:
        return False
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 1 <= int(port) <= 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        return "%" not in host and _parse_ip(host[1:-1]) is not None
    if not host or len(host) > 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_LABEL_RE.fullmatch(label) for label in labels)
