"""Real Gentoo in the namespace lab: `swarmnode emerge` on fresh Portage prefixes, a binhost
that a client installs from, and the faults a swarm of build machines meets.

    lan1 10.42.0.50  founder, binhost (served on :8080), worker
    lan2 .51, lan3 .52  workers
    odd  .53         a worker whose make.conf has other CFLAGS: it must get no emerge job
    mirror .54       the distfile mirror (an HTTP server whose log counts the downloads)
    client .55       a Portage prefix without swarmnode: installs from the binhost

Every host's Portage is a fresh prefix (tests/lab/portage.py) with none of the packages; the
repository is the lab's seven packages (a chain of depth 3, a diamond, a sub-slot dependency,
a USE flag, a C program from a distfile).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab import Lab, lan_addr, unavailable_reason
from tests.lab import portage as portage_lab
from tests.swarm import (
    Node,
    Swarm,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason() or portage_lab.unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(420),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
MIRROR_PORT = 8000
BINHOST_PORT = 8080
JOIN_S = 30.0
WORKERS = ("lan1", "lan2", "lan3")
HOSTS = (*WORKERS, "odd", "mirror", "client")
TOP = "app-lab/tool"


class EmergeLab:
    def __init__(self, lab: Lab, swarm: Swarm, root: Path) -> None:
        self.lab, self.swarm, self.root = lab, swarm, root
        sw = lab.switch("sw")
        self.addr = {}
        for i, host in enumerate(HOSTS, start=1):
            self.addr[host] = lan_addr(i)
            lab.connect(lab.host(host), sw, self.addr[host] + "/24")
        portage_lab.ensure_portage_user()
        self.repo = portage_lab.write_repo(root / "repo")
        mirror = portage_lab.write_mirror(root / "mirror")
        self.mirror = lab.spawn("mirror", [sys.executable, "-m", "http.server", "--bind",
                                           self.addr["mirror"], "--directory", str(mirror),
                                           str(MIRROR_PORT)])
        url = f"http://{self.addr['mirror']}:{MIRROR_PORT}"
        hosts = [h for h in HOSTS if h != "mirror"]
        made = portage_lab.make_prefixes([root / "prefix" / h for h in hosts], self.repo,
                                         mirror=url)
        self.prefix = dict(zip(hosts, made, strict=True))
        with self.prefix["odd"].make_conf.open("a") as f:
            f.write('CFLAGS="-O3 -pipe"\n')
        # the swarm's signing key on the binhost; the client trusts it and demands signatures
        self.gnupg, self.keyring = root / "swarm-gnupg", root / "client-gnupg"
        self.key = portage_lab.signing_key(self.gnupg)
        portage_lab.trust(self.keyring, self.gnupg, self.key)
        self.nodes: dict[str, Node] = {}

    def config(self, node: Node, extra: str = "") -> None:
        (node.home / "config.toml").write_text(
            f'emerge = "{self.prefix[node.name].emerge}"\ncores = 2\n{extra}')

    def start(self) -> None:
        first, token = self.swarm.init("lan1", f"{self.addr['lan1']}:{PORT}", host="lan1")
        self.config(first, f'roles = ["binhost"]\n'
                           f'binhost_listen = "{self.addr["lan1"]}:{BINHOST_PORT}"\n'
                           f'binhost_gpg_home = "{self.gnupg}"\nbinhost_gpg_key = "{self.key}"\n')
        self.swarm.start(first)
        self.nodes["lan1"] = first
        for host in ("lan2", "lan3", "odd"):
            node = self.swarm.add(host, f"{self.addr[host]}:{PORT}", host=host)
            self.config(node)
            self.nodes[host] = self.swarm.start(node, token)
        self.swarm.wait_converged(self.nodes.values(), JOIN_S)
        self.swarm.wait_for(  # every node's build environment probed and known at lan1
            lambda: all(m["portage_differs"] is not None
                        for m in self.swarm.query(first, "nodes")), JOIN_S,
            "every node states its Portage environment")

    def emerge(self, node: str = "lan1", *atoms: str) -> dict:
        res = self.swarm.cli(self.nodes[node], "emerge", *(atoms or (TOP,)), "--wait",
                             "--json", timeout=300)
        return json.loads(res.stdout)

    def downloads(self, name: str) -> int:
        return self.lab.read_log(self.mirror).count(f"GET /distfiles/{name} ")


@pytest.fixture(scope="module")
def elab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from tests.lab import Lab as LabClass
    from tests.swarm import managed_swarm

    root = tmp_path_factory.mktemp("emerge")
    with LabClass(prefix="em") as lab, managed_swarm(request, lab) as swarm:
        e = EmergeLab(lab, swarm, root)
        try:
            e.start()
            yield e
        finally:
            portage_lab.stop_agents(e.gnupg, e.keyring)


def _client_install(e: EmergeLab, url: str, *atoms: str,
                    **env: str) -> subprocess.CompletedProcess[str]:
    """The client installs from the binhost, demanding packages signed by the swarm's key."""
    client = e.prefix["client"]
    return e.lab.run("client", [str(client.emerge), "--getbinpkgonly", "--color=n",
                                *(atoms or (TOP,))],
                     env={**client.env(), "PORTAGE_BINHOST": url,
                          **portage_lab.verifying_env(e.keyring), **env}, timeout=180)


