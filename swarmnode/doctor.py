"""`swarmnode doctor`: what usually goes wrong with a node, each check with a fix in plain words.

Local checks read what the node holds (its home's permissions, disk, mDNS, Tailscale, the
service unit); the network checks ask the members: each alive member is sent `doctor.ask` and
answers `doctor.reply` with its wall clock (clock skew, NTP-style: against the middle of the
round trip) and, for each address this node reports in its signed record (at most
MAX_ADDRESSES), whether a TCP connection to it from there succeeded, and the address it sees
this node's traffic come from (NAT). A member dials only the asker's own reported addresses,
at most one request per asker every ASK_EVERY_S: it cannot be turned into a scanner of
anything else, nor made busy.

A check's status: "ok", "warn" (works, but worth a look) or "fail" (something does not work;
the command exits non-zero).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack

from net.addresses import split_hostport
from net.transport import Inbound

ASK, REPLY = "doctor.ask", "doctor.reply"
TYPES = frozenset({ASK, REPLY})
#: Reported addresses a member tries for the asker (a record holds a few).
MAX_ADDRESSES = 8
#: How long a member tries to connect to each address.
CONNECT_TIMEOUT_S = 2.0
#: How long the asker waits for the members' answers (their connects run side by side).
ASK_TIMEOUT_S = 5.0
#: A member answers one asker at most this often (a person running doctor twice is fine).
ASK_EVERY_S = 2.0
#: Members asked at most (the first by id): enough to see a pattern, bounded work.
MAX_ASKED = 32
#: Clock skew worth a warning (leases and the dashboard's times assume clocks within a second)
#: and one that fails (tokens' expiry and notes' ages go wrong).
SKEW_WARN_S, SKEW_FAIL_S = 1.0, 30.0
#: A test hook (the lab's): seconds added to the clock this node states in its answers.
CLOCK_OFFSET_ENV = "SWARMNODE_TEST_CLOCK_OFFSET_S"
#: Where bootstrap installs the service (systemd, OpenRC).
SERVICE_FILES = ("/etc/systemd/system/swarmnode.service", "/lib/systemd/system/swarmnode.service",
                 "/etc/init.d/swarmnode")
#: Files of a home that hold secrets or private state: owner only.
PRIVATE = ("identity.key", "dashboard.token")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Answer:
    """One member's answer: its clock against ours, and its connects to our addresses."""

    member: str
    skew_s: float
    rtt_s: float
    reach: dict[str, str]  # address -> "ok" or why not
    observed: str | None  # where it sees our traffic come from


# ---------------------------------------------------------------------- local checks


def check_home(home: Path) -> Check:
    """The home: not writable by others; secrets and databases readable by the owner only."""
    problems = []
    mode = home.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"{home} is writable by others ({stat.filemode(mode)})")
    for path in sorted(home.iterdir()):
        if not path.is_file():
            continue
        if path.name in PRIVATE or path.suffix == ".db":
            m = path.stat().st_mode
            if m & 0o077:
                problems.append(f"{path.name} is {stat.filemode(m)}")
    if problems:
        return Check("home", "fail", "; ".join(problems),
                     f"chmod 700 {home} and chmod 600 the files named: another local user "
                     "could read the node's key or write its state")
    return Check("home", "ok", f"{home}: owner only")


def check_disk(status: dict[str, Any]) -> Check:
    worst = min(status["disk"], key=lambda d: d["free"] - d["threshold"], default=None)
    if worst is None:
        return Check("disk", "warn", "no file system looked at yet")
    detail = f"{worst['free'] / 2**30:.1f} GiB free on {worst['path']}"
    if status["disk_low"]:
        return Check("disk", "fail", detail + ": nearly full, this node takes no jobs",
                     "free space there (old artifacts: see [disk] retention in config.toml)")
    return Check("disk", "ok", detail)


def check_tailscale(wanted: bool, which: Callable[[str], str | None] = shutil.which) -> Check:
    if not wanted:
        return Check("tailscale", "ok", "off (--no-tailscale)")
    if which("tailscale") is None:
        return Check("tailscale", "warn", "no tailscale command: no seeds from the tailnet",
                     "install Tailscale to reach members across networks, or give --seed")
    return Check("tailscale", "ok", "the tailnet's peers are seeds")


