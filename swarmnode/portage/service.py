"""`swarmnode emerge`: from atoms to a submitted build, on the node the user asked.

The steps, each with Portage's own answer: what would be merged (`emerge --pretend --tree
--verbose`), the edges between those packages and their USE (graph.py), which of them the
binhost already has for this build environment (reused, not built), the source archives
(fetched once here, by Portage, which checks them against the Manifest; every job gets them by
digest through the swarm and its Portage checks them again), then the plan.

Build times are remembered per package here (SQLite) when a build ends and are the next
estimates, so the critical path of a large @world is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarmnode.artifact_service import ArtifactError
from swarmnode.binhost_service import query_binhost
from swarmnode.build.emerge import EmergeError, Package, cpv_of, job_name, parse_pretend
from swarmnode.build.plan import PlanError
from swarmnode.control import ControlError
from swarmnode.portage.binhost import BINARY_PACKAGES, BinhostError, package_key
from swarmnode.portage.graph import (
    TAG_PREFIX,
    Graph,
    Reused,
    emerge_plan,
    read_graph,
    worker_tags,
)
from swarmnode.portage.host import PortageError, PortageHost
from swarmnode.push.release import BUILD
from swarmnode.tasks import until

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: An atom or set as emerge takes it: never an option (argv, so no shell, but emerge would
#: read "--config-root=..." as one).
ATOM_RE = re.compile(r"[@=<>~A-Za-z0-9_][A-Za-z0-9_.+*:/@=<>~-]{0,300}")
MAX_ATOMS = 1000
#: Build times kept (cpv and package name each): a large @world is about 1,500 packages, so
#: this holds several versions of each; the oldest are forgotten first.
MAX_TIMES = 20_000
TIMES_KEY = "emerge_seconds"
#: How long a binhost may take to answer which packages it has (a lookup in its SQLite).
QUERY_S = 10.0
#: Longest `published` waits for the binhosts to serve a finished build's packages: a
#: binhost fetches and indexes each package after its job is done, seconds per package.
PUBLISH_WAIT_MAX_S = 60.0
#: How often `published` asks the binhosts again while it waits (one small SQLite lookup).
PUBLISH_POLL_S = 0.25
#: How long a build's times are waited for: a @world can run for days.
WATCH_S = 14 * 86400.0


@dataclass(frozen=True)
class Submitted:
    build: str | None  # None: nothing to build, every package was reused
    packages: int  # the packages emerge would merge (binaries it would take included)
    built: int
    reused: int

    def plain(self) -> dict[str, Any]:
        return {"build": self.build, "packages": self.packages, "built": self.built,
                "reused": self.reused}


def check_atoms(atoms: list[Any]) -> list[str]:
    if not isinstance(atoms, list) or not atoms or len(atoms) > MAX_ATOMS:
        raise ControlError(f"emerge: give 1 to {MAX_ATOMS} packages")
    for atom in atoms:
        if not isinstance(atom, str) or not ATOM_RE.fullmatch(atom):
            raise ControlError(f"emerge: {atom!r} is not a package atom or set")
    return atoms


class EmergeService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def host(self) -> PortageHost:
        if self.node.portage is None:
            raise ControlError("this node has no Portage: `emerge` is not on its PATH and "
                               "config.toml names none (key `emerge`)")
        return self.node.portage

    async def pretend(self, atoms: list[str]) -> list[Package]:
        code, out, err = await self.host.run(
            [str(self.host.emerge), "--pretend", "--tree", "--verbose", "--color=n", *atoms])
        text = out.decode("utf-8", "replace")
        if code != 0:
            tail = (text + err.decode("utf-8", "replace")).strip()[-3000:]
            raise ControlError(f"emerge --pretend failed ({code}):\n{tail}")
        try:
            return parse_pretend(text)
        except EmergeError as exc:
            raise ControlError(str(exc)) from None

    async def submit(self, atoms: list[Any], dry_run: bool = False) -> dict[str, Any]:
        """Plan and submit the emerge of `atoms` (see the module notes): what `Submitted`
        says, or with `dry_run` the plan's jobs and the packages reused."""
        fingerprint = self.node.fingerprint
        if fingerprint is None:
            raise ControlError("this node's build environment is not known yet (emerge --info "
                               "failed or is still running): see the node's log")
        self._check_matching_worker(fingerprint.hash)
        packages = await self.pretend(check_atoms(atoms))
        listed = len({p.cpv for p in packages if not p.nomerge})
        merged = [p for p in packages if not p.nomerge and not p.binary]
        if not merged:
            return Submitted(None, listed, 0, 0).plain()
        try:
            graph = await read_graph(self.host, list(dict.fromkeys(p.cpv for p in merged)))
        except PortageError as exc:
            raise ControlError(str(exc)) from None
        reused = await self._reused(graph, fingerprint.abi, fetch=not dry_run)
        built = [cpv for cpv in graph.packages if cpv not in reused]
        distfiles = ({name: "" for cpv in built for name in graph.packages[cpv].distfiles}
                     if dry_run else await self._distfiles(graph, built))
        try:
            plan, stored = emerge_plan(packages, graph, fingerprint=fingerprint.hash,
                                       abi=fingerprint.abi, reused=reused, distfiles=distfiles,
                                       estimates=self._times())
        except PlanError as exc:
            raise ControlError(str(exc)) from None
        if dry_run:
            times = self._times()
            return {"jobs": {name: {"cmd": list(job.cmd), "deps": list(job.deps),
                                    "inputs": list(job.inputs), "outputs": list(job.outputs),
                                    "estimate": job.estimate}
                             for name, job in plan.jobs.items()}, "reused": sorted(reused),
                    "remembered": {cpv: times.get(cpv) for cpv in graph.packages}}
        if not plan.jobs:
            return Submitted(None, listed, 0, len(reused)).plain()
        build_id = await self.node.builds.submit_plan(plan, stored)
        self._spawn(self._remember_times(build_id, {job_name(p): p for p in merged}))
        return Submitted(build_id, listed, len(plan.jobs), len(reused)).plain()

    async def published(self, build_id: str, wait: float = 0.0) -> dict[str, Any]:
        """What of a build's packages the binhosts do not serve yet: {binhost name: [cpv]}
        (or {binhost name: error}), waiting up to `wait` s for none to be missing. A binhost
        takes a package in a moment after its job is done, so `emerge --wait` waits for this
        before it says the build is through: clients install right after."""
        keys: dict[str, str] = {}  # package key -> cpv
        for job in self.node.builds.ledger.jobs(build_id):
            packaged = any(p.endswith(BINARY_PACKAGES) for p, _d in job.artifacts)
            if job.state == "done" and packaged and (
                    key := package_key(await self.node.builds.job_env(job))):
                keys[key] = cpv_of(job.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), PUBLISH_WAIT_MAX_S)

        async def lacking(binhost: str) -> list[str] | str:
            """What `binhost` does not serve, asked at once (no query outlasts the wait by
            more than a second: the caller's own timeout is the wait plus a margin)."""
            if not keys:
                return []
            timeout = min(QUERY_S, max(deadline - loop.time(), 1.0))
            try:
                have = await query_binhost(self.node, binhost, list(keys), timeout)
            except BinhostError as exc:
                return str(exc)
            return sorted(cpv for key, cpv in keys.items() if key not in have)

        while True:
            binhosts = self.binhosts()
            answers = await asyncio.gather(*(lacking(b) for b in binhosts))
            missing = {self.node.member_name(b): a for b, a in zip(binhosts, answers, strict=True)}
            if not any(missing.values()) or loop.time() >= deadline:
                return missing
            await asyncio.sleep(PUBLISH_POLL_S)

    def _alive_facts(self) -> dict[str, dict[str, str | int]]:
        """The facts of every alive admitted member, by id."""
        return {m.id: m.record.facts_dict() for m in self.node.core.members()
                if m.admitted_by is not None and m.state == "alive" and m.record is not None}

    def _check_matching_worker(self, fingerprint: str) -> None:
        """Fail now, not with every job blocked, when no member can build for this node."""
        tag = TAG_PREFIX + fingerprint
        if not any(tag in worker_tags(facts) for facts in self._alive_facts().values()):
            raise ControlError(f"no alive member has this node's build environment "
                               f"({fingerprint}): `swarmnode nodes` shows how each differs")

    def binhosts(self) -> list[str]:
        """The members whose binhost catalog is believed: alive admitted members stating a
        `binhost` fact and holding the `build` right. A binhost's answer decides what workers
        install, which is what a build's jobs can do anyway; a member without that right (a
        forgotten container) claiming to be a binhost is not asked."""
        builders = self.node.rights.holders(BUILD)
        return sorted(i for i, facts in self._alive_facts().items()
                      if i in builders and facts.get("binhost"))

    async def _reused(self, graph: Graph, abi: str, fetch: bool = True) -> dict[str, Reused]:
        """The packages a binhost has for this environment, fetched here (unless `fetch` is
        off: a dry run) so that jobs get them from this node (and the binhost) by digest."""
        keys = {info.key(abi): cpv for cpv, info in graph.packages.items()}
        found: dict[str, Reused] = {}
        for binhost in self.binhosts():
            try:
                have = await query_binhost(self.node, binhost, list(keys), QUERY_S)
            except BinhostError as exc:
                log.warning("binhost %s: %s", self.node.member_name(binhost), exc)
                continue
            for key, (path, digest) in have.items():
                if key in keys and keys[key] not in found:
                    with contextlib.suppress(ArtifactError):
                        if fetch:
                            await self.node.artifacts.fetch(digest, [binhost])
                        found[keys[key]] = Reused(path, digest)
        return found

    async def _distfiles(self, graph: Graph, built: list[str]) -> dict[str, str]:
        """Every source archive of the packages built: fetched here (Portage checks each
        against the Manifest) and stored, name -> digest."""
        needed = [cpv for cpv in built if graph.packages[cpv].distfiles]
        if not needed:
            return {}
        code, out, err = await self.host.run(
            [str(self.host.emerge), "--fetchonly", "--oneshot", "--nodeps", "--color=n",
             *(f"={cpv}" for cpv in needed)])
        if code != 0:
            tail = (out + err).decode("utf-8", "replace").strip()[-3000:]
            raise ControlError(f"fetching the source archives failed ({code}):\n{tail}")
        store = self.node.artifacts.store
        names = {name for cpv in needed for name in graph.packages[cpv].distfiles}
        try:
            return {name: await asyncio.to_thread(store.put_file, graph.distdir / name)
                    for name in sorted(names)}
        except OSError as exc:
            raise ControlError(f"cannot read a fetched source archive: {exc}") from None

    # -- build times ----------------------------------------------------------------------

    def _times(self) -> dict[str, float]:
        times = self.node.store.get(TIMES_KEY, {})
        return times if isinstance(times, dict) else {}

    async def _remember_times(self, build_id: str, packages: dict[str, Package]) -> None:
        builds = self.node.builds
        if not await until(builds._changed, lambda: builds.ledger.finished(build_id), WATCH_S):
            return
        times = self._times()
        for job in builds.ledger.jobs(build_id):
            package = packages.get(job.name)
            if package is not None and job.state == "done" and job.seconds > 0:
                for key in (package.cpv, package.atom):  # (the name: for the next version)
                    times.pop(key, None)
                    times[key] = round(job.seconds, 1)
        while len(times) > MAX_TIMES:
            times.pop(next(iter(times)))
        self.node.store.put(**{TIMES_KEY: times})

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
