"""Tests for net.mdns: TXT encoding and sighting parsing, then real mDNS between two namespaces.

The end-to-end test needs root: it builds two network namespaces joined by a veth pair (a
link of its own, so no packet leaves them), runs one node process in each, and checks that
each sees the other's id, and that a malformed announcement is ignored and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from net.mdns import (
    MAX_RESOLVING,
    SERVICE_TYPE,
    Mdns,
    Sighting,
    TxtError,
    advertised_ips,
    decode_txt,
    encode_txt,
    instance_name,
    parse_sighting,
)
from swarmnode.discovery import MAX_CANDIDATE_ADDRESSES, MAX_CANDIDATES, Discovery
from swarmnode.identity import encode_id
from swarmnode.node import Observed

REPO = Path(__file__).resolve().parent.parent


def new_id() -> str:
    return encode_id(secrets.token_bytes(32))


NODE = new_id()


def as_wire(props: dict[str, str]) -> dict[bytes, bytes | None]:
    """What zeroconf hands back after a round trip: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in props.items()}


# ---- TXT records -------------------------------------------------------------------------


def test_encode_txt() -> None:
    assert encode_txt(NODE, "c1", "io") == {"id": NODE, "cluster": "c1", "name": "io", "v": "1"}


@given(
    st.text(max_size=20).filter(str.isprintable),
    st.text(max_size=20).filter(str.isprintable),
)
def test_txt_roundtrip(cluster: str, name: str) -> None:
    assert decode_txt(as_wire(encode_txt(NODE, cluster, name))) == (NODE, cluster, name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_id": "short"}, "not a node id"),
        ({"name": "x" * 64}, "longer than 63"),
        ({"name": "é" * 32}, "longer than 63"),
        ({"cluster": "c" * 65}, "longer than 64"),
        ({"name": "bad\nname"}, "control"),
    ],
)
def test_encode_txt_rejects(kwargs: dict[str, str], message: str) -> None:
    args = {"node_id": NODE, "cluster": "", "name": ""} | kwargs
    with pytest.raises(TxtError, match=message):
        encode_txt(**args)


def test_decode_tolerates_unknown_keys_and_missing_optionals() -> None:
    props = {b"id": NODE.encode(), b"v": b"1", b"future": b"x", b"flag": None}
    assert decode_txt(props) == (NODE, "", "")


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({b"id": NODE.encode()}, "version None"),
        ({b"id": NODE.encode(), b"v": b"2"}, "version '2'"),
        ({b"id": NODE.encode(), b"v": None}, "version None"),
        ({b"v": b"1"}, "not a node id"),
        ({b"id": b"nope", b"v": b"1"}, "not a node id"),
        ({b"id": NODE.upper().encode(), b"v": b"1"}, "not a node id"),
        ({b"id": NODE.encode(), b"v": b"1", b"name": b"\xff\xfe"}, "UTF-8"),
        ({b"id": NODE.encode(), b"v": b"1", b"cluster": b"x" * 65}, "longer"),
        ({b"id": NODE.encode(), b"v": b"1", b"name": b"a\x00b"}, "control"),
    ],
)
def test_decode_txt_rejects(props: dict[bytes, bytes | None], message: str) -> None:
    with pytest.raises(TxtError, match=message):
        decode_txt(props)


# ---- sightings ---------------------------------------------------------------------------


def test_parse_sighting() -> None:
    props = as_wire(encode_txt(NODE, "c1", "tarn"))
    ips = ["192.168.10.25", "fd7a:115c:a1e0::1", "127.0.0.1", "fe80::1", "192.168.10.25"]
    assert parse_sighting(props, ips, 7000) == Sighting(
        NODE, "c1", "tarn", ("192.168.10.25:7000", "[fd7a:115c:a1e0::1]:7000")
    )


