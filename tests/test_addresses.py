"""Tests for net.addresses: interface discovery, reported addresses, host:port parsing, NAT."""

from __future__ import annotations

import ipaddress

import ifaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from net.addresses import (
    MAX_REPORTED,
    dial_order,
    is_nat,
    is_tailscale,
    is_wire_address,
    join_hostport,
    local_addresses,
    local_networks,
    observed_matches,
    reported_addresses,
    split_hostport,
)


def v4(addr: str, prefix: int = 24) -> ifaddr.IP:
    return ifaddr.IP(addr, prefix, "x")


def v6(addr: str, scope: int = 0, prefix: int = 64) -> ifaddr.IP:
    return ifaddr.IP((addr, 0, scope), prefix, "x")


def adapters(*items: tuple[str, list[ifaddr.IP]]):
    return lambda: [ifaddr.Adapter(name, name, ips, index=i) for i, (name, ips) in enumerate(items)]


HOST = adapters(
    ("lo", [v4("127.0.0.1", 8), v6("::1", prefix=128)]),
    ("eth0", [v4("203.0.113.9"), v6("2001:db8::9"), v6("fe80::1", scope=2)]),
    ("tailscale0", [v4("100.91.120.17", 32), v6("fd7a:115c:a1e0::4534:7811", prefix=128)]),
    ("wlan0", [v4("192.168.1.20"), v4("169.254.3.4", 16), v6("fd00::20")]),
    ("br0", [v4("10.42.0.1")]),
)


def test_local_addresses_order_and_filtering() -> None:
    assert local_addresses(HOST) == [
        "192.168.1.20",
        "10.42.0.1",
        "100.91.120.17",
        "fd7a:115c:a1e0::4534:7811",
        "203.0.113.9",
        "2001:db8::9",
        "fd00::20",
    ]


def test_local_addresses_deduplicates_and_strips_scope() -> None:
    src = adapters(
        ("a", [v4("10.0.0.1"), v6("fd00::1%eth0")]),
        ("b", [v4("10.0.0.1"), v6("fd00::1")]),
    )
    assert local_addresses(src) == ["10.0.0.1", "fd00::1"]


def test_local_addresses_only_loopback_is_empty() -> None:
    assert local_addresses(adapters(("lo", [v4("127.0.0.1", 8), v6("::1")]))) == []


def test_local_addresses_real_host() -> None:
    found = local_addresses()
    assert found == local_addresses()  # stable
    for addr in found:
        ip = ipaddress.ip_address(addr)
        assert not (ip.is_loopback or ip.is_link_local)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("100.64.0.1", True),
        ("100.127.255.254", True),
        ("100.128.0.1", False),
        ("100.63.255.255", False),
        ("fd7a:115c:a1e0::1", True),
        ("fd7a:115c:a1e1::1", False),
        ("::ffff:100.100.1.1", True),
        ("10.0.0.1", False),
        ("not-an-ip", False),
    ],
)
def test_is_tailscale(ip: str, expected: bool) -> None:
    assert is_tailscale(ip) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        ("10.0.0.1", ("10.0.0.1", 5555)),
        ("host.example:80", ("host.example", 80)),
        ("host.example", ("host.example", 5555)),
        ("[fd00::1]:7000", ("fd00::1", 7000)),
        ("[fd00::1]", ("fd00::1", 5555)),
        ("fd00::1", ("fd00::1", 5555)),
        ("::", ("::", 5555)),
        (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
    ],
)
def test_split_hostport(value: str, expected: tuple[str, int]) -> None:
    assert split_hostport(value, 5555) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("10.0.0.1:", "bad port"),
        ("10.0.0.1:x", "bad port"),
        ("10.0.0.1:0", "out of range"),
        ("10.0.0.1:65536", "out of range"),
        ("10.0.0.1:-1", "bad port"),
        ("[fd00::1", "unclosed"),
        ("[fd00::1]x", "after ']'"),
        ("[10.0.0.1]:5", "IPv6"),
        ("fd00::1:zz:80", "brackets"),
        (":80", "bad host"),
        ("a b:80", "bad host"),
    ],
)
def test_split_hostport_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_hostport(value, 5555)


def test_port_0_only_where_any_free_port_is_meant() -> None:
    assert split_hostport("127.0.0.1:0", any_port=True) == ("127.0.0.1", 0)
    assert split_hostport("[::1]:0", any_port=True) == ("::1", 0)
    assert split_hostport("0.0.0.0", 0, any_port=True) == ("0.0.0.0", 0)
    with pytest.raises(ValueError, match="out of range"):
        split_hostport("127.0.0.1:65536", any_port=True)


def test_split_hostport_needs_port_without_default() -> None:
    with pytest.raises(ValueError, match="no port"):
        split_hostport("10.0.0.1")


def test_join_hostport() -> None:
    assert join_hostport("10.0.0.1", 80) == "10.0.0.1:80"
    assert join_hostport("fd00::1", 80) == "[fd00::1]:80"
    assert join_hostport("[fd00::1]", 80) == "[fd00::1]:80"
    with pytest.raises(ValueError):
        join_hostport("10.0.0.1", 0)
    with pytest.raises(ValueError):
        join_hostport("", 1)


ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda ip: ip.compressed),
)