def check_mdns(wanted: bool, running: bool, interfaces: Iterable[str]) -> Check:
    if not wanted:
        return Check("mdns", "ok", "off (--no-mdns)")
    if not running:
        return Check("mdns", "warn", "mDNS could not start: members on this LAN are not found",
                     "check that an interface with multicast is up, or give --seed")
    names = ", ".join(interfaces) or "every interface"
    return Check("mdns", "ok", f"announcing on {names}")


def check_service(files: Iterable[str] = SERVICE_FILES) -> Check:
    found = [f for f in files if os.path.exists(f)]
    if found:
        return Check("service", "ok", f"installed: {found[0]}")
    return Check("service", "warn", "no service unit: the node does not start at boot",
                 "swarmnode bootstrap installs one (or see docs/operations.md, systemd unit)")


def check_portage(mine: str | None, theirs: dict[str, str | None]) -> Check:
    """`theirs`: member name -> its Portage fingerprint (None: it states none)."""
    if mine is None:
        return Check("portage", "ok", "no Portage here: this node takes no Portage jobs")
    differ = sorted(n for n, fp in theirs.items() if fp is not None and fp != mine)
    same = sum(1 for fp in theirs.values() if fp == mine)
    if differ:
        return Check("portage", "warn", f"{len(differ)} member(s) build differently: "
                     + ", ".join(differ[:8]),
                     "swarmnode portage-env NODE shows which settings differ; emerges run "
                     "only where the submitter's fingerprint is stated")
    return Check("portage", "ok", f"the same as {same} member(s)")


# ---------------------------------------------------------------------- network checks


def judge(answers: list[Answer], asked: list[str], reported: list[str]) -> list[Check]:
    """The network checks from the members' answers (`asked`: names of those asked)."""
    answered = {a.member for a in answers}
    silent = [m for m in asked if m not in answered]
    checks = []
    if not asked:
        return [Check("reachable", "warn", "no alive member to ask",
                      "join a swarm, or wait until its members are alive")]
    reached = {addr: [a.member for a in answers if a.reach.get(addr) == "ok"]
               for addr in reported}
    by_any = [addr for addr, who in reached.items() if who]
    detail = "; ".join(f"{addr}: reached by {len(who)} of {len(answers)}"
                       for addr, who in reached.items())
    if not answers:
        checks.append(Check("reachable", "warn", f"no member of {len(asked)} answered",
                            "see `members`; run doctor again in a few seconds"))
    elif not by_any:
        checks.append(Check("reachable", "fail", f"no member reached this node: {detail}",
                            "open the port in the firewall (see docs/operations.md, Ports), or "
                            "give --advertise with an address members can dial"))
    elif any(len(who) < len(answers) for who in reached.values() if who):
        checks.append(Check("reachable", "warn", detail,
                            "members that cannot dial in reach this node only over its own "
                            "connections to them"))
    else:
        checks.append(Check("reachable", "ok", detail))
    if silent:
        checks.append(Check("members", "warn", f"no answer from {', '.join(silent[:8])}",
                            "they may run an older release, or be unreachable from here"))
    nat = sorted({a.observed for a in answers if a.observed and a.observed not in
                  {split_hostport(r, 0)[0] for r in reported}})
    if nat:
        checks.append(Check("nat", "warn", f"members see this node's traffic from {nat[0]}, "
                            "an address it does not report: it is behind NAT",
                            "members reach it over its connections to them; for dialling in, "
                            "forward the port and give --advertise"))
    elif answers:
        checks.append(Check("nat", "ok", "members see the addresses this node reports"))
    worst = max(answers, key=lambda a: abs(a.skew_s), default=None)
    if worst is not None:
        skew = abs(worst.skew_s)
        status = "fail" if skew > SKEW_FAIL_S else "warn" if skew > SKEW_WARN_S else "ok"
        checks.append(Check("clock", status,
                            f"largest skew {worst.skew_s:+.3f} s against {worst.member} "
                            f"(round trip {worst.rtt_s * 1000:.0f} ms)",
                            "" if status == "ok" else
                            "run an NTP client (chrony, systemd-timesyncd) on both machines"))
    return checks


