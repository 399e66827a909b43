"""The asyncio shell around the sans-I/O membership core.

The core decides (whom to probe, what to gossip, who is dead); this shell owns the sockets,
the clock, the disk and discovery. It feeds the core authenticated messages and timer ticks,
and carries out what the core outputs: sends, and events that it persists and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import zmq

from net import whois
from net.addresses import is_nat, split_hostport
from net.sshkeys import host_key_fingerprints
from net.transport import Inbound, Transport
from net.wire import PROTOCOL_VERSION as WIRE_VERSION
from net.wire import DropCounter, Envelope
from swarmnode import __version__, cluster, control, disk, doctor, notify, power, series
from swarmnode import config as node_config
from swarmnode import token as tokens
from swarmnode.actions import Actions
from swarmnode.admission import Admission
from swarmnode.alarm import Alarm
from swarmnode.artifact_service import ArtifactService
from swarmnode.binhost_service import BinhostService
from swarmnode.build.emerge import EmergeError, plan_from_pretend
from swarmnode.build.plan import PlanError
from swarmnode.builds import Builds
from swarmnode.discovery import Discovery
from swarmnode.disk import DiskService
from swarmnode.eventlog import FILE as EVENTS_FILE
from swarmnode.eventlog import JsonLines
from swarmnode.facts import detect_facts
from swarmnode.http_api import HttpApi, HttpError
from swarmnode.identity import Identity, curve_public_key, load_or_create
from swarmnode.leadership import Leadership
from swarmnode.ledger.jobs import LEDGER_FORMAT, LedgerEvent
from swarmnode.looplag import LoopLag
from swarmnode.membership import (
    Config,
    Event,
    Membership,
    MemberView,
    MessageError,
    Note,
    Send,
    decode,
    encode,
    make_record,
)
from swarmnode.metrics import Metrics
from swarmnode.options import NodeOptions
from swarmnode.portage import host as portage_host
from swarmnode.portage.env import PortageEnv
from swarmnode.portage.fingerprint import FACT_HASH, Fingerprint
from swarmnode.portage.service import EmergeService
from swarmnode.power import PowerMeter
from swarmnode.push.bundle import code_root
from swarmnode.push.release import PUSH, SELF_APP, operators
from swarmnode.push.releases import LAUNCHER_ENV, exec_argv
from swarmnode.push_service import PushService, release_facts
from swarmnode.rights import Rights
from swarmnode.routes import PING as ROUTE_PING
from swarmnode.routes import PONG as ROUTE_PONG
from swarmnode.routes import RouteError, Router
from swarmnode.ssh_actions import ctl_facts
from swarmnode.store import Store
from swarmnode.views import cores_online_total, member_cores, member_view, resolve_node
from swarmnode.worker import Worker

log = logging.getLogger("swarmnode")

#: How often the membership snapshot is written while it changes: often enough that a crash
#: loses at most a few seconds of gossip (which anti-entropy restores anyway). Those periodic
#: writes skip the fsync (a power cut may lose the last of them, as a crash of the process
#: loses what came after): at 40 members the snapshot is tens of KiB, and an fsync on the loop
#: thread while a push or a build kept the disk busy held it for 50-300 ms. A write this node
#: makes for an operator (a ban, a rename, a grant) is synced at once.
SNAPSHOT_EVERY_S = 2.0
#: Core events that change who the members are: the snapshot is written at once after them,
#: not at the next period. A restart rejoins through the members the snapshot names, and a
#: node killed 1.6 s after joining came back knowing nobody (the founder it had joined through
#: was frozen): deaf to every member for 40 s, while its vote was needed for a majority.
MEMBER_SET_EVENTS = frozenset({"member_join", "admitted", "member_reaped"})
#: How often the interface addresses are re-read (DHCP renewals, a Tailscale address coming
#: up); a change is re-signed and gossiped under the same identity.
ADDRESS_CHECK_S = 10.0
#: Where `swarmnode dashboard --bind` put the HTTP server (kept across restarts).
HTTP_BIND_KEY = "dashboard_bind"
#: How often this machine's draw is sampled (RAPL counters or /proc/stat): a reading is the
#: mean over the interval, and reading costs two small files.
POWER_S = 5.0
#: How often a node states its draw to the swarm (a signed note, gossiped): the dashboard's
#: cluster watts are at most this old, at one small broadcast per node.
POWER_NOTE_S = 30.0
#: ...but the whole swarm states at most this many a second (each node waits live members /
#: this, if longer), as Nomad caps heartbeats cluster-wide: every note is gossiped to every
#: member, so each node's gossip would otherwise grow with the swarm (1,000 nodes stating
#: every 30 s make 33 notes a second for everyone to pass on; capped, 40 nodes wait 40 s).
POWER_NOTES_PER_S = 1.0


def power_note_interval(live: int) -> float:
    """Seconds between this node's power notes in a swarm of `live` members."""
    return max(POWER_NOTE_S, live / POWER_NOTES_PER_S)


#: Messages that always go over this node's own connection, dialled if need be: a SWIM probe
#: tests the path from here to the member (as memberlist's probes go to its address), which
#: keeps what route diagnostics and the dashboard's map say about who can dial whom true.
#: Everything else may ride the member's own connection to us (net/transport.py: connections by
#: need), so each probe round opens at most one connection per member, closed when idle.
DIALLED = frozenset({"ping"})
#: Longest a graceful leave waits for its announcement to be gossiped before exiting.
LEAVE_TIMEOUT_S = 3.0
BUILD_COMMANDS = frozenset({"build", "emerge", "emerge_published", "jobs", "build_status",
                            "fetch_outputs", "logs", "cancel", "set_voters", "pause", "resume"})
