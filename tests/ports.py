"""Free ports for test servers, chosen below Linux's ephemeral range (32768-60999).

A port the kernel hands out for `bind(0)` lies in the ephemeral range, where the outgoing
connections of every other test (and ZeroMQ's reconnects) also take their source ports, so
it can be taken again before the server binds it. Ports below the range are only ever taken
by explicit binds.

A port is free when chosen, and bound later: another test run on the same machine could
choose it in between. So each chosen port, and the one after it (a node's dashboard binds
its port + 1), is claimed for the rest of this process with a POSIX record lock on its byte
of one shared file: other runs skip it, and the kernel releases the claims when the process
exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path

LOW, HIGH = 20000, 32000
CLAIMS = Path(tempfile.gettempdir()) / "swarmnode-test-ports"

_claims_fd: int | None = None
_given: set[int] = set()  # chosen in this process (its own record locks never conflict)


def claim(port: int) -> bool:
    """Claim `port` and `port + 1` for this process, unless another process holds either
    (True also when the claims file cannot be opened: then only the bind test guards)."""
    global _claims_fd
    if _claims_fd is None:
        try:
            _claims_fd = os.open(CLAIMS, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return True
    try:
        fcntl.lockf(_claims_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 2, port, os.SEEK_SET)
    except OSError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` (swarmnode uses the same number for both),
    claimed with the next one for this process."""
    for _ in range(200):
        port = random.randint(LOW, HIGH)
        if {port - 1, port, port + 1} & _given or not claim(port):  # (a dashboard: + 1)
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(
                socket.AF_INET, socket.SOCK_DGRAM
            ) as u:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((host, port))
                u.bind((host, port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise RuntimeError("no free port found")
