"""Learn which identity listens at a seed address, so a CURVE connection to it can be opened.

CURVE needs the server's public key before the first byte, but `--seed HOST:PORT` and
Tailscale peers give only an address. A tiny UDP exchange on the same port number answers
"which node id is here?" with the id and a signature over the asker's nonce. The answer is a
hint, not trust: the CURVE handshake that follows proves the identity, and an attacker who
answers with its own id gains nothing (it is not a member, so it gets no data).

The answer is never larger than the question: the asker pads its request with zeros to
REQUEST_LEN (the largest answer it accepts), and a request too short for the answer gets none,
so the port cannot reflect more bytes at a forged source address than it was sent.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import msgpack

from net.addresses import split_hostport
from net.wire import DropCounter
from swarmnode.identity import Identity, is_node_id, verify

REQUEST = b"SWNWHO1"
ANSWER = b"SWNIAM1"
NONCE_LEN = 16
SIG_LEN = 64  # Ed25519
DOMAIN = b"swarmnode-whois-v1"
#: Answers per second; whois is used at start-up and on reconnect, never in a hot path,
#: so a low cap keeps the UDP port useless as a reflection amplifier.
RATE_PER_S = 50.0
MAX_ANSWER = 512
#: A request: REQUEST + nonce + zeros, this long: any answer the asker accepts fits in it.
REQUEST_LEN = MAX_ANSWER


@dataclass(frozen=True, slots=True)
class WhoisAnswer:
    id: str
    cluster: str


def _signed(nonce: bytes, cluster: str) -> bytes:
    return DOMAIN + nonce + cluster.encode()


def request(nonce: bytes) -> bytes:
    """The padded request asking for an answer signed over `nonce`."""
    return (REQUEST + nonce).ljust(REQUEST_LEN, b"\0")


class WhoisServer(asyncio.DatagramProtocol):
    """Answers whois requests; drops (counted in `drops`, the node's counter) junk
    (`whois_malformed`), a request shorter than its answer (`whois_short`: the old unpadded
    form, or a reflection attempt) and requests over the rate (`whois_rate`)."""

    def __init__(self, identity: Identity, cluster: str, drops: DropCounter) -> None:
        self.identity = identity
        self.cluster = cluster
        self.drops = drops
        self.transport: asyncio.DatagramTransport | None = None
        self.answer_len = len(self._answer(bytes(SIG_LEN)))  # (a signature's size is fixed)
        self._allowance = RATE_PER_S
        self._last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _answer(self, sig: bytes) -> bytes:
        return ANSWER + msgpack.packb([self.identity.id, self.cluster, sig], use_bin_type=True)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        head = len(REQUEST) + NONCE_LEN
        if not data.startswith(REQUEST) or len(data) > REQUEST_LEN or len(data) < head \
                or data[head:].strip(b"\0"):
            self.drops.drop("whois_malformed")
            return
        if len(data) < self.answer_len:
            self.drops.drop("whois_short")
            return
        now = time.monotonic()
        self._allowance = min(RATE_PER_S, self._allowance + (now - self._last) * RATE_PER_S)
        self._last = now
        if self._allowance < 1:
            self.drops.drop("whois_rate")
            return
        self._allowance -= 1
        nonce = data[len(REQUEST) : head]
        assert self.transport is not None
        self.transport.sendto(self._answer(self.identity.sign(_signed(nonce, self.cluster))), addr)


async def serve(identity: Identity, cluster: str, listen: str,
                drops: DropCounter) -> asyncio.DatagramTransport:
    host, port = split_hostport(listen, 0)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: WhoisServer(identity, cluster, drops), local_addr=(host or "0.0.0.0", port)
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
            transport.sendto(request(nonce))
            try:
                async with asyncio.timeout(timeout / tries):
                    return await asyncio.shield(proto.answer)
            except TimeoutError:  # asyncio.timeout keeps an outer cancellation a cancellation
                continue
        return None
    finally:
        transport.close()
