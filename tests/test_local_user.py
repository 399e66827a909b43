"""The local Unix user row of docs/security.md, on a real node: another user of the machine can
neither steer the node (control socket), nor read its secrets and stores, nor read its
dashboard, though all of them are on the same machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from swarmnode import control
from tests.swarm import (
    Swarm,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

NOBODY = 65534
SECRETS = ("identity.key", "dashboard.token", "state.db", "ledger.db", "events.jsonl")


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a Python of another user (nobody), with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-I", "-c", code],
        capture_output=True, text=True, timeout=30, check=False)


def test_another_user_can_neither_steer_nor_read_the_node(swarm: Swarm) -> None:
    (node,), _token = swarm.loopback(1, 30)
    home = node.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE(control.socket_path(home).stat().st_mode) == 0o600
    for name in SECRETS:
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    url = swarm.query(node, "status")["dashboard"]
    try:
        urllib.request.urlopen(url + "api/state", timeout=5)
        raise AssertionError("the dashboard answered without the token")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    # The same attempts as another user: the socket and every secret are refused by the kernel.
    # (Opening the home's files needs search permission on every directory above it too, so
    # each attempt names its own failure.)
    probe = as_nobody(
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(control.socket_path(home))!r})\n    print('connected')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
        f"for n in {SECRETS!r}:\n"
        "    try:\n"
        f"        open({str(home)!r} + '/' + n, 'rb').read(1)\n        print('read', n)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n")
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.split()
    assert "connected" not in lines and not any(w == "read" for w in lines), probe.stdout
    assert lines.count("PermissionError") == 1 + len(SECRETS), probe.stdout
