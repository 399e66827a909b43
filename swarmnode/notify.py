"""Notifications for what needs a person: a pending node (the forgotten container), a member
dead or back, a build finished or failed (with the failing job and its log tail), a push
rolled back, a nearly full disk, a day's energy over its budget.

Who sends: the leader only, so a swarm of 40 sends one message, not 40. Every node keeps
what it has seen (which disks are low, which rollbacks it knows of, whether today's budget
was passed), so a new leader does not announce again what its predecessor did long ago; what
a node saw in the GRACE_S before it became leader it sends (at least once, around a change of
leader: a notice the old leader sent just before it lost office may come twice).

`Notifier` is the pure part: notices in, messages out -- those within `group_s` of the first
become one message, and a channel gets at most `per_hour` a rolling hour; past that they wait,
at most MAX_WAITING of them (the oldest are dropped and counted in the next message). A member
back before the notice of its death went out cancels it: neither is sent, and the flap is
counted (a false death on a loaded machine is refuted within a second and pages no one).
`NotifyService` turns the node's events, applied ledger entries and a look every CHECK_S into
notices while leading, and sends each message on every configured channel (a JSON webhook,
ntfy, e-mail over SMTP) in a worker thread with a timeout: a channel that hangs or fails
costs the node nothing but a counted failure. Addresses come from the operator's config
only; what members state (names, job names, log tails) goes into message bodies and headers
with control characters removed, never into a command line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmnode.config import NotifySettings

log = logging.getLogger(__name__)

#: Notices waiting at most while the hour's messages are used up.
MAX_WAITING = 100
#: How often the leader looks at members' disks, rollbacks and the day's energy.
CHECK_S = 5.0
#: Longest one send may take (connect, TLS, answer) before it counts as failed.
SEND_TIMEOUT_S = 10.0
#: Characters of a failed job's log tail in a message.
TAIL_CHARS = 2000
#: Builds remembered as announced (a bound on a long-running leader's memory).
MAX_ANNOUNCED = 10_000
#: Notices a node sees while it does not lead are kept this long: if it becomes leader within
#: it (an election after a step-down, a leader's death), it sends them. Losing "the disk is
#: full" to a one-second election is worse than hearing of something twice.
GRACE_S = 15.0


@dataclass(frozen=True, slots=True)
class Notice:
    kind: str
    title: str
    text: str = ""
    urgent: bool = False
    about: str | None = None  # the member a member_dead or member_back notice is about


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    text: str
    notices: tuple[Notice, ...]
    dropped: int  # notices dropped before this one (the hourly limit)

    @property
    def urgent(self) -> bool:
        return any(n.urgent for n in self.notices)

    def to_json(self, swarm: str) -> dict[str, Any]:
        return {"swarm": swarm, "title": self.title, "text": self.text,
                "dropped": self.dropped, "notices": [
                    {"kind": n.kind, "title": n.title, "text": n.text, "urgent": n.urgent}
                    for n in self.notices]}


@dataclass
class Notifier:
    """Groups notices into messages and keeps to the hourly limit."""

    group_s: float
    per_hour: int
    _waiting: deque[tuple[float, Notice]] = field(default_factory=deque)
    _sent: deque[float] = field(default_factory=deque)
    dropped: int = 0
    flaps: int = 0  # deaths cancelled by the member's return before they were sent

    def offer(self, now: float, notice: Notice) -> None:
        if notice.kind == "member_back" and self._cancel_death(notice.about):
            return
        if len(self._waiting) >= MAX_WAITING:
            self._waiting.popleft()
            self.dropped += 1
        self._waiting.append((now, notice))

    def _cancel_death(self, member: str | None) -> bool:
        if member is None:
            return False
        for i, (_t, waiting) in enumerate(self._waiting):
            if waiting.kind == "member_dead" and waiting.about == member:
                del self._waiting[i]
                self.flaps += 1
                return True
        return False

    def due(self) -> float | None:
        """When `take` may give a message next (None: nothing waits)."""
        if not self._waiting:
            return None
        due = self._waiting[0][0] + self.group_s
        if len(self._sent) >= self.per_hour:
            due = max(due, self._sent[0] + 3600)
        return due

    def take(self, now: float) -> Message | None:
        while self._sent and self._sent[0] <= now - 3600:
            self._sent.popleft()
        due = self.due()
        if due is None or now < due:
            return None
        notices = tuple(n for _t, n in self._waiting)
        self._waiting.clear()
        self._sent.append(now)
        dropped, self.dropped = self.dropped, 0
        title = notices[0].title if len(notices) == 1 else (
            f"{len(notices)} events: {notices[0].title}, and more")
        lines = [f"- {n.title}" + (f"\n{n.text}" if n.text else "") for n in notices]
        if dropped:
            lines.append(f"({dropped} more were not sent: at most {self.per_hour} messages "
                         "an hour)")
        return Message(title, "\n".join(lines), notices, dropped)


def clean(text: str, limit: int = 200) -> str:
    """Member-stated text for a title or header: no control characters, bounded."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


