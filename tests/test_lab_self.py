"""Self-tests of the namespace lab: the incident network behaves like the incident.

Why: every multi-host test trusts the lab; if masquerading, routing, partitions or teardown
were wrong, those tests would prove nothing (or leak namespaces into the next run).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.lab import Lab, LabError, incident_topology, unavailable_reason

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(30),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7400

# A one-connection-at-a-time echo server that reports each peer's address as it sees it.
ECHO_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    conn, (host, _port) = s.accept()
    print("peer", host, flush=True)
    with conn:
        conn.sendall(conn.recv(1024))
"""

# Connects, sends, prints "<own local address> <echo>"; non-zero exit when it cannot connect.
ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
c.sendall(b"ping")
print(c.getsockname()[0], c.recv(1024).decode(), flush=True)
"""


def _echo(
    lab: Lab, host: str, server_addr: str, timeout: float = 2.0
) -> subprocess.CompletedProcess[str]:
    return lab.run(
        host,
        [sys.executable, "-c", ECHO_CLIENT, server_addr, str(PORT), str(timeout)],
        timeout=timeout + 5,
    )


def _peers(log: str) -> list[str]:
    return [line.split()[1] for line in log.splitlines() if line.startswith("peer ")]


def _start_server(lab: Lab, host: str) -> subprocess.Popen[bytes]:
    server = lab.spawn(host, [sys.executable, "-c", ECHO_SERVER, str(PORT)])
    lab.wait_for_log(server, "listening", timeout=5)
    return server


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for PID 1 to reap it counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout


def test_incident_peers_seen_through_nat_and_routing(lab: Lab) -> None:
    topo = incident_topology(lab)
    lan1 = topo.addr("lan1")
    server = _start_server(lab, "lan1")

    # (client, address the server must see, client's own local address)
    cases = [
        ("tarn", topo.gw_lan_addr, "192.168.10.25"),  # masqueraded: seen as the gateway
        ("far", "172.30.0.9", "172.30.0.9"),  # routed, no NAT: its real address
        ("lan2", "10.42.0.51", "10.42.0.51"),  # same LAN
    ]
    for n, (client, seen, local) in enumerate(cases, start=1):
        res = _echo(lab, client, lan1)
        assert res.returncode == 0, f"{client}: {res.stderr}"
        assert res.stdout.split() == [local, "ping"]
        log = lab.wait_for_log(server, "peer ", timeout=5, count=n)
        assert _peers(log)[n - 1] == seen, f"{client}: server log:\n{log}"


def test_far_unreachable_without_route_and_mdns_scope(lab: Lab) -> None:
    """The topology exposes what the incident needs: lan1 has a multicast route on the LAN,
    and `far` is only reachable through routing (no multicast route towards it)."""
    topo = incident_topology(lab, lan_hosts=1, tarn=False)
    routes = lab.run("lan1", ["ip", "route"], check=True).stdout
    assert "224.0.0.0/4 dev to-lan" in routes
    assert "172.30.0.0/24 via 10.42.0.1" in routes
    assert topo.hosts == ("lan1", "far")
    far_routes = lab.run("far", ["ip", "route"], check=True).stdout
    assert "224.0.0.0/4" not in far_routes


def test_cut_blocks_and_uncut_restores(lab: Lab) -> None:
    topo = incident_topology(lab, lan_hosts=2, tarn=False, far=False)
    lan1, lan2 = topo.addr("lan1"), topo.addr("lan2")
    _start_server(lab, "lan1")
    assert _echo(lab, "lan2", lan1).returncode == 0

    lab.cut("lan1", lan2)  # server side drops: the client's SYNs vanish, it times out
    lab.cut("lan1", lan2)  # idempotent
    assert _echo(lab, "lan2", lan1, timeout=0.5).returncode != 0

    lab.uncut("lan1", lan2)
    lab.uncut("lan1", lan2)  # idempotent
    assert _echo(lab, "lan2", lan1).returncode == 0

    lab.cut("lan2", lan1)  # client side drops its own output
    assert _echo(lab, "lan2", lan1, timeout=0.5).returncode != 0
    lab.uncut("lan2", lan1)
    assert _echo(lab, "lan2", lan1).returncode == 0


def test_teardown_removes_namespaces_and_processes() -> None:
    with Lab("snt") as lab:
        incident_topology(lab, lan_hosts=1)
        names = lab.netns_names
        server = _start_server(lab, "lan1")
        # A process that escaped the spawned process's group: only `ip netns pids` finds it.
        escaper = lab.spawn("far", ["sh", "-c", "setsid sleep 300 & echo pid $!; wait"])
        log = lab.wait_for_log(escaper, "pid ", timeout=5)
        escaped_pid = int(log.split()[1])
        assert set(names) <= set(_netns_list().split())
    assert len(names) == 5
    listed = _netns_list()
    assert not [ns for ns in names if ns in listed]
    assert server.poll() is not None
    assert escaper.poll() is not None
    assert not _alive(escaped_pid)
    lab.close()  # idempotent


def test_teardown_after_failure_and_partial_setup() -> None:
    with pytest.raises(LabError), Lab("snt") as lab:
        lab.host("a")
        lab.switch("sw")
        names = lab.netns_names
        lab.connect("a", "sw", "not-an-address")  # fails half-way: veth exists, no address
    assert not [ns for ns in names if ns in _netns_list()]
    with pytest.raises(ZeroDivisionError), Lab("snt") as lab2:
        lab2.host("b")
        names = lab2.netns_names
        _ = 1 / 0
    assert not [ns for ns in names if ns in _netns_list()]


def test_netem_applies_or_skips(lab: Lab) -> None:
    incident_topology(lab, lan_hosts=1, tarn=False, far=False)
    lab.netem("lan1", "to-lan", loss=0, delay_ms=20)  # skips when the kernel lacks netem
    qdisc = lab.run("lan1", ["tc", "qdisc", "show", "dev", "to-lan"], check=True).stdout
    assert "netem" in qdisc
    lab.netem("lan1", "to-lan")
    qdisc = lab.run("lan1", ["tc", "qdisc", "show", "dev", "to-lan"], check=True).stdout
    assert "netem" not in qdisc


# Joins the mDNS group on every interface it is routed to and reports each datagram's sender.
MDNS_LISTENER = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton("0.0.0.0")))
print("listening", flush=True)
while True:
    data, (host, _port) = s.recvfrom(2048)
    print("from", host, data.decode(), flush=True)
"""

MDNS_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
s.sendto(sys.argv[1].encode(), ("224.0.0.251", 5353))
"""


def test_mdns_multicast_stays_on_the_lan(lab: Lab) -> None:
    incident_topology(lab, lan_hosts=2, tarn=False)
    listener = lab.spawn("lan1", [sys.executable, "-c", MDNS_LISTENER])
    lab.wait_for_log(listener, "listening", timeout=5)
    # far first: by the time lan2's datagram arrives, far's would have, had it crossed gw.
    assert lab.run("far", [sys.executable, "-c", MDNS_SEND, "from-far"]).returncode == 0
    assert lab.run("lan2", [sys.executable, "-c", MDNS_SEND, "from-lan2"]).returncode == 0
    log = lab.wait_for_log(listener, "from-lan2", timeout=5)
    assert "from 10.42.0.51 from-lan2" in log
    assert "from-far" not in log
