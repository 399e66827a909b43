"""A node's electrical draw: measured by RAPL energy counters where they can be read, else
estimated from CPU utilisation between the node's configured idle and full-load watts.

RAPL ("running average power limit", Intel since Sandy Bridge, AMD since Zen) exposes, under
/sys/class/powercap, a cumulative energy counter in microjoules per zone; it wraps at the
zone's `max_energy_range_uj`. The top-level `intel-rapl:N` zones are the CPU packages (their
`intel-rapl:N:M` subzones are parts of a package, so they are not added again); a `psys` zone,
where there is one, covers the whole platform and is used alone. Since 2020 the counters are
readable by root only (CVE-2020-8694), so an unprivileged node, a VM or a container falls back
to the estimate. Either way the reading says where it came from, and the dashboard shows it.

The meters are small state machines over samples (counter values and times), so they are
tested on fake trees and figures; `PowerMeter.sample` does the reading.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

POWERCAP = Path("/sys/class/powercap")
PROC_STAT = Path("/proc/stat")
#: The estimate without configured figures: a small server's idle draw, and what each core
#: adds at full load (a desktop or server core draws about 5-15 W). Shown as "estimate
#: (default figures)" so nobody mistakes it for a measurement; set `watts_idle` and
#: `watts_max` in config.toml (a wall meter's readings) for a better one.
DEFAULT_WATTS_IDLE = 10.0
DEFAULT_WATTS_PER_CORE = 10.0


@dataclass(frozen=True, slots=True)
class Reading:
    watts: float
    source: str  # "rapl", "estimate", "estimate (default figures)"


@dataclass(frozen=True, slots=True)
class Zone:
    energy: Path  # energy_uj
    wrap: int  # max_energy_range_uj: the counter goes back to 0 past it


def rapl_zones(root: Path = POWERCAP) -> list[Zone]:
    """The zones whose energy adds up to the machine's CPU draw, if their counters can be
    read: `psys` alone when present, else every package. Empty when there are none, or when
    they cannot be read (not root)."""
    try:
        tops = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
    except OSError:
        return []
    named = [(p, _read_text(p / "name")) for p in tops]
    chosen = [p for p, name in named if name == "psys"] or [p for p, name in named
                                                            if name and name != "psys"]
    zones = []
    for p in chosen:
        wrap = _read_int(p / "max_energy_range_uj")
        if wrap is None or wrap <= 0 or _read_int(p / "energy_uj") is None:
            return []  # unreadable: all or nothing, a partial sum would be wrong
        zones.append(Zone(p / "energy_uj", wrap))
    return zones


class RaplMeter:
    """Watts between consecutive samples of the zones' counters (wraps handled)."""

    def __init__(self, zones: list[Zone]) -> None:
        self.zones = zones
        self._last: tuple[float, list[int]] | None = None

    def update(self, now: float, counters: list[int]) -> float | None:
        """Feed the counters read at `now`; the mean watts since the previous sample (None for
        the first, or when time did not advance)."""
        last, self._last = self._last, (now, counters)
        if last is None or now <= last[0]:
            return None
        joules = sum((c - old) % zone.wrap
                     for c, old, zone in zip(counters, last[1], self.zones, strict=True)) / 1e6
        return joules / (now - last[0])

    def read(self) -> list[int] | None:
        values = [_read_int(z.energy) for z in self.zones]
        return None if any(v is None for v in values) else values  # type: ignore[return-value]


class CpuMeter:
    """CPU utilisation (0..1, all CPUs) between consecutive samples of /proc/stat."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def update(self, stat_text: str) -> float | None:
        busy_total = parse_cpu_line(stat_text)
        if busy_total is None:
            return None
        last, self._last = self._last, busy_total
        if last is None or busy_total[1] <= last[1]:
            return None
        return min(1.0, max(0.0, (busy_total[0] - last[0]) / (busy_total[1] - last[1])))


def parse_cpu_line(stat_text: str) -> tuple[int, int] | None:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat; idle and iowait are
    not busy, guest time is already counted in user."""
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:] if x.isdigit()]
            if len(fields) < 5:
                return None
            total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
            return total - fields[3] - fields[4], total
    return None