# ---------------------------------------------------------------------- channels
# (urllib.request, smtplib and email are imported when a message is sent: a node without
# notifications -- most -- starts without them)


def send_webhook(url: str, message: Message, swarm: str) -> None:
    import urllib.request

    body = json.dumps(message.to_json(swarm)).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "swarmnode"})
    with urllib.request.urlopen(req, timeout=SEND_TIMEOUT_S) as resp:
        resp.read(65536)


def send_ntfy(url: str, message: Message, swarm: str) -> None:
    import urllib.request

    req = urllib.request.Request(url, data=message.text.encode(), method="POST", headers={
        "Title": clean(f"{swarm}: {message.title}"), "Tags": "warning" if message.urgent
        else "information_source", "Priority": "high" if message.urgent else "default",
        "User-Agent": "swarmnode"})
    with urllib.request.urlopen(req, timeout=SEND_TIMEOUT_S) as resp:
        resp.read(65536)


def send_email(settings: NotifySettings, message: Message, swarm: str) -> None:
    import smtplib
    from email.message import EmailMessage

    mail = EmailMessage()
    mail["Subject"] = clean(f"[{swarm}] {message.title}")
    mail["From"] = settings.email_from
    mail["To"] = ", ".join(settings.email_to)
    mail.set_content(message.text)
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=SEND_TIMEOUT_S) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_user:
            password = ""
            if settings.smtp_password_file:
                password = Path(settings.smtp_password_file).expanduser().read_text().strip()
            smtp.login(settings.smtp_user, password)
        smtp.send_message(mail)


def channels(settings: NotifySettings) -> dict[str, Callable[[Message, str], None]]:
    """The configured channels, each a blocking send of one message."""
    out: dict[str, Callable[[Message, str], None]] = {}
    if settings.webhook:
        out["webhook"] = lambda m, s, url=settings.webhook: send_webhook(url, m, s)
    if settings.ntfy:
        out["ntfy"] = lambda m, s, url=settings.ntfy: send_ntfy(url, m, s)
    if settings.email_to:
        out["email"] = lambda m, s: send_email(settings, m, s)
    return out


# ---------------------------------------------------------------------- the service


@dataclass
class Seen:
    """What the swarm looked like at the last check, on every node (leading or not)."""

    disks_low: set[str] = field(default_factory=set)
    rolled_back: set[tuple[str, str]] = field(default_factory=set)  # (member, app)
    budget_day: str | None = None  # the day whose energy passed the budget
    announced: deque[str] = field(default_factory=deque)  # builds announced as finished


