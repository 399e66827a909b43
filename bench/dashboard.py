"""The dashboard's update latency and what an open page costs the node serving it.

Three real nodes on loopback addresses (shipped default timers). A headless Chromium (Debian's,
driven by Playwright) opens n1's dashboard. Latency: `--repeats` times, a member is renamed
through n1's control socket (the `renamed` event happens on n1 at once) and the time is taken
until the new name is in the page's node table: event, snapshot, server-sent event, render.
Cost: n1's CPU (from /proc) over `--seconds` with the page open, beside the same span with no
page, alternating `--rounds` times; medians reported.

    .venv/bin/python bench/dashboard.py [--repeats 20] [--seconds 20] [--rounds 3]

Results on stdout and in /tmp/swarmnode-bench/dashboard.json. Needs /usr/bin/chromium
(scripts/setup installs it as root).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
sys.path.insert(0, str(snapshot.source()))

from playwright.sync_api import expect, sync_playwright

from swarmnode import control
from tests.swarm import Swarm, loopback_addr
from tests.test_dashboard_browser import ARGS, CHROMIUM


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "dashboard", swarmnode=False)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    swarm = Swarm(Path(tempfile.mkdtemp(prefix="swarmnode-bench-dash-")))
    try:
        founder, token = swarm.init("n1", loopback_addr(1))
        swarm.start(founder, fast=False)
        nodes = [founder] + [swarm.start(swarm.add(f"n{i}", loopback_addr(i)), token,
                                         fast=False) for i in (2, 3)]
        swarm.wait_converged(nodes, 60)
        url = swarm.cli(founder, "dashboard").stdout.strip()
        pid = control.call(founder.home, "status")["pid"]
        renamed = nodes[2]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#nodes")).to_have_text("3", timeout=20_000)
            latencies = []
            for i in range(args.repeats):
                name = f"renamed{i}"
                t0 = time.perf_counter()
                control.call(founder.home, "rename", node=renamed.id, name=name)
                expect(page.locator(f'#members tr[data-name="{name}"]')).to_have_count(
                    1, timeout=10_000)
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.2)  # (spacing between trials, not a measurement)
            busy: dict[str, list[float]] = {"open": [], "closed": []}
            for _ in range(args.rounds):
                for state in ("open", "closed"):
                    if state == "closed":
                        page.goto("about:blank")
                    elif page.url == "about:blank":
                        page.goto(url)
                    before = snapshot.cpu_seconds(pid)
                    time.sleep(args.seconds)  # the span measured
                    busy[state].append((snapshot.cpu_seconds(pid) - before) / args.seconds)
            browser.close()
    finally:
        swarm.close()
    res = {"commit": snapshot.commit(),
           "latency_ms": {"median": round(statistics.median(latencies) * 1000, 1),
                          "max": round(max(latencies) * 1000, 1),
                          "each": [round(x * 1000, 1) for x in latencies]},
           "cpu_percent": {k: round(statistics.median(v) * 100, 2) for k, v in busy.items()},
           "cpu_percent_each": {k: [round(x * 100, 2) for x in v] for k, v in busy.items()}}
    res["cpu_percent"]["extra"] = round(res["cpu_percent"]["open"]
                                        - res["cpu_percent"]["closed"], 2)
    print(f"event → visible: median {res['latency_ms']['median']} ms, max "
          f"{res['latency_ms']['max']} ms ({args.repeats} renames)")
    print(f"n1 CPU, % of one core: page open {res['cpu_percent']['open']}, closed "
          f"{res['cpu_percent']['closed']}, extra {res['cpu_percent']['extra']}")
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
