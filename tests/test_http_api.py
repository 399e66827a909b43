"""The node's outward interfaces on real processes: Prometheus metrics that reflect the swarm,
the status JSON, the token every request needs (reads too, on localhost too, unless the
operator opened them), the Host check against DNS rebinding, the bind surviving a restart,
and the events as JSON lines."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmnode.config import ConfigError, parse
from swarmnode.eventlog import JsonLines
from swarmnode.http_api import STATIC, _page, host_allowed
from swarmnode.netmap import network_of, picture
from tests.ports import free_port
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def get(url: str, token: str | None = None, host: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if host:
        headers["Host"] = host
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_reflect_the_swarm_and_a_build(swarm: Swarm, tmp_path: Path) -> None:
    nodes, _token = swarm.loopback(2, 30)
    first = nodes[0]
    url, _, query = swarm.cli(first, "dashboard").stdout.strip().partition("?")
    assert url.startswith("http://127.0.0.1:") and url == swarm.query(first, "status")["dashboard"]
    token = (first.home / "dashboard.token").read_text().strip()
    assert query == "token=" + token
    swarm.wait_for(lambda: swarm.query(first, "status")["leader"], 20, "a leader")
    plan = tmp_path / "p.toml"
    plan.write_text('[jobs.a]\ncmd = "true"\n[jobs.b]\ncmd = "exit 3"\n')
    swarm.cli(first, "build", str(plan), "--wait", check=False, timeout=60)
    code, text = get(url + "metrics", token)
    assert code == 200
    got = samples(text)
    assert got[("swarmnode_members", (("state", "alive"),))] == 2
    assert got[("swarmnode_cores", (("state", "online"),))] == \
        swarm.query(first, "status")["cores_online"] > 0
    assert got[("swarmnode_jobs", (("state", "done"),))] == 1
    assert got[("swarmnode_jobs", (("state", "blocked"),))] == 1  # failed on both nodes
    assert got[("swarmnode_messages_sent_total", (("type", "ping"),))] > 0
    assert got[("swarmnode_messages_received_total", (("type", "ack"),))] > 0
    assert got[("swarmnode_wire_bytes_total", (("direction", "out"),))] > 0
    assert got[("swarmnode_members_paused", ())] == 0
    assert got[("swarmnode_loop_lag_seconds_count", ())] > 0  # the monitor runs
    assert swarm.query(first, "status")["loop_lag_worst_ms"] >= 0
    runs, joules = 0.0, 0.0
    for n in nodes:
        per = samples(get(swarm.query(n, "status")["dashboard"] + "metrics",
                          (n.home / "dashboard.token").read_text().strip())[1])
        runs += sum(v for (name, _l), v in per.items() if name == "swarmnode_job_seconds_count")
        joules += sum(v for (name, _l), v in per.items()
                      if name == "swarmnode_job_energy_joules_total")
    assert runs == 3  # a once, b on each node before it was blocked
    ledger_joules = sum(j["joules"] for j in swarm.cli_json(first, "jobs"))
    assert joules == pytest.approx(ledger_joules, abs=0.01)  # (the ledger's are rounded)
    code, body = get(url + "api/status", token)
    assert code == 200 and json.loads(body)["id"] == first.id


def test_a_taken_default_port_falls_back_to_any_free_one(swarm: Swarm) -> None:
    """Nodes on one machine sharing a swarm port (on different addresses) all want
    127.0.0.1:<port + 1> for the dashboard: the ones that lose get a free port, not none."""
    node, _token = swarm.init("n1", loopback_addr(1))
    port = int(node.listen.rpartition(":")[2])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        swarm.start(node)
        url = swarm.query(node, "status")["dashboard"]
        assert url.startswith("http://127.0.0.1:") and url != f"http://127.0.0.1:{port + 1}/"
        assert get(url + "metrics", _token_of(node))[0] == 200
    bound = swarm.cli(node, "dashboard", "--bind", "127.0.0.1:0").stdout.strip()
    assert not bound.startswith("http://127.0.0.1:0/") and get(bound)[0] == 200


def _token_of(node) -> str:
    return (node.home / "dashboard.token").read_text().strip()


def test_every_read_needs_the_token_and_a_foreign_host_is_refused(swarm: Swarm) -> None:
    """Regression (issue 13, item 8): on localhost the dashboard's reads -- the member list,
    metrics, a job's output -- were open to every local user, and any Host was answered, so a
    site whose name was rebound to 127.0.0.1 could read them from a browser. Now every read
    needs the token unless the operator opens it in config.toml, and only the bound address
    or a configured name is answered."""
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    url, token = swarm.query(node, "status")["dashboard"], _token_of(node)
    port = url.rstrip("/").rpartition(":")[2]
    reads = ("", "metrics", "api/status", "api/state", "api/logs?job=none/x", "api/history",
             "static/uplot.iife.min.js")
    for path in reads:
        assert get(url + path)[0] == 401, path
        assert get(url + path, token)[0] in (200, 404), path  # (404: no such job)
    assert get(url + f"api/state?token={token}")[0] == 200
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        assert get(url + "metrics", token, host=host)[0] == 200, host
    for host in (f"rebound.example:{port}", "127.0.0.2", f"[::1]:{port}", "a b"):
        assert get(url + "metrics", token, host=host)[0] == 421, host
    drops = swarm.query(node, "status")["drops"]
    assert drops.get("http_unauthorised") == len(reads) and drops.get("http_foreign_host") == 4

    # opened on purpose: only what config.toml names, and only under a name it knows
    (node.home / "config.toml").write_text('http_open_paths = ["/metrics"]\n'
                                           'http_hosts = ["swarm.lan"]\n')
    swarm.stop(node)
    swarm.start(node)
    url = swarm.query(node, "status")["dashboard"]
    port = url.rstrip("/").rpartition(":")[2]
    assert get(url + "metrics")[0] == 200
    assert get(url + "metrics", host=f"swarm.lan:{port}")[0] == 200
    assert get(url + "metrics", host=f"rebound.example:{port}")[0] == 421
    assert get(url + "api/state")[0] == 401 and get(url + "api/status")[0] == 401
    shown = swarm.cli(node, "dashboard")
    assert shown.stdout.strip() == f"{url}?token={token}"
    assert "/metrics opened" in " ".join(shown.stderr.split())


@pytest.mark.parametrize(("header", "bound", "allowed"), [
    ("127.0.0.1:7947", "127.0.0.1", True),
    ("localhost:7947", "127.0.0.1", True),
    ("LOCALHOST", "::1", True),
    ("[::1]:7947", "::1", True),
    ("[::1]:7947", "127.0.0.1", False),
    ("localhost:7947", "192.168.1.5", False),
    ("192.168.1.5:8080", "0.0.0.0", True),  # a wildcard bind: any address typed (port-forward)
    ("[fd00::5]", "::", True),
    ("evil.example:7947", "0.0.0.0", False),  # a name rebound to this machine
    ("swarm.lan:7947", "0.0.0.0", True),  # ... unless configured
    ("swarm.lan", "swarm.lan", True),  # bound by name
    ("", "127.0.0.1", False),
    ("[::1", "::1", False),
])
def test_the_host_must_name_the_bound_address_or_a_configured_name(header, bound, allowed):
    assert host_allowed(header, bound, ("swarm.lan",) if bound != "127.0.0.1" else ()) is allowed


def test_a_bind_off_localhost_needs_the_token_and_is_kept(swarm: Swarm) -> None:
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    port = free_port()
    shown = swarm.cli(node, "dashboard", "--bind", f"0.0.0.0:{port}")
    url = shown.stdout.strip()
    token = (node.home / "dashboard.token").read_text().strip()
    assert url == f"http://0.0.0.0:{port}/?token={token}" and "token" in shown.stderr
    assert stat.S_IMODE((node.home / "dashboard.token").stat().st_mode) == 0o600
    local = f"http://127.0.0.1:{port}/"
    assert get(local + "metrics")[0] == 401
    assert get(local + "metrics", token="wrong" * 8)[0] == 401
    assert get(local + "metrics", token=token)[0] == 200
    assert get(local + f"api/status?token={token}")[0] == 200
    assert swarm.query(node, "status")["drops"].get("http_unauthorised") == 2
    swarm.stop(node)
    swarm.start(node)  # the bind is kept
    assert swarm.query(node, "status")["dashboard"] == f"http://0.0.0.0:{port}/"
    assert get(local + "metrics")[0] == 401
    res = swarm.cli(node, "dashboard", "--bind", "192.0.2.1:80", check=False)  # not ours
    assert res.returncode == 1 and "cannot serve the dashboard on 192.0.2.1:80" in res.stderr
    assert get(local + "metrics", token=token)[0] == 200  # the old bind still serves


def test_events_are_json_lines_for_log_shippers(swarm: Swarm, tmp_path: Path) -> None:
    """Every event a node records is also a JSON line in <home>/events.jsonl (0600), the same
    record `events --json` shows; past the size limit the file rotates to `.1`."""
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    path = node.home / "events.jsonl"
    lines = swarm.wait_for(lambda: [json.loads(x) for x in path.read_text().splitlines()]
                           if path.exists() else None, 10, "events.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    started = next(x for x in lines if x["kind"] == "node_started")
    recorded = next(e for e in swarm.events(node) if e["kind"] == "node_started")
    assert started == recorded
    # what the start cost: the process's CPU, the CLI's parse before the exec included
    assert 0 < started["cpu_s"] < 60
    log = JsonLines(tmp_path / "ev.jsonl", max_bytes=200)
    for i in range(10):
        log.write({"seq": i, "kind": "x", "pad": "y" * 40})
    newer = [json.loads(x)["seq"] for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    older = [json.loads(x)["seq"]
             for x in (tmp_path / "ev.jsonl.1").read_text().splitlines()]
    assert older + newer == list(range(older[0], 10)) and newer[-1] == 9
    assert (tmp_path / "ev.jsonl").stat().st_size <= 200


def test_an_open_page_does_not_hold_up_a_nodes_stop(swarm: Swarm) -> None:
    """A dashboard left open (its event stream never ends by itself) must not delay a
    restart or a shutdown: the streams end when the node stops serving."""
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    url = swarm.query(node, "status")["dashboard"]
    stream = urllib.request.urlopen(url + f"api/stream?token={_token_of(node)}", timeout=10)
    try:
        assert stream.readline().startswith(b"data: ")
        started = time.monotonic()
        assert swarm.stop(node, timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        stream.close()


@pytest.mark.parametrize(("addresses", "network"), [
    (["127.0.0.3:7946"], "loopback"),
    (["100.101.102.103:7946"], "tailscale"),
    (["192.168.1.20:7946", "100.64.0.1:7946"], "192.168.1.0/24"),
    (["10.42.7.9:7946"], "10.42.7.0/24"),
    (["[fd00:1:2:3::9]:7946"], "fd00:1:2:3::/64"),
    (["8.8.4.4:7946"], "internet"),  # (a string only: no traffic)
    ([], "unknown"),
    (["not an address"], "unknown"),
])
def test_members_are_grouped_by_the_network_of_their_first_address(addresses, network):
    assert network_of(addresses) == network


def _member(mid: str, network: str, how: str, via: tuple[str, ...] = ()) -> dict[str, object]:
    return {"id": mid, "network": network, "path": {"how": how, "via": list(via)}}


def test_the_network_picture_draws_jump_chains_once_and_nat_as_the_members_own_edge() -> None:
    pic = picture("me", [
        _member("lan", "10.0.0.0/24", "reported"),
        _member("me", "10.0.0.0/24", "this node"),
        _member("far1", "172.31.0.0/24", "ssh", ("root@10.0.0.3:22", "root@172.30.0.2:22")),
        _member("far2", "172.31.0.0/24", "ssh", ("root@10.0.0.3:22", "root@172.30.0.2:22")),
        _member("natted", "192.168.7.0/24", "inbound"),
        _member("ts", "tailscale", "override"),
        _member("lost", "internet", "none"),
    ])
    assert pic["networks"][0] == {"name": "10.0.0.0/24", "members": ["me", "lan"]}
    assert {n["name"] for n in pic["networks"]} == {"10.0.0.0/24", "172.31.0.0/24",
                                                    "192.168.7.0/24", "tailscale", "internet"}
    assert pic["jumps"] == ["jump:root@10.0.0.3:22", "jump:root@172.30.0.2:22"]
    edges = {(e["from"], e["to"]): e["kind"] for e in pic["edges"]}
    assert edges == {
        ("me", "lan"): "direct", ("me", "ts"): "direct", ("natted", "me"): "inbound",
        ("me", "jump:root@10.0.0.3:22"): "ssh",
        ("jump:root@10.0.0.3:22", "jump:root@172.30.0.2:22"): "ssh",
        ("jump:root@172.30.0.2:22", "far1"): "ssh", ("jump:root@172.30.0.2:22", "far2"): "ssh",
    }


def test_the_page_has_one_script_and_the_policy_names_it() -> None:
    """The policy allows the page's inline script by its hash and scripts from the node
    itself (the charting library it serves): a second inline <script> would be silently
    blocked, so the page must keep exactly one, bare, and load nothing from elsewhere."""
    text, csp = _page()
    assert text.count("<script>") == 1
    sources = re.findall(r'<script src="([^"]*)"></script>', text)
    assert text.count("<script") == 1 + len(sources)
    assert sources and all(s.removeprefix("/static/") in STATIC for s in sources)
    assert all(h.removeprefix("/static/") in STATIC
               for h in re.findall(r'<link rel="stylesheet" href="([^"]*)">', text))
    script = text.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp and "'unsafe-inline'; " not in (
        csp.split("style-src")[0])
    assert not re.search(r"<[^>]*\son[a-z]+=", text)  # no inline handlers either


def test_opened_reads_and_host_names_are_checked_in_the_config() -> None:
    cfg = parse('http_open_paths = ["/metrics"]\nhttp_hosts = ["Swarm.LAN"]\n')
    assert cfg.http_open_paths == ("/metrics",) and cfg.http_hosts == ("swarm.lan",)
    assert parse("").http_open_paths == () and parse("").http_hosts == ()  # closed by default
    with pytest.raises(ConfigError, match="http_open_paths: '/api/action' is not a read path"):
        parse('http_open_paths = ["/api/action"]')
    with pytest.raises(ConfigError, match=r"http_hosts: 'swarm\.lan:80' is not a host name"):
        parse('http_hosts = ["swarm.lan:80"]')
