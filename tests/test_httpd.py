"""net/httpd on real loopback sockets: requests parsed strictly, kept-alive connections,
HEAD, bodies, streams with and without a length, what is refused (and counted), a handler's
error contained, the connection cap, and a stop that ends open streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from net import httpd
from net.httpd import Request, Response, Server

pytestmark = pytest.mark.timeout(30)

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def echo(request: Request) -> Response:
    """What the server parsed, as text."""
    return Response.text(f"{request.method} {request.path} {sorted(request.query.items())} "
                         f"{request.cookies} {request.headers.get('x-a')} {request.body!r}")


def serve(handler: Callable[[Request], Awaitable[Response]],
          body: Callable[[Server, int], Awaitable[None]]) -> Server:
    async def main() -> Server:
        server = Server(handler)
        _host, port = await server.start("127.0.0.1", 0)
        try:
            await body(server, port)
        finally:
            await server.stop()
        return server
    return asyncio.run(main())


async def connect(port: int) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port)


async def response(reader: asyncio.StreamReader, head_only: bool = False
                   ) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body (by length, else to close)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")[:-2]
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    if head_only:
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        return await reader.read() == b""


def test_requests_on_one_kept_alive_connection_are_parsed_and_answered() -> None:
    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET /a%20b?x=1&y=&x=2 HTTP/1.1\r\nHost: h\r\nX-A: one\r\nx-a: two\r\n"
                     b"Cookie: c=d; e=\"f\"\r\n\r\n")
        status, headers, text = await response(reader)
        assert status == 200 and headers["connection"] == "keep-alive"
        assert text == (b"GET /a b [('x', '1'), ('y', '')] {'c': 'd', 'e': 'f'} one, two b''")
        writer.write(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await response(reader))[2] == b"POST /p [] {} None b'hello'"
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n")
        status, headers, _ = await response(reader, head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        writer.write(b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        status, headers, text = await response(reader)  # (HEAD sent no body before it)
        assert text.startswith(b"GET /last ") and headers["connection"] == "close"
        assert await closed(reader)
        writer.close()
    serve(echo, body)


def test_an_http_1_0_request_without_keep_alive_closes() -> None:
    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert (await response(reader))[0] == 200
        assert await closed(reader)
        writer.close()
    serve(echo, body)


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (httpd.MAX_BODY + 1), 413),
    (b"GET / HTTP/1.1\r\nA: " + b"x" * httpd.MAX_HEAD + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * (httpd.MAX_HEADERS + 1) + b"\r\n", 431),
])
def test_a_malformed_or_oversized_request_is_refused_counted_and_closed(
        raw: bytes, status: int) -> None:
    async def body(server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(raw)
        got, headers, _ = await response(reader)
        assert got == status and headers["connection"] == "close"
        assert await closed(reader)
        assert server.drops["http_bad_request"] == 1
        writer.close()
    serve(echo, body)


def test_a_handler_that_raises_gets_a_500_and_the_server_goes_on() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/bug":
            raise RuntimeError("a bug")
        return await echo(request)

    async def body(server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET /bug HTTP/1.1\r\n\r\nGET /fine HTTP/1.1\r\n\r\n")
        assert (await response(reader))[0] == 500
        assert (await response(reader))[2].startswith(b"GET /fine ")
        assert server.drops["http_handler_error"] == 1
        writer.close()
    serve(handler, body)


def test_streams_with_a_length_keep_the_connection_and_without_one_end_it() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"ab", b"cd", b"e"):
            yield part

    async def handler(request: Request) -> Response:
        return Response(stream=chunks(), length=5 if request.path == "/sized" else None)

    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET /sized HTTP/1.1\r\n\r\n")
        assert (await response(reader))[2] == b"abcde"
        writer.write(b"GET /open HTTP/1.1\r\n\r\n")
        _status, headers, text = await response(reader)
        assert "content-length" not in headers and headers["connection"] == "close"
        assert text == b"abcde"
        writer.close()
    serve(handler, body)


def test_a_stream_that_outgrows_its_length_is_cut_off() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    async def handler(_request: Request) -> Response:
        return Response(stream=chunks(), length=4)

    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        assert await reader.read() == b"abc"  # never more than it said
        writer.close()
    serve(handler, body)


def test_stop_ends_an_open_stream_and_its_cleanup_runs() -> None:
    ended = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: x\n\n"
                started.set()
                await asyncio.Event().wait()
        finally:
            ended.set()

    async def handler(_request: Request) -> Response:
        return Response(stream=forever())

    async def main() -> None:
        server = Server(handler)
        _host, port = await server.start("127.0.0.1", 0)
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await started.wait()
        async with asyncio.timeout(5):
            await server.stop()
        assert ended.is_set()
        assert (await reader.read()).startswith(b"data: x")  # then the close
        writer.close()
    asyncio.run(main())


def test_a_client_gone_mid_stream_ends_the_stream_and_its_cleanup_runs() -> None:
    ended = asyncio.Event()

    async def forever() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0)
        finally:
            ended.set()

    async def handler(_request: Request) -> Response:
        return Response(stream=forever())

    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()
        async with asyncio.timeout(5):
            await ended.wait()
    serve(handler, body)


def test_connections_beyond_the_cap_are_closed_at_once_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "MAX_CONNECTIONS", 2)

    async def body(server: Server, port: int) -> None:
        held = [await connect(port) for _ in range(2)]
        for reader, writer in held:  # (each is being served before the next dials)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert (await response(reader))[0] == 200
        reader, writer = await connect(port)
        assert await closed(reader)
        assert server.drops["http_too_many_connections"] == 1
        held[0][1].close()
        await held[0][1].wait_closed()
        async with asyncio.timeout(5):  # a slot is free again once the server saw the close
            while True:
                reader, writer = await connect(port)
                writer.write(b"GET / HTTP/1.1\r\n\r\n")
                try:
                    if (await response(reader))[0] == 200:
                        break
                except asyncio.IncompleteReadError:
                    pass
        for _r, w in held[1:]:
            w.close()
    serve(echo, body)


def test_head_of_a_stream_sends_its_length_and_no_body() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"never sent"

    async def handler(_request: Request) -> Response:
        return Response(stream=chunks(), length=10)

    async def body(_server: Server, port: int) -> None:
        reader, writer = await connect(port)
        writer.write(b"HEAD / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n")
        for _ in range(2):
            status, headers, _ = await response(reader, head_only=True)
            assert status == 200 and headers["content-length"] == "10"
        writer.close()
    serve(handler, body)
