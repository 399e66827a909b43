"""Learn which identity listens at a seed address, so a CURVE connection to it can be opened.

CURVE needs the server's public key before the first byte, but `--seed HOST:PORT` and
Tailscale peers give only an address. A tiny UDP exchange on the same port number answers
"which node id is here?" with the id and a signature over the asker's nonce. The answer is a
hint, not trust: the CURVE handshake that follows proves the identity, and an attacker who
answers with its own id gains nothing (it is not a member, so it gets no data).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import msgpack

from net.addresses import split_hostport
from swarmnode.identity import Identity, is_node_id, verify

REQUEST = b"SWNWHO1"
ANSWER = b"SWNIAM1"
NONCE_LEN = 16
DOMAIN = b"swarmnode-whois-v1"
#: Answers per second; whois is used at start-up and on reconnect, never in a hot path,
#: so a low cap keeps the UDP port useless as a reflection amplifier.
RATE_PER_S = 50.0
MAX_ANSWER = 512


@dataclass(frozen=True, slots=True)
class WhoisAnswer:
    id: str
    cluster: str


def _signed(nonce: bytes, cluster: str) -> bytes:
    return DOMAIN + nonce + cluster.encode()


class WhoisServer(asyncio.DatagramProtocol):
    def __init__(self, identity: Identity, cluster: str) -> None:
        self.identity = identity
        self.cluster = cluster
        self.transport: asyncio.DatagramTransport | None = None
        self._allowance = RATE_PER_S
        self._last = time.monotonic()
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) != len(REQUEST) + NONCE_LEN or not data.startswith(REQUEST):
            self.dropped += 1
            return
        now = time.monotonic()
        self._allowance = min(RATE_PER_S, self._allowance + (now - self._last) * RATE_PER_S)
        self._last = now
        if self._allowance < 1:
            self.dropped += 1
            return
        self._allowance -= 1
        nonce = data[len(REQUEST) :]
        sig = self.identity.sign(_signed(nonce, self.cluster))
        body = msgpack.packb([self.identity.id, self.cluster, sig], use_bin_type=True)
        assert self.transport is not None
        self.transport.sendto(ANSWER + body, addr)


async def serve(identity: Identity, cluster: str, listen: str) -> asyncio.DatagramTransport:
    host, port = split_hostport(listen, 0)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: WhoisServer(identity, cluster), local_addr=(host or "0.0.0.0", port)
    )
    return transport


def parse_answer(data: bytes, nonce: bytes) -> WhoisAnswer | None:
    """The verified answer to our `nonce`, or None for anything else."""
    if not data.startswith(ANSWER) or len(data) > MAX_ANSWER:
        return None
    try:
        node_id, cluster, sig = msgpack.unpackb(
            data[len(ANSWER) :], raw=False, max_bin_len=128, max_str_len=128, max_array_len=3
        )
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not (is_node_id(node_id) and isinstance(cluster, str) and isinstance(sig, bytes)):
        return None
    if not verify(node_id, _signed(nonce, cluster), sig):
        return None
    return WhoisAnswer(node_id, cluster)


class _Client(asyncio.DatagramProtocol):
    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self.answer: asyncio.Future[WhoisAnswer] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        parsed = parse_answer(data, self.nonce)
        if parsed is not None and not self.answer.done():
            self.answer.set_result(parsed)


async def whois(hostport: str, timeout: float = 1.0, tries: int = 3) -> WhoisAnswer | None:
    """Ask `hostport` which node id listens there; None when nothing valid answers."""
    host, port = split_hostport(hostport, 0)
    nonce = os.urandom(NONCE_LEN)
    loop = asyncio.get_running_loop()
    try:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Client(nonce), remote_addr=(host, port)
        )
    except OSError:
        return None
    try:
        for _ in range(tries):
            transport.sendto(REQUEST + nonce)
            try:
                async with asyncio.timeout(timeout / tries):
                    return await asyncio.shield(proto.answer)
            except TimeoutError:  # asyncio.timeout keeps an outer cancellation a cancellation
                continue
        return None
    finally:
        transport.close()
