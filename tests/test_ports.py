"""Test ports chosen by one test run are not chosen by another on the same machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import ports

REPO = Path(__file__).resolve().parent.parent
CHILD = """
import random, sys
from tests.ports import LOW, HIGH, claim
port = next(p for p in iter(lambda: random.randint(LOW, HIGH - 2), None) if claim(p))
print(port, flush=True)
sys.stdin.read()
"""


def test_a_port_another_process_claimed_is_skipped_until_that_process_ends() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        # its claim covers the port and the next one (a node's dashboard port)
        assert not ports.claim(port) and not ports.claim(port + 1)
        assert not ports.claim(port - 1)  # (port - 1 and port: overlaps it)
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(timeout=30)
    assert ports.claim(port)  # released with the process
