"""Disk retention and a nearly full disk, on real nodes over loopback.

What must hold: builds leave no directory under any node's `jobs/`; the artifact GC brings a
store over its cap down to it while the inputs of a build still running survive (on its
submitter and on the worker running it); a node whose disk is nearly full (a real tmpfs as
its jobs directory, filled by a ballast file) says so (event, `status`, the fact others see)
and gets no work until the space returns; a job that fills that disk with its output fails
with "no space left on device", the node stays a member, and the build finishes elsewhere.
The tmpfs tests need root (mount) and are skipped without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.swarm import Node, Swarm, swarm_fixture  # noqa: F401 (the `swarm` fixture)
from tests.test_build_loopback import three

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

#: Fast passes, and no threshold: the test machine's own disk must not make a node "low".
FAST = ("[disk]\ncheck_every = 0.2\ngc_every = 0.5\nartifacts_min_age = 0.5\n"
        "min_free = 0\nmin_free_percent = 0.0\n")
CAP = 300_000
OUTPUT = 100_000


def configure(text: str):
    def prepare(node: Node) -> None:
        (node.home / "config.toml").write_text(text)
    return prepare


def store_objects(node: Node) -> dict[str, int]:
    """digest -> size of every object in the node's artifact store."""
    root = node.home / "artifacts" / "objects"
    return {sub.name + f.name: f.stat().st_size for sub in root.iterdir() if sub.is_dir()
            for f in sub.iterdir()}


def dirs_under(root: Path) -> list[str]:
    return [str(Path(top).relative_to(root)) for top, _d, _f in os.walk(root)
            if Path(top) != root]


def test_builds_leave_no_job_dirs_and_gc_holds_the_cap_sparing_a_running_builds_inputs(
        swarm: Swarm, tmp_path: Path) -> None:
    nodes = three(swarm, prepare=configure(
        FAST + f"artifacts_keep_builds = 100\nartifacts_keep_hours = 100.0\n"
        f"artifacts_max_bytes = {CAP}\n"))
    submitter = nodes[1]
    plan = tmp_path / "outs.toml"
    plan.write_text("".join(
        f'[jobs.o{i}]\ncmd = "head -c {OUTPUT} /dev/urandom > out.bin"\n'
        f'outputs = ["out.bin"]\n\n' for i in range(4)))
    outputs: set[str] = set()
    for _ in range(3):
        status = json.loads(swarm.cli(submitter, "build", str(plan), "--wait", "--json",
                                      timeout=60).stdout)
        assert status["ok"], status
        outputs |= {d for j in swarm.cli_json(submitter, "jobs", "--build", status["build"])
                    for d in j["artifacts"].values()}
    assert len(outputs) == 12
    for node in nodes:  # not even the empty build and job directories
        assert dirs_under(node.home / "jobs") == [], node.name
    # a build still running, with an input bigger than what is left under the cap
    big = tmp_path / "big.in"
    big.write_bytes(os.urandom(150_000))
    wanted = hashlib.sha256(big.read_bytes()).hexdigest()
    running = tmp_path / "running.toml"
    running.write_text('[jobs.slow]\ncmd = "sleep 600"\ninputs = ["big.in"]\n')
    build = json.loads(swarm.cli(submitter, "build", str(running), "--json").stdout)["build"]
    worker = swarm.wait_for(lambda: next((n for n in nodes for j in swarm.cli_json(
        submitter, "jobs", "--build", build) if j["state"] == "running" and j["node"] == n.id),
        None), 30, "the slow job runs")

    def collected() -> bool:
        objects = store_objects(submitter)
        return (sum(objects.values()) <= CAP and wanted in objects
                and len(outputs & objects.keys()) <= 1)

    swarm.wait_for(collected, 30, "the submitter's store under the cap")
    assert swarm.events(submitter, "artifacts_gc")
    # The worker collects on its own schedule (the input it just fetched puts it over).
    swarm.wait_for(lambda: sum(store_objects(worker).values()) <= CAP + len(big.read_bytes()),
                   30, "the worker's store under the cap but for its running job's input")
    assert wanted in store_objects(worker)  # the worker's copy, pinned while its job runs
    assert [d for d in dirs_under(worker.home / "jobs") if d.count("/") == 2] == [
        f"{build}/slow/1"]
    swarm.cli(submitter, "cancel", build)
    kept = worker.home / "jobs" / build / "slow" / "1" / ".swarmnode" / "kept"
    swarm.wait_for(kept.exists, 30, "the cancelled job's directory kept for `logs`, marked")


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
SMALL = 16 << 20  # the tmpfs
LOW = 8 << 20  # its min_free


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """tmpfs mounts made by the test, unmounted at the end (after the nodes stopped: the
    `swarm` fixture is torn down first, being requested after this one)."""
    made: list[Path] = []
    yield made
    for where in made:
        subprocess.run(["umount", "-l", str(where)], check=False)


