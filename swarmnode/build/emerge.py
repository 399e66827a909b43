"""Gentoo `emerge --pretend` output turned into a build plan of binary packages.

`emerge --pretend [--tree] [--verbose] ...` prints one line per package, for instance::

    [ebuild     U  ] sys-libs/glibc-2.17 [2.15-r3] USE="-nscd% -suid%"
    [binary  N     ] dev-cpp/fast_float-8.0.2-1::gentoo  USE="-test" 0 KiB
    [nomerge       ] x11-wm/i3-4.14.1::desktop-kit  USE="-debug"
    [blocks B      ] sys-kernel/linux-headers ("sys-kernel/linux-headers" is soft blocking ...)

Choices made here, and why:

* Dependencies. With `--tree` the indentation says who pulled in whom: a line is a dependency
  of the nearest shallower line above it. A job depends on the jobs below it; `[nomerge]`
  lines and skipped binaries are transparent (a job under a nomerge parent under a job is a
  dependency of that job), so no ordering emerge implied is lost. emerge prints a package once
  even when several parents need it, so the tree may miss edges to later parents; that is the
  price of its parallelism. Without `--tree` there is no dependency information, only the merge
  order, so each job depends on the one before it: always correct, never parallel. Pass
  `--tree` to emerge to let the swarm build in parallel.
* PKGDIR. emerge --buildpkgonly writes to $PKGDIR, but plan outputs must be relative to the job
  directory. Each job therefore runs emerge with PKGDIR set to `<job dir>/<pkgdir>` (a tiny
  `sh -c` wrapper exports PKGDIR="$PWD/..." because the job directory's absolute path is only
  known on the node) and its outputs are that one package's files in either layout portage
  uses: `CAT/PF.tbz2` / `CAT/PF.gpkg.tar`, or with FEATURES=binpkg-multi-instance
  `CAT/PN/PF-BUILDID.xpak` / `.gpkg.tar`. The patterns name this package only, so the binary
  packages of dependencies staged into the same directory are not collected again.
* `[binary ...]` lines already have a binary package, so by default they get no job.
* Blockers are errors: emerge would not install the set, so nothing should be built.

Note that --buildpkgonly builds against what is installed on the node: emerge refuses when a
dependency of the package still needs merging there, and staged dependency packages are not
installed by these jobs.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from swarmnode.build.plan import DEFAULT_ESTIMATE, Job, Plan, PlanError, Requires, validate_plan

ANYWHERE = Requires()

_LINE_RE = re.compile(r"\[(?P<kind>[a-z]+)(?P<flags>[^\]]*)\](?P<indent> +)(?P<rest>\S.*)")
_NAME = r"[A-Za-z0-9_][A-Za-z0-9+_.-]*"
_VERSION = r"\d+(?:\.\d+)*[a-z]?(?:_(?:alpha|beta|pre|rc|p)\d*)*(?:-r\d+)?"
_PACKAGE_RE = re.compile(
    rf"(?P<atom>{_NAME}/[A-Za-z0-9_][A-Za-z0-9+_-]*?)-(?P<version>{_VERSION})"
    r"(?:-(?P<build_id>\d+))?"
    rf"(?::(?P<slot>{_NAME}(?:/{_NAME})?))?"
    r"(?:::(?P<repo>[A-Za-z0-9_][A-Za-z0-9_-]*))?"
    r"(?=\s|$)"
)
_ROOT_RE = re.compile(r"\s+to\s+(?P<root>/\S*)")
_OLD_RE = re.compile(r"\s*\[(?P<old>[^\]]*)\]")
_GROUP_RE = re.compile(r'\s*(?P<name>[A-Z][A-Z0-9_]*)="(?P<value>[^"]*)"')
_SIZE_RE = re.compile(r"\s*(?P<size>\d[\d,.]*\s*[KMGT]?i?B)")
_BLOCKER_RE = re.compile(
    r"(?P<atom>\S+)\s+\((?:\"(?P<shown>[^\"]*)\"\s+)?is\s+(?P<how>\S+\s+blocking)\s+(?P<by>[^)]*)\)"
)
_TOTAL_RE = re.compile(r"Total:\s+(?P<count>\d+)\s+packages?\b")


class EmergeError(ValueError):
    """Output that must not become a plan: blockers, or lines this parser cannot read."""

    def __init__(self, message: str, blockers: tuple[Blocker, ...] = ()) -> None:
        super().__init__(message)
        self.blockers = blockers


@dataclass(frozen=True)
class Blocker:
    """A `[blocks ...]` line: `atom` is blocked, as shown, by the packages in `by`."""

    atom: str
    how: str  # "soft blocking" or "hard blocking"
    by: tuple[str, ...]
    resolved: bool  # lower-case "b": emerge would resolve it by uninstalling
    line: int

    def describe(self) -> str:
        state = "resolvable by uninstalling" if self.resolved else "unresolved"
        return f'line {self.line}: "{self.atom}" is {self.how} {", ".join(self.by)} ({state})'


@dataclass(frozen=True)
class Package:
    """One package line of emerge output."""

    atom: str  # "cat/pkg"
    version: str  # with revision: "2.20-r1"
    slot: str | None = None  # "3.3" or "0/34" (slot/sub-slot), when shown
    repo: str | None = None
    flags: str = ""  # status letters without spaces: "N", "NS", "U", "UD", "R~"
    old_version: str | None = None  # the version being replaced, for U, UD, NS
    binary: bool = False  # a [binary ...] line: installed from an existing binary package
    nomerge: bool = False  # a [nomerge ...] line (--tree): a parent that is not rebuilt
    depth: int = 0  # --tree indentation level; 0 without --tree
    use: str | None = None  # the USE="..." text as shown, without the quotes
    use_expand: tuple[tuple[str, str], ...] = ()  # other groups: (("ABI_X86", "32 (64)"),)
    build_id: int | None = None  # binary packages of binpkg-multi-instance show "-BUILDID"
    line: int = field(default=0, compare=False)

    @property
    def cpv(self) -> str:
        """The "cat/pkg-version" that `=` atoms and binary package file names are made of."""
        return f"{self.atom}-{self.version}"


def _fail(number: int, line: str, problem: str) -> EmergeError:
    return EmergeError(f"line {number}: {problem}: {line.strip()!r}")


def _old_version(old: str) -> str:
    """The version in "2.7.5-r2:2.7::gentoo" (first of several, if emerge lists more)."""
    first = old.split(",")[0].strip()
    return first.split(":")[0]


def _package(kind: str, flags: str, depth: int, rest: str, number: int, line: str) -> Package:
    match = _PACKAGE_RE.match(rest)
    if match is None:
        raise _fail(number, line, "cannot read the package name and version")
    build_id = match["build_id"]
    if build_id is not None and kind != "binary":
        raise _fail(number, line, "a build id is only shown for binary packages")
    pos = match.end()
    extra = _ROOT_RE.match(rest, pos)  # `to /root/` when emerging into another ROOT
    pos = extra.end() if extra else pos
    old = _OLD_RE.match(rest, pos)
    pos = old.end() if old else pos
    groups: list[tuple[str, str]] = []
    while group := _GROUP_RE.match(rest, pos):
        groups.append((group["name"], group["value"]))
        pos = group.end()
    size = _SIZE_RE.match(rest, pos)
    pos = size.end() if size else pos
    if rest[pos:].strip():
        raise _fail(number, line, f"unexpected text {rest[pos:].strip()!r}")
    use = next((value for name, value in groups if name == "USE"), None)
    return Package(
        atom=match["atom"],
        version=match["version"],
        slot=match["slot"],
        repo=match["repo"],
        flags=flags.replace(" ", ""),
        old_version=_old_version(old["old"]) if old else None,
        binary=kind == "binary",
        nomerge=kind == "nomerge",
        depth=depth,
        use=use,
        use_expand=tuple((name, value) for name, value in groups if name != "USE"),
        build_id=int(build_id) if build_id is not None else None,
        line=number,
    )


def _blocker(flags: str, rest: str, number: int, line: str) -> Blocker:
    match = _BLOCKER_RE.fullmatch(rest.strip())
    if match is None:
        raise _fail(number, line, "cannot read the blocker")
    by = tuple(part.strip() for part in match["by"].split(","))
    atom = match["shown"] or match["atom"].lstrip("!")
    return Blocker(atom, match["how"], by, resolved="b" in flags, line=number)


def parse_pretend(text: str) -> list[Package]:
    """The package lines of `emerge --pretend` output, in the order printed.

    Raises EmergeError for blockers (all of them, in one message), for bracketed lines that are
    not readable package lines, and when a `Total: N packages` line disagrees with the count.
    """
    packages: list[Package] = []
    blockers: list[Blocker] = []
    total: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE_RE.match(line)
        if match is None:
            if line.startswith("[") and re.match(r"\[[a-z]+[ A-Za-z~*#%]*\]", line):
                raise _fail(number, line, "no package after the status field")
            counted = _TOTAL_RE.match(line)
            if counted:
                total = int(counted["count"])
            continue  # headings, notes, news, "Calculating dependencies", ...
        kind, flags, rest = match["kind"], match["flags"], match["rest"]
        depth = len(match["indent"]) - 1
        if kind == "blocks":
            blockers.append(_blocker(flags, rest, number, line))
        elif kind in ("ebuild", "binary", "nomerge"):
            packages.append(_package(kind, flags, depth, rest, number, line))
        elif kind == "uninstall":
            raise _fail(number, line, "emerge would uninstall a package; resolve that first")
        else:
            raise _fail(number, line, f"unknown line kind '{kind}'")
    if blockers:
        listed = "; ".join(blocker.describe() for blocker in blockers)
        raise EmergeError(
            f"emerge reports {len(blockers)} blocker(s), so these packages cannot be installed "
            f"together and nothing is planned: {listed}",
            tuple(blockers),
        )
    merged = sum(1 for package in packages if not package.nomerge)
    if total is not None and total != merged:
        raise EmergeError(f"emerge's Total says {total} packages, but {merged} lines were read")
    if not packages and total is None:
        raise EmergeError("no package lines found: is this `emerge --pretend` output?")
    return packages


def job_name(package: Package) -> str:
    """A directory-safe job name: "dev-libs/openssl-3.0.13" -> "dev-libs_openssl-3.0.13"."""
    return package.cpv.replace("/", "_")


def cpv_of(job: str) -> str:
    """The package a job name stands for, `job_name` read back: its first "_" was the "/"
    ("dev-libs_openssl-3.0.13" -> "dev-libs/openssl-3.0.13")."""
    return job.replace("_", "/", 1)


def binpkg_outputs(package: Package, pkgdir: str = "binpkgs") -> tuple[str, ...]:
    """Globs, relative to the job directory, for the binary package emerge writes to PKGDIR."""
    category, name = package.atom.split("/")
    pf = f"{name}-{package.version}"
    return (
        f"{pkgdir}/{category}/{pf}.tbz2",
        f"{pkgdir}/{category}/{pf}.gpkg.tar",
        f"{pkgdir}/{category}/{name}/{pf}-[0-9]*.xpak",
        f"{pkgdir}/{category}/{name}/{pf}-[0-9]*.gpkg.tar",
    )


def emerge_command(package: Package, pkgdir: str = "binpkgs") -> tuple[str, ...]:
    """argv building one binary package into `<job dir>/<pkgdir>`.

    The job directory is only known on the node, hence `sh -c` with "$PWD"; the package atom is
    passed as an argument, never pasted into the script.
    """
    script = f'export PKGDIR="$PWD"/{shlex.quote(pkgdir)}; exec "$@"'
    return ("sh", "-c", script, "sh", "emerge", "--buildpkgonly", "--oneshot", f"={package.cpv}")


def _is_tree(text: str, packages: list[Package]) -> bool:
    return "in reverse order" in text or any(package.depth for package in packages)


def _tree_deps(packages: list[Package], builds: list[bool]) -> dict[int, list[int]]:
    """For each built line, the built lines below it (through lines that are not built)."""
    deps: dict[int, list[int]] = {i: [] for i, build in enumerate(builds) if build}
    parents: list[int] = []  # stack of line indexes on the path from the root to this line
    for i, package in enumerate(packages):
        while parents and packages[parents[-1]].depth >= package.depth:
            parents.pop()
        if builds[i]:
            ancestor = next((p for p in reversed(parents) if builds[p]), None)
            if ancestor is not None:
                deps[ancestor].append(i)
        parents.append(i)
    return deps


def plan_from_pretend(
    text: str,
    name: str = "emerge",
    *,
    pkgdir: str = "binpkgs",
    requires: Requires = ANYWHERE,
    estimates: Mapping[str, float] | None = None,
    include_binary: bool = False,
) -> Plan:
    """A plan with one job per package emerge would build (see the module notes).

    `estimates` maps a cpv or an atom to seconds (cpv wins); `requires` applies to every job;
    `include_binary` also rebuilds packages emerge would take from existing binary packages.
    """
    packages = parse_pretend(text)
    builds = [not p.nomerge and (include_binary or not p.binary) for p in packages]
    indexes = [i for i, build in enumerate(builds) if build]
    if not indexes:
        raise EmergeError("nothing to build: every package is a nomerge parent or a binary")
    if _is_tree(text, packages):
        deps = _tree_deps(packages, builds)
    else:
        deps = {i: [prev] for prev, i in itertools.pairwise(indexes)}
        deps[indexes[0]] = []
    estimates = estimates or {}
    jobs: dict[str, Job] = {}
    for i in indexes:
        package = packages[i]
        job = job_name(package)
        below = tuple(dict.fromkeys(job_name(packages[d]) for d in deps.get(i, [])))
        if job in jobs:  # listed twice in a tree: build once, after everything either needed
            below = tuple(dict.fromkeys(jobs[job].deps + below))
        jobs[job] = Job(
            name=job,
            cmd=emerge_command(package, pkgdir),
            outputs=binpkg_outputs(package, pkgdir),
            deps=tuple(dep for dep in below if dep != job),
            requires=requires,
            estimate=estimates.get(package.cpv, estimates.get(package.atom, DEFAULT_ESTIMATE)),
        )
    try:
        return validate_plan(Plan(name=name, jobs=jobs))
    except PlanError as exc:
        raise EmergeError(f"the plan made from emerge output is invalid: {exc}") from None
