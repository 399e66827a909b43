"""The UDP whois exchange on loopback: a seed address yields the id listening there."""

from __future__ import annotations

from net import whois
from net.wire import DropCounter
from swarmnode.identity import Identity
from tests.ports import free_port


async def test_whois_returns_the_signed_identity():
    ident = Identity.generate()
    port = free_port()
    server = await whois.serve(ident, "c" * 32, f"127.0.0.1:{port}", DropCounter())
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


class _Sent:
    """A datagram transport that keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple) -> None:
        self.sent.append(data)


def _server(cluster: str = "c" * 32) -> tuple[whois.WhoisServer, _Sent, DropCounter]:
    drops, transport = DropCounter(), _Sent()
    proto = whois.WhoisServer(Identity.generate(), cluster, drops)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, drops


def test_server_ignores_junk_and_rate_limits():
    proto, transport, drops = _server()
    request = whois.request(b"r" * whois.NONCE_LEN)
    for junk in (b"junk", request + b"\0", request[:-1] + b"x", whois.REQUEST + b"n" * 15):
        proto.datagram_received(junk, ("127.0.0.1", 1))
    assert drops == {"whois_malformed": 4} and not transport.sent
    for _ in range(int(whois.RATE_PER_S) * 3):
        proto.datagram_received(request, ("127.0.0.1", 1))
    assert int(whois.RATE_PER_S) <= len(transport.sent) < int(whois.RATE_PER_S) * 2
    assert drops["whois_rate"] > 0


def test_an_answer_is_never_larger_than_its_request():
    """Regression (issue 13, item 9): a 23-byte request got a 162-byte answer, so a forged
    source address made the port a 7x reflector. Now the request is padded to the largest
    answer and one shorter than its answer (the old form included) is dropped and counted."""
    proto, transport, drops = _server()
    old_form = whois.REQUEST + b"r" * whois.NONCE_LEN  # 23 bytes, as before
    proto.datagram_received(old_form, ("127.0.0.1", 1))
    just_short = old_form.ljust(proto.answer_len - 1, b"\0")
    proto.datagram_received(just_short, ("127.0.0.1", 1))
    assert not transport.sent and drops == {"whois_short": 2}
    for size in (proto.answer_len, whois.REQUEST_LEN):
        proto.datagram_received(old_form.ljust(size, b"\0"), ("127.0.0.1", 1))
        assert len(transport.sent[-1]) <= size
    assert len(transport.sent) == 2
    assert whois.parse_answer(transport.sent[-1], b"r" * whois.NONCE_LEN) is not None
    longest = _server("c" * 128)[0]  # the longest cluster a client accepts still fits
    assert longest.answer_len <= whois.REQUEST_LEN == len(whois.request(b"n" * 16))
