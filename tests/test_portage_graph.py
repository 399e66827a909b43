"""The plan of an emerge from real Portage: its dependency edges, reuse, and a job run as a
fresh worker runs it (tests/lab/portage.py has the lab's repository)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from swarmnode.build.emerge import job_name, parse_pretend, plan_from_pretend
from swarmnode.portage.graph import (
    JOB_SCRIPT,
    PackageInfo,
    Reused,
    emerge_plan,
    install_closure,
    job_deps,
    read_graph,
)
from swarmnode.portage.host import PortageHost
from tests.lab import portage as lab

FIXTURE = Path(__file__).parent / "fixtures" / "emerge-pretend-diamond.txt"
_REASON = lab.unavailable_reason()
needs_portage = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _info(cpv: str, build=(), run=()) -> PackageInfo:
    return PackageInfo(cpv, (), tuple(build), tuple(run), (), ())


def test_the_tree_alone_misses_the_diamond_edge_that_the_graph_has() -> None:
    # emerge printed libbase under a [nomerge] libb line: by indentation, nothing needs it
    old = plan_from_pretend(FIXTURE.read_text())
    assert "app-lab_libbase-1.0" not in old.jobs["app-lab_libb-1.0"].deps
    graph = {
        "app-lab/libb-1.0": _info("app-lab/libb-1.0", ["app-lab/libbase-1.0"],
                                  ["app-lab/libbase-1.0"]),
        "app-lab/libbase-1.0": _info("app-lab/libbase-1.0"),
    }
    assert job_deps(graph, list(graph)) == {"app-lab/libb-1.0": ["app-lab/libbase-1.0"],
                                            "app-lab/libbase-1.0": []}


def test_a_job_waits_for_its_install_closure_but_a_runtime_cycle_is_not_closed() -> None:
    graph = {
        "a": _info("a", build=["b"]),
        "b": _info("b", run=["c", "d"]),
        "c": _info("c", build=["a"]),  # waiting for c as part of a's closure: a cycle
        "d": _info("d"),
    }
    assert install_closure(graph, "a") == ["b", "c", "d"]
    deps = job_deps(graph, ["a", "b", "c", "d"])
    assert deps == {"a": ["b", "d"], "b": [], "c": ["a"], "d": []}


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory) -> tuple[lab.Prefix, lab.Prefix, Path]:
    if _REASON is not None:
        pytest.skip(_REASON)
    root = tmp_path_factory.mktemp("portage")
    lab.ensure_portage_user()
    repo = lab.write_repo(root / "repo")
    builder, fresh = lab.make_prefixes([root / "builder", root / "fresh"], repo)
    shutil.copy(lab.write_mirror(root / "mirror") / "distfiles" / lab.DISTFILE,
                builder.distdir / lab.DISTFILE)  # (no mirror needed: the archive is there)
    return builder, fresh, root


@needs_portage
def test_portage_gives_every_edge_the_use_the_sub_slot_binding_and_the_distfiles(
        prefixes) -> None:
    builder, _fresh, _root = prefixes
    packages = parse_pretend(FIXTURE.read_text())
    cpvs = list(dict.fromkeys(p.cpv for p in packages if not p.nomerge))
    graph = asyncio.run(read_graph(PortageHost(builder.emerge), cpvs))
    infos = graph.packages
    assert infos["app-lab/libb-1.0"].build == ("app-lab/libbase-1.0",)
    assert infos["app-lab/liba-1.0"].build == ("app-lab/libbase-1.0",)
    assert infos["app-lab/liba-1.0"].bindings == ("app-lab/libbase:0/1",)
    assert infos["app-lab/libb-1.0"].use == ("extra",)
    assert infos["app-lab/tool-1.0"].build == ("app-lab/hello-1.0", "app-lab/libmid-1.0")
    assert infos["app-lab/hello-1.0"].distfiles == (lab.DISTFILE,)
    assert graph.distdir == builder.distdir

    plan, stored = emerge_plan(packages, graph, fingerprint="f" * 16, abi="a" * 16, reused={},
                               distfiles={lab.DISTFILE: "d" * 64}, estimates={"app-lab/tool": 7})
    tool = plan.jobs["app-lab_tool-1.0"]
    assert set(tool.deps) == {job_name(p) for p in packages if not p.nomerge
                              and p.atom not in ("app-lab/tool", "app-lab/labdocs")}
    assert tool.estimate == 7 and tool.requires.tags == {"portage:" + "f" * 16}
    assert plan.jobs["app-lab_libb-1.0"].deps == ("app-lab_libbase-1.0",)
    assert plan.jobs["app-lab_hello-1.0"].inputs == (f"distfiles/{lab.DISTFILE}",)
    assert stored == {f"distfiles/{lab.DISTFILE}": "d" * 64}
    # the package key changes with the package's USE and the build environment
    libb = infos["app-lab/libb-1.0"]
    assert libb.key("a" * 16) != libb.key("b" * 16)
    assert libb.key("a" * 16) != PackageInfo(libb.cpv, (), libb.build, libb.run, (),
                                             ()).key("a" * 16)

    reused = {"app-lab/libbase-1.0": Reused("app-lab/libbase/libbase-1.0-3.gpkg.tar", "e" * 64)}
    plan, stored = emerge_plan(packages, graph, fingerprint="f" * 16, abi="a" * 16,
                               reused=reused, distfiles={lab.DISTFILE: "d" * 64}, estimates={})
    assert "app-lab_libbase-1.0" not in plan.jobs
    assert plan.jobs["app-lab_liba-1.0"].deps == ()
    assert plan.jobs["app-lab_liba-1.0"].inputs == (
        "binpkgs/app-lab/libbase/libbase-1.0-3.gpkg.tar",)
    assert stored["binpkgs/app-lab/libbase/libbase-1.0-3.gpkg.tar"] == "e" * 64


def _job(prefix: lab.Prefix, job_dir: Path, cpv: str) -> subprocess.CompletedProcess[str]:
    job_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["sh", "-c", JOB_SCRIPT, "sh", f"={cpv}"], cwd=job_dir,
                          env=prefix.env(), capture_output=True, text=True, timeout=300)


@needs_portage
def test_the_job_builds_on_a_fresh_prefix_from_its_dependencies_binary_packages(
        prefixes) -> None:
    builder, fresh, root = prefixes
    base = _job(builder, root / "job-libbase", "app-lab/libbase-1.0")
    assert base.returncode == 0, base.stdout[-2000:] + base.stderr[-2000:]
    made = list((root / "job-libbase/binpkgs").rglob("libbase-1.0-*.gpkg.tar"))
    assert len(made) == 1
    assert "app-lab/libbase-1.0" not in builder.installed()  # built, not installed

    # a fresh worker: without libbase installed, --buildpkgonly alone would refuse
    job = root / "job-liba"
    staged = job / "binpkgs/app-lab/libbase" / made[0].name
    staged.parent.mkdir(parents=True)
    shutil.copy(made[0], staged)
    done = _job(fresh, job, "app-lab/liba-1.0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "app-lab/libbase-1.0" in fresh.installed()
    assert list((job / "binpkgs/app-lab/liba").glob("liba-1.0-*.gpkg.tar"))
