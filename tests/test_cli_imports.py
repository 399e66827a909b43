"""The command line starts light: what `join` needs to parse and exec the node is typer and a
few small modules; rich, the control socket's client (asyncio) and the cluster's modules come
only with the commands that use them (they were half of `join`'s 0.2 s of CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.imports import loaded_by
from tests.swarm import REPO


def test_importing_the_cli_leaves_rich_asyncio_and_the_cluster_for_later() -> None:
    assert loaded_by("cli.main", ("rich.console", "rich.table", "asyncio", "swarmnode.control",
                                  "swarmnode.cluster", "swarmnode.token")) == []


def test_commands_still_print_through_rich(tmp_path: Path) -> None:
    """A command that prints loads rich when it prints: `id` makes and shows a home's id,
    `token` without a cluster says why in rich's red."""
    home = ["--home", str(tmp_path / "home")]
    node_id = subprocess.run([sys.executable, "-m", "cli.main", *home, "id"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert len(node_id.strip()) == 52
    res = subprocess.run([sys.executable, "-m", "cli.main", *home, "token"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "error:" in res.stderr
