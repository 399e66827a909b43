"""`swarmnode push` in the node: rolling a release out (the pusher) and applying one (everyone).

The pusher bundles a directory (or its own code), stores the bundle as a content-addressed
artifact, signs a release note and drives a `Rollout` (swarmnode/push/rollout.py): the signed
note goes to the canaries directly (`push.stage`), and to everyone by gossip once they are
healthy. A node applying a release fetches the bundle in chunks from the pusher and from nodes
that already hold it (the artifact service verifies every chunk and the whole), installs it
under `<home>/releases/<digest>`, switches the app's link atomically, restarts and checks
health, rolling itself back when the check fails; it reports each step to the pusher
(`push.state`). A node that missed a push (offline, or joined later) finds the newest release
among the notes it holds and applies it.

The self-update (app "swarmnode") ends in this process exec-ing the new release; the new
process is on trial until it has rejoined, and rolls back to the previous release when it has
not within the release's health timeout (swarmnode/push/releases.py keeps the trial on disk,
so a release that cannot even start is rolled back by the launcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from net.transport import Inbound
from swarmnode import control
from swarmnode.artifact_service import ArtifactError
from swarmnode.artifacts import check_digest
from swarmnode.membership import Note
from swarmnode.membership.messages import (
    MAX_FACT_KEY,
    MAX_NOTE_VALUE,
    MessageError,
    item_from_plain,
    item_to_plain,
)
from swarmnode.push import bundle as bundles
from swarmnode.push.bundle import SELF_APP
from swarmnode.push.release import (
    GRANT_TOPIC,
    PUSH,
    RELEASE_TOPIC,
    Release,
    ReleaseError,
    newest,
    verify_stage,
)
from swarmnode.push.releases import Releases
from swarmnode.push.rollout import Publish, Rollout, Stage, wave_size
from swarmnode.routes import RouteError
from swarmnode.tasks import TaskSet
from swarmnode.worker import pack, unpack_map

T = TypeVar("T")

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

STAGE = "push.stage"
STATE = "push.state"
SOURCES = "push.sources"
HINTS_PER_HOLDER = 8
"""A node that has installed a release is named as a source to at most this many nodes still
fetching it, so the bundle spreads from every holder (a tree) instead of all from the pusher."""
TICK_S = 0.25
"""How often rollouts check their deadlines and nodes look for releases they missed."""
CATCH_UP_S = 5.0
"""A node compares the releases it holds with what it runs this often (and on every new
release note): the catch-up of a node that was offline during a push."""
OWNER = "push"
"""The artifact-store pin that keeps bundles of installed releases (others may fetch them)."""
FACT_PREFIX = "rel."
MAX_APP_FACTS = 12
"""Apps whose release a node states in its record; the rest of its 32 facts describe it."""
ROLLBACK_PREFIX = "rb."
MAX_ROLLBACK_FACTS = 4
"""Apps whose latest rollback here a node states (`rb.APP` = digest@when): the dashboard
shows where a release was rolled back. With MAX_APP_FACTS, 16 of a record's 32 facts."""
KEEP_PUSHES = 32
"""Finished pushes whose outcome `push_status` still shows (the events keep every one)."""


def release_facts(releases: Releases) -> dict[str, str]:
    """The record facts that tell the cluster what this node runs: `rel.APP` = digest@switched,
    for the MAX_APP_FACTS apps switched most recently (a record holds 32 facts in all), and
    `rb.APP` = digest@when for its MAX_ROLLBACK_FACTS latest rollbacks."""
    runs = []
    for app in releases.apps():
        digest = releases.current(app)
        if digest is not None and len(FACT_PREFIX + app) <= MAX_FACT_KEY:
            runs.append((releases.switched_at(app) or 0.0, app, digest))
    runs.sort(reverse=True)
    facts = {FACT_PREFIX + app: f"{digest}@{int(at)}" for at, app, digest in runs[:MAX_APP_FACTS]}
    facts.update({ROLLBACK_PREFIX + app: f"{digest}@{int(at)}"
                  for app, digest, at in releases.rolled_back(MAX_ROLLBACK_FACTS)
                  if len(ROLLBACK_PREFIX + app) <= MAX_FACT_KEY})
    return facts


