"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a running
3-node swarm: the right node count and cores, a new pending node appearing without a reload,
and admitting it from the page (opened by the URL `swarmnode dashboard` prints: its token
becomes the page's cookie, which its stream, log and action requests then carry)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.swarm import (
    REPO,
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="needs Debian's chromium (scripts/setup installs it as root)"),
]
#: Flags for a headless Chromium on a machine without internet: no background connections
#: (they are refused here, many at a time), no first-run or update checks.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Where to save the screenshot as well; docs/dashboard.png is made with
#: SWARMNODE_SCREENSHOT=docs/dashboard.png .venv/bin/python -m pytest \
#:     tests/test_dashboard_browser.py
SCREENSHOT = os.environ.get("SWARMNODE_SCREENSHOT")


def test_the_page_shows_the_swarm_live_and_admits_a_pending_node(swarm: Swarm,
                                                                   tmp_path: Path) -> None:
    nodes, _token = swarm.loopback(3, 30)
    first = nodes[0]
    swarm.wait_for(lambda: swarm.query(first, "status")["leader"], 20, "a leader")
    url = swarm.cli(first, "dashboard").stdout.strip()
    cores = swarm.query(first, "status")["cores_online"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            expect = playwright.expect  # (locator checks: the page's CSP forbids eval)
            expect(page.locator("#nodes")).to_have_text("3", timeout=20_000)
            # (the cores of a member count once its record is in: the page's snapshot of the
            # moment may be a second behind what status said, so wait for it to catch up)
            expect(page.locator("#cores")).to_have_text(str(cores))
            assert page.locator("#members tbody tr").count() == 3
            assert page.inner_text("#status") == "live"
            assert page.inner_text("#cores_total") == f"of {cores}"
            loop = page.locator('#network svg .net[data-network="loopback"]')
            expect(loop.locator(".peer")).to_have_count(3)
            expect(loop.locator('.peer[data-name="n1"] .how')).to_have_text("this node")
            expect(loop.locator('.peer[data-name="n2"] .how')).to_have_text("direct")
            expect(page.locator("#network svg path.edge.direct")).to_have_count(2)
            expect(page.locator("#powernodes tr")).to_have_count(3, timeout=20_000)
            expect(page.locator('#powernodes tr[data-name="n2"]')).to_contain_text(" W")

            guest = swarm.start(swarm.add("guest", loopback_addr(4)), seeds=[first.listen])
            row = page.locator('#members tr.pending[data-name="guest"]')
            row.wait_for(timeout=20_000)  # arrives over the stream: no reload
            assert page.inner_text("#pending") == "1"
            page.screenshot(path=str(tmp_path / "pending.png"))

            row.locator("button.admit").click()
            expect(page.locator('#members tr.alive[data-name="guest"]')).to_have_count(
                1, timeout=20_000)
            expect(page.locator("#result")).to_contain_text("admit: guest")
            swarm.wait_state([guest], "alive", [first], 20)
            how = [e for e in swarm.events(first, "admitted") if e.get("id") == guest.id]
            assert how and "via dashboard" in how[-1]["how"]
            expect(page.locator("#nodes")).to_have_text("4", timeout=20_000)

            # pause a node from the page: committed, shown, and undone with Resume
            page.locator('#members tr[data-name="n2"] button.pause').click()
            expect(page.locator('#members tr[data-name="n2"] .tag.paused')).to_have_count(
                1, timeout=20_000)
            expect(page.locator("#result")).to_contain_text("paused: n2")  # (the answer may
            # come after the stream showed the pause)
            assert swarm.wait_for(lambda: any(n["paused"] for n in swarm.query(
                nodes[2], "snapshot")["nodes"] if n["name"] == "n2"), 10, "paused everywhere")
            page.locator("#evkind").select_option("actions")
            expect(page.locator('#events tr[data-kind="node_paused_by_operator"]')).to_have_count(
                1, timeout=10_000)
            expect(page.locator('#events tr[data-kind="member_join"]')).to_have_count(0)
            page.locator('#members tr[data-name="n2"] button.resume').click()
            expect(page.locator('#members tr[data-name="n2"] .tag.paused')).to_have_count(
                0, timeout=20_000)
            page.locator("#evkind").select_option("")
            plan = tmp_path / "four.toml"  # (for the screenshot: a build spread over nodes)
            plan.write_text('name = "four"\n' + "".join(
                f'[jobs.part{i}]\ncmd = "sleep 0.5"\n' for i in range(4))
                + '[jobs.link]\ncmd = "true"\ndeps = ["part0", "part1", "part2", "part3"]\n')
            swarm.cli(first, "build", str(plan), "--wait")
            expect(page.locator(".build .job.done")).to_have_count(5, timeout=20_000)
            page.screenshot(path=str(tmp_path / "admitted.png"), full_page=True)
            if SCREENSHOT:
                shutil.copy(tmp_path / "admitted.png", REPO / SCREENSHOT)
        finally:
            browser.close()


def test_the_history_charts_draw_the_series_and_the_range_buttons_change_it(
        swarm: Swarm, tmp_path: Path) -> None:
    """The History section: four uPlot charts with points from the node's time series, a
    build in the history table with its sparkline, and the range buttons asking for a
    different span (the served charting library, never the internet)."""
    nodes, _token = swarm.loopback(2, 30)
    first = nodes[0]
    swarm.wait_for(lambda: swarm.query(first, "status")["leader"], 20, "a leader")
    plan = tmp_path / "charted.toml"
    plan.write_text('name = "charted"\n' + "".join(
        f'[jobs.j{i}]\ncmd = "sleep 0.3"\n' for i in range(6)))
    build_id = json.loads(swarm.cli(first, "build", str(plan), "--wait", "--json").stdout)[
        "build"]
    finished = swarm.query(first, "jobs", build=build_id)
    assert all(j["state"] == "done" for j in finished)

    def finished_in_series() -> bool:
        view = swarm.query(first, "history", since=3600)
        return sum(p[view["columns"].index("finished")] for p in view["points"]) == 6

    swarm.wait_for(finished_in_series, 30, "the build's jobs in the series")
    url = swarm.cli(first, "dashboard").stdout.strip()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            asked: list[str] = []
            page.on("request", lambda r: asked.append(r.url))
            page.goto(url)
            expect = playwright.expect
            for chart in ("ch_watts", "ch_cores", "ch_jobs", "ch_load"):
                expect(page.locator(f"#{chart} .uplot canvas")).to_have_count(1, timeout=20_000)
            assert int(page.get_attribute("#ch_jobs", "data-points") or 0) >= 1
            row = page.locator(f'#buildhist tr[data-build="{build_id}"]')
            expect(row).to_have_count(1)
            expect(row.locator("svg.spark polyline")).to_have_count(1)
            assert "charted" in row.inner_text()
            expect(page.locator("#histsum")).to_contain_text("the last day")
            page.locator('button.range[data-s="3600"]').click()
            expect(page.locator("#histsum")).to_contain_text("the last hour")
            expect(page.locator('button.range.on')).to_have_text("hour")
            assert any(u.endswith("/api/history?since=3600") for u in asked)
            assert all(u.startswith(url.split("?")[0].rstrip("/")) for u in asked), asked
            page.locator("#history").screenshot(path=str(tmp_path / "history.png"))
            if SCREENSHOT:
                shutil.copy(tmp_path / "history.png",
                            REPO / Path(SCREENSHOT).with_name("history.png"))
        finally:
            browser.close()


def test_viewing_and_acting_need_the_token_even_on_localhost(swarm: Swarm) -> None:
    """Another user of this machine can neither view (job output, members) nor act."""
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    base = swarm.query(node, "status")["dashboard"]
    token = (node.home / "dashboard.token").read_text().strip()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base, timeout=5)
    assert info.value.code == 401
    with urllib.request.urlopen(f"{base}?token={token}", timeout=5) as r:
        assert r.status == 200 and b"swarmnode" in r.read()
        script_src = next(d for d in r.headers["Content-Security-Policy"].split("; ")
                          if d.startswith("script-src"))
        # the page's own script by its hash, the charting library from the node itself
        assert script_src.startswith("script-src 'self' 'sha256-") and "unsafe" not in script_src
    request = urllib.request.Request(base + "api/action", method="POST",
                                     data=json.dumps({"action": "ban", "target": "-"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 401
    request.add_header("Authorization", f"Bearer {token}")
    with pytest.raises(urllib.error.HTTPError) as info:  # with it: judged like the CLI's
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "no node" in json.loads(info.value.read())["error"]


def test_the_page_shows_a_build_a_jobs_output_and_cancels_it(swarm: Swarm,
                                                             tmp_path: Path) -> None:
    node, _token = swarm.init("n1", loopback_addr(1))
    swarm.start(node)
    swarm.wait_for(lambda: swarm.query(node, "status")["leader"] == node.id, 20, "leading")
    plan = tmp_path / "talk.toml"
    plan.write_text('name = "talk"\n[jobs.hello]\ncmd = "echo hello from the page; sleep 60"\n'
                    '[jobs.after]\ncmd = "true"\ndeps = ["hello"]\n'
                    '[jobs.quick]\ncmd = "sleep 0.3"\n')
    build_id = json.loads(swarm.cli(node, "build", str(plan), "--json").stdout)["build"]
    url = swarm.cli(node, "dashboard").stdout.strip()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            expect = playwright.expect
            job = page.locator(f'.job.running[data-job="{build_id}/hello"]')
            expect(job).to_have_count(1, timeout=20_000)
            expect(job).to_contain_text("hello · n1")  # the job's node on its chip
            done = page.locator(f'.job.done[data-job="{build_id}/quick"]')
            expect(done).to_contain_text(" s", timeout=20_000)  # and, once ended, its time
            assert 0.2 <= float(done.inner_text().split(" · ")[-1].removesuffix(" s")) < 5
            expect(page.locator(f'.build[data-build="{build_id}"] .energy')).to_contain_text(
                "Wh", timeout=20_000)
            expect(page.locator('#members tr[data-name="n1"] .current')).to_contain_text(
                "hello")
            expect(page.locator(f'.job.queued[data-job="{build_id}/after"]')).to_have_count(1)
            job.click()
            expect(page.locator("#log")).to_contain_text("hello from the page",
                                                         timeout=10_000)
            assert "running on n1" in page.inner_text("#logtitle")
            page.locator(f'button.cancel[data-build="{build_id}"]').click()
            expect(page.locator(f'.job.cancelled[data-job="{build_id}/hello"]')).to_have_count(
                1, timeout=20_000)
            assert swarm.query(node, "build_status", build=build_id)["finished"]
        finally:
            browser.close()
