"""The plan of an emerge: real Portage's packages, Portage's own dependency edges between them,
and a job per package that any fresh worker with the same build environment can run.

Why not the `--tree` indentation alone: emerge prints a package once even when several packages
need it (a diamond: libb and liba both on libbase, libbase printed under one of them, or under
a `[nomerge]` line), so the indentation misses edges and would schedule a library before the
base it is compiled against. The edges come from Portage's metadata instead
(`portage_graph.py`, run by Portage's own Python): DEPEND, BDEPEND and IDEPEND (needed to
build) and RDEPEND (needed for what was installed to work), with USE conditionals evaluated.

How a fresh worker builds a package whose dependencies it does not have: `emerge
--buildpkgonly` refuses unless every build-time dependency is installed, so each job first
installs them from binary packages, then builds its own (`JOB_SCRIPT`). The binary packages
are the job's staged files: the packages of the same run it needs (its dependencies' job
outputs) and the packages reused from the binhost (inputs fetched by digest). A job therefore
depends on its whole install closure: its build-time dependencies and everything they need at
run time. This installs into the worker's own Portage, like a person running emerge there
would; a per-build ROOT would keep the worker clean but makes Portage load a second
configuration for `/` and merge BDEPENDs into the real root (../shared/PORTAGE.md), so it is
not used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from swarmnode.build.emerge import Package, binpkg_outputs, job_name
from swarmnode.build.plan import DEFAULT_ESTIMATE, Job, Plan, PlanError, Requires, validate_plan
from swarmnode.portage.host import PortageError, PortageHost

HELPER = Path(__file__).with_name("portage_graph.py")
#: Where a job keeps binary packages and source archives, relative to its directory.
PKGDIR = "binpkgs"
DISTDIR = "distfiles"
#: A worker's tag saying which build environment it has; a job requires its submitter's.
TAG_PREFIX = "portage:"

#: The job: install the package's build-time dependencies from the staged binary packages
#: (Portage falls back to building one from source only if no binary is staged for it), then
#: build the package. The package is "$1", never pasted into the script.
JOB_SCRIPT = (
    'set -e\n'
    f'export PKGDIR="$PWD/{PKGDIR}" DISTDIR="$PWD/{DISTDIR}"\n'
    # the staged packages have no index yet: read each package's own metadata
    'export FEATURES="-pkgdir-index-trusted"\n'
    'export NOCOLOR=true\n'  # (the phases' own messages: --color=n covers emerge's)
    'mkdir -p "$PKGDIR" "$DISTDIR"\n'
    'emerge --usepkg --onlydeps --onlydeps-with-rdeps=n --oneshot --color=n "$1"\n'
    'exec emerge --buildpkgonly --oneshot --color=n "$1"\n'
)


def worker_tags(facts: Mapping[str, object]) -> frozenset[str]:
    """The tags a member's facts give it: its build environment, when it has Portage."""
    fingerprint = facts.get("portage")
    return frozenset({TAG_PREFIX + fingerprint}) if isinstance(fingerprint, str) else frozenset()