def test_emerge_builds_the_graph_on_fresh_workers_and_a_client_installs_it(elab) -> None:
    e = elab
    view = e.emerge()
    assert view["ok"], view
    assert view["built"] == 7 and view["reused"] == 0
    assert view["binhosts"] == ["lan1"]  # it returned once lan1 served all 7: install now
    jobs = e.swarm.query(e.nodes["lan1"], "jobs", build=view["build"])
    assert {j["state"] for j in jobs} == {"done"}
    ran_on = {j["node_name"] for j in jobs}
    assert len(ran_on) >= 2 and ran_on <= set(WORKERS), ran_on  # spread, and never on `odd`

    url = e.swarm.query(e.nodes["lan1"], "status")["binhost_url"]
    assert url == f"http://{e.addr['lan1']}:{BINHOST_PORT}"
    done = _client_install(e, url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tool = e.lab.run("client", [str(e.prefix["client"].root / "usr/bin/lab-tool"), "ok"],
                     env=e.prefix["client"].env())
    assert "hello from the swarmnode lab (ok)" in tool.stdout, tool
    assert "b extra" in tool.stdout  # built against libb with USE=extra, through libmid
    assert e.downloads(portage_lab.DISTFILE) == 1

    # someone who can write the binhost changes a package and fixes up the index: refused
    binhost = e.nodes["lan1"].home / "binhost"
    path = next(p for p in binhost.rglob("labdocs-*.gpkg.tar")).relative_to(binhost)
    portage_lab.tamper(binhost / path)
    portage_lab.reindex_entry(binhost, str(path))
    fresh = e.root / "client-fresh-pkgdir"
    fresh.mkdir()
    done = _client_install(e, url, "--oneshot", "=app-lab/labdocs-2.1-r1", PKGDIR=str(fresh))
    assert done.returncode != 0 and "verification failed" in done.stdout + done.stderr, (
        done.stdout[-2000:] + done.stderr[-2000:])


def test_the_second_identical_emerge_builds_nothing(elab) -> None:
    e = elab
    plan = json.loads(e.swarm.cli(e.nodes["lan1"], "emerge", TOP, "--dry-run", "--json",
                                  timeout=120).stdout)
    # (what lan1 installed as dependencies of its own jobs is no longer listed by emerge)
    assert plan["jobs"] == {} and set(plan["reused"]) == set(plan["remembered"]), plan
    # the first build's times are remembered: the next estimates
    assert all(isinstance(s, float) and s > 0 for s in plan["remembered"].values()), plan
    started = time.monotonic()
    view = e.emerge()
    took = time.monotonic() - started
    assert view["ok"] and view["build"] is None
    assert view["built"] == 0 and view["reused"] == view["packages"] > 0
    assert took < 20, took  # seconds, not a rebuild (the benchmark measures it properly)
    assert e.downloads(portage_lab.DISTFILE) == 1  # the mirror served the archive once


def test_a_worker_with_other_cflags_gets_no_emerge_job_and_nodes_says_why(elab) -> None:
    e = elab
    members = e.swarm.query(e.nodes["lan1"], "nodes")
    odd = next(m for m in members if m["name"] == "odd")
    lan2 = next(m for m in members if m["name"] == "lan2")
    assert odd["portage_differs"] == ["CFLAGS"], odd["portage_differs"]
    assert lan2["portage_differs"] == []
    # an emerge asked on `odd` runs on `odd` alone (nobody else shares its environment)
    jobs = [j for j in e.swarm.query(e.nodes["lan1"], "jobs") if j["node_name"] == "odd"]
    assert jobs == []


BROKEN = portage_lab.ebuild("Lab package whose build fails", """DEPEND="app-lab/liba"

src_compile() { die "lab: this package does not build on purpose"; }
""")


def test_a_failing_package_is_reported_with_the_end_of_portages_output(elab) -> None:
    e = elab
    ebuild = e.repo / "app-lab/broken/broken-1.0.ebuild"
    ebuild.parent.mkdir(parents=True)
    ebuild.write_text(BROKEN)
    res = e.swarm.cli(e.nodes["lan1"], "emerge", "app-lab/broken", "--wait", timeout=300,
                      check=False)
    assert res.returncode == 1, res
    assert "app-lab/broken-1.0" in res.stderr and "does not build on purpose" in res.stderr
    assert re.search(r"0 built, 1 not built, \d+ reused", res.stderr), res.stderr
    assert "\x1b[" not in res.stderr  # Portage's colours are off


def slow_ebuild(started: Path, gate: Path) -> str:
    """A package that builds until the test opens `gate` (after marking in `started`)."""
    return portage_lab.ebuild("Lab package that builds until the test opens a gate", f"""\
DEPEND="app-lab/libbase"

src_compile() {{
	touch "{started}/$$" || die
	while [ ! -e "{gate}" ]; do sleep 0.05; done
	cat "${{ESYSROOT}}"/usr/share/libbase/base.txt > slow.txt || die
}}
src_install() {{ insinto /usr/share/slow; doins slow.txt; }}
""")


def test_a_worker_killed_mid_emerge_has_its_package_rebuilt_elsewhere(elab) -> None:
    e = elab
    started, gate = e.root / "slow-started", e.root / "slow-gate"
    started.mkdir()
    ebuild = e.repo / "app-lab/slow/slow-1.0.ebuild"
    ebuild.parent.mkdir(parents=True)
    ebuild.write_text(slow_ebuild(started, gate))
    lan1 = e.nodes["lan1"]
    e.swarm.cli(lan1, "pause", "lan1")  # the victim is a plain worker: lan2 or lan3
    try:
        view = json.loads(e.swarm.cli(lan1, "emerge", "app-lab/slow", "--json",
                                      timeout=120).stdout)
        assert view["built"] == 1  # (libbase: reused, or installed on lan1 already)
        build = view["build"]

        def running_on() -> str | None:
            jobs = e.swarm.query(lan1, "jobs", build=build)
            return (jobs[0]["node_name"] if jobs and jobs[0]["state"] == "running"
                    and any(started.iterdir()) else None)

        victim = e.swarm.wait_for(running_on, 120, "the slow package builds on a worker")
        assert victim in ("lan2", "lan3")
        e.swarm.kill9(e.nodes[victim])
        e.lab.crash(victim)  # its emerge too: the machine is gone
        gate.touch()
        status = e.swarm.wait_for(
            lambda: (s := e.swarm.query(lan1, "build_status", build=build))["finished"] and s,
            180, "the package is built again elsewhere")
        assert status["ok"], status
        job = e.swarm.query(lan1, "jobs", build=build)[0]
        assert job["node_name"] not in (victim, "lan1", "odd") and job["attempt"] >= 2, job
    finally:
        e.swarm.cli(lan1, "resume", "lan1")
