"""The power meters on a fake powercap tree and fake /proc/stat figures: RAPL zones chosen and
summed, counter wraps, unreadable counters falling back to the estimate, utilisation from
jiffies and the linear model."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest

from swarmnode.node import POWER_S
from swarmnode.power import (
    DEFAULT_WATTS_IDLE,
    DEFAULT_WATTS_PER_CORE,
    EnergyShare,
    PowerMeter,
    RaplMeter,
    estimate,
    note_value,
    parse_cpu_line,
    rapl_zones,
    read_note,
)
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)


def zone(root: Path, name: str, label: str, energy: int, wrap: int = 262143328850) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy}\n")
    (z / "max_energy_range_uj").write_text(f"{wrap}\n")
    return z


def stat(busy: int, idle: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return (f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy} 0 0 {idle} 0 0 0 0 0 0\n"
            "intr 12345\n")


def test_packages_are_summed_and_their_subzones_not_added_again(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    zone(tmp_path, "intel-rapl:0:0", "core", 900_000)
    zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    zones = rapl_zones(tmp_path)
    assert [z.energy.parent.name for z in zones] == ["intel-rapl:0", "intel-rapl:1"]
    meter = RaplMeter(zones)
    assert meter.update(10.0, meter.read()) is None  # the first sample: nothing to compare
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("21000000\n")  # +20 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("25000000\n")  # +20 J
    assert meter.update(12.0, meter.read()) == pytest.approx(20.0)  # 40 J in 2 s


def test_a_platform_zone_is_used_alone(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 0)
    zone(tmp_path, "intel-rapl:1", "psys", 0)
    assert [z.energy.parent.name for z in rapl_zones(tmp_path)] == ["intel-rapl:1"]


def test_a_counter_wrap_is_not_a_negative_draw(tmp_path: Path) -> None:
    zone(tmp_path, "intel-rapl:0", "package-0", 999_000_000, wrap=1_000_000_000)
    meter = RaplMeter(rapl_zones(tmp_path))
    meter.update(0.0, meter.read())
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("4000000\n")  # wrapped: +5 J
    assert meter.update(1.0, meter.read()) == pytest.approx(5.0)


def test_unreadable_or_absent_counters_mean_the_estimate(tmp_path: Path) -> None:
    assert rapl_zones(tmp_path / "none") == []
    z = zone(tmp_path, "intel-rapl:0", "package-0", 0)
    (z / "energy_uj").unlink()  # what a non-root reader sees as unreadable
    (z / "energy_uj").mkdir()
    assert rapl_zones(tmp_path) == []
    proc = tmp_path / "stat"
    proc.write_text(stat(100, 900))
    meter = PowerMeter(watts_idle=20.0, watts_max=120.0, powercap=tmp_path, proc_stat=proc)
    assert meter.rapl is None
    assert meter.sample(0.0) is None  # utilisation needs two samples
    proc.write_text(stat(100 + 75, 900 + 25))  # 75% busy since
    reading = meter.sample(5.0)
    assert reading is not None and reading.source == "estimate"
    assert reading.watts == pytest.approx(20.0 + 100.0 * 0.75)
    assert meter.joules == pytest.approx(95.0 * 5.0)


def test_energy_today_starts_again_with_a_new_day_and_travels_in_the_note(
        tmp_path: Path) -> None:
    proc = tmp_path / "stat"
    proc.write_text(stat(0, 100))
    meter = PowerMeter(watts_idle=10.0, watts_max=10.0, powercap=tmp_path, proc_stat=proc)
    busy = 0
    for t, day in ((0.0, "2026-11-26"), (10.0, "2026-11-26"), (20.0, "2026-11-26")):
        busy += 10
        proc.write_text(stat(busy, 100 + int(t)))
        meter.sample(t, day)
    assert meter.joules_today == pytest.approx(200.0)  # 10 W for 20 s
    proc.write_text(stat(busy + 10, 200))
    meter.sample(30.0, "2026-11-27")  # past midnight: only what follows counts for today
    assert meter.joules_today == pytest.approx(100.0) and meter.joules == pytest.approx(300.0)
    stated = read_note(note_value(meter))
    assert stated is not None and stated.day == "2026-11-27" and stated.joules_today == 100
    assert stated.reading == meter.last and stated.load is None
    assert stated.joules_on("2026-11-27") == 100 and stated.joules_on("2026-11-28") == 0
    loaded = read_note(note_value(meter, 1.2345))
    assert loaded is not None and loaded.load == 1.23
    for bad in (-1, "high", True, 1e9):
        plain = {**msgpack.unpackb(note_value(meter)), "l": bad}
        odd = read_note(msgpack.packb(plain))
        assert odd is not None and odd.load is None  # a bad load does not void the reading


def test_rapl_is_preferred_and_a_counter_that_goes_away_falls_back(tmp_path: Path) -> None:
    z = zone(tmp_path / "pc", "intel-rapl:0", "package-0", 0)
    proc = tmp_path / "stat"
    proc.write_text(stat(0, 100))
    meter = PowerMeter(powercap=tmp_path / "pc", proc_stat=proc, cores=4)
    assert meter.sample(0.0) is None
    (z / "energy_uj").write_text("30000000\n")
    assert meter.sample(1.0) is not None and meter.last.source == "rapl"  # type: ignore[union-attr]
    assert meter.last.watts == pytest.approx(30.0)  # type: ignore[union-attr]
    (z / "energy_uj").unlink()
    assert meter.sample(2.0) is None and meter.rapl is None  # counters gone: the estimate
    proc.write_text(stat(50, 150))  # 50% busy
    reading = meter.sample(3.0)
    assert reading is not None and reading.source == "estimate (default figures)"
    assert reading.watts == pytest.approx(DEFAULT_WATTS_IDLE + DEFAULT_WATTS_PER_CORE * 4 * 0.5)


def test_utilisation_and_the_model() -> None:
    assert parse_cpu_line(stat(30, 70)) == (30, 100)
    assert parse_cpu_line("intr 1\n") is None
    assert parse_cpu_line("cpu  1 2\n") is None
    assert estimate(0.0, 10, 90) == 10 and estimate(1.0, 10, 90) == 90
    assert estimate(0.25, 10, 90) == pytest.approx(30)


def test_each_reading_is_shared_among_the_jobs_that_ran_in_its_interval() -> None:
    """A reading is the mean draw since the one before: shared over that interval among the
    jobs that ran in it, by cores x time. a (1 core) runs 10..20 s, b (3 cores) 12..18 s."""
    share = EnergyShare()
    share.reading(0.0, None)
    share.start(10.0, "a", 1)
    share.start(12.0, "b", 3)
    share.reading(16.0, 100.0)  # 100 W over 0..16 s: busy 10..16 (600 J), idle before
    share.reading(18.0, 60.0)  # 60 W over 16..18 s, split 1:3 (b's end takes a reading)
    b = share.end(18.0, "b")
    a = share.end(20.0, "a")  # no reading at its end: its tail at the latest figure
    assert b == pytest.approx(100 * 6 * 3 / 4 - 100 * 2 * 3 / 4 + 60 * 2 * 3 / 4)  # 390
    assert a == pytest.approx(100 * 2 + 100 * 4 / 4 + 60 * 2 / 4 + 60 * 2)  # 450
    assert a + b == pytest.approx(100 * 6 + 60 * 2 + 60 * 2)  # every busy moment, once
    share.start(30.0, "c", 2)
    share.reading(31.0, None)  # an interval of unknown draw is nobody's
    share.reading(32.0, 40.0)
    assert share.end(32.0, "c") == pytest.approx(40.0)


def test_a_meters_readings_feed_its_share_and_a_jobs_end_takes_one(tmp_path: Path) -> None:
    proc = tmp_path / "stat"
    proc.write_text(stat(0, 100))
    meter = PowerMeter(10.0, 90.0, powercap=tmp_path / "none", proc_stat=proc)
    meter.sample(0.0)
    meter.share.start(0.5, "job", 1)
    proc.write_text(stat(50, 150))  # 50% busy since the last reading -> 50 W
    meter.refresh(0.1)  # younger than REFRESH_S: no reading
    assert meter.last is None
    meter.refresh(3.0)
    assert meter.share.end(3.0, "job") == pytest.approx(50 * 2.5)  # its part of 0..3 s
    assert meter.last is None and meter.joules == pytest.approx(150.0)
    proc.write_text(stat(250, 150))  # then fully busy -> 90 W for 2 s
    reading = meter.sample(5.0)  # the figure shown: the mean since the last `sample`
    assert reading is not None and reading.watts == pytest.approx((150 + 180) / 5, abs=0.05)


def test_the_real_machine_gives_a_reading() -> None:
    """Whatever this machine offers (RAPL as root on bare metal, else the estimate), two
    samples give a plausible figure and say where it came from."""
    meter = PowerMeter()
    meter.sample(time.monotonic())
    time.sleep(0.3)  # a measurement interval: the counters (jiffies, microjoules) must advance
    reading = meter.sample(time.monotonic())
    assert reading is not None and 0 < reading.watts < 5000
    assert reading.source in ("rapl", "estimate (default figures)")


def test_a_running_node_reports_its_draw(swarm: Swarm) -> None:
    """`status` carries the node's latest reading, where it came from, and the energy since
    start (this machine: a VM, so the estimate unless RAPL is readable)."""
    node, _token = swarm.init("n1", loopback_addr(1))
    (node.home / "config.toml").write_text("watts_idle = 20\nwatts_max = 80\n")
    swarm.start(node)
    st = swarm.wait_for(lambda: (s := swarm.query(node, "status"))["watts"] is not None and s,
                        3 * POWER_S, "a power reading")
    assert st["power_source"] in ("rapl", "estimate")
    if st["power_source"] == "estimate":
        assert 20 <= st["watts"] <= 80
    assert st["energy_kwh"] >= 0


def test_every_node_states_its_draw_and_each_sees_the_swarms(swarm: Swarm) -> None:
    """Each node states its reading in a signed note; every node sums the members' latest
    (`cluster_watts`), and a stranger's or a malformed note does not count."""
    nodes, _token = swarm.loopback(2, 30)
    ids = {n.id for n in nodes}
    snaps = swarm.wait_for(
        lambda: (v := [swarm.query(n, "snapshot") for n in nodes])
        and all(set(s["power"]) == ids for s in v) and v,
        4 * POWER_S, "both nodes' draw everywhere")
    views = [s["status"] for s in snaps]
    for snap in snaps:
        stated = snap["power"].values()
        assert all(p["watts"] > 0 and p["source"].startswith(("rapl", "estimate"))
                   and p["load"] >= 0 for p in stated)
        assert snap["status"]["cluster_watts"] == pytest.approx(sum(p["watts"] for p in stated))
    assert read_note(b"\xff\x00") is None and read_note(b"\x81\xa1w\xc3") is None
    assert all(st["cluster_kwh_today"] >= 0 and st["cost_today"] is None for st in views)
