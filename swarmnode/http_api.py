"""The node's HTTP side: Prometheus metrics at `/metrics` and its status at `/api/status`
(the dashboard's data), served on localhost unless told otherwise.

Every request needs the node's dashboard token -- `Authorization: Bearer TOKEN`, `?token=`
(which also sets a cookie, so a browser keeps it), or that cookie -- wherever it is bound:
the control socket is owner-only, and the dashboard shows as much (job output, the members),
so another local user must not read it either. The token lives in `<home>/dashboard.token`,
mode 0600. An operator may open chosen reads on purpose (`http_open_paths` in config.toml,
e.g. `/metrics` for a Prometheus without a bearer token); actions always need the token.

A request whose Host header is neither the bound address (an IP literal of this machine for
a wildcard bind; `localhost` for a loopback one) nor a name in `http_hosts` is refused: a
page on another site whose name was rebound to this address (DNS rebinding) sends its own
name, so it can neither read nor act even where reads are open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from net.addresses import is_loopback, split_hostport
from net.httpd import Request, Response, Server
from swarmnode import promtext
from swarmnode.control import ControlError
from swarmnode.identity import is_node_id, write_secret
from swarmnode.netmap import network_of, picture
from swarmnode.views import member_view

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

TOKEN_FILE = "dashboard.token"
COOKIE = "swarmnode_token"
#: The page's stream looks at the swarm at least this often (and at once on an event).
STREAM_S = 1.0
KEEPALIVE_S = 15.0
ACTIONS = ("admit", "ban", "pause", "resume", "cancel")
MAX_BUILDS, MAX_EVENTS, MAX_PUSHES = 10, 100, 5
#: The newest builds whose jobs the page lists (each at most MAX_JOBS of them).
JOB_BUILDS, MAX_JOBS = 3, 300
#: The page runs its own inline script -- that one only, by its hash: markup that slipped
#: through unescaped cannot run -- and inline style, talks only to this node, embeds nothing.
CSP = ("default-src 'none'; script-src 'self' {script}; style-src 'self' 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


#: The files under /static/ and their types: uPlot, the charting library the history draws
#: with (swarmnode/static/README.md).
STATIC = {"uplot.iife.min.js": "text/javascript; charset=utf-8",
          "uplot.min.css": "text/css; charset=utf-8"}


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


class HttpApi:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.token = load_token(node.home)
        self.bind: tuple[str, int] | None = None
        self._server: Server | None = None
        self._streams: set[asyncio.Event] = set()
        self._routes = {"/": self._page, "/metrics": self._metrics, "/api/status": self._status,
                        "/api/state": self._state, "/api/stream": self._stream,
                        "/api/logs": self._logs, "/api/history": self._history,
                        **{f"/static/{name}": functools.partial(self._static, name)
                           for name in STATIC}}

    @property
    def open_paths(self) -> tuple[str, ...]:
        """The reads the operator opened to requests without the token."""
        return self.node.node_config.http_open_paths

    def url(self, with_token: bool = False) -> str | None:
        if self.bind is None:
            return None
        host, port = self.bind
        shown = f"[{host}]" if ":" in host else host
        query = f"?token={self.token}" if with_token else ""
        return f"http://{shown}:{port}/{query}"

    async def start(self, bind: str) -> str:
        """Serve on `bind` (HOST[:PORT]; port 0: any free one), replacing a previous binding;
        the URL. Raises HttpError when the address cannot be bound."""
        try:
            host, port = split_hostport(bind, 0, any_port=True)
        except ValueError as exc:
            raise HttpError(f"dashboard bind {bind!r}: {exc}") from None
        # (each server checks Host against its own address: a re-bind serves before the old
        # one stops)
        server = Server(functools.partial(self._guard, host), self.node.drops)
        try:
            _host, bound = await server.start(host, port)
        except OSError as exc:
            raise HttpError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
        await self.stop()
        self._server = server
        self.bind = (host, bound)
        return self.url() or ""

    async def stop(self) -> None:
        """Stop serving; open streams end at once (an open page must not hold up a node's
        shutdown)."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    async def _guard(self, bound: str, request: Request) -> Response:
        """Refuse a foreign Host (421), then a request without the token (401) unless it is a
        read the operator opened; then the path's handler."""
        if not host_allowed(request.headers.get("host", ""), bound,
                            self.node.node_config.http_hosts):
            self.node.drops.drop("http_foreign_host")
            return Response.text("this Host is not the dashboard's address (add the name to "
                                 "http_hosts in config.toml)", 421)
        query = request.query
        given = (query.get("token") or request.cookies.get(COOKIE)
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        good = bool(given) and hmac.compare_digest(given.encode(), self.token.encode())
        read = request.method in ("GET", "HEAD")
        if not good and not (read and request.path in self.open_paths):
            self.node.drops.drop("http_unauthorised")
            return Response.text("a token is needed: swarmnode dashboard shows the URL", 401)
        if request.path == "/api/action":
            response = (await self._action(request) if request.method == "POST"
                        else Response.text("POST only", 405, headers={"Allow": "POST"}))
        elif (handler := self._routes.get(request.path)) is None:
            response = Response.text("not found", 404)
        elif not read:
            response = Response.text("GET or HEAD only", 405, headers={"Allow": "GET, HEAD"})
        else:
            response = await handler(request)
        if good and query.get("token"):
            response.headers["Set-Cookie"] = (f"{COOKIE}={self.token}; HttpOnly; Path=/; "
                                              "SameSite=Strict")
        return response

    async def _metrics(self, _request: Request) -> Response:
        return Response(body=self.node.metrics.exposition(),
                        headers={"Content-Type": promtext.CONTENT_TYPE,
                                 "X-Content-Type-Options": "nosniff"})

    async def _status(self, _request: Request) -> Response:
        return Response.json(json.dumps(self.node.status()))

    async def _history(self, request: Request) -> Response:
        """The swarm's time series and builds over `?since=SECONDS` (default a day)."""
        try:
            seconds = float(request.query.get("since", "86400"))
        except ValueError:
            return _error("since: a number of seconds", 400)
        return Response.json(_dumps(self.node.history_view(seconds, progress=True)))

    async def _static(self, name: str, _request: Request) -> Response:
        return Response(body=_static(name), headers={
            "Content-Type": STATIC[name], "Cache-Control": "max-age=86400",
            "X-Content-Type-Options": "nosniff"})

    async def _page(self, _request: Request) -> Response:
        text, csp = _page()
        return Response.text(text, content_type="text/html",
                             headers={"Content-Security-Policy": csp,
                                      "X-Content-Type-Options": "nosniff"})

    async def _state(self, _request: Request) -> Response:
        return Response.json(_dumps(self.snapshot()))

    def notify(self) -> None:
        """Something changed (an event): the streams send a snapshot now, not in a second."""
        for changed in self._streams:
            changed.set()

    async def _stream(self, _request: Request) -> Response:
        """Server-sent events (until the client or the server closes)."""
        return Response(headers={"Content-Type": "text/event-stream",
                                 "Cache-Control": "no-cache"}, stream=self._events())

    async def _events(self) -> AsyncIterator[bytes]:
        """The snapshot whenever it differs, looked at on each event and every STREAM_S; a
        comment line now and then keeps proxies from closing it."""
        changed = asyncio.Event()
        self._streams.add(changed)
        last, quiet = "", 0
        try:
            while True:
                data = _dumps(self.snapshot())
                if data != last:
                    yield f"data: {data}\n\n".encode()
                    last, quiet = data, 0
                elif (quiet := quiet + 1) * STREAM_S >= KEEPALIVE_S:
                    yield b": keepalive\n\n"
                    quiet = 0
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STREAM_S):
                        await changed.wait()
        finally:
            self._streams.discard(changed)

    async def _logs(self, request: Request) -> Response:
        """A job's record and output (`logs BUILD/JOB`), for a click on it."""
        try:
            return Response.json(_dumps(await self.node.builds.log_view(
                request.query.get("job", "")[:300])))
        except ControlError as exc:
            return Response.json(json.dumps({"error": str(exc)}), 404)

    async def _action(self, request: Request) -> Response:
        """admit, ban, pause, resume (a node) or cancel (a build), through the same code as
        the CLI; only with the token, as JSON (a cross-site form cannot send that), wherever
        it is bound."""
        if request.content_type != "application/json":
            return _error("send JSON", 415)
        try:
            body = json.loads(request.body)
        except ValueError:
            return _error("not JSON", 400)
        action = body.get("action") if isinstance(body, dict) else None
        target = body.get("target") if isinstance(body, dict) else None
        if action not in ACTIONS or not isinstance(target, str) or not target:
            return _error(f"action: one of {', '.join(ACTIONS)}, with a target", 400)
        args = {"build": target} if action == "cancel" else {"node": target, "via": "dashboard"}
        try:
            result = await self.node.handle_command(action, args)
        except ControlError as exc:
            return _error(str(exc), 400)
        self.node.event("dashboard_action", {"action": action, "target": target[:80]})
        return Response.json(json.dumps({"result": result}))

    def _path_to(self, peer: str, observed: str | None) -> dict[str, Any]:
        """How this node reaches `peer`: the route actions use (override, SSH jumps...), else
        the address its connection completed the handshake on, else only the peer's own
        inbound connection (it is behind NAT), else none yet. `via`: the jump hosts."""
        node = self.node
        if peer == node.id:
            return {"how": "this node", "via": [], "detail": ""}
        route = node.router.cached(peer)
        if route is not None:
            return {"how": route.method, "via": list(route.via),
                    "detail": " → ".join((*route.via, route.address))}
        shaken = [ep for _t, ev, ep in node.transport.connection_events(peer)
                  if ev == "handshake_ok"]
        if shaken:
            return {"how": "direct", "via": [], "detail": shaken[-1].removeprefix("tcp://")}
        if node.transport.inbound_age(peer) is not None:
            return {"how": "inbound", "via": [],
                    "detail": f"its connection from {observed or '?'}"}
        return {"how": "none", "via": [], "detail": ""}

    def _pushes(self) -> dict[str, Any]:
        """Each app pushed or rolled back: its newest release, the members on each release
        (by name), where a release was rolled back; and the pushes started from this node,
        newest first, with how each ended."""
        versions = self.node.push.versions()
        apps = sorted(versions["latest"].keys()
                      | {a for m in versions["nodes"] for a in m["rolled_back"]})
        out = []
        for app in apps:
            latest = versions["latest"].get(app)
            runs: dict[str, list[str]] = {}
            for m in versions["nodes"]:
                digest = m["apps"].get(app, {}).get("digest")
                runs.setdefault(digest[:12] if digest else "none", []).append(m["name"])
            out.append({
                "app": app, "digest": latest["digest"][:12] if latest else None,
                "by": self.node.member_name(latest["by"]) if latest else None,
                "current": len(runs.get(latest["digest"][:12], ())) if latest else 0,
                "behind": sum(len(v) for k, v in runs.items()
                              if not latest or k != latest["digest"][:12]),
                "releases": [{"digest": d, "nodes": sorted(n)} for d, n in sorted(runs.items())],
                "rolled_back": [{"node": m["name"], "digest": m["rolled_back"][app][:12]}
                                for m in versions["nodes"] if app in m["rolled_back"]]})
        service = self.node.push
        started = sorted(service.pushes.values(), key=lambda p: p.started, reverse=True)
        here = []
        for push in started[:MAX_PUSHES]:
            view = service.push_view(push.id)
            here.append({"push": push.id, "app": view["app"], "digest": view["digest"][:12],
                         "phase": view["phase"], "done": view["done"],
                         "halted": view["halted"], "counts": view["counts"],
                         "failures": view["failures"]})
        return {"apps": out, "here": here}

    def snapshot(self) -> dict[str, Any]:
        """The swarm as this node sees it, for the page."""
        node = self.node
        ledger = node.leadership.ledger
        running: dict[str, int] = {}
        current: dict[str, list[str]] = {}  # node -> its running jobs' names (a few)
        for job in ledger.active():
            if job.node:
                running[job.node] = running.get(job.node, 0) + 1
                if len(names := current.setdefault(job.node, [])) < 3:
                    names.append(job.name)
        price = node.node_config.price_per_kwh
        builds = []
        for n, build in enumerate(reversed(ledger.builds()[-MAX_BUILDS:])):
            progress = ledger.progress(build.build_id)
            jobs = [{"job": j.name, "state": j.state, "seconds": round(j.seconds, 2),
                     "node": node.member_name(j.node) if j.node else None}
                    for j in ledger.jobs(build.build_id)[:MAX_JOBS]] if n < JOB_BUILDS else []
            kwh = ledger.energy(build.build_id) / 3.6e6
            builds.append({"build": build.build_id, "name": build.name, "done": progress["done"],
                           "total": progress["total"], "blocked": progress["blocked"],
                           "running": progress["running"] + progress["assigned"],
                           "finished": ledger.finished(build.build_id), "jobs": jobs,
                           "kwh": kwh,
                           "cost": round(kwh * price, 4) if price is not None else None})
        events = []
        for ev in node.store.events(limit=MAX_EVENTS):
            who = ev.get("id")
            detail = {k: node.member_name(v) if isinstance(v, str) and is_node_id(v) else v
                      for k, v in ev.items() if k not in ("seq", "ts", "kind", "id")}
            events.append({"ts": ev["ts"], "kind": ev["kind"],
                           "who": node.member_name(who) if isinstance(who, str) and who else "",
                           "detail": " ".join(f"{k}={v}" for k, v in detail.items())[:200]})
        leader = node.leadership.leader
        nodes = []
        for m in node.core.members():
            view = member_view(node, m)
            view["network"] = network_of(view["addresses"])
            view["path"] = self._path_to(m.id, view["observed"])
            view["paused"] = m.id in ledger.paused
            view["current"] = current.get(m.id, [])
            nodes.append(view)
        return {"status": node.status(), "nodes": nodes, "network": picture(node.id, nodes),
                "running": running, "builds": builds, "events": events[::-1],
                "pushes": self._pushes(),
                "power": node.power_view(),
                "leader_name": node.member_name(leader) if leader else None}