def small_jobs_dir(mounts: list[Path]):
    """n3's jobs directory on a 16 MiB tmpfs, and a min_free of 8 MiB everywhere."""
    def prepare(node: Node) -> None:
        (node.home / "config.toml").write_text(FAST.replace("min_free = 0", f"min_free = {LOW}"))
        if node.name == "n3":
            jobs = node.home / "jobs"
            jobs.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(jobs)],
                           check=True)
            mounts.append(jobs)
    return prepare


def disk_low_seen(swarm: Swarm, nodes: list[Node], who: Node) -> set[bool]:
    return {next(m["disk_low"] for m in swarm.cli_json(n, "nodes") if m["id"] == who.id)
            for n in nodes}


@needs_root
def test_a_node_with_a_nearly_full_disk_gets_no_work_until_space_returns(
        mounts: list[Path], swarm: Swarm, tmp_path: Path) -> None:
    nodes = three(swarm, prepare=small_jobs_dir(mounts))
    n3 = nodes[2]
    assert swarm.query(n3, "status")["disk_low"] is False
    ballast = n3.home / "jobs" / "ballast"
    ballast.write_bytes(b"\0" * (SMALL - LOW // 2))
    swarm.wait_for(lambda: swarm.query(n3, "status")["disk_low"]
                   and disk_low_seen(swarm, nodes, n3) == {True}, 20, "n3 low, as all see")
    event = swarm.events(n3, "disk_low")[-1]
    assert event["path"] == str(n3.home / "jobs") and event["free"] < LOW <= event["threshold"]
    assert "LOW: takes no jobs" in swarm.cli(n3, "status").stdout
    plan = tmp_path / "twelve.toml"
    plan.write_text("".join(f'[jobs.t{i}]\ncmd = "sleep 0.3"\n' for i in range(12)))
    status = json.loads(swarm.cli(nodes[0], "build", str(plan), "--wait", "--json",
                                  timeout=60).stdout)
    assert status["ok"], status
    ran_on = {j["node"] for j in swarm.cli_json(nodes[0], "jobs", "--build", status["build"])}
    assert n3.id not in ran_on and ran_on
    ballast.unlink()
    swarm.wait_for(lambda: not swarm.query(n3, "status")["disk_low"]
                   and disk_low_seen(swarm, nodes, n3) == {False}, 20, "n3 ok, as all see")
    assert swarm.events(n3, "disk_ok")
    status = json.loads(swarm.cli(nodes[0], "build", str(plan), "--wait", "--json",
                                  timeout=60).stdout)
    assert status["ok"], status
    assert n3.id in {j["node"] for j in swarm.cli_json(nodes[0], "jobs", "--build",
                                                       status["build"])}


@needs_root
def test_a_job_filling_the_disk_fails_saying_so_and_the_node_carries_on(
        mounts: list[Path], swarm: Swarm, tmp_path: Path) -> None:
    nodes = three(swarm, ("build", "operate"), prepare=small_jobs_dir(mounts))
    n1, n2, n3 = nodes
    for other in (n1, n2):  # the job runs on n3 first
        assert f"paused: {other.name}" in swarm.cli(n1, "pause", other.name).stdout
    plan = tmp_path / "loud.toml"
    plan.write_text('[jobs.loud]\ncmd = "head -c 20000000 /dev/zero; echo written"\n')
    build = json.loads(swarm.cli(n1, "build", str(plan), "--json").stdout)["build"]
    failed = swarm.wait_for(lambda: [e for e in swarm.events(n3, "job_failed_here")
                                     if e["build"] == build], 60, "the job fails on n3")
    assert failed[0]["status"] == "error" and "no space left on device" in failed[0]["reason"]
    # (whether n3 was seen low while the log filled its disk depends on the moment it looked)
    swarm.wait_for(lambda: not swarm.query(n3, "status")["disk_low"], 30, "n3's disk ok")
    assert n3.running and swarm.state(n1, n3) == "alive"
    assert "resumed: n2" in swarm.cli(n1, "resume", "n2").stdout
    status = json.loads(swarm.cli(n1, "build", "wait", build, "--json", timeout=60).stdout)
    assert status["ok"], status
    job = swarm.cli_json(n1, "jobs", "--build", build)[0]
    assert job["node"] == n2.id and job["attempt"] == 2