async def reach(addresses: list[str], timeout: float = CONNECT_TIMEOUT_S) -> dict[str, str]:
    """A TCP connection to each address, side by side: "ok" or why not."""
    async def one(addr: str) -> str:
        try:
            host, port = split_hostport(addr, 0)
            async with asyncio.timeout(timeout):
                _reader, writer = await asyncio.open_connection(host, port)
            writer.close()
            return "ok"
        except (OSError, ValueError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__

    results = await asyncio.gather(*(one(a) for a in addresses))
    return dict(zip(addresses, results, strict=True))


class Doctor:
    """The node's side: answers members' `doctor.ask`, and asks them for `run`.

    `addresses_of` gives a member's reported addresses (from its signed record); `send`
    sends a message to a member; `name` gives a member's name; `drop` counts bad input."""

    def __init__(self, addresses_of: Callable[[str], list[str]],
                 send: Callable[[str, str, bytes], None], name: Callable[[str], str],
                 drop: Callable[[str], None]) -> None:
        self.addresses_of, self.send, self.name, self.drop = addresses_of, send, name, drop
        self._answered: dict[str, float] = {}  # asker -> when last answered
        # rid -> (member, when asked, its answer and when that came)
        self._asked: dict[bytes, tuple[str, float, asyncio.Future[tuple[Any, float]]]] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            body = msgpack.unpackb(env.body)
            rid = body["rid"]
            if not isinstance(rid, bytes) or len(rid) != 8:
                raise ValueError("rid")
        except Exception:
            self.drop("malformed_doctor")
            return
        if env.type == ASK:
            now = time.monotonic()
            if now - self._answered.get(env.sender, -ASK_EVERY_S) < ASK_EVERY_S:
                self.drop("doctor_too_often")
                return
            self._answered[env.sender] = now
            task = asyncio.ensure_future(self._answer(inbound, rid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        asked = self._asked.get(rid)
        if asked is None or asked[0] != env.sender or asked[2].done():
            self.drop("unasked_doctor_reply")
            return
        asked[2].set_result((body, time.time()))  # (when it came: the round trip's end)

    async def _answer(self, inbound: Inbound, rid: bytes) -> None:
        addresses = self.addresses_of(inbound.envelope.sender)[:MAX_ADDRESSES]
        results = await reach(addresses)
        offset = float(os.environ.get(CLOCK_OFFSET_ENV, "0") or 0)
        body = msgpack.packb({"rid": rid, "t": time.time() + offset, "reach": results,
                              "observed": inbound.observed})
        # on the asker's own connection (the way back to a node behind NAT or a firewall);
        # if that closed idle while the connects waited, as any message is sent
        if not inbound.reply(REPLY, body):
            self.send(inbound.envelope.sender, REPLY, body)

    async def ask(self, members: list[str]) -> tuple[list[Answer], list[str]]:
        """Every member in `members` (at most MAX_ASKED) asked at once; their answers, and
        the names of those asked."""
        members = sorted(members)[:MAX_ASKED]
        if not members:
            return [], []
        loop = asyncio.get_running_loop()
        futs = []
        for member in members:
            rid = os.urandom(8)
            fut: asyncio.Future[tuple[Any, float]] = loop.create_future()
            self._asked[rid] = (member, time.time(), fut)
            self.send(member, ASK, msgpack.packb({"rid": rid}))
            futs.append((rid, member, fut))
        await asyncio.wait([f for _r, _m, f in futs], timeout=ASK_TIMEOUT_S)
        answers = []
        for rid, member, fut in futs:
            sent = self._asked.pop(rid)[1]
            if not fut.done():
                fut.cancel()
                continue
            body, got = fut.result()
            answers.append(self._read(member, sent, got, body))
        return [a for a in answers if a is not None], [self.name(m) for m in members]

    def _read(self, member: str, sent: float, got: float, body: Any) -> Answer | None:
        if not isinstance(body, dict):
            self.drop("malformed_doctor")
            return None
        t, results, observed = body.get("t"), body.get("reach"), body.get("observed")
        if (isinstance(t, bool) or not isinstance(t, int | float) or not isinstance(results, dict)
                or not all(isinstance(k, str) and isinstance(v, str)
                           for k, v in results.items())
                or not (observed is None or isinstance(observed, str))):
            self.drop("malformed_doctor")
            return None
        return Answer(self.name(member), t - (sent + got) / 2, got - sent,
                      {k[:100]: v[:200] for k, v in list(results.items())[:MAX_ADDRESSES]},
                      observed[:100] if observed else None)


def as_plain(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
