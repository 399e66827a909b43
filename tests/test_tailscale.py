"""Tests for net.tailscale on the recorded `tailscale status --json` sample."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from net.tailscale import Peer, TailscaleStatus, parse_status, query, seed_candidates

FIXTURE = Path(__file__).parent / "fixtures" / "tailscale-status.json"


@pytest.fixture
def sample() -> dict:
    return json.loads(FIXTURE.read_text())


def test_parse_recorded_sample() -> None:
    status = parse_status(FIXTURE.read_text())
    assert status.self_ips == ("100.91.120.17", "fd7a:115c:a1e0::4534:7811")
    assert status.backend_state == "Running"
    by_name = {p.hostname: p for p in status.peers}
    assert set(by_name) == {"drone-tarn", "drone-meridian", "pixel-7", "Studio Mac mini"}
    assert by_name["drone-tarn"] == Peer(
        hostname="drone-tarn",
        dns_name="drone-tarn.tail0example.ts.net.",
        os="linux",
        ips=("100.100.10.25", "fd7a:115c:a1e0::6a34:7655"),
        online=True,
    )
    assert by_name["drone-meridian"].online is False
    assert by_name["pixel-7"].os == "android"


def test_seed_candidates_on_sample() -> None:
    status = parse_status(FIXTURE.read_bytes())
    # only drone-tarn: meridian is offline, the phone and the Mac do not run swarmnode
    assert seed_candidates(status, 7000) == [
        "100.100.10.25:7000",
        "[fd7a:115c:a1e0::6a34:7655]:7000",
    ]


def test_seed_order_ipv4_of_all_peers_first() -> None:
    status = TailscaleStatus(
        self_ips=("100.64.0.1",),
        peers=[
            Peer("a", "", "linux", ("fd7a:115c:a1e0::a", "100.64.0.10"), True),
            Peer("b", "", "FreeBSD", ("100.64.0.11", "fd7a:115c:a1e0::b"), True),
            Peer("self-dup", "", "linux", ("100.64.0.1",), True),
            Peer("win", "", "windows", ("100.64.0.12",), True),
            Peer("ios", "", "iOS", ("100.64.0.13",), True),
            Peer("noip", "", "linux", (), True),
        ],
    )
    assert seed_candidates(status, 9) == [
        "100.64.0.10:9",
        "100.64.0.11:9",
        "[fd7a:115c:a1e0::a]:9",
        "[fd7a:115c:a1e0::b]:9",
    ]


def test_no_seeds_when_backend_not_running(sample: dict) -> None:
    sample["BackendState"] = "Stopped"
    assert seed_candidates(parse_status(json.dumps(sample)), 7000) == []


def test_unknown_keys_and_missing_optional_fields_are_tolerated(sample: dict) -> None:
    sample["SomeFutureKey"] = {"x": [1, 2]}
    peer = next(iter(sample["Peer"].values()))
    peer["NewField"] = True
    del peer["DNSName"]
    status = parse_status(json.dumps(sample))
    assert any(p.dns_name == "" for p in status.peers)


@pytest.mark.parametrize("peers", [None, {}])
def test_no_peers(sample: dict, peers: dict | None) -> None:
    sample["Peer"] = peers
    assert parse_status(json.dumps(sample)).peers == []


def test_self_ips_fall_back_to_top_level(sample: dict) -> None:
    del sample["Self"]
    assert parse_status(json.dumps(sample)).self_ips == (
        "100.91.120.17",
        "fd7a:115c:a1e0::4534:7811",
    )


def _break(sample: dict, how: str) -> str:
    first = next(iter(sample["Peer"]))
    if how == "not-json":
        return '{"Self": '
    if how == "list":
        return "[]"
    if how == "self-str":
        sample["Self"] = "me"
    elif how == "peer-list":
        sample["Peer"] = [1]
    elif how == "peer-str":
        sample["Peer"][first] = "x"
    elif how == "online-str":
        sample["Peer"][first]["Online"] = "yes"
    elif how == "ips-str":
        sample["Peer"][first]["TailscaleIPs"] = "100.64.0.1"
    elif how == "bad-ip":
        sample["Peer"][first]["TailscaleIPs"] = ["100.64.0.300"]
    elif how == "ip-int":
        sample["Peer"][first]["TailscaleIPs"] = [1]
    elif how == "hostname-int":
        sample["Peer"][first]["HostName"] = 5
    return json.dumps(sample)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("not-json", "not JSON"),
        ("list", "top level"),
        ("self-str", "Self must be"),
        ("peer-list", "Peer must be"),
        ("peer-str", "must be an object"),
        ("online-str", "Online must be bool"),
        ("ips-str", "TailscaleIPs must be list"),
        ("bad-ip", "100.64.0.300"),
        ("ip-int", "TailscaleIPs holds 1"),
        ("hostname-int", "HostName must be str"),
    ],
)
def test_malformed_raises_clear_error(sample: dict, how: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_status(_break(sample, how))


def test_invalid_utf8_raises_value_error() -> None:
    with pytest.raises(ValueError, match="not JSON"):
        parse_status(b"\xff\xfe{")


def fake_tailscale(bin_dir: Path, script: str) -> None:
    exe = bin_dir / "tailscale"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", str(tmp_path))
    return tmp_path


def test_query_absent_returns_none(bin_dir: Path) -> None:
    assert query() is None


def test_query_runs_status_json(bin_dir: Path) -> None:
    fake_tailscale(bin_dir, f'[ "$1 $2" = "status --json" ] || exit 9\nexec /bin/cat "{FIXTURE}"')
    status = query()
    assert status is not None
    assert len(status.peers) == 4


@pytest.mark.parametrize(
    "script",
    [
        "echo 'failed to connect to local tailscaled' >&2; exit 1",
        "echo 'not json'",
        "exec /bin/sleep 30",
    ],
)
def test_query_failures_return_none(
    bin_dir: Path, script: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake_tailscale(bin_dir, script)
    with caplog.at_level(logging.WARNING, logger="net.tailscale"):
        assert query(timeout=0.5) is None
    assert caplog.records


def test_query_not_executable(bin_dir: Path) -> None:
    assert query(executable=str(bin_dir)) is None  # a directory: which() refuses it