def estimate(utilisation: float, watts_idle: float, watts_max: float) -> float:
    """Linear in utilisation between idle and full load: what SPECpower-style curves
    approximate to within about 10% for servers."""
    return watts_idle + (watts_max - watts_idle) * utilisation


class EnergyShare:
    """The node's draw split among the jobs running on it by the cores each holds, so that a
    build's energy is what its jobs' shares add up to (the draw while nothing runs is no
    build's).

    A reading is the mean draw since the one before, so it is shared out over that interval,
    among the jobs that ran in it by cores x time (a running integral of 1 / busy cores makes
    each start and end O(1); a reading costs one step per running job). The worker takes a
    reading as a job ends (`PowerMeter.refresh`), so a job's energy is complete when it is
    reported; only a tail shorter than `PowerMeter.REFRESH_S` counts at the latest figure."""

    def __init__(self) -> None:
        self._g = 0.0  # integral of 1 / busy cores since the last reading
        self._at: float | None = None
        self._busy = 0
        self._watts = 0.0  # the latest reading, for tails
        self._jobs: dict[object, list[float]] = {}  # key -> [cores, mark in _g, joules]

    def _advance(self, now: float) -> None:
        if self._at is not None and now <= self._at:
            return
        if self._at is not None and self._busy > 0:
            self._g += (now - self._at) / self._busy
        self._at = now

    def reading(self, now: float, watts: float | None) -> None:
        """The mean draw since the previous reading (None: unknown, that interval is no
        job's), shared among the jobs that ran in it."""
        self._advance(now)
        for job in self._jobs.values():
            if watts is not None:
                job[2] += watts * job[0] * (self._g - job[1])
            job[1] = 0.0
        self._g = 0.0
        if watts is not None:
            self._watts = watts

    def start(self, now: float, key: object, cores: int) -> None:
        self._advance(now)
        self._busy += cores
        self._jobs[key] = [float(cores), self._g, 0.0]

    def end(self, now: float, key: object) -> float:
        """The job `key` ended: its joules."""
        self._advance(now)
        cores, mark, joules = self._jobs.pop(key)
        self._busy -= int(cores)
        return joules + self._watts * cores * (self._g - mark)


