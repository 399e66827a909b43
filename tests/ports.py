"""Free ports for test servers, chosen below Linux's ephemeral range (32768-60999).

A port the kernel hands out for `bind(0)` lies in the ephemeral range, where the outgoing
connections of every other test (and ZeroMQ's reconnects) also take their source ports, so
it can be taken again before the server binds it. Ports below the range are only ever taken
by explicit binds.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32000


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` (swarmnode uses the same number for both)."""
    for _ in range(200):
        port = random.randint(LOW, HIGH)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(
                socket.AF_INET, socket.SOCK_DGRAM
            ) as u:
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((host, port))
                u.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port found")
