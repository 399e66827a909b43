"""`swarmnode monitor`: the swarm at a glance in the terminal, refreshed every second.

The same snapshot the dashboard streams (`snapshot` over the control socket), drawn with
rich for any terminal from 80x24 up: the figures on one line, then the nodes (pending ones
highlighted), the running builds and as many recent events as fit. `q` quits (so does
Ctrl-C); the terminal is restored either way.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from swarmnode import control

REFRESH_S = 1.0
STATE_STYLE = {"pending": "bold black on yellow", "suspect": "red", "dead": "dim",
               "left": "dim", "banned": "dim strike", "paused": "yellow"}


def render(snap: dict[str, Any], width: int, height: int) -> Group:
    """One frame for a `width` x `height` terminal."""
    st = snap["status"]
    top = Text.assemble(
        ("swarmnode ", "bold"), (f"{st['cores_online']}", "bold green"),
        f"/{st.get('cores_total', '?')} cores  ",  # (a node before cores_total: "?")
        (f"{st['nodes_alive']}", "bold"), " nodes  ",
        (f"{st['pending']} pending", "bold black on yellow" if st["pending"] else ""), "  ",
        "leader ", (f"{snap['leader_name'] or 'none'}", "bold"), f" (term {st['term']})  ",
        (f"{st['cluster_watts']} W", "bold"), " in the swarm")
    nodes = Table(expand=True, box=None, padding=(0, 1), header_style="bold")
    # names and words share the width left (cut with an ellipsis when they must be); numbers
    # and the state take the width they need first: a cut number ("1…" watts) reads as a
    # wrong one
    for name, ratio in (("node", 3), ("state", None), ("kind", 2), ("arch", 2), ("cores", None),
                        ("load", None), ("route", 5), ("version", 2), ("job", 3), ("W", None)):
        if ratio is None:
            nodes.add_column(name, no_wrap=True, justify="left" if name == "state" else "right")
        else:
            nodes.add_column(name, ratio=ratio, no_wrap=True, overflow="ellipsis")
    for m in snap["nodes"]:
        route = (m["addresses"] or ["-"])[0]
        if m["observed"] and m["nat"]:
            route = f"{route} via {m['observed']} NAT"
        if m["path"]["how"] == "ssh":
            route = f"{route} ssh via {len(m['path']['via'])} jump"
        stated = snap["power"].get(m["id"], {})
        running = snap["running"].get(m["id"], 0)
        job = (m["current"] or [""])[0] + (f" +{running - 1}" if running > 1 else "")
        state = "paused" if m["paused"] and m["state"] == "alive" else m["state"]
        nodes.add_row(m["name"] + (" *" if m["leader"] else ""), state, m["kind"] or "",
                      m["arch"] or "", str(m["cores"] or ""), str(stated.get("load") or ""),
                      route, str(m["version"] or ""), job, str(stated.get("watts", "")),
                      style=STATE_STYLE.get(state, ""))
    parts: list[Any] = [top, nodes]
    used = 2 + len(snap["nodes"])
    for b in snap["builds"][:3]:
        if not b["finished"]:
            parts.append(Text(f"build {b['name']}: {b['done']}/{b['total']} done"
                              + (f", {b['running']} running" if b["running"] else "")
                              + (f", {b['blocked']} blocked" if b["blocked"] else "")))
            used += 1
    room = max(0, height - used - 2)
    if room:
        parts.append(Text("recent events", style="bold"))
        for ev in snap["events"][:room]:
            clock = time.strftime("%H:%M:%S", time.localtime(ev["ts"]))
            parts.append(Text(f"{clock} {ev['kind']} {ev['who']} {ev['detail']}"[:width],
                              overflow="ellipsis", no_wrap=True))
    parts.append(Text("q quits", style="dim"))
    return Group(*parts)


@contextlib.contextmanager
def _keys() -> Iterator[None]:
    """The terminal in cbreak mode (keys arrive one by one, unechoed), restored after."""
    if not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pressed_q(timeout: float) -> bool:
    """Wait up to `timeout` for a key; True when it is q."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        return False
    key = os.read(sys.stdin.fileno(), 16)
    return key[:1] in (b"q", b"Q") or not key  # (end of input: quit too)


def run(home: Any) -> None:
    console = Console()
    with _keys(), Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            try:
                snap = control.call(home, "snapshot", timeout=5)
                frame: Any = render(snap, console.width, console.height)
            except (control.ControlError, TimeoutError, OSError) as exc:
                frame = Text(f"the node in {home} does not answer: {exc}\nq quits")
            live.update(frame, refresh=True)
            if _pressed_q(REFRESH_S):
                return