@dataclass(frozen=True)
class PackageInfo:
    """Portage's view of one package of the plan (see portage_graph.py)."""

    cpv: str
    use: tuple[str, ...]
    build: tuple[str, ...]
    run: tuple[str, ...]
    bindings: tuple[str, ...]
    distfiles: tuple[str, ...]

    def key(self, abi: str) -> str:
        """The binary package's identity in the binhost: version, its own USE, what its `:=`
        dependencies bound to, and the build environment (`abi`); 40 hex characters."""
        text = json.dumps([self.cpv, self.use, self.bindings, abi], separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


@dataclass(frozen=True)
class Graph:
    packages: dict[str, PackageInfo]
    distdir: Path


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PortageError(f"Portage's graph helper gave a bad {what}")
    return tuple(value)


def parse_graph(text: bytes, cpvs: Iterable[str]) -> Graph:
    """The helper's answer, checked: every asked cpv, with lists of strings."""
    try:
        raw = json.loads(text)
        packages, distdir = raw["packages"], raw["distdir"]
    except (ValueError, KeyError, TypeError):
        raise PortageError("Portage's graph helper gave no readable answer") from None
    infos = {}
    for cpv in cpvs:
        item = packages.get(cpv) if isinstance(packages, dict) else None
        if not isinstance(item, dict):
            raise PortageError(f"Portage's graph helper left out {cpv}")
        infos[cpv] = PackageInfo(cpv, *(_strings(item.get(k), f"{k} of {cpv}") for k in
                                        ("use", "build", "run", "bindings", "distfiles")))
    if not isinstance(distdir, str):
        raise PortageError("Portage's graph helper gave no DISTDIR")
    return Graph(infos, Path(distdir))


async def read_graph(host: PortageHost, cpvs: list[str]) -> Graph:
    """Portage's dependency edges, USE and distfiles for `cpvs` (one helper run)."""
    code, out, err = await host.run([host.python(), str(HELPER)],
                                    stdin=json.dumps({"cpvs": cpvs}).encode())
    if code != 0:
        tail = err.decode("utf-8", "replace").strip()[-2000:]
        raise PortageError(f"reading Portage's dependency graph failed ({code}): {tail}")
    return parse_graph(out, cpvs)


def install_closure(graph: Mapping[str, PackageInfo], cpv: str) -> list[str]:
    """What must be installed to build `cpv`: its build-time dependencies and, transitively,
    everything those need at run time; in the order found."""
    seen: dict[str, None] = {}
    todo = list(graph[cpv].build)
    while todo:
        dep = todo.pop(0)
        if dep in seen or dep == cpv:
            continue
        seen[dep] = None
        todo.extend(graph[dep].run)
    return list(seen)


def _reaches(deps: Mapping[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        at = todo.pop()
        if at == goal:
            return True
        if at not in seen:
            seen.add(at)
            todo.extend(deps.get(at, ()))
    return False


def job_deps(graph: Mapping[str, PackageInfo], built: Iterable[str]) -> dict[str, list[str]]:
    """For each package built, the built packages that must be done first: its build-time
    dependencies always, and the rest of its install closure unless that would close a cycle
    (runtime cycles are common in Portage's tree; a package left out that way has no binary
    staged for the job, whose first step then builds it from source)."""
    built = list(built)
    wanted = set(built)
    deps = {cpv: {d for d in graph[cpv].build if d in wanted and d != cpv} for cpv in built}
    for cpv in built:
        for dep in install_closure(graph, cpv):
            if dep in wanted and dep not in deps[cpv] and not _reaches(deps, dep, cpv):
                deps[cpv].add(dep)
    order = {cpv: i for i, cpv in enumerate(built)}
    return {cpv: sorted(d, key=order.__getitem__) for cpv, d in deps.items()}


@dataclass(frozen=True)
class Reused:
    """A binary package the binhost already has: where it goes in a job's PKGDIR, by digest."""

    path: str  # below PKGDIR: CAT/PN/PF-N.gpkg.tar
    digest: str


def emerge_plan(
    packages: list[Package],
    graph: Graph,
    *,
    fingerprint: str,
    abi: str,
    reused: Mapping[str, Reused],
    distfiles: Mapping[str, str],
    estimates: Mapping[str, float],
    name: str = "emerge",
) -> tuple[Plan, dict[str, str]]:
    """The plan building every package of `packages` that is neither reused nor a binary,
    and the inputs it names that are already in the artifact store (path -> digest).

    `distfiles` maps a source archive's name to its digest; `estimates` maps a cpv or an
    atom to seconds. Raises PlanError for a cycle among build-time dependencies.
    """
    by_cpv = {p.cpv: p for p in packages if not p.nomerge and not p.binary}
    built = [cpv for cpv in by_cpv if cpv not in reused]
    deps = job_deps(graph.packages, built)
    requires = Requires(tags=frozenset({TAG_PREFIX + fingerprint}))
    stored: dict[str, str] = {}
    jobs: dict[str, Job] = {}
    for cpv in built:
        info, package = graph.packages[cpv], by_cpv[cpv]
        inputs = []
        for dep in install_closure(graph.packages, cpv):
            if dep in reused:
                rel = f"{PKGDIR}/{reused[dep].path}"
                stored[rel] = reused[dep].digest
                inputs.append(rel)
        for archive in info.distfiles:
            rel = f"{DISTDIR}/{archive}"
            stored[rel] = distfiles[archive]
            inputs.append(rel)
        jobs[job_name(package)] = Job(
            name=job_name(package),
            cmd=("sh", "-c", JOB_SCRIPT, "sh", f"={cpv}"),
            inputs=tuple(inputs),
            outputs=binpkg_outputs(package, PKGDIR),
            deps=tuple(job_name(by_cpv[d]) for d in deps[cpv]),
            requires=requires,
            estimate=estimates.get(cpv, estimates.get(package.atom, DEFAULT_ESTIMATE)),
            env={"SWARMNODE_PACKAGE_KEY": info.key(abi)},
        )
    plan = Plan(name=name, jobs=jobs)
    if not jobs:  # every package reused: nothing to build (and no plan to check)
        return plan, stored
    try:
        return validate_plan(plan), stored
    except PlanError as exc:
        raise PlanError(f"the plan made from Portage's graph is invalid: {exc}") from None