@pytest.mark.parametrize(
    ("ips", "port", "message"),
    [
        (["10.0.0.1"], None, "bad port"),
        (["10.0.0.1"], 0, "bad port"),
        ([], 7000, "no usable address"),
        (["127.0.0.1", "fe80::1%2", "garbage"], 7000, "no usable address"),
    ],
)
def test_parse_sighting_rejects(ips: list[str], port: int | None, message: str) -> None:
    with pytest.raises(TxtError, match=message):
        parse_sighting(as_wire(encode_txt(NODE)), ips, port)


def test_instance_name_and_advertised_ips() -> None:
    assert instance_name(NODE) == f"{NODE[:16]}.{SERVICE_TYPE}"
    reported = ["gw.example:7000", "10.0.0.5:7000", "[fd00::5]:7001", "127.0.0.1:7000", "10.0.0.5"]
    assert advertised_ips(reported) == ["10.0.0.5", "fd00::5"]


def test_mdns_rejects_bad_identity_before_touching_the_network() -> None:
    with pytest.raises(TxtError):
        Mdns("not-an-id", 7000, ["10.0.0.1"], lambda s: None)


# ---- a flood of fake service records costs bounded memory --------------------------------


def test_fake_service_flood_resolves_a_bounded_number_at_once() -> None:
    async def run() -> Mdns:
        mdns = Mdns(NODE, 7000, ["10.0.0.1:7000"], lambda s: None)
        mdns._azc = object()  # type: ignore[assignment]  # "started", without sockets
        release = asyncio.Event()

        async def stuck(name: str) -> None:  # a resolution that takes its whole timeout
            await release.wait()

        mdns._resolve = stuck  # type: ignore[method-assign]
        for i in range(1000):
            mdns._schedule_resolve(f"fake{i}.{SERVICE_TYPE}")
        assert len(mdns._tasks) == MAX_RESOLVING
        release.set()
        await asyncio.gather(*mdns._tasks.values())
        return mdns

    mdns = asyncio.run(run())
    assert mdns.drops["busy"] == 1000 - MAX_RESOLVING and not mdns._tasks