PUSH_COMMANDS = frozenset({"push", "push_status", "versions"})
RIGHTS_COMMANDS = frozenset({"grant", "revoke"})
#: Builds the dashboard's history draws a sparkline for (the newest; each costs a query).
SPARK_BUILDS = 20
#: Longest the timer loop sleeps, so a clock jump or a missed wake-up costs at most this.
MAX_SLEEP_S = 0.5
#: Blocks above this get their own mapping, handed back to the system when freed. glibc
#: otherwise raises its threshold to the largest block freed so far, so a ledger snapshot of a
#: few MB, made every few minutes, then comes from the heap and leaves it fragmented (RSS
#: crept up at each compaction in the soak). 512 KiB: below snapshots, and above the 256 KiB
#: buffer every msgpack.packb allocates and frees (several per message): at 256 KiB each
#: packb was an mmap and a munmap, 8 us of CPU and 25 us of wall time instead of 0.65 and 1.4.
MMAP_THRESHOLD_BYTES = 512 * 1024
#: Free memory at the top of the heap beyond this goes back to the system. Fixing the mmap
#: threshold fixes this one at glibc's 128 KiB too, which hands a freed packing buffer back
#: (brk) on every packb, at the same cost; 1 MiB keeps one.
TRIM_THRESHOLD_BYTES = 1024 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # (mallopt's parameter numbers in glibc's malloc.h)
#: Allocations between young-generation GC passes (Python's default: 700).
GC_THRESHOLD = 20_000


class StartError(RuntimeError):
    """The node could not start (its address is taken, another node runs in its home)."""


@dataclass
class Observed:
    """What this node saw of a peer's connections, kept apart from what the peer reports."""

    address: str | None = None
    nat: bool = False
    extra: set[str] = field(default_factory=set)  # seed/mDNS addresses for this identity