class NotifyService:
    """Notices from what the node sees, sent while it leads. `leading` tells whether this
    node leads now; `name` gives a member's name; `swarm` is the cluster's name."""

    def __init__(self, settings: NotifySettings, leading: Callable[[], bool],
                 name: Callable[[str], str], swarm: Callable[[], str],
                 now: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.leading, self.name, self.swarm, self.now = leading, name, swarm, now
        self.notifier = Notifier(settings.group_s, settings.per_hour)
        self.channels = channels(settings)
        self.seen = Seen()
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._unsent: deque[tuple[float, Notice]] = deque(maxlen=MAX_WAITING)

    def offer(self, notice: Notice) -> None:
        if not self.channels or notice.kind not in self.settings.events:
            return
        if not self.leading():
            self._unsent.append((self.now(), notice))
            return
        self.notifier.offer(self.now(), notice)
        self._wake.set()

    def tick(self) -> None:
        """Every CHECK_S: on becoming leader, send what was seen in the last GRACE_S."""
        now = self.now()
        while self._unsent and self._unsent[0][0] < now - GRACE_S:
            self._unsent.popleft()
        if self._unsent and self.leading():
            for _t, notice in self._unsent:
                self.notifier.offer(now, notice)
            self._unsent.clear()
            self._wake.set()

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """The node's event log, as it is written."""
        who = data.get("id")
        about = who if isinstance(who, str) else None
        name = clean(self.name(about)) if about is not None else "?"
        if kind == "pending":
            addresses = ", ".join(clean(str(a)) for a in data.get("addresses", [])[:4])
            self.offer(Notice("pending", f"a node asks to join: {name}",
                              f"{who} from {addresses}: admit it (swarmnode admit) or ban it",
                              urgent=True))
        elif kind == "member_dead":
            self.offer(Notice("member_dead", f"{name} is dead", str(who), urgent=True,
                              about=about))
        elif kind == "member_alive" and data.get("previous") in ("dead", "left"):
            self.offer(Notice("member_back", f"{name} is back", str(who), about=about))

    def on_build_end(self, build: str, name: str, progress: dict[str, int],
                     failures: Iterable[tuple[str, str, str]]) -> None:
        """A build of the ledger finished: `failures` are (job, reason, log tail) of its
        blocked jobs. Announced once per build."""
        if build in self.seen.announced:
            return
        self.seen.announced.append(build)
        if len(self.seen.announced) > MAX_ANNOUNCED:
            self.seen.announced.popleft()
        failed = list(failures)
        counts = f"{progress.get('done', 0)} of {progress.get('total', 0)} jobs done"
        if not failed:
            self.offer(Notice("build_finished", f"build {clean(name)} finished", counts))
            return
        job, reason, tail = failed[0]
        text = (f"{counts}; {len(failed)} failed. {clean(job)}: {clean(reason, 500)}\n"
                + tail[-TAIL_CHARS:])
        self.offer(Notice("build_failed", f"build {clean(name)} failed: {clean(job)}", text,
                          urgent=True))

    def check(self, disks_low: set[str], rolled_back: set[tuple[str, str]],
              kwh_today: float, day: str) -> None:
        """The look every CHECK_S: members whose disk is low, (member, app) rollbacks known,
        the swarm's energy today. New ones are announced (while leading)."""
        for member in sorted(disks_low - self.seen.disks_low):
            self.offer(Notice("disk_low", f"{clean(self.name(member))}'s disk is nearly full",
                              "it takes no jobs until space is freed", urgent=True))
        for member, app in sorted(rolled_back - self.seen.rolled_back):
            name = clean(self.name(member))
            self.offer(Notice("push_rolled_back", f"{clean(app)} rolled back on {name}",
                              f"the release failed there and the one before runs again; "
                              f"`swarmnode versions` shows every member's, {name}'s "
                              f"`swarmnode events` why", urgent=True))
        budget = self.settings.energy_budget_kwh
        if budget is not None and kwh_today > budget and self.seen.budget_day != day:
            self.seen.budget_day = day
            self.offer(Notice("energy_budget", f"the swarm drew {kwh_today:.2f} kWh today",
                              f"over the budget of {budget:g} kWh"))
        self.seen.disks_low, self.seen.rolled_back = set(disks_low), set(rolled_back)

    async def send(self, message: Message) -> dict[str, str]:
        """On every channel at once, each in a thread: "sent" or why not."""
        swarm = self.swarm()

        async def one(name: str, channel: Callable[[Message, str], None]) -> str:
            try:
                await asyncio.wait_for(asyncio.to_thread(channel, message, swarm),
                                       SEND_TIMEOUT_S + 5)
            except Exception as exc:  # any failure of the far end is counted, not raised
                self.failed[name] = self.failed.get(name, 0) + 1
                log.warning("notification by %s failed: %s", name, exc)
                return f"failed: {exc}"
            self.sent[name] = self.sent.get(name, 0) + 1
            return "sent"

        names = list(self.channels)
        results = await asyncio.gather(*(one(n, self.channels[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def run(self) -> None:
        while True:
            due = self.notifier.due()
            wait = None if due is None else max(due - self.now(), 0.0)
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            message = self.notifier.take(self.now())
            if message is not None:
                await self.send(message)

    def status(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "sent": dict(self.sent),
                "failed": dict(self.failed), "dropped": self.notifier.dropped,
                "flaps": self.notifier.flaps}
