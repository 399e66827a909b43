"""`swarmnode monitor`'s frame at the sizes people run it in: numbers are never cut."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from cli.monitor import render


def snapshot(n: int) -> dict[str, Any]:
    nodes, power = [], {}
    for i in range(n):
        nid = f"id{i:02d}"
        nodes.append({
            "id": nid, "name": f"build-container-with-a-long-name-{i}", "leader": i == 0,
            "addresses": [f"100.101.102.{i}:7946"], "observed": f"192.168.77.{i}:40123",
            "nat": i % 2 == 1, "path": {"how": "ssh", "via": ["jump1", "jump2"]},
            "current": ["dev-lang/rust-1.83.0:compile"] if i % 3 == 0 else [],
            "paused": False, "state": "alive", "kind": "lxc", "arch": "x86_64",
            "cores": 128, "version": "0.1.0+a1b2c3d"})
        power[nid] = {"load": 12.75, "watts": 1234.5}
    return {"status": {"cores_online": 128 * n, "cores_total": 128 * n, "nodes_alive": n,
                       "pending": 0, "term": 7, "cluster_watts": 1234.5 * n},
            "leader_name": nodes[0]["name"], "nodes": nodes, "power": power,
            "running": {"id00": 3}, "builds": [], "events": []}


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (160, 50)])
def test_cores_load_and_watts_are_whole_at_any_width(width: int, height: int) -> None:
    console = Console(width=width, height=height, record=True, color_system=None)
    console.print(render(snapshot(6), width, height))
    text = console.export_text()
    rows = [line for line in text.splitlines() if "lxc" in line]
    assert len(rows) == 6
    for row in rows:
        assert "128" in row and "12.75" in row and "1234.5" in row and "alive" in row, row
    assert "…" in text  # the words were cut to fit, not the numbers