@dataclass
class _Push:
    id: str
    note: Note
    release: Release
    rollout: Rollout
    started: float  # wall clock when `push` was asked, bundling included
    finished: float | None = None
    logged: bool = False  # its end is an event once
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # for `push_status --wait`

    def touch(self) -> None:
        """Wake whoever waits on this push's progress."""
        self.changed.set()
        self.changed = asyncio.Event()


class PushService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.releases = Releases(node.home)
        self._writing = asyncio.Lock()  # one write to `releases` at a time (`_write`)
        self.tasks = TaskSet()
        self.pushes: dict[str, _Push] = {}
        self.applying: dict[str, str] = {}  # app -> digest being applied here
        self.queued: dict[str, tuple[Note, Release, list[str]]] = {}  # app -> next to apply
        self.wake = asyncio.Event()

    def handles(self, msg_type: str) -> bool:
        return msg_type in (STAGE, STATE, SOURCES)

    # -- who may push ---------------------------------------------------------------------

    def pushers(self) -> frozenset[str]:
        return self.node.rights.holders(PUSH)

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            body = unpack_map(env.body)
            if env.type == STAGE:
                note = item_from_plain(body.get("note"), frozenset({"note"}))
                self._on_stage(env.sender, note, self._sources(body))  # type: ignore[arg-type]
            elif env.type == SOURCES:  # hints only: whatever they send is verified
                self.node.artifacts.add_sources(check_digest(body.get("digest")),
                                                self._sources(body))
            else:
                self._on_state(env.sender, body)
        except (MessageError, ValueError, TypeError, KeyError):
            self.node.drops.drop("push_malformed")

    def _sources(self, body: dict[str, Any]) -> list[str]:
        """The members a message names as holders of a bundle (at most 64)."""
        named = body.get("sources")
        if not isinstance(named, list):
            return []
        return [s for s in named[:64] if isinstance(s, str) and self.node.is_admitted_member(s)]

    def _refuse(self, sender: str, note: Note | None, why: str) -> None:
        self.node.drops.drop("push_refused")
        self.node.event("push_refused", {"id": sender, "by": note.by if note else None,
                                         "reason": why})

    def _on_stage(self, sender: str, note: Note, sources: list[str]) -> None:
        try:
            release = verify_stage(sender, note, self.pushers())
        except ReleaseError as exc:
            self._refuse(sender, note, str(exc))
            return
        self._start_apply(note, release, [sender, *sources])

    def _on_state(self, sender: str, body: dict[str, Any]) -> None:
        push = self.pushes.get(str(body.get("push", "")))
        if push is None:
            return
        state = str(body.get("state", ""))
        push.rollout.report(self.node.clock(), sender, state, str(body.get("reason", ""))[:500])
        if state == "installed":
            self._hint(push, sender)
        self._carry_out(push)

    def _hint(self, push: _Push, holder: str) -> None:
        """Name a new holder of the bundle to some of the nodes still fetching it."""
        fetching = [n for n, s in push.rollout.nodes.items()
                    if s.state in ("staged", "fetching") and n != holder]
        body = pack({"digest": push.release.digest, "sources": [holder]})
        for n in random.sample(fetching, min(HINTS_PER_HOLDER, len(fetching))):
            self.node.send_raw(n, SOURCES, body)

    # -- applying a release here ----------------------------------------------------------

    def _start_apply(self, note: Note, release: Release, sources: list[str]) -> None:
        app, digest = release.app, release.digest
        if self.applying.get(app) == digest:
            self.node.artifacts.add_sources(digest, sources)  # more holders for the fetch
            return
        if self.applying.get(app) is not None:
            # One release of an app at a time: the latest staged one runs next (a canary's
            # release is not published yet, so the catch-up would not find it).
            self.queued[app] = (note, release, sources)
            return
        self.applying[app] = digest
        self.tasks.spawn(self._apply(note, release, sources))

    def _report(self, note: Note, state: str, reason: str = "") -> None:
        body = {"push": _push_id(note), "app": note.key, "state": state, "reason": reason}
        self.node.send_raw(note.by, STATE, pack(body))

    async def _apply(self, note: Note, release: Release, sources: list[str]) -> None:
        app, digest = release.app, release.digest
        try:
            if release.is_self and self.releases.current(app) == digest:
                return  # running it already, or on trial (whose end is reported)
            if self.releases.current(app) == digest and (
                    self.releases.status(app, digest) or ("",))[0] == "healthy":
                self._set_applied(note)
                self._report(note, "healthy")
                return
            why = self.releases.failed(app, digest)
            if why is not None:
                self._report(note, "rolled_back", f"rolled back here before: {why}")
                return
            self._report(note, "fetching")
            store = self.node.artifacts.store
            store.pin(digest, OWNER)
            try:
                await self.node.artifacts.fetch(digest, sources)
                await asyncio.to_thread(self.releases.install, digest, store.path(digest))
            except (ArtifactError, OSError, ValueError) as exc:  # BundleError, ReleaseError
                store.unpin(digest, OWNER)
                self._report(note, "failed", f"{type(exc).__name__}: {exc}")
                self.node.event("push_failed", {"app": app, "digest": digest, "reason": str(exc)})
                return
            self._report(note, "installed")
            try:
                if release.is_self:
                    await self._switch_self(note, release)
                else:
                    await self._switch_payload(note, release)
            except (OSError, ValueError) as exc:  # e.g. a real directory where the link goes
                self._report(note, "failed", f"{type(exc).__name__}: {exc}")
                self.node.event("push_failed", {"app": app, "digest": digest, "reason": str(exc)})
        finally:
            self.applying.pop(app, None)
            if app in self.queued:
                self._start_apply(*self.queued.pop(app))
            else:  # a newer note may have come while this one applied
                self._new_notes = True
                self.wake.set()

    async def _write(self, write: Callable[..., T], *args: Any) -> T:
        """A write to the releases database: off the loop thread (each commits with an fsync,
        which a disk kept busy by the push made tens of milliseconds of the loop's, up to 64 at
        40 nodes), and one at a time (the writes share one connection, and a transaction
        cannot begin inside another's)."""
        async with self._writing:
            return await asyncio.to_thread(write, *args)

    async def _switch_payload(self, note: Note, release: Release) -> None:
        await self._write(self.releases.switch, release.app, release.digest)
        self._publish_facts()
        self._report(note, "restarted" if release.spec.restart else "installed")
        why = await self._check_payload(release)
        if why is None:
            self._set_applied(note)
            self._report(note, "healthy")
            await self._prune()
        else:
            self._report(note, "rolled_back", why)

    async def _check_payload(self, release: Release) -> str | None:
        """Restart the app's current release and check its health; when either fails, roll
        back (and restart the previous release). None when healthy, else why not."""
        app, digest, spec = release.app, release.digest, release.spec
        why = await self._run_hook(release, "restart", spec.restart)
        if why is None:
            why = await self._run_hook(release, "health", spec.health)
        if why is None:
            await self._write(self.releases.mark, app, digest, "healthy")
            self.node.event("push_healthy", {"app": app, "digest": digest})
            return None
        back = await self._write(self.releases.rollback, app, why)
        self._publish_facts()
        if back is not None and spec.restart:  # the previous release runs again
            await self._run_hook(Release(spec, back, 0), "restart", spec.restart)
        self.node.event("push_rolled_back", {"app": app, "digest": digest, "reason": why,
                                             "now": back})
        return why

    async def _recheck(self) -> None:
        """An app switched to a release that was never found healthy (the node stopped in
        the middle of its check) is checked again now, with the spec its bundle carries."""
        for app in self.releases.apps():
            digest = self.releases.current(app)
            if app == SELF_APP or digest is None or \
                    (self.releases.status(app, digest) or ("",))[0] != "installed":
                continue
            try:
                spec = bundles.load_spec(self.releases.path(digest))
                spec = bundles.PushSpec(app, spec.restart, spec.health, spec.health_timeout)
            except (OSError, ValueError) as exc:
                await self._write(self.releases.rollback, app,
                                  f"its spec cannot be read: {exc}")
                self._publish_facts()
                continue
            self.applying[app] = digest  # no catch-up of the app meanwhile
            try:
                await self._check_payload(Release(spec, digest, 0))
            finally:
                self.applying.pop(app, None)

    async def _prune(self) -> None:
        """Keep the last few releases (and the bundles of those, for others to fetch)."""
        try:
            gone = await self._write(self.releases.prune)
        except OSError as exc:
            log.warning("pruning old releases: %s", exc)
            return
        for digest in gone:
            self.node.artifacts.store.unpin(digest, OWNER)

    async def _run_hook(self, release: Release, what: str, cmd: str | None) -> str | None:
        """Run a payload's restart or health command in its release dir; None when it passed,
        else why not (exit status and the end of its output)."""
        if not cmd:
            return None
        where = self.node.home / "releases" / release.digest
        env = dict(os.environ, SWARMNODE_APP=release.app, SWARMNODE_RELEASE=str(where),
                   SWARMNODE_HOME=str(self.node.home))
        proc = await asyncio.create_subprocess_shell(
            cmd, cwd=where, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        try:
            async with asyncio.timeout(release.spec.health_timeout):
                output, _ = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            return f"{what} command did not finish within {release.spec.health_timeout:g} s"
        if proc.returncode == 0:
            return None
        tail = output.decode(errors="replace").strip().splitlines()[-3:]
        return f"{what} command exited {proc.returncode}" + (f": {' | '.join(tail)}"
                                                             if tail else "")

    async def _switch_self(self, note: Note, release: Release) -> None:
        """Switch `<home>/current` and re-exec into it, on trial until rejoined."""
        digest = release.digest
        # Other apps' restarts and health checks finish first: the exec would cut them off
        # half-way, switched but unverified.
        deadline = time.monotonic() + release.spec.health_timeout
        while set(self.applying) - {SELF_APP} and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # The trial is on disk before the switch: a crash in between still rolls back.
        await self._write(self.releases.begin_trial, digest, self.releases.current(SELF_APP),
                          time.time() + release.spec.health_timeout)
        await self._write(self.releases.switch, SELF_APP, digest)
        self.node.store.put(push_trial_note=item_to_plain(note))  # whom to tell, after exec
        self._report(note, "restarted")
        self.node.event("push_restarting", {"app": SELF_APP, "digest": digest})
        self.node.reexec(self.node.home / "releases" / digest, digest)

    async def _watch_trial(self) -> None:
        """A freshly updated node: healthy once it has rejoined (or is alone in its cluster);
        rolled back and re-exec'd into the previous release when the deadline passes first."""
        trial = self.releases.trial()
        if trial is None or self.releases.current(SELF_APP) != trial.digest:
            return
        while time.time() < trial.deadline:
            if self._rejoined():
                await self._write(self.releases.end_trial, True)
                self.node.event("push_healthy", {"app": SELF_APP, "digest": trial.digest})
                self._report_trial(trial.digest, "healthy")
                await self._prune()
                return
            await asyncio.sleep(0.05)
        why = "not rejoined before the trial's deadline"
        await self._write(self.releases.end_trial, False, why)
        self.node.event("push_rolled_back", {"app": SELF_APP, "digest": trial.digest,
                                             "reason": why})
        self._report_trial(trial.digest, "rolled_back", why)
        back = self.releases.current(SELF_APP)
        self.node.reexec(self.node.home / "releases" / back if back else None, back)

    def _rejoined(self) -> bool:
        """A member has talked to us since the restart (or we are the only member)."""
        others = [m for m in self.node.core.members()
                  if m.id != self.node.id and m.admitted_by is not None
                  and m.state not in ("banned", "pending", "left")]
        return not others or self.node.heard_member

    def _report_trial(self, digest: str, state: str, reason: str = "") -> None:
        """Tell the pusher how the trial of its release ended (the note was kept on disk
        across the exec: a canary's release is not published yet)."""
        plain = self.node.store.get("push_trial_note")
        if not plain:
            return
        with contextlib.suppress(MessageError):
            note = item_from_plain(plain, frozenset({"note"}))
            if _digest_of(note) == digest:  # type: ignore[arg-type]
                if state == "healthy":
                    self._set_applied(note)  # type: ignore[arg-type]
                self._report(note, state, reason)  # type: ignore[arg-type]
        self.node.store.put(push_trial_note=None)

    def _publish_facts(self) -> None:
        rec = self.node.core.record
        facts = {k: v for k, v in rec.facts
                 if not k.startswith((FACT_PREFIX, ROLLBACK_PREFIX))}
        facts.update(release_facts(self.releases))
        self.node.core.update_record(self.node.clock(), facts=facts)
        self.node.flush()

    def _applied(self, app: str) -> tuple[int, str]:
        """(ts, author) of the release note this node last applied for `app`: a catch-up only
        ever moves to a newer one (a canary runs a release not yet published, and must not
        go back to the older published one meanwhile)."""
        ts, by = (self.node.store.get("push_applied") or {}).get(app, (-1, ""))
        return int(ts), str(by)

    def _set_applied(self, note: Note) -> None:
        if (note.ts, note.by) <= self._applied(note.key):
            return  # an older push finishing late does not step back
        applied = dict(self.node.store.get("push_applied") or {})
        applied[note.key] = [note.ts, note.by]
        self.node.store.put(push_applied=applied)

    def catch_up(self) -> None:
        """Apply the newest release of each app this node holds a note for and does not run
        (it was offline during the push, or joined since), unless it failed here before."""
        mine = {(p.release.app, p.release.digest) for p in self.pushes.values()
                if not p.rollout.done}
        for app, (note, release) in newest(self.node.core.notes(RELEASE_TOPIC),
                                           self.pushers()).items():
            if (app, release.digest) in mine or app in self.applying:
                continue
            if self.releases.current(app) == release.digest:
                continue
            if self.releases.failed(app, release.digest) is not None:
                continue
            if (note.ts, note.by) <= self._applied(app):
                continue
            holders = [m.id for m in self.node.core.members()
                       if m.state == "alive" and m.id != self.node.id
                       and _runs(m, app, release.digest)]
            random.shuffle(holders)
            self._start_apply(note, release, [note.by, *holders])

    # -- pushing --------------------------------------------------------------------------

    async def push(self, path: str | None, canary: int | None,
                   wave: int | None = None) -> dict[str, Any]:
        node = self.node
        started = time.time()
        if node.id not in self.pushers():
            raise control.ControlError(
                "this node may not push: a node that may (the first node of the cluster) "
                "can allow it with `swarmnode grant push NODE`")
        if wave is not None and wave < 0:
            raise control.ControlError(f"--wave {wave}: give 0 (all at once) or more")
        release, size = await asyncio.to_thread(self._bundle, path)
        value = release.pack()
        if len(value) > MAX_NOTE_VALUE:
            raise control.ControlError(
                f"the release's commands are too long ({len(value)} bytes with the spec; at "
                f"most {MAX_NOTE_VALUE}): put them in a script inside the payload")
        # newer than any release of the app anyone announced: a pusher whose clock is behind
        # another's must still supersede it
        after = max((n.ts for n in node.core.notes(RELEASE_TOPIC) if n.key == release.app),
                    default=-1)
        note = node.core.sign_note(node.clock(), RELEASE_TOPIC, release.app, value, after)
        members = [m for m in node.core.members()
                   if m.admitted_by is not None and m.state not in ("banned", "pending")]
        live = sorted(m.id for m in members if m.state in ("alive", "suspect"))
        offline = tuple(sorted(m.id for m in members if m.state in ("dead", "left")))
        others = [m for m in live if m != node.id]
        n = canary if canary is not None else (1 if len(live) > 2 else 0)
        if n < 0 or (others and n >= len(others) + 1):
            raise control.ControlError(f"--canary {n}: there are {len(others)} other nodes")
        canaries = tuple(random.sample(others, min(n, len(others))))
        rollout = Rollout(node.id, tuple(live), canaries, release.spec.health_timeout,
                          self_last=release.is_self, offline=offline,
                          wave=wave_size(len(live)) if wave is None else wave)
        push = _Push(_push_id(note), note, release, rollout, started)
        self.pushes[push.id] = push
        for old in [p for p in self.pushes.values() if p.rollout.done][:-KEEP_PUSHES]:
            del self.pushes[old.id]
        node.event("push_started", {"push": push.id, "app": release.app,
                                    "digest": release.digest, "size": size,
                                    "canaries": list(canaries), "nodes": len(live)})
        rollout.start(node.clock())
        self._carry_out(push)
        return self.push_view(push.id)

    def _bundle(self, path: str | None) -> tuple[Release, int]:
        """Bundle PATH (or this node's own code) into the artifact store; the release."""
        if path is None:
            root, include = bundles.code_root(), bundles.SELF_INCLUDE
            spec = None
        else:
            root, include = Path(path).resolve(), None
            if not root.is_dir():
                raise control.ControlError(f"{path}: not a directory")
            try:
                spec = bundles.load_spec(root)
            except bundles.BundleError as exc:
                raise control.ControlError(str(exc)) from exc
        store = self.node.artifacts.store
        tmpdir = self.node.home / "tmp"
        tmpdir.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
            out = Path(tmp) / "bundle.tar.gz"
            try:
                info = bundles.make_bundle(root, out, include)
            except bundles.BundleError as exc:
                raise control.ControlError(str(exc)) from exc
            digest = store.put_file(out, expected=info.digest)
        store.pin(digest, OWNER)
        if spec is None:
            return Release.of_self(digest, info.size), info.size
        return Release(spec, digest, info.size), info.size

    def _carry_out(self, push: _Push) -> None:
        node = self.node
        for out in push.rollout.drain():
            if isinstance(out, Publish):
                node.core.add_note(node.clock(), push.note)
                node.flush()
                node.save_snapshot()
            elif isinstance(out, Stage):
                holders = [n for n, s in push.rollout.nodes.items()
                           if s.state in ("installed", "restarted", "healthy")]
                body = pack({"note": item_to_plain(push.note),
                             "sources": [node.id, *random.sample(holders, len(holders))][:64]})
                for target in out.nodes:
                    self.tasks.spawn(self._stage_to(target, body))
        push.touch()
        if push.rollout.done and not push.logged:
            push.logged = True
            push.finished = time.time()
            view = self.push_view(push.id)
            node.event("push_halted" if view["halted"] else "push_done",
                       {"push": push.id, "halted": view["halted"], "counts": view["counts"]})

    async def _stage_to(self, target: str, body: bytes) -> None:
        """Send the signed release to `target` over a route proven to reach it, as `exec` does:
        its reported addresses, an override, the connection it keeps to us from behind NAT, or
        an SSH jump chain. A member can be alive in gossip (others reach it, and the indirect
        probes go through them) while this node has no path of its own to it yet; and the
        send is pinned to that route's path, because a connection the member once opened to
        us can outlive the path under it (a jump host that stopped forwarding): a release sent
        down it is lost, and the node times out as if it had failed."""
        node = self.node
        view = node.core.member(target)
        if target == node.id or view is None:
            node.send_raw(target, STAGE, body)
            return
        try:
            route = await node.router.route(view)
        except RouteError:
            node.send_raw(target, STAGE, body)  # maybe still reachable; else its deadline
            return
        node.route_to(target)
        node.transport.send(target, STAGE, body, via=route.via_transport)

    async def wait_view(self, push_id: str, timeout: float) -> dict[str, Any]:
        """The push's view once it changes (or `timeout` passes): `push --wait` long-polls
        instead of sampling, so it sees the end as it happens."""
        push = self.pushes.get(push_id)
        if push is not None and not push.rollout.done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await push.changed.wait()
        return self.push_view(push_id)

    def push_view(self, push_id: str) -> dict[str, Any]:
        push = self.pushes.get(push_id)
        if push is None:
            raise control.ControlError(f"no push {push_id!r} started from this node")
        r = push.rollout
        return {
            "push": push.id, "app": push.release.app, "digest": push.release.digest,
            "size": push.release.size, "phase": r.phase, "done": r.done,
            "halted": "" if r.halted is None else (
                f"canary {self.node.member_name(r.halted[0])} "
                f"{r.halted[1].replace('_', ' ')}: {r.halted[2]}"),
            "elapsed": (push.finished or time.time()) - push.started, "counts": r.counts(),
            "nodes": {n: {"name": self.node.member_name(n), "state": s.state,
                          "reason": s.reason, "canary": s.canary}
                      for n, s in r.nodes.items()},
            "failures": [{"id": n, "name": self.node.member_name(n), "state": st, "reason": why}
                         for n, st, why in r.failures()],
        }

    def versions(self) -> dict[str, Any]:
        """Each member's releases (from the facts in its signed record) and the newest per app."""
        latest = {app: {"digest": r.digest, "by": n.by, "ts": n.ts}
                  for app, (n, r) in newest(self.node.core.notes(RELEASE_TOPIC),
                                            self.pushers()).items()}
        nodes = []
        for m in self.node.core.members():
            if m.admitted_by is None or m.record is None or m.state == "banned":
                continue
            apps, rolled_back = {}, {}
            for k, v in m.record.facts:
                if k.startswith(ROLLBACK_PREFIX) and isinstance(v, str):
                    rolled_back[k.removeprefix(ROLLBACK_PREFIX)] = v.partition("@")[0]
                elif k.startswith(FACT_PREFIX) and isinstance(v, str) and "@" in v:
                    digest, _, at = v.partition("@")
                    app = k.removeprefix(FACT_PREFIX)
                    newest_digest = latest.get(app, {}).get("digest")
                    apps[app] = {"digest": digest,
                                 "switched_at": int(at) if at.isascii() and at.isdigit() else None,
                                 "drift": newest_digest is not None and digest != newest_digest}
            for app in latest.keys() - apps.keys():  # never got it (offline, or it failed)
                apps[app] = {"digest": None, "switched_at": None, "drift": True}
            nodes.append({"id": m.id, "name": m.name, "state": m.state, "apps": apps,
                          "rolled_back": rolled_back})
        return {"latest": latest, "nodes": nodes}

    # -- loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        self.tasks.spawn(self._watch_trial())
        self.tasks.spawn(self._recheck())
        next_catch_up = time.monotonic() + 1.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await self.wake.wait()
            self.wake.clear()
            now = self.node.clock()
            for push in list(self.pushes.values()):
                if not push.rollout.done:
                    push.rollout.tick(now)
                    self._carry_out(push)
            if time.monotonic() >= next_catch_up or self._new_notes:
                self._new_notes = False
                next_catch_up = time.monotonic() + CATCH_UP_S
                if self.node.admitted and self.releases.trial() is None:
                    self.catch_up()

    _new_notes = False

    def member_gone(self, member: str, state: str) -> None:
        """A member went dead or left: rollouts do not stage it when its wave comes."""
        for push in self.pushes.values():
            if not push.rollout.done:
                push.rollout.gone(self.node.clock(), member, f"{state} when its wave came")
                self._carry_out(push)

    def on_note(self, topic: str) -> None:
        """A new note arrived: a release or a grant may make a catch-up due."""
        if topic in (RELEASE_TOPIC, GRANT_TOPIC):
            self._new_notes = True
            self.wake.set()

    async def close(self) -> None:
        await self.tasks.close()


def _push_id(note: Note) -> str:
    return f"{note.key}-{_digest_of(note)[:12]}-{note.ts}"


def _digest_of(note: Note) -> str:
    try:
        return Release.unpack(note.value).digest
    except ReleaseError:
        return ""


def _runs(member: Any, app: str, digest: str) -> bool:
    """Whether a member's record says it runs `digest` of `app` (so it holds the bundle)."""
    rec = member.record
    if rec is None:
        return False
    return any(k == FACT_PREFIX + app and isinstance(v, str) and v.startswith(digest)
               for k, v in rec.facts)