def host_allowed(header: str, bound: str, names: tuple[str, ...]) -> bool:
    """Whether a request's Host header (`header`) names the server bound to `bound`: the bound
    address itself, any IP literal when bound to a wildcard address (whoever typed an address
    of this machine meant it), `localhost` when bound to loopback, or one of `names`. The port
    is not compared (a port-forward changes it); the name is what a rebound page cannot fake.
    """
    try:
        host = split_hostport(header, 80)[0].lower()
    except ValueError:
        return False
    if host in names or host == bound.lower():
        return True
    try:
        asked, ours = ipaddress.ip_address(host), ipaddress.ip_address(bound)
    except ValueError:
        return host == "localhost" and is_loopback(bound)
    return asked == ours or ours.is_unspecified


@functools.cache
def _static(name: str) -> bytes:
    """A file the page loads (swarmnode/static: the charting library), read once."""
    return resources.files("swarmnode").joinpath("static", name).read_bytes()


@functools.cache
def _page() -> tuple[str, str]:
    """The dashboard: one page (swarmnode/dashboard.html), no build step, nothing fetched from
    the internet. It follows `/api/stream` and posts actions to `/api/action` with the token
    the URL `swarmnode dashboard` prints carries (kept by the server in a same-site cookie).
    With it, the Content-Security-Policy that lets its one script run and no other."""
    text = resources.files("swarmnode").joinpath("dashboard.html").read_text(encoding="utf-8")
    script = text.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return text, CSP.format(script=f"'sha256-{digest}'")


def _error(text: str, status: int) -> Response:
    return Response.json(json.dumps({"error": text}), status)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))
