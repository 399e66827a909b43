"""The node's HTTP side: Prometheus metrics at `/metrics` and its status at `/api/status`
(the dashboard's data), served on localhost unless told otherwise.

Bound to a loopback address, it answers reads without a token (whoever can reach it is on
this machine, as with `swarmnode status`). Bound anywhere else (`swarmnode dashboard --bind`),
every request needs the node's dashboard token -- `Authorization: Bearer TOKEN`, `?token=`
(which also sets a cookie, so a browser keeps it), or that cookie -- so a bind to the LAN is
never open by accident. The token lives in `<home>/dashboard.token`, mode 0600.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from net.addresses import split_hostport
from swarmnode.identity import write_secret

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard.token"
COOKIE = "swarmnode_token"


class HttpError(Exception):
    """The HTTP side could not bind where asked."""


def load_token(home: Path) -> str:
    """The node's dashboard token, made (0600) on first use."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
        if len(token) >= 32:
            return token
    except (OSError, UnicodeDecodeError):
        pass
    token = secrets.token_urlsafe(32)
    write_secret(path, token.encode("ascii"))
    return token


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class HttpApi:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.token = load_token(node.home)
        self.bind: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def open_reads(self) -> bool:
        return self.bind is not None and is_loopback(self.bind[0])

    def url(self, with_token: bool = False) -> str | None:
        if self.bind is None:
            return None
        host, port = self.bind
        shown = f"[{host}]" if ":" in host else host
        query = f"?token={self.token}" if with_token and not self.open_reads else ""
        return f"http://{shown}:{port}/{query}"

    async def start(self, bind: str, default_port: int) -> str:
        """Serve on `bind` (HOST[:PORT]; port 0: any free one), replacing a previous binding;
        the URL. Raises HttpError when the address cannot be bound."""
        try:
            host, port = split_hostport(bind, default_port)
        except ValueError as exc:
            raise HttpError(f"dashboard bind {bind!r}: {exc}") from None
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/status", self._status)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise HttpError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
        await self.stop()
        self._runner = runner
        bound = runner.addresses[0]
        self.bind = (host, int(bound[1]))
        return self.url() or ""

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        given = (request.query.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("Authorization", "").removeprefix("Bearer ").strip())
        good = bool(given) and hmac.compare_digest(given.encode(), self.token.encode())
        if not good and not self.open_reads:
            self.node.drops.drop("http_unauthorised")
            raise web.HTTPUnauthorized(text="a token is needed: swarmnode dashboard shows the URL")
        response = await handler(request)
        if good and request.query.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return response

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.node.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST,
                                     "X-Content-Type-Options": "nosniff"})

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(self.node.status())