@given(ips, st.integers(1, 65535))
def test_join_split_roundtrip(host: str, port: int) -> None:
    got_host, got_port = split_hostport(join_hostport(host, port))
    assert got_port == port
    assert ipaddress.ip_address(got_host) == ipaddress.ip_address(host)


DETECTED = ["192.168.1.20", "100.91.120.17", "fd7a:115c:a1e0::4534:7811"]


def test_reported_advertise_first_then_wildcard_v4() -> None:
    advertise = ["198.51.100.7:17000", "gw.example"]
    got = reported_addresses("0.0.0.0", 7000, advertise, detected=DETECTED)
    assert got == (
        "198.51.100.7:17000",
        "gw.example:7000",
        "192.168.1.20:7000",
        "100.91.120.17:7000",
    )


def test_reported_v6_wildcard_includes_both_families() -> None:
    got = reported_addresses("::", 7000, [], detected=DETECTED)
    assert got == ("192.168.1.20:7000", "100.91.120.17:7000", "[fd7a:115c:a1e0::4534:7811]:7000")


def test_reported_specific_listen_is_included_even_loopback() -> None:
    assert reported_addresses("127.0.0.3", 7000, [], detected=DETECTED) == ("127.0.0.3:7000",)
    assert reported_addresses("10.0.0.5", 7000, ["[fd00::1]:9"], detected=DETECTED) == (
        "[fd00::1]:9",
        "10.0.0.5:7000",
    )


def test_reported_deduplicates_equivalent_spellings() -> None:
    got = reported_addresses(
        "fd00:0::1", 7000, ["[fd00::1]:7000", "FD00::1", "192.168.1.20"], detected=DETECTED
    )
    assert got == ("[fd00::1]:7000", "192.168.1.20:7000")


def test_reported_bad_advertise_raises() -> None:
    with pytest.raises(ValueError, match="bad port"):
        reported_addresses("0.0.0.0", 7000, ["10.0.0.1:http"], detected=[])


def test_reported_real_detection_runs() -> None:
    got = reported_addresses("0.0.0.0", 7000, [])
    assert all(entry.endswith(":7000") for entry in got)


def test_observed_matches_and_nat() -> None:
    reported = ("192.168.10.25:7000", "[fd7a:115c:a1e0::1]:7000", "tarn.example:7000")
    assert observed_matches("192.168.10.25", reported)
    assert observed_matches("::ffff:192.168.10.25", reported)
    assert observed_matches("[fd7a:115c:a1e0:0::1]", reported)
    assert observed_matches("TARN.example", reported)
    assert not is_nat("192.168.10.25", reported)
    # the gateway's own address, as seen behind a masquerade
    assert is_nat("10.42.0.1", reported)
    assert is_nat("10.42.0.1", ())


def test_observed_ignores_malformed_reported_entries() -> None:
    assert is_nat("10.0.0.1", ("garbage:port", "[oops"))
    assert observed_matches("10.0.0.1", ("garbage:port", "10.0.0.1:5"))


@given(st.lists(ips, min_size=1, max_size=5), st.integers(1, 65535))
def test_every_reported_host_matches(hosts: list[str], port: int) -> None:
    reported = reported_addresses("0.0.0.0", port, hosts, detected=[])
    for host in hosts:
        assert observed_matches(host, reported)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("10.0.0.1:7946", True),
        ("build-01.lan:7946", True),
        ("[fd7a:115c:a1e0::1]:7946", True),
        ("[fe80::1%eth0]:7946", False),  # a zone means nothing on another machine
        ("10.0.0.1", False),
        ("10.0.0.1:0", False),
        ("-bad-.lan:1", False),
        ("[not-v6]:1", False),
        ("x" * 300 + ":1", False),
        (7946, False),
    ],
)
def test_wire_address(value, ok):
    assert is_wire_address(value) is ok


def test_reported_addresses_are_capped_best_first():
    many = [f"10.0.{i}.1" for i in range(40)]
    got = reported_addresses("0.0.0.0", 7946, detected=many)
    assert len(got) == MAX_REPORTED and got[0] == "10.0.0.1:7946"


def test_dial_order_prefers_same_subnet_then_tailscale_then_the_rest():
    nets = [ipaddress.ip_network("10.42.0.0/24")]
    reported = ["203.0.113.5:7946", "100.101.1.2:7946", "192.168.10.25:7946", "10.42.0.9:7946",
                "[fd7a:115c:a1e0::5]:7946"]
    assert dial_order(reported, nets) == [
        "10.42.0.9:7946", "100.101.1.2:7946", "[fd7a:115c:a1e0::5]:7946",
        "203.0.113.5:7946", "192.168.10.25:7946"]
    assert dial_order(reported[:2], []) == ["100.101.1.2:7946", "203.0.113.5:7946"]


def test_local_networks_gives_the_subnet_of_each_usable_address():
    assert local_networks(HOST) == [
        ipaddress.ip_network(n) for n in (
            "203.0.113.0/24", "2001:db8::/64", "100.91.120.17/32",
            "fd7a:115c:a1e0::4534:7811/128", "192.168.1.0/24", "fd00::/64", "10.42.0.0/24")]