class Node:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.home = opts.home
        self.identity: Identity = load_or_create(self.home)
        self.id = self.identity.id
        self.store = Store(self.home)
        self.event_lines = JsonLines(self.home / EVENTS_FILE)  # events for log shippers
        self.http = HttpApi(self)  # (serves once started; its streams hear every event)
        self.drops = DropCounter()
        self.started = time.time()
        self._epoch = self.started - time.monotonic()
        self._apply_options(opts)
        try:
            self.node_config = node_config.load(self.home)
        except node_config.ConfigError as exc:
            raise StartError(str(exc)) from exc
        quiet = frozenset({power.POWER_TOPIC})  # telemetry every member states: no gossip rounds
        self.config = (Config.fast(quiet_topics=quiet) if opts.fast
                       else Config(quiet_topics=quiet))
        try:  # this node's Portage (None: not a Gentoo host); portage_env probes it
            self.portage = portage_host.find(self.node_config.emerge)
        except portage_host.PortageError as exc:
            raise StartError(str(exc)) from exc
        self.portage_env = PortageEnv(self)
        self.binhost = BinhostService(self)  # (its URL is a fact of the record made next)
        self.observed: dict[str, Observed] = {}
        self.reexec_argv: list[str] | None = None  # set by a self-update: exec this on exit
        self.heard_member = False  # a member's gossip has reached us since we started
        self.received: dict[str, int] = {}  # messages of a known type received, by type
        self.rights = Rights(self)
        self.push = PushService(self)
        self.core = self._make_core()
        self.admission = Admission(self)
        self.discovery = Discovery(self)
        self.router = Router(self)
        self.actions = Actions(self)
        self.leadership = Leadership(self)
        self.artifacts = ArtifactService(self)
        self.worker = Worker(self)
        self.disk = DiskService(self)
        self.power = PowerMeter(self.node_config.watts_idle, self.node_config.watts_max)
        self.metrics = Metrics(self)
        self.loop_lag = LoopLag(self.metrics.loop_lag.observe, self.metrics.loop_held.observe)
        self.builds = Builds(self)
        self.emerge = EmergeService(self)
        self.series = series.SeriesService(series.SeriesStore(self.home / series.DB_FILE),
                                           self.swarm_view, time.time)
        self.leadership.on_applied.append(self._series_count)
        self.notify = notify.NotifyService(self.node_config.notify, lambda: self.builds.leading,
                                           self.member_name, lambda: self.cluster_name)
        self.leadership.on_applied.append(self._notify_build_end)
        self.doctor = doctor.Doctor(self._reported_by, self.send_raw, self.member_name,
                                    self.drops.drop)
        self.transport = Transport(self.identity, self.listen, self.on_message, self._banned_key,
                                   drops=self.drops)
        self.transport.is_member = self.is_admitted_member
        self._alarm = Alarm()
        self._stop = asyncio.Event()
        self._dirty = True
        # Bans are enforced at the CURVE handshake; a restarted node knows them from its snapshot.
        self._banned_keys = {_raw_curve(m.id) for m in self.core.members() if m.state == "banned"}

    # -- set-up ---------------------------------------------------------------------------

    def _apply_options(self, opts: NodeOptions) -> None:
        s = self.store
        if opts.token:
            tok = tokens.parse(opts.token)
            known = s.get("cluster_id")
            if known and known != tok.cluster_id:
                raise cluster.ClusterError(
                    f"{self.home} belongs to cluster {s.get('cluster_name')!r}; this token is "
                    f"for {tok.cluster_name!r}. Use another --home."
                )
            if not s.get("admitted"):
                s.put(cluster_id=tok.cluster_id, cluster_name=tok.cluster_name)
            self.join_token: tokens.Token | None = tok
        else:
            self.join_token = None
        updates: dict[str, Any] = {}
        if opts.name:
            updates["node_name"] = opts.name
        if opts.listen:
            updates["listen"] = opts.listen
        if opts.advertise:
            updates["advertise"] = list(opts.advertise)
        if updates:
            s.put(**updates)
        self.name = s.get("node_name") or socket.gethostname()
        self.listen = s.get("listen") or cluster.DEFAULT_LISTEN
        split_hostport(self.listen, cluster.DEFAULT_PORT)
        self.addresses = cluster.addresses_for(self.listen, s.get("advertise", []))

    def clock(self) -> float:
        """Seconds on a clock that never jumps but reads as wall time.

        The core's timers need a monotonic clock; its statement timestamps (rename: last
        writer wins across nodes) need wall time. Anchoring monotonic time at the wall time of
        start gives both.
        """
        return self._epoch + time.monotonic()

    @property
    def cluster_id(self) -> str:
        return self.store.get("cluster_id") or ""

    @property
    def cluster_name(self) -> str:
        return self.store.get("cluster_name") or ""

    @property
    def admitted(self) -> bool:
        return bool(self.store.get("admitted"))

    @property
    def fingerprint(self) -> Fingerprint | None:
        """This node's Portage build environment (None: no Portage, or not probed yet)."""
        return self.portage_env.fingerprint

    def _make_core(self) -> Membership:
        now = self.clock()
        incarnation = int(self.store.get("incarnation", 0)) + 1
        facts = detect_facts(__version__, kind_override=self.node_config.kind)
        if self.node_config.cores is not None:
            facts["cores"] = self.node_config.cores
        if self.node_config.roles:
            facts["roles"] = ",".join(self.node_config.roles)
        facts["ledger"] = LEDGER_FORMAT
        facts.update(self._ssh_facts())
        facts.update(release_facts(self.push.releases))
        facts.update(self.binhost.facts())
        self.kind = str(facts["kind"])
        record = make_record(
            self.identity, self.id, incarnation, self.name, self.addresses,
            tuple(sorted(facts.items())),
        )
        self.store.put(incarnation=incarnation)
        rng = random.Random(int.from_bytes(os.urandom(8), "big"))
        founder = bool(self.store.get("founder"))
        snapshot = self.store.get("snapshot")
        if snapshot:
            try:
                return Membership.restore(snapshot, record, self.identity, self.config, rng, now,
                                          is_founder=self.is_founder, operators=self._operators)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable membership snapshot: %s", exc)
        return Membership(record, self.identity, self.config, rng, now, founder=founder,
                          is_founder=self.is_founder, operators=self._operators)

    def _operators(self, members: list[MemberView], notes: list[Note],
                   before: int | None) -> dict[str, int]:
        """The core's `Operators`: the operate right of this cluster's founder's tree."""
        return operators(members, notes, self.is_founder, before)

    def is_founder(self, node_id: str) -> bool:
        """Whether `node_id` founded this node's cluster: the cluster id names its founder."""
        return tokens.is_founder(self.cluster_id, node_id)

    def _ssh_facts(self) -> dict[str, str | int]:
        """What others need to reach this host over SSH safely: its host key fingerprints
        (signed into the record, so an SSH peer is verified against them, never trusted on
        first use), its sshd port, and the swarmnode executable and home here."""
        keys = host_key_fingerprints(Path(p) for p in self.node_config.ssh.host_keys)
        if not keys:
            return {}
        facts: dict[str, str | int] = {"ssh_keys": " ".join(keys[:4])}
        facts["ssh_port"] = self.node_config.ssh.port
        return facts | ctl_facts(self.home)

    # -- main loop ------------------------------------------------------------------------

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        ctl = await control.serve(self.home, self.handle_command)  # refuses a second node here
        try:
            await self.transport.start()
            udp = await whois.serve(self.identity, self.cluster_id, self.listen, self.drops)
        except (zmq.ZMQError, OSError) as exc:
            ctl.close()
            control.socket_path(self.home).unlink(missing_ok=True)
            await self.transport.close()
            self.store.close()
            raise StartError(f"cannot listen on {self.listen}: {exc}") from exc
        await self._serve_http()
        await self.binhost.start()
        # cpu_s: the process's CPU so far, the CLI's parse before the exec included (the
        # clock is the process's, which an exec keeps): what starting a node costs a machine
        self.event("node_started", {"id": self.id, "name": self.name,
                                    "addresses": list(self.addresses), "version": __version__,
                                    "cpu_s": round(time.process_time(), 3)})
        log.info("node %s (%s) listening on %s, reporting %s", self.name, self.id[:12],
                 self.listen, ", ".join(self.addresses))
        self.ready = True
        tasks = [asyncio.ensure_future(self._timer_loop()),
                 asyncio.ensure_future(self._address_watch()),
                 asyncio.ensure_future(self._power_watch()),
                 asyncio.ensure_future(self.router.maintain()),
                 asyncio.ensure_future(self.leadership.run()),
                 asyncio.ensure_future(self.worker.run()),
                 asyncio.ensure_future(self.disk.run()),
                 asyncio.ensure_future(self.builds.run()),
                 asyncio.ensure_future(self.push.run()),
                 asyncio.ensure_future(self.portage_env.run()),
                 asyncio.ensure_future(self.loop_lag.run()),
                 asyncio.ensure_future(self.series.run()),
                 asyncio.ensure_future(self.notify.run()),
                 asyncio.ensure_future(self._notify_watch())]
        tasks += await self.discovery.start()
        tasks.append(asyncio.ensure_future(self.admission.run()))
        self.flush()  # a restored core has queued its rejoin push-pulls
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(tasks, udp, ctl)
        return 0

    def _default_http_bind(self) -> str:
        """Localhost, at the port after the swarm port (any free one if that is taken)."""
        _host, port = split_hostport(self.listen, cluster.DEFAULT_PORT)
        return f"127.0.0.1:{port + 1 if port else 0}"

    async def _serve_http(self) -> None:
        """The metrics and dashboard server where `dashboard --bind` last put it, else on
        localhost; a bind that fails falls back to localhost, then to any free port."""
        for bind in dict.fromkeys((self.store.get(HTTP_BIND_KEY) or self._default_http_bind(),
                                   self._default_http_bind(), "127.0.0.1:0")):
            try:
                url = await self.http.start(bind)
            except HttpError as exc:
                log.warning("%s", exc)
                continue
            log.info("dashboard and metrics at %s", url)
            return

    async def _shutdown(self, tasks: list[asyncio.Future], udp, ctl) -> None:
        if self.reexec_argv is not None:
            log.info("restarting into %s", self.reexec_argv[3:4])
        else:
            log.info("leaving the cluster")
        if self.admitted and self.reexec_argv is None:  # a restart is back at once: no leave
            self.core.leave(self.clock())
            self.flush()
            # The timer loop keeps gossiping until the leave has been sent its full number of
            # times (or LEAVE_TIMEOUT_S passes), so members record `left`, not `dead`.
            deadline = time.monotonic() + LEAVE_TIMEOUT_S
            while (self.core.broadcasting_self and self.core.live_count > 0
                   and time.monotonic() < deadline):
                await asyncio.sleep(self.config.gossip_interval)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.discovery.close()
        await self.builds.close()
        await self.emerge.close()
        await self.binhost.close()
        await self.push.close()
        await self.worker.close()
        await self.artifacts.close()
        await self.http.stop()
        self.series.store.close()
        self.router.close()
        ctl.close()
        with contextlib.suppress(FileNotFoundError):
            control.socket_path(self.home).unlink()
        udp.close()
        self.save_snapshot()
        await self.transport.close()
        self.store.close()

    async def _timer_loop(self) -> None:
        while True:
            now = self.clock()
            self.core.tick(now)
            self.flush()
            if self._dirty and time.time() - self._last_save >= SNAPSHOT_EVERY_S:
                self.save_snapshot(synced=False)
            now = self.clock()
            await self._alarm.sleep(now, min(self.core.next_deadline(), now + MAX_SLEEP_S))

    _last_save = 0.0
    _members_changed = False  # since the last save (MEMBER_SET_EVENTS)
    ready = False
    """Start-up is over: it listens, its HTTP side serves (the control socket answers from
    the first moment, so that a second node in the same home is refused at once)."""
    members_saved = 0
    """Other members in the member list last saved (a restart rejoins them at once)."""

    async def _power_watch(self) -> None:
        """Sample this machine's draw every POWER_S (RAPL, else the estimate), and state it to
        the swarm in a note every POWER_NOTE_S or longer (POWER_NOTES_PER_S; the newest per
        node is kept and gossiped).
        The first reading comes a quarter of a second after the start (the estimate needs
        two looks at /proc/stat, RAPL two at its counters): jobs' energy shares count from it."""
        stated, tries = -POWER_NOTE_S, 0
        while True:
            tries += 1
            reading = self.power.sample(time.monotonic())
            every = power_note_interval(self.core.live_count)
            if reading is not None and self.admitted and time.monotonic() - stated >= every:
                stated = time.monotonic()
                value = power.note_value(self.power, os.getloadavg()[0])
                self.core.add_note(self.clock(), self.core.sign_note(
                    self.clock(), power.POWER_TOPIC, "", value))
                self.flush()
            await asyncio.sleep(0.25 if self.power.last is None and tries < 8 else POWER_S)

    def _cluster_power(self) -> dict[str, Any]:
        """The swarm's draw now, its energy today and, at the configured price, its cost."""
        today = power.today()
        watts = joules = 0.0
        for _by, stated, _age in self._stated_power():
            watts += stated.reading.watts
            joules += stated.joules_on(today)  # summed before rounding, not rounded shares
        kwh = round(joules / 3.6e6, 4)
        price = self.node_config.price_per_kwh
        return {"cluster_watts": round(watts, 1),
                "cluster_kwh_today": kwh,
                "cost_today": round(kwh * price, 4) if price is not None else None,
                "price_per_kwh": price}

    def _stated_power(self) -> Iterator[tuple[str, power.Stated, float]]:
        """Each admitted, live member's latest power note (if not older than power.STALE_S):
        who, what it states, its age in seconds."""
        now_ms = self.clock() * 1000
        for note in self.core.notes(power.POWER_TOPIC):
            view = self.core.member(note.by)
            stated = power.read_note(note.value)
            age = (now_ms - note.ts) / 1000
            if (stated is None or view is None or view.admitted_by is None
                    or view.state not in ("alive", "suspect") or age > power.STALE_S):
                continue
            yield note.by, stated, age

    def power_view(self) -> dict[str, dict[str, Any]]:
        """Each admitted member's latest stated draw (if not older than power.STALE_S)."""
        today = power.today()
        return {by: {"watts": stated.reading.watts, "source": stated.reading.source,
                     "kwh_today": round(stated.joules_on(today) / 3.6e6, 4),
                     "load": stated.load, "age_s": round(max(age, 0.0), 1)}
                for by, stated, age in self._stated_power()}

    def _series_count(self, ev: LedgerEvent) -> None:
        """A job event for the time series, unless it is the past replayed."""
        if self.leadership.applying_live:
            self.series.recorder.on_ledger(ev.kind)

    def _notify_build_end(self, ev: LedgerEvent) -> None:
        """A job's end that may finish its build: the build's end goes to the notifier
        (not a replayed one: a restart does not announce old builds again)."""
        if ev.kind not in ("done", "blocked", "cancelled") or not self.leadership.applying_live:
            return
        ledger = self.leadership.ledger
        job = ledger.job(str(ev.data.get("job_key", "")))
        if job is None or not ledger.finished(job.build_id):
            return
        build = ledger.build(job.build_id)
        # blocked jobs, those that failed themselves (a log tail) before their dependants
        failures = sorted(((j.name, j.reason or "", j.log_tail) for j in ledger.jobs(job.build_id)
                           if j.state == "blocked"), key=lambda f: not f[2])
        self.notify.on_build_end(job.build_id, build.name if build else job.build_id,
                                 ledger.progress(job.build_id), failures)

    async def _notify_watch(self) -> None:
        """Every notify.CHECK_S: members' low disks, rollbacks and the day's energy, for the
        notifier (which tells only what is new, and only while this node leads)."""
        while True:
            await asyncio.sleep(notify.CHECK_S)
            if not self.notify.channels:
                continue
            self.notify.tick()
            low = {m.id for m in self.core.members()
                   if m.admitted_by and m.record and m.record.facts_dict().get(disk.FACT)}
            rolled = {(member["id"], f"{app} {digest[:12]}")
                      for member in self.push.versions()["nodes"]
                      for app, digest in member["rolled_back"].items()}
            self.notify.check(low, rolled, self._cluster_power()["cluster_kwh_today"],
                              power.today())

    def _reported_by(self, member: str) -> list[str]:
        view = self.core.member(member)
        return list(view.record.addresses) if view is not None and view.record else []

    async def doctor_view(self) -> list[dict[str, str]]:
        """`swarmnode doctor`: the local checks, then what the alive members answer."""
        facts = self.core.record.facts_dict()
        theirs = {m.name: m.record.facts_dict().get(FACT_HASH) for m in self.core.members()
                  if m.id != self.id and m.admitted_by and m.state == "alive" and m.record}
        checks = [doctor.check_home(self.home), doctor.check_disk(self.disk.status()),
                  doctor.check_mdns(self.opts.mdns, self.discovery.mdns is not None,
                                    self.opts.mdns_interfaces or ()),
                  doctor.check_tailscale(self.opts.tailscale), doctor.check_service(),
                  doctor.check_portage(facts.get(FACT_HASH),
                                       {k: v if isinstance(v, str) else None
                                        for k, v in theirs.items()})]
        live = [m.id for m in self.core.members()
                if m.id != self.id and m.admitted_by and m.state in ("alive", "suspect")]
        answers, asked = await self.doctor.ask(live)
        return doctor.as_plain(checks + doctor.judge(answers, asked, list(self.addresses)))

    def history_view(self, seconds: float | None, progress: bool = False) -> dict[str, Any]:
        """The swarm's series over the last `seconds` (default a day; at most the coarse
        series' reach), and the builds that started in it with their energy and cost; with
        `progress`, the newest SPARK_BUILDS builds' sparklines (jobs done over their time)
        and the members' names (the dashboard's charts)."""
        now = time.time()
        seconds = min(max(seconds if seconds is not None else series.FINE_KEEP_S, 60.0),
                      series.COARSE_KEEP_S)
        since = now - seconds
        price = self.node_config.price_per_kwh
        history = self.builds.history
        builds = [{**b, "submitter_name": self.member_name(b["submitter"])
                   if b["submitter"] else None,
                   "cost": round((b["joules"] or 0) / 3.6e6 * price, 4)
                   if price is not None else None}
                  for b in history.builds(since)]
        view = {"since": since, "now": now, **self.series.store.query(since, now),
                "builds": builds, "price_per_kwh": price}
        if progress:
            for b in builds[-SPARK_BUILDS:]:
                ends = [a["ended"] for a in history.attempts(b["build"])
                        if a["result"] == "done" and a["ended"]]
                b["progress"] = series.progress(ends, b["started"] or now, b["ended"] or now)
            view["names"] = {m: self.member_name(m) for m in view["nodes"]}
        return view

    def swarm_view(self) -> series.SwarmView:
        """The swarm now, for its time series: members' stated draw and energy, cores online
        and busy (jobs held, at most a member's cores), jobs ready to run."""
        members = {by: series.Member(stated.load, stated.reading.watts, stated.day,
                                     stated.joules_today)
                   for by, stated, _age in self._stated_power()}
        online, _total = cores_online_total(self.core.members())
        ledger = self.leadership.ledger
        held: dict[str, int] = {}
        for job in ledger.active():
            if job.node:
                held[job.node] = held.get(job.node, 0) + 1
        busy = 0
        for node, n in held.items():
            m = self.core.member(node)
            busy += min(n, member_cores(m)) if m is not None else n
        return series.SwarmView(members, online, busy, len(ledger.ready_keys()))

    async def _address_watch(self) -> None:
        while True:
            await asyncio.sleep(ADDRESS_CHECK_S)
            current = cluster.addresses_for(self.listen, self.store.get("advertise", []))
            if current != self.addresses:
                self.event("addresses_changed", {"id": self.id, "old": list(self.addresses),
                                                 "new": list(current)})
                self.addresses = current
                self.core.update_record(self.clock(), addresses=current)
                self.flush()

    def save_snapshot(self, synced: bool = True) -> None:
        snapshot = self.core.snapshot()
        self.store.put(synced, snapshot=snapshot)
        self._dirty = self._members_changed = False
        self._last_save = time.time()
        self.members_saved = len(snapshot["members"])

    # -- core outputs ---------------------------------------------------------------------

    def flush(self) -> None:
        outputs = self.core.drain()
        for out in outputs:  # persist first: an incarnation must hit the disk before use
            if isinstance(out, Event):
                self.on_core_event(out)
        if self._members_changed:
            self.save_snapshot(synced=False)
        for out in outputs:
            if isinstance(out, Send):
                self.send(out.to, out.msg)
        self._alarm.sooner(self.core.next_deadline())

    def send(self, to: str, msg: object) -> bool:
        msg_type, body = encode(msg)
        return self.send_raw(to, msg_type, body)

    def send_raw(self, to: str, msg_type: str, body: bytes) -> bool:
        if to == self.id:  # the leader is also a worker: deliver to ourselves, next turn
            asyncio.get_running_loop().call_soon(self._loopback, msg_type, body)
            return True
        # One connection per pair when we can: the one `to` opened to us (while it is in
        # use), if we have none to it or `to` has the smaller id -- so a pair that both dialled
        # settles on one, and the other goes idle and closes; else ours (dialled). A probe
        # always takes ours (DIALLED).
        if (msg_type not in DIALLED and (to < self.id or not self.transport.has_dealer(to))
                and self.transport.send_inbound(to, msg_type, body)):
            return True
        self.route_to(to)
        # A probe to a member we have dialled before waits for our handshake rather than
        # ride its connection to us: otherwise it never dials us, and we keep ours open for
        # it (a member nobody dials is taken to be behind NAT).
        via = "dealer" if msg_type in DIALLED and self.transport.dialable(to) else None
        return self.transport.send(to, msg_type, body, via=via)

    def _loopback(self, msg_type: str, body: bytes) -> None:
        env = Envelope(WIRE_VERSION, msg_type, self.id, 0, 0, body)
        self.on_message(Inbound(env, None, lambda t, b: self.send_raw(self.id, t, b)))

    def route_to(self, peer: str) -> None:
        """Keep a connection to `peer` at its reported addresses and any discovered ones."""
        view = self.core.member(peer)
        if view is not None and view.state == "left":
            return  # it said goodbye: no dialling it for ever (a reply may still go back)
        addrs: tuple[str, ...] = view.record.addresses if view and view.record else ()
        extra = self.observed.get(peer)
        if extra is not None and extra.extra:
            addrs = addrs + tuple(sorted(a for a in extra.extra if a not in addrs))
        addrs = addrs + tuple(a for a in self.router.extra_addresses(peer) if a not in addrs)
        if addrs:
            self.transport.connect(peer, addrs)

    def on_core_event(self, ev: Event) -> None:
        data = dict(ev.data)
        if ev.kind == "incarnation":
            self.store.put(incarnation=int(data["incarnation"]))
            return
        if ev.kind == "banned":
            self._banned_keys.add(_raw_curve(data["id"]))
            self.transport.disconnect(data["id"])
        if ev.kind in ("member_left", "member_reaped") and data.get("id") != self.id:
            self.transport.disconnect(data["id"])
        if ev.kind in ("member_dead", "member_left", "banned") and data.get("id") != self.id:
            self.artifacts.source_gone(data["id"], ev.kind.removeprefix("member_"))
            self.push.member_gone(data["id"], ev.kind.removeprefix("member_"))
        if ev.kind == "note":
            if data.get("topic") == power.POWER_TOPIC:
                self._dirty = True
                return  # telemetry every POWER_NOTE_S from each node: not an event
            self.push.on_note(str(data.get("topic")))
        if ev.kind == "admitted":
            if data.get("id") == self.id and not self.admitted:
                self.store.put(admitted=True)
            elif data.get("id") != self.id:
                self.admission.on_admitted(data["id"])
        self._dirty = True
        self._members_changed |= ev.kind in MEMBER_SET_EVENTS
        self.event(ev.kind, data)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event (in the store, not fsynced: see `Store.add_event`)."""
        data = {k: v for k, v in data.items() if k != "kind"}
        ts = time.time()
        seq = self.store.add_event(kind, data, ts)
        self.notify.on_event(kind, data)
        self.event_lines.write({"seq": seq, "ts": ts, "kind": kind, **data})
        self.http.notify()
        who = data.get("id", "")
        log.info("event %s %s %s", kind, who[:12] if isinstance(who, str) else who,
                 {k: v for k, v in data.items() if k != "id"})

    def _banned_key(self, key: bytes) -> bool:
        return key in self._banned_keys

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        """Hand a message to its service; count it by type when it is of a known type (so the
        table is bounded by the protocol's types, whatever a peer sends)."""
        if self._dispatch(inbound):
            kind = inbound.envelope.type
            self.received[kind] = self.received.get(kind, 0) + 1

    def _dispatch(self, inbound: Inbound) -> bool:
        """Whether a service takes messages of this type."""
        env = inbound.envelope
        if self.admission.handles(env.type):
            self.admission.on_message(inbound)
            return True
        # Builds, jobs, pushes, artifacts and Raft are for admitted members only (membership
        # and actions judge outsiders themselves, to list them as pending or to answer them).
        for service in (self.builds, self.worker, self.push, self.artifacts, self.leadership,
                        self.portage_env, self.binhost, self.doctor):
            if service.handles(env.type):
                if self.is_admitted_member(env.sender):
                    # (a silence shows there: the worker's start rule; bounded by the members)
                    self.worker.heard(env.sender, (env.epoch, env.seq), time.monotonic())
                    service.on_message(inbound)
                else:
                    self.drops.drop("not_member")  # no work, code, artifact or vote for a ghost
                return True
        if env.type in (ROUTE_PING, ROUTE_PONG):
            self.router.on_message(inbound)
            return True
        if self.actions.handles(env.type):
            self.observe(env.sender, inbound.observed)
            self.actions.on_message(inbound)
            return True
        try:
            msg = decode(env.type, env.body)
        except MessageError:
            self.drops.drop("malformed_body")
            return False
        self.observe(env.sender, inbound.observed)
        self.core.handle(self.clock(), env.sender, msg)
        self.flush()
        if not self.heard_member and self.is_admitted_member(env.sender):
            self.heard_member = True  # rejoined: a restarted node's health check waits for it
        return True

    def observed_entry(self, peer: str) -> Observed:
        return self.observed.setdefault(peer, Observed())

    def member_name(self, peer: str) -> str:
        view = self.core.member(peer)
        return view.name if view is not None else peer[:12]

    def is_admitted_member(self, peer: str) -> bool:
        view = self.core.member(peer)
        return view is not None and view.admitted_by is not None and view.state != "banned"

    def observe(self, peer: str, observed: str | None) -> None:
        """Record the source address as `observed` only; flag NAT when it is not reported.
        Only for ids in the member table (members and listed guests): a flood of fresh keys
        must not grow it."""
        if not observed or self.core.member(peer) is None:
            return
        seen = self.observed_entry(peer)
        if seen.address == observed:
            return
        seen.address = observed
        view = self.core.member(peer)
        reported = view.record.addresses if view and view.record else ()
        nat = bool(reported) and is_nat(observed, reported)
        if nat and not seen.nat:
            self.event("nat_detected", {"id": peer, "observed": observed,
                                        "reported": list(reported)})
        seen.nat = nat

    # -- control commands -----------------------------------------------------------------

    async def handle_command(self, cmd: str, args: dict[str, Any]) -> Any:
        now = self.clock()
        if cmd == "nodes":
            return [member_view(self, m) for m in self.core.members()]
        if cmd == "status":
            return self.status()
        if cmd == "snapshot":
            return self.http.snapshot()
        if cmd == "dashboard":
            bind = args.get("bind")
            if isinstance(bind, str) and bind:
                try:
                    await self.http.start(bind)
                except HttpError as exc:
                    raise control.ControlError(str(exc)) from None
                self.store.put(**{HTTP_BIND_KEY: bind})
            return {"url": self.http.url(with_token=True), "open_paths": list(self.http.open_paths)}
        if cmd == "events":
            return self.store.events(limit=int(args.get("limit", 50)))
        if cmd == "token":
            return self.admission.new_token(int(args.get("ttl", 86400)))
        if cmd in ("admit", "ban", "rename"):
            if not self.admitted:
                raise control.ControlError("this node is not an admitted member")
            target = resolve_node(self.core.members(), str(args.get("node", "")))
            if cmd == "admit":
                self.rights.operator("admit")
                via = "dashboard" if args.get("via") == "dashboard" else "CLI"
                self.core.admit(now, target.id, how=f"by {self.name[:40]} via {via}")
            elif cmd == "ban":
                if target.id == self.id:
                    raise control.ControlError("a node cannot ban itself")
                self.rights.may_ban(target)
                self.core.ban(now, target.id)
            else:
                if target.id != self.id:
                    self.rights.operator("rename another member")
                self.core.rename(now, target.id, str(args.get("name", "")))
            self.flush()
            self.save_snapshot()
            return f"{cmd}: {target.name} ({target.id[:12]})"
        if cmd == "route":
            target = resolve_node(self.core.members(), str(args.get("node", "")))
            address = args.get("address")
            try:
                route = await self.router.resolve(target, str(address) if address else None)
            except RouteError as exc:
                return {"id": target.id, "method": None, "error": str(exc),
                        "attempts": [a.plain() for a in exc.attempts]}
            return route.plain()
        if cmd in ("exec", "restart", "reboot"):
            target = resolve_node(self.core.members(), str(args.get("node", "")))
            argv = [str(a) for a in args.get("argv", [])] if cmd == "exec" else []
            address = args.get("address")
            return self.actions.request(target, cmd, argv, bool(args.get("force")),
                                        str(address) if address else None)
        if cmd == "portage_env":
            return await self.portage_env.command(args)
        if cmd == "history":
            return self.history_view(_number(args.get("since")))
        if cmd == "doctor":
            return await self.doctor_view()
        if cmd == "notify_test":
            if not self.notify.channels:
                raise control.ControlError("no notification channel is configured "
                                           "([notify] in config.toml)")
            return await self.notify.send(notify.Message(
                "a test from swarmnode", f"{self.name} sent this to test its notifications.",
                (notify.Notice("test", "a test from swarmnode"),), 0))
        if cmd in BUILD_COMMANDS:
            return await self._build_command(cmd, args)
        if cmd in PUSH_COMMANDS:
            return await self._push_command(cmd, args)
        if cmd in RIGHTS_COMMANDS:
            target = resolve_node(self.core.members(), str(args.get("node", "")))
            act = self.rights.grant if cmd == "grant" else self.rights.revoke
            return act(str(args.get("right", PUSH)), target)
        raise control.ControlError(f"unknown command {cmd!r}")

    async def _build_command(self, cmd: str, args: dict[str, Any]) -> Any:
        if not self.admitted:
            raise control.ControlError("this node is not an admitted member")
        if cmd == "build":
            try:
                return await self.builds.submit(Path(str(args.get("plan", ""))))
            except (PlanError, OSError) as exc:
                raise control.ControlError(str(exc)) from exc
        if cmd == "emerge":
            if "atoms" in args:
                return await self.emerge.submit(args["atoms"], bool(args.get("dry_run")))
            try:  # a saved `emerge --pretend --tree` (jobs ordered by its indentation)
                plan = plan_from_pretend(str(args.get("text", "")), name="emerge")
            except (EmergeError, PlanError) as exc:
                raise control.ControlError(str(exc)) from exc
            return {"build": await self.builds.submit_plan(plan)}
        if cmd == "emerge_published":
            return await self.emerge.published(str(args.get("build", "")),
                                               _number(args.get("wait")) or 0.0)
        if cmd == "set_voters":
            names = [str(n) for n in args.get("nodes", [])]
            chosen = [resolve_node(self.core.members(), n) for n in names]
            for m in chosen:
                if m.admitted_by is None or m.state in ("pending", "banned", "left"):
                    raise control.ControlError(f"{m.name} is {m.state}: it cannot vote")
            return await self.builds.set_voters([m.id for m in chosen])
        if cmd in ("pause", "resume"):
            target = resolve_node(self.core.members(), str(args.get("node", "")))
            if cmd == "pause" and (target.admitted_by is None
                                   or target.state in ("pending", "banned")):
                raise control.ControlError(f"{target.name} is {target.state}: it gets no work")
            await self.builds.pause(target.id, cmd == "pause")
            return f"{cmd}d: {target.name} ({target.id[:12]})"
        if cmd == "jobs":
            if args.get("history") is True:
                build = args.get("build")
                return self.builds.history_view(str(build) if build else None)
            return self.builds.jobs_view(args.get("build"))
        if cmd == "build_status":
            wait, known = _number(args.get("wait")), args.get("known")
            if wait is not None:
                return await self.builds.wait_view(
                    str(args.get("build", "")), wait, known if isinstance(known, dict) else None)
            return self.builds.build_view(str(args.get("build", "")))
        if cmd == "fetch_outputs":
            return await self.builds.fetch_outputs(str(args.get("build", "")),
                                                   Path(str(args.get("out", ""))))
        if cmd == "logs":
            since = args.get("since", 0)
            return await self.builds.log_view(str(args.get("job", "")),
                                              since if type(since) is int else 0,
                                              args.get("wait") is True)
        return await self.builds.cancel(str(args.get("build", "")))

    async def _push_command(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "versions":
            return self.push.versions()
        if cmd == "push_status":
            wait = min(max(float(args.get("wait", 0.0)), 0.0), 5.0)
            return await self.push.wait_view(str(args.get("push", "")), wait)
        if not self.admitted:
            raise control.ControlError("this node is not an admitted member")
        path = args.get("path")
        canary, wave = args.get("canary"), args.get("wave")
        return await self.push.push(str(path) if path else None,
                                    int(canary) if canary is not None else None,
                                    int(wave) if wave is not None else None)

    def reexec(self, root: Path | None, digest: str | None) -> None:
        """Stop (without leaving: the restart is back at once) and exec the release at `root`,
        or the installed code when None. The same pid, identity and home; a new incarnation."""
        launcher = Path(os.environ.get(LAUNCHER_ENV) or code_root())
        self.reexec_argv = exec_argv(root or launcher, launcher, digest or "", sys.argv[1:])
        self._stop.set()

    def drop_counts(self) -> dict[str, int]:
        """Everything dropped, by reason: at the wire, in the handshake, in the core."""
        drops = dict(self.drops)
        for key, n in self.core.counters.items():
            if key.startswith("drop_"):
                drops[key.removeprefix("drop_")] = drops.get(key, 0) + n
        return drops

    def status(self) -> dict[str, Any]:
        alive = [m for m in self.core.members() if m.admitted_by and m.state == "alive"]
        online, total = cores_online_total(self.core.members())
        return {
            "id": self.id,
            "name": self.core.member(self.id).name,  # as renamed by anyone
            "cluster": self.cluster_name,
            "cluster_id": self.cluster_id,
            "admitted": self.admitted,
            "nodes_alive": len(alive),
            "cores_online": online,
            "cores_total": total,
            "pending": sum(1 for m in self.core.members() if m.state == "pending"),
            **self.leadership.status(),
            "voters_pinned": list(self.leadership.ledger.pinned_voters),
            "version": __version__,
            "release": self.push.releases.current(SELF_APP),
            "pid": os.getpid(),
            "ready": self.ready,
            # this node's build environment once probed (None: no Portage, or not yet)
            "portage": self.fingerprint.hash if self.fingerprint else None,
            "uptime_s": round(time.time() - self.started, 1),
            "loop_lag_worst_ms": round(self.loop_lag.worst * 1000, 1),
            "loop_held_worst_ms": round(self.loop_lag.held_worst * 1000, 1),
            "members_saved": self.members_saved,
            # the time series: writes that failed (a full disk), members past its bound
            "notify": self.notify.status(),
            "series": {"write_failures": self.series.failures,
                       "members_dropped": self.series.recorder.nodes_dropped},
            "drops": self.drop_counts(),
            "bytes_in": self.transport.bytes_in,
            "bytes_out": self.transport.bytes_out,
            "connections": self.transport.connections(),
            "sent": dict(sorted(self.transport.sent.items())),  # messages by type
            "received": dict(sorted(self.received.items())),
            "watts": self.power.last.watts if self.power.last else None,
            "power_source": self.power.last.source if self.power.last else None,
            "energy_kwh": round(self.power.joules / 3.6e6, 6),
            **self._cluster_power(),
            "dashboard": self.http.url(),
            **self.binhost.status(),
            **self.disk.status(),
        }


def _number(value: Any) -> float | None:
    """A control argument that must be a number (JSON's true is not 1 s), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _raw_curve(node_id: str) -> bytes:
    from zmq.utils import z85

    return z85.decode(curve_public_key(node_id))


def _fix_malloc_thresholds() -> None:
    """Fix glibc's mmap and trim thresholds (a no-op where there is no glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def main(options: str) -> NoReturn:
    """Run the node `swarmnode join` parsed `options` (NodeOptions as JSON) for, in this fresh
    interpreter, and exit with its code."""
    try:
        code = run(NodeOptions.from_json(options))
    except (cluster.ClusterError, tokens.TokenError, control.ControlError, StartError,
            TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


def run(opts: NodeOptions) -> int:
    logging.basicConfig(
        level=os.environ.get("SWARMNODE_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Fewer cyclic-GC passes: a busy node allocates messages by the thousand a second, nearly
    # none of them in cycles, and each young-generation pass costs as much as a message.
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    _fix_malloc_thresholds()
    code, argv = asyncio.run(_run(opts))
    if argv is not None:  # a self-update: become the new release, same pid, same identity
        logging.shutdown()
        os.execv(argv[0], argv)
    return code


async def _run(opts: NodeOptions) -> tuple[int, list[str] | None]:
    node = Node(opts)
    code = await node.main()
    return code, node.reexec_argv

