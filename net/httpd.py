"""A small HTTP/1.1 server on asyncio streams: the dashboard, `/metrics` and the binhost.

Why not a framework: a node serves a handful of fixed paths to a browser, Prometheus and
Portage, and a web framework's imports were a fifth of every node's memory. What this serves
is small and strict instead:

* requests: a request line and headers within `MAX_HEAD` bytes and `MAX_HEADERS` lines, read
  within `HEAD_TIMEOUT_S` of the first byte; a body only with `Content-Length` (at most
  `MAX_BODY`; `Transfer-Encoding` is refused), read within `BODY_TIMEOUT_S`; anything else
  gets a 4xx and the connection is closed;
* connections: at most `MAX_CONNECTIONS` at a time (another is closed at once), kept alive
  between requests for `IDLE_S`;
* responses: a body of known length, or a stream (server-sent events, a file) -- with a
  length when it is known, else delimited by closing the connection. HEAD gets the headers
  of GET and no body;
* a handler that raises gets a 500 and the server goes on; `stop` ends every connection at
  once (an open dashboard stream must not hold up a node's shutdown).

Rejections and handler errors are counted in `drops` (the node's drop counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote

from net.wire import DropCounter

log = logging.getLogger(__name__)

#: Request line plus headers: browsers send 1-2 KiB; 16 KiB is what most servers allow.
MAX_HEAD = 16 * 1024
#: Header lines in one request (browsers send about 20).
MAX_HEADERS = 100
#: A request body: only the dashboard's actions have one (a few hundred bytes of JSON).
MAX_BODY = 64 * 1024
#: A request's head must arrive this soon after its first byte (a slow sender holds a slot).
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
#: A kept-alive connection waits this long for its next request (Prometheus scrapes every
#: 15 s by default and a browser reuses a connection within a minute).
IDLE_S = 75.0
#: Connections at once: a dashboard holds a few, Portage fetches a few files at a time.
MAX_CONNECTIONS = 64

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")


class HttpError(Exception):
    """A request the server refuses: answered with `status` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    method: str
    target: str  # as sent: the path, percent-encoded, and the query
    headers: dict[str, str]  # names lower-case; repeated headers joined with ", "
    body: bytes = b""

    @property
    def path(self) -> str:
        """The target's path, percent-decoded."""
        return unquote(self.raw_path)

    @property
    def raw_path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters (the first of each name)."""
        pairs = parse_qsl(self.target.partition("?")[2], keep_blank_values=True)
        return {k: v for k, v in reversed(pairs)}

    @property
    def cookies(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in self.headers.get("cookie", "").split(";"):
            name, eq, value = part.strip().partition("=")
            if eq and name not in out:
                out[name] = value.strip('"')
        return out

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()


@dataclass
class Response:
    """A body of `body`, or the chunks of `stream` (with `length` when it is known: else the
    connection is closed after it). An answer to HEAD may give `length` with no body."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain",
             headers: dict[str, str] | None = None) -> Response:
        return cls(status, text.encode(), {"Content-Type": f"{content_type}; charset=utf-8",
                                           **(headers or {})})

    @classmethod
    def json(cls, data: str, status: int = 200) -> Response:
        """`data`: the JSON text already made (each caller dumps its own way)."""
        return cls.text(data, status, "application/json")


Handler = Callable[[Request], Awaitable[Response]]


class Server:
    """Serves `handler` on one address until `stop`."""

    def __init__(self, handler: Handler, drops: DropCounter | None = None) -> None:
        self.handler = handler
        self.drops = drops if drops is not None else DropCounter()
        self.bound: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host`:`port` (0: any free one); (host, port) bound. Raises OSError when
        it cannot."""
        self._server = await asyncio.start_server(self._connection, host, port,
                                                  limit=MAX_HEAD, reuse_address=True)
        self.bound = (host, int(self._server.sockets[0].getsockname()[1]))
        return self.bound

    async def stop(self) -> None:
        """Stop listening and end every connection, streams too."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= MAX_CONNECTIONS:
            self.drops.drop("http_too_many_connections")
            writer.close()
            return
        self._tasks.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            if self._server is not None:  # not our stop: the loop is going down
                raise
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, answer and write one request; whether the connection stays open."""
        try:
            async with asyncio.timeout(IDLE_S):
                first = await reader.readexactly(1)
        except asyncio.IncompleteReadError:
            return False  # the client closed between requests
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = first + await _read_head(reader)
            request = parse_head(head)
            if request.headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            async with asyncio.timeout(BODY_TIMEOUT_S):
                request.body = await reader.readexactly(_body_length(request.headers))
        except HttpError as exc:
            self.drops.drop("http_bad_request")
            await _write(writer, "GET", Response.text(exc.reason + "\n", exc.status), False)
            return False
        try:
            response = await self.handler(request)
        except Exception:  # a handler's bug: this request fails, the server goes on
            log.exception("HTTP %s %s failed", request.method, request.raw_path[:200])
            self.drops.drop("http_handler_error")
            response = Response.text("internal error\n", 500)
        keep = (response.stream is None or response.length is not None) and _keep_alive(
            request)
        await _write(writer, request.method, response, keep)
        return keep


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise HttpError(400, "request head cut short") from None
        raise


def parse_head(head: bytes) -> Request:
    """A request from its head (request line and headers, CRLF-terminated). Raises HttpError."""
    lines = head[:-4].split(b"\r\n")
    if len(lines) > MAX_HEADERS + 1:
        raise HttpError(431, "too many headers")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]):
        raise HttpError(400, "malformed request line")
    method, target = parts[0].decode("ascii"), parts[1]
    if not target.startswith(b"/") or any(c <= 0x20 or c >= 0x7F for c in target):
        raise HttpError(400, "the target must be an absolute path")
    headers: dict[str, str] = {"http-version": parts[2].decode("ascii")}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # (a folded line starts with a space)
            raise HttpError(400, "malformed header")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in ("content-length", "host") and key in headers:
            raise HttpError(400, f"repeated {key}")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(method, target.decode("ascii"), headers)


def _body_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported: send Content-Length")
    raw = headers.get("content-length", "0")
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, "malformed Content-Length")
    if int(raw) > MAX_BODY:
        raise HttpError(413, "request body too large")
    return int(raw)


def _keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.headers["http-version"] == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


async def _write(writer: asyncio.StreamWriter, method: str, response: Response,
                 keep: bool) -> None:
    try:
        await _send(writer, method, response, keep)
    finally:
        if response.stream is not None and hasattr(response.stream, "aclose"):
            await response.stream.aclose()  # (its file closes now, even when cut short)


async def _send(writer: asyncio.StreamWriter, method: str, response: Response,
                keep: bool) -> None:
    length = response.length
    if length is None and response.stream is None:
        length = len(response.body)
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {response.status} {phrase}"]
    lines += [f"{k}: {v}" for k, v in response.headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append(f"Connection: {'keep-alive' if keep else 'close'}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if method == "HEAD":
        await writer.drain()
        return
    if response.stream is None:
        writer.write(response.body)
        await writer.drain()
        return
    sent = 0
    async for chunk in response.stream:
        if length is not None and sent + len(chunk) > length:
            raise ConnectionError("the stream outgrew its length")  # (never send more)
        writer.write(chunk)
        sent += len(chunk)
        await writer.drain()
    if length is not None and sent != length:
        raise ConnectionError("the stream ended short of its length")
