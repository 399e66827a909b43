"""`swarmnode monitor` in a real pseudo-terminal of 80x24 against a running swarm: it draws
the swarm, shows a node that turns up pending without being restarted, a node's current job
and a paused node as they happen, and `q` quits with the terminal given back (the alternate
screen left)."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.swarm import (
    CLI,
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


class Terminal:
    """A program on the slave side of a pty of `rows` x `cols`; its output, as bytes."""

    def __init__(self, argv: list[str], rows: int = 24, cols: int = 80) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols),
               "LINES": str(rows)}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.output = b""

    def read_until(self, needle: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} never showed; got {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # the program ended
                    raise AssertionError(f"{needle!r} never showed: {self.output!r}") from None
        return self.output

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_monitor_draws_the_swarm_and_q_quits(swarm: Swarm) -> None:
    nodes, _token = swarm.loopback(2, 30)
    swarm.wait_for(lambda: swarm.query(nodes[0], "status")["leader"], 20, "a leader")
    term = Terminal([*CLI, "--home", str(nodes[0].home), "monitor"])
    try:
        screen = term.read_until(b"recent events", 20)
        assert b"\x1b[?1049h" in screen  # the alternate screen: the shell's is kept intact
        cores = swarm.query(nodes[0], "status")["cores_online"]
        assert f"/{cores} cores".encode() in screen  # online (bold) / total
        assert f"{cores}".encode() in screen and b"n1" in screen and b"n2" in screen
        assert b"0 pending" in screen
        swarm.start(swarm.add("guest", loopback_addr(3)), seeds=[nodes[0].listen])
        term.read_until(b"1 pending", 20)  # redrawn without a restart
        term.read_until(b"guest", 5)
        # a node's current job and load, and a paused node, as they happen
        plan = nodes[0].home / "sleepy.toml"
        plan.write_text('[jobs.sleeper]\ncmd = "sleep 30"\n')
        swarm.cli(nodes[0], "build", str(plan))
        term.read_until(b"sleeper", 20)
        term.read_until(b"1 running", 5)
        swarm.cli(nodes[0], "pause", "n2")
        term.read_until(b"paused", 20)
        os.write(term.master, b"q")
        assert term.proc.wait(timeout=10) == 0
        term.read_until(b"\x1b[?1049l", 5)  # and left again
    finally:
        term.close()