class PowerMeter:
    """The node's draw, sampled every few seconds: RAPL if readable, else the estimate."""

    def __init__(self, watts_idle: float | None = None, watts_max: float | None = None,
                 cores: int | None = None, powercap: Path = POWERCAP,
                 proc_stat: Path = PROC_STAT) -> None:
        zones = rapl_zones(powercap)
        self.rapl = RaplMeter(zones) if zones else None
        self.cpu = CpuMeter()
        self.proc_stat = proc_stat
        configured = watts_idle is not None and watts_max is not None
        self.watts_idle = watts_idle if watts_idle is not None else DEFAULT_WATTS_IDLE
        self.watts_max = watts_max if watts_max is not None else (
            self.watts_idle + DEFAULT_WATTS_PER_CORE * (cores or os.cpu_count() or 1))
        self.estimate_source = "estimate" if configured else "estimate (default figures)"
        self.last: Reading | None = None
        self.joules = 0.0  # energy since start, from the samples
        self.day = ""  # the local date the samples are counted under
        self.joules_today = 0.0  # energy since the day began (or since start, if later)
        self.share = EnergyShare()
        self._at: float | None = None
        self._known = 0.0  # seconds whose draw is known (in `joules`)
        self._period = (0.0, 0.0)  # (`_known`, `joules`) at the last `sample`

    #: A job's end takes a reading unless the last is younger than this (its energy share
    #: is then complete; at most this many readings a second however many jobs end).
    REFRESH_S = 0.25

    def refresh(self, now: float, day: str | None = None) -> None:
        """A reading for the jobs' shares and the energy now, unless the last one is younger
        than REFRESH_S (the figure people see, `last`, stays `sample`'s)."""
        if self._at is None or now - self._at >= self.REFRESH_S:
            self._measure(now, day)

    def sample(self, now: float, day: str | None = None) -> Reading | None:
        """A reading now; `last` becomes the mean draw since the previous `sample` (readings
        that jobs' ends took in between included: alone, a quarter of a second of /proc/stat
        is too coarse a figure to show). None while the draw is unknown."""
        source = self._measure(now, day)
        known, joules = self._known - self._period[0], self.joules - self._period[1]
        if source is None or known <= 0:
            return None
        self._period = (self._known, self.joules)
        self.last = Reading(round(joules / known, 1), source)
        return self.last

    def _measure(self, now: float, day: str | None) -> str | None:
        """Read the counters (or /proc/stat) at `now` (monotonic seconds), on local date `day`
        (None: today's); the draw since the previous reading, added to `joules` and to
        `joules_today` (which a new day starts again from 0) and shared among the jobs that
        ran. Its source, or None when the draw is not known."""
        day = today() if day is None else day
        if day != self.day:
            self.day, self.joules_today = day, 0.0
        watts: float | None = None
        source = "rapl"
        if self.rapl is not None:
            counters = self.rapl.read()
            watts = self.rapl.update(now, counters) if counters is not None else None
            if counters is None:
                self.rapl = None  # became unreadable: the estimate from now on
        if self.rapl is None:
            source = self.estimate_source
            util = self.cpu.update(_read_text(self.proc_stat, 1 << 16) or "")
            watts = None if util is None else estimate(util, self.watts_idle, self.watts_max)
        if watts is not None and self._at is not None and now > self._at:
            self.joules += watts * (now - self._at)
            self.joules_today += watts * (now - self._at)
            self._known += now - self._at
        self._at = now
        self.share.reading(now, watts)
        return source if watts is not None else None


#: The membership note topic a node states its latest reading under (the newest per node is
#: kept and spread by gossip; see `Note`), and how old one may be before it no longer counts.
POWER_TOPIC = "power"
STALE_S = 120.0


@dataclass(frozen=True, slots=True)
class Stated:
    """What a member stated: its reading, its energy on the local `day` so far, and its
    one-minute load average (None if it did not say)."""

    reading: Reading
    day: str
    joules_today: float
    load: float | None = None

    def joules_on(self, day: str) -> float:
        """Its energy on `day`: a note from yesterday states nothing about today."""
        return self.joules_today if self.day == day else 0.0


def note_value(meter: PowerMeter, load: float | None = None) -> bytes:
    assert meter.last is not None
    plain = {"w": meter.last.watts, "s": meter.last.source[:40], "d": meter.day[:10],
             "jd": int(meter.joules_today)}
    if load is not None:
        plain["l"] = round(load, 2)
    return msgpack.packb(plain)


def read_note(value: bytes) -> Stated | None:
    """A power note's contents; None for anything malformed (another member's bytes)."""
    try:
        plain = msgpack.unpackb(value, raw=False, max_str_len=64, max_map_len=8)
    except (ValueError, msgpack.UnpackException, TypeError):
        return None
    if not isinstance(plain, dict):
        return None
    watts, source = plain.get("w"), plain.get("s")
    day, today, load = plain.get("d", ""), plain.get("jd", 0), plain.get("l")
    if isinstance(watts, bool) or not isinstance(watts, int | float) or not 0 <= watts < 1e6 \
            or not isinstance(source, str) or not isinstance(day, str) \
            or type(today) is not int or not 0 <= today < 1e13:
        return None
    if isinstance(load, bool) or not isinstance(load, int | float) or not 0 <= load < 1e5:
        load = None
    return Stated(Reading(float(watts), source), day, float(today), load)


def today() -> str:
    """The local date, as power notes and `joules_today` count days."""
    return time.strftime("%Y-%m-%d")


def _read_text(path: Path, limit: int = 256) -> str | None:
    try:
        with path.open("r", encoding="ascii", errors="replace") as f:
            return f.read(limit).strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
