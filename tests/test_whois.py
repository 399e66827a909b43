"""The UDP whois exchange on loopback: a seed address yields the id listening there."""

from __future__ import annotations

import asyncio

from net import whois
from swarmnode.identity import Identity
from tests.ports import free_port


async def test_whois_returns_the_signed_identity():
    ident = Identity.generate()
    port = free_port()
    server = await whois.serve(ident, "c" * 32, f"127.0.0.1:{port}")
    try:
        answer = await whois.whois(f"127.0.0.1:{port}", timeout=3.0)
        assert answer == whois.WhoisAnswer(ident.id, "c" * 32)
    finally:
        server.close()


async def test_whois_to_a_silent_address_gives_none():
    port = free_port()  # nothing listens there
    assert await whois.whois(f"127.0.0.1:{port}", timeout=0.3) is None


def test_answer_for_another_nonce_or_forged_is_rejected():
    ident = Identity.generate()
    nonce = b"n" * whois.NONCE_LEN
    sig = ident.sign(whois.DOMAIN + nonce + b"c")
    import msgpack

    good = whois.ANSWER + msgpack.packb([ident.id, "c", sig])
    assert whois.parse_answer(good, nonce) == whois.WhoisAnswer(ident.id, "c")
    assert whois.parse_answer(good, b"m" * whois.NONCE_LEN) is None
    other = Identity.generate()
    assert whois.parse_answer(whois.ANSWER + msgpack.packb([other.id, "c", sig]), nonce) is None
    for junk in (b"", whois.ANSWER, whois.ANSWER + b"\xc1", b"x" * 600, good[:-3]):
        assert whois.parse_answer(junk, nonce) is None


async def test_server_ignores_junk_and_rate_limits():
    ident = Identity.generate()
    proto = whois.WhoisServer(ident, "")
    sent: list[bytes] = []

    class FakeTransport:
        def sendto(self, data: bytes, addr: tuple) -> None:
            sent.append(data)

    proto.connection_made(FakeTransport())  # type: ignore[arg-type]
    proto.datagram_received(b"junk", ("127.0.0.1", 1))
    assert proto.dropped == 1 and not sent
    request = whois.REQUEST + b"r" * whois.NONCE_LEN
    for _ in range(int(whois.RATE_PER_S) * 3):
        proto.datagram_received(request, ("127.0.0.1", 1))
    assert int(whois.RATE_PER_S) <= len(sent) < int(whois.RATE_PER_S) * 2
    assert proto.dropped > 0
    await asyncio.sleep(0)