class _Drops:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def drop(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1


def _discovery(admitted: bool) -> tuple[Discovery, SimpleNamespace]:
    contacts: dict[str, str] = {}
    observed: dict[str, Observed] = {}
    node = SimpleNamespace(
        admitted=admitted, drops=_Drops(), observed=observed,
        observed_entry=lambda peer: observed.setdefault(peer, Observed()),
        admission=SimpleNamespace(contacts=contacts,
                                  contact=lambda peer, how: contacts.setdefault(peer, how)),
        core=SimpleNamespace(member=lambda peer: None), opts=SimpleNamespace(seeds=()))
    return Discovery(node), node  # type: ignore[arg-type]


def test_mdns_candidates_are_bounded() -> None:
    disc, node = _discovery(admitted=False)
    for i in range(500):
        disc.candidate(new_id(), f"10.1.{i // 250}.{i % 250}:7000", "mdns")
    peer = next(iter(node.admission.contacts))
    for i in range(50):
        disc.candidate(peer, f"10.2.0.{i}:7000", "mdns")
    assert len(node.admission.contacts) == MAX_CANDIDATES == len(node.observed)
    assert len(node.observed[peer].extra) == MAX_CANDIDATE_ADDRESSES
    assert node.drops.counts["candidate_full"] == 500 - MAX_CANDIDATES
    # a member keeps nothing for ids that are not members (a stranger says hello itself)
    disc, node = _discovery(admitted=True)
    for _ in range(100):
        disc.candidate(new_id(), "10.3.0.1:7000", "mdns")
    assert not node.observed and node.drops.counts["candidate_not_member"] == 100


# ---- end to end in two network namespaces ------------------------------------------------

NODE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from collections import Counter
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
    from net.mdns import SERVICE_TYPE, Mdns

    my_id, my_ip, peer_id, role = sys.argv[1:5]

    class Notifying(Counter):
        def __init__(self, hook):
            super().__init__()
            self.hook = hook
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.hook()

    async def main():
        found = {}
        done = asyncio.Event()
        def check():
            if peer_id in found and (role != "watch" or mdns.malformed >= 1):
                done.set()
        def on_found(s):
            found[s.id] = s
            check()
        mdns = Mdns(my_id, 7000, [my_ip + ":7000"], on_found, cluster="lab",
                    name="node-" + role, interfaces=[my_ip])
        mdns.drops = Notifying(check)
        bogus = None
        await mdns.start()
        if role == "bogus":
            # a second responder announcing a record no swarmnode would accept
            bogus = AsyncZeroconf(interfaces=[my_ip])
            info = AsyncServiceInfo(SERVICE_TYPE, "bogus." + SERVICE_TYPE, port=7001,
                                    properties={"id": "nope", "v": "1"},
                                    server="bogus.local.", parsed_addresses=[my_ip])
            await (await bogus.async_register_service(info))
        try:
            await asyncio.wait_for(done.wait(), 30)
        finally:
            out = {"found": {k: [v.cluster, v.name, list(v.addresses)] for k, v in found.items()},
                   "malformed": mdns.malformed, "drops": dict(mdns.drops)}
            print(json.dumps(out), flush=True)
        # stay announced until the test has heard from both sides
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if bogus is not None:
            await bogus.async_close()
        await mdns.close()

    asyncio.run(main())
    """
)


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


def _kill_namespace(ns: str) -> None:
    listed = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False
    )
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


@pytest.fixture
def netns_pair() -> Iterator[list[tuple[str, str]]]:
    """Two namespaces joined by a veth pair: [(ns_a, ip_a), (ns_b, ip_b)]; always removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs the `ip` command (iproute2)")
    tag = secrets.token_hex(3)
    subnet = f"10.77.{secrets.randbelow(256)}"
    pair = [
        (f"swmd-{tag}-a", f"{subnet}.1", f"swmd{tag}a"),
        (f"swmd-{tag}-b", f"{subnet}.2", f"swmd{tag}b"),
    ]
    created: list[str] = []
    try:
        for ns, _, _ in pair:
            try:
                run("ip", "netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
            created.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        (ns_a, _, if_a), (ns_b, _, if_b) = pair
        run(
            "ip",
            "link",
            "add",
            if_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            if_b,
            "netns",
            ns_b,
        )
        for ns, ip, ifname in pair:
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
            run("ip", "-n", ns, "link", "set", ifname, "up")
            run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", ifname)
        yield [(ns, ip) for ns, ip, _ in pair]
    finally:
        for ns in created:
            _kill_namespace(ns)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """Kill what is still running and close every pipe (the namespace fixture sweeps too)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.mark.lab
@pytest.mark.slow
def test_two_namespaces_find_each_other(netns_pair: list[tuple[str, str]], tmp_path: Path) -> None:
    script = tmp_path / "mdns_node.py"
    script.write_text(NODE_SCRIPT)
    (ns_a, ip_a), (ns_b, ip_b) = netns_pair
    id_a, id_b = new_id(), new_id()
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen[str]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_stop, procs)
        for ns, my_id, ip, peer, role in (
            (ns_a, id_a, ip_a, id_b, "watch"),
            (ns_b, id_b, ip_b, id_a, "bogus"),
        ):
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, str(script), my_id, ip, peer, role],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stack.enter_context((tmp_path / f"{role}.err").open("w")),
                    text=True,
                    cwd=REPO,
                    env=env,
                )
            )
        lines = [_read_line(proc, 45) for proc in procs]
        errors = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.err")}
        assert all(lines), f"a node reported nothing; stderr: {errors}"
        seen_by_a, seen_by_b = (json.loads(line) for line in lines)

        assert seen_by_a["found"][id_b] == ["lab", "node-bogus", [f"{ip_b}:7000"]]
        assert seen_by_b["found"][id_a] == ["lab", "node-watch", [f"{ip_a}:7000"]]
        # never reported to itself, and the malformed announcement was dropped and counted
        assert id_a not in seen_by_a["found"]
        assert id_b not in seen_by_b["found"]
        assert seen_by_a["malformed"] >= 1
        for proc in procs:
            proc.stdin.write("bye\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.wait(timeout=20) == 0
