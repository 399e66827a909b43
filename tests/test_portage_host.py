"""Finding a node's Portage, its Python, and running its commands without leaving any behind."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from swarmnode.portage.host import PortageError, PortageHost, find


def _emerge(where: Path, first_line: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    emerge = where / "emerge"
    emerge.write_text(first_line + "\nexit 0\n")
    emerge.chmod(0o755)
    return emerge


def test_the_configured_emerge_wins_and_a_bad_one_is_a_clear_error(tmp_path: Path) -> None:
    emerge = _emerge(tmp_path / "prefix/bin", "#!/bin/sh")
    host = find(str(emerge), path="/nonexistent")
    assert host is not None and host.bin_dir == emerge.parent
    assert host.path.startswith(f"{emerge.parent}:")  # Portage's directory first for jobs
    with pytest.raises(PortageError, match="not an executable"):
        find(str(tmp_path / "nope"))
    assert find(None, path=str(tmp_path / "empty")) is None  # not a Gentoo host
    assert find(None, path=str(emerge.parent)) == host


def test_portages_python_is_read_from_emerges_first_line(tmp_path: Path) -> None:
    venv = _emerge(tmp_path / "a/bin", f"#!{sys.executable}")
    assert PortageHost(venv).python() == sys.executable
    env = _emerge(tmp_path / "b/bin", "#!/usr/bin/env python3")
    assert Path(PortageHost(env).python()).name.startswith("python3")
    wrapper = _emerge(tmp_path / "c/bin", "#!/usr/lib/python-exec/python-exec2")
    assert Path(PortageHost(wrapper).python()).name.startswith("python3")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_command_past_its_time_or_whose_caller_is_cancelled_is_killed(
        tmp_path: Path) -> None:
    host = PortageHost(_emerge(tmp_path / "bin", "#!/bin/sh"))
    pidfile = tmp_path / "pid"
    script = f'echo $$ > {pidfile}; exec sleep 60'
    with pytest.raises(PortageError, match="did not finish"):
        await host.run(["sh", "-c", script], timeout=0.5)
    assert not _alive(int(pidfile.read_text()))

    pidfile.unlink()
    task = asyncio.create_task(host.run(["sh", "-c", script]))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(pid)
