"""Remote actions (`exec`, `restart`, `reboot`), always aimed at an identity and checked twice.

The incident this prevents: a reboot meant for a node behind NAT went to the gateway whose
address the orchestrator had recorded. Here an action names the target's id; the requester
reaches it only over a route where that id proved itself (CURVE, see routes.py), and the
target refuses anything addressed to another id, from anyone but an operator (the signed
`operate` right, push/release.py `levels`; its config may narrow that to some operators or
to none), or (reboot of bare metal) without `--force`. Every check fails closed: on any
doubt nothing runs, and a refusal is counted (drops `action_refused`) and evented.

Wire exchange (bodies are msgpack maps, inside the signed envelope):
  act_req  {rid, target, verb, argv, force}   requester -> target
  act_start{rid}                               target accepted and started it
  act_out  {rid, seq, fd, data}                output chunks (fd 1 or 2), in order
  act_ack  {rid, seq}                          requester has written chunks up to seq
  act_end  {rid, code, error}                  exit code, or why it was refused or failed
Output is flow-controlled: the target keeps at most WINDOW unacknowledged chunks in flight,
so a command printing gigabytes neither fills the send queue (which would drop) nor memory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from net.transport import Inbound
from swarmnode.control import ControlError
from swarmnode.push.release import OPERATE
from swarmnode.routes import Route, RouteError
from swarmnode.ssh_actions import local_refusal, run_over_ssh

if TYPE_CHECKING:
    from swarmnode.membership import MemberView
    from swarmnode.node import Node

log = logging.getLogger(__name__)

REQ, START, OUT, ACK, END = "act_req", "act_start", "act_out", "act_ack", "act_end"
TYPES = frozenset({REQ, START, OUT, ACK, END})

#: Output chunk size and window: 16 x 32 KiB in flight keeps a LAN pipe full without
#: approaching the transport's per-peer queue (256 messages).
CHUNK = 32 * 1024
WINDOW = 16
#: Bounds on a request: a command line is at most this many arguments and bytes.
MAX_ARGS = 1024
MAX_ARGV_BYTES = 128 * 1024
MAX_BODY = MAX_ARGV_BYTES + 4096
#: A running command whose requester acknowledges nothing for this long is killed (the
#: requester died or was cut off; nobody would ever read the rest).
ACK_TIMEOUT_S = 60.0
#: How long a requester waits for the target to accept before retrying the route once.
ACCEPT_TIMEOUT_S = 5.0
#: How often a waiting requester checks that the target is still alive.
LIVENESS_CHECK_S = 2.0
#: After the restart or reboot command starts the node usually goes away; the requester
#: then waits this long for it to come back under a new incarnation.
REJOIN_TIMEOUT_S = 120.0


class RequesterGone(Exception):
    """The requester stopped acknowledging output: nobody is reading, so stop the command."""


class ActionRefused(ControlError):
    """The target (or this node, before sending) refused the action; nothing ran."""


@dataclass
class _Pending:
    """An action this node asked for, waiting for the target's messages."""

    target: str
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = field(default_factory=asyncio.Queue)
    via: str | None = None  # the transport path of the route the request went over


@dataclass
class _Run:
    """An action this node is running for a requester."""

    requester: str
    reply: Callable[[str, bytes], bool]
    acked: int = 0
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def pack(**fields: Any) -> bytes:
    return msgpack.packb(fields)


def unpack(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise ValueError("oversized")
    value = msgpack.unpackb(body, raw=False, max_bin_len=CHUNK, max_str_len=MAX_ARGV_BYTES,
                            max_array_len=MAX_ARGS, max_map_len=16)
    if not isinstance(value, dict) or not isinstance(value.get("rid"), bytes):
        raise ValueError("no request id")
    if len(value["rid"]) != 16:
        raise ValueError("bad request id")
    return value


class Actions:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.pending: dict[bytes, _Pending] = {}
        self.runs: dict[tuple[str, bytes], _Run] = {}

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    # -- inbound --------------------------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            body = unpack(env.body)
        except (ValueError, TypeError, msgpack.UnpackException):
            self.node.drops.drop("malformed_action")
            return
        if env.type == REQ:
            self._on_request(inbound, body)
        elif env.type == ACK:
            run = self.runs.get((env.sender, body["rid"]))
            if run is not None and isinstance(body.get("seq"), int):
                run.acked = max(run.acked, body["seq"])
                run.credit.set()
        else:
            pending = self.pending.get(body["rid"])
            if pending is None or pending.target != env.sender:
                self.node.drops.drop("unexpected_action_reply")
                return
            pending.queue.put_nowait((env.type, body))

    def _on_request(self, inbound: Inbound, body: dict[str, Any]) -> None:
        sender, rid = inbound.sender, body["rid"]
        if (sender, rid) in self.runs:
            return  # a duplicate of one already running
        verb, argv = body.get("verb"), body.get("argv")
        refusal = self._refusal(sender, body)
        who = self.node.member_name(sender)
        if refusal is not None:
            self.node.drops.drop("action_refused")
            inbound.reply(END, pack(rid=rid, code=None, error=refusal))
            self.node.event("action_refused", {"id": sender, "by": who, "verb": str(verb),
                                               "reason": refusal})
            return
        run = _Run(sender, inbound.reply)
        self.runs[(sender, rid)] = run
        inbound.reply(START, pack(rid=rid))
        run.task = asyncio.ensure_future(self._run(rid, run, verb, argv))

    def _refusal(self, sender: str, body: dict[str, Any]) -> str | None:
        """Why this node will not run the request, or None. Every check fails closed: an
        admitted member holding the signed operate right, and (if this node's config names
        any) one of the operators it names."""
        node = self.node
        if not node.is_admitted_member(sender):
            return "refused: the requester is not an admitted member of this cluster"
        refusal = local_refusal(node.id, node.name, node.kind, node.node_config,
                                body.get("target"), body.get("verb"), body.get("force"))
        if refusal is None and sender not in node.rights.holders(OPERATE):
            return (f"refused: {node.member_name(sender)} is not an operator (an operator "
                    "can allow it with `swarmnode grant operate NODE`)")
        allowed = node.node_config.accept_actions_from
        if refusal is None and allowed and sender not in allowed:
            return (f"refused: {node.name} accepts actions only from the operators its "
                    "config names (accept_actions_from)")
        if refusal is None and body.get("verb") == "exec" and not _valid_argv(body.get("argv")):
            return "refused: exec needs a command (a list of strings)"
        return refusal

    async def _run(self, rid: bytes, run: _Run, verb: str, argv: list[str] | None) -> None:
        cfg = self.node.node_config
        if verb == "exec":
            cmd: list[str] = list(argv or [])
            shown = shlex.join(cmd)
        else:
            command = cfg.restart_command if verb == "restart" else cfg.reboot_command
            cmd, shown = ["/bin/sh", "-c", command], command
        code: int | None = None
        error: str | None = None
        try:
            code = await self._spawn(rid, run, cmd, cfg.exec_timeout)
        except FileNotFoundError:
            error = f"{cmd[0]}: command not found on {self.node.name}"
        except PermissionError:
            error = f"{cmd[0]}: permission denied on {self.node.name}"
        except TimeoutError:
            error = f"killed after exec_timeout ({cfg.exec_timeout:g} s)"
        except RequesterGone:
            error = f"killed: the requester stopped reading for {ACK_TIMEOUT_S:g} s"
        except OSError as exc:
            error = f"cannot run {cmd[0]}: {exc}"
        finally:
            self.runs.pop((run.requester, rid), None)
        run.reply(END, pack(rid=rid, code=code, error=error))
        self.node.event("action_run", {"id": run.requester,
                                       "by": self.node.member_name(run.requester), "verb": verb,
                                       "cmd": shown[:200], "code": code, "error": error})

    async def _spawn(self, rid: bytes, run: _Run, cmd: list[str], timeout: float) -> int:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=str(self.node.home), start_new_session=True)
        seq = [0]
        try:
            async with asyncio.timeout(timeout):
                assert proc.stdout is not None and proc.stderr is not None
                await asyncio.gather(self._pump(rid, run, proc.stdout, 1, seq),
                                     self._pump(rid, run, proc.stderr, 2, seq))
                return await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                await proc.wait()

    async def _pump(self, rid: bytes, run: _Run, stream: asyncio.StreamReader, fd: int,
                    seq: list[int]) -> None:
        while True:
            data = await stream.read(CHUNK)
            if not data:
                return
            while seq[0] - run.acked >= WINDOW:
                run.credit.clear()
                try:
                    async with asyncio.timeout(ACK_TIMEOUT_S):
                        await run.credit.wait()
                except TimeoutError:
                    raise RequesterGone from None
            seq[0] += 1
            run.reply(OUT, pack(rid=rid, seq=seq[0], fd=fd, data=data))

    # -- requesting -----------------------------------------------------------------------

    async def request(self, view: MemberView, verb: str, argv: list[str], force: bool,
                      address: str | None) -> AsyncIterator[dict[str, Any]]:
        """Run `verb` on `view` and yield what comes back: {"route"}, {"fd", "data"} chunks,
        then {"exit": code}. Raises ActionRefused/RouteError with the reason when it cannot."""
        node = self.node
        rid = os.urandom(16)
        pending = _Pending(view.id)
        self.pending[rid] = pending
        outcome, shown = "no answer", None
        try:
            self._check_target(view, verb, force)
            try:
                route = await (node.router.resolve(view, address) if address
                               else node.router.route(view))
            except RouteError as failed:
                if address:
                    raise
                items = run_over_ssh(node, view, verb, argv, force, failed)
            else:
                items = self._over_zmq(view, route, rid, verb, argv, force, pending)
            async for item in items:
                if "route" in item:
                    shown = _describe(item["route"])
                if "exit" in item:
                    outcome = f"exit {item['exit']}" + (f" ({item['note']})"
                                                        if item.get("note") else "")
                yield item
        except ControlError as exc:
            outcome = str(exc).splitlines()[0]
            raise
        finally:
            self.pending.pop(rid, None)
            node.event("action", {"id": view.id, "name": view.name, "verb": verb,
                                  "cmd": shlex.join(argv)[:200], "route": shown,
                                  "outcome": outcome})

    async def _over_zmq(self, view: MemberView, route: Route, rid: bytes, verb: str,
                        argv: list[str], force: bool,
                        pending: _Pending) -> AsyncIterator[dict[str, Any]]:
        yield {"route": route.plain()}
        if not await self._send_request(view, route, rid, verb, argv, force, pending):
            route = await self.node.router.resolve(view)  # the route stopped working
            yield {"route": route.plain()}
            if not await self._send_request(view, route, rid, verb, argv, force, pending):
                raise ActionRefused(f"{view.name} did not answer over {route.describe()}")
        async for item in self._results(view, verb, rid, pending):
            yield item

    def _check_target(self, view: MemberView, verb: str, force: bool) -> None:
        """What this node can refuse before anything is sent."""
        if view.id == self.node.id:
            raise ActionRefused("that is this node: run the command here")
        if view.state in ("pending", "banned") or view.admitted_by is None:
            raise ActionRefused(f"refused: {view.name} is {view.state}, not an admitted member")
        if view.state == "left":
            raise ActionRefused(f"{view.name} has left the cluster")
        kind = view.record.facts_dict().get("kind") if view.record else None
        if verb == "reboot" and kind == "bare" and not force:
            raise ActionRefused(f"refused: {view.name} is bare metal; use --force to reboot it")
        if self.node.id not in self.node.rights.holders(OPERATE):
            raise ActionRefused("refused: this node is not an operator (an operator can allow "
                                "it with `swarmnode grant operate NODE`)")

    async def _send_request(self, view: MemberView, route: Route, rid: bytes, verb: str,
                            argv: list[str], force: bool, pending: _Pending) -> bool:
        """Send the request and wait for the target to accept (or refuse) it."""
        body = pack(rid=rid, target=view.id, verb=verb, argv=argv, force=force)
        self.node.route_to(view.id)
        pending.via = route.via_transport
        if not self.node.transport.send(view.id, REQ, body, via=pending.via):
            return False
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT_S):
                kind, msg = await pending.queue.get()
        except TimeoutError:
            return False
        pending.queue.put_nowait((kind, msg))  # the results loop reads it again
        return True

    async def _results(self, view: MemberView, verb: str, rid: bytes,
                       pending: _Pending) -> AsyncIterator[dict[str, Any]]:
        started_at: float | None = None
        while True:
            try:
                async with asyncio.timeout(LIVENESS_CHECK_S):
                    kind, msg = await pending.queue.get()
            except TimeoutError:
                done = self._after_silence(view, verb, started_at)
                if done is not None:
                    yield done
                    return
                continue
            if kind == START:
                started_at = time.monotonic()
            elif kind == OUT:
                data = msg.get("data")
                if isinstance(data, bytes) and msg.get("fd") in (1, 2):
                    yield {"fd": msg["fd"], "data": base64.b64encode(data).decode()}
                self.node.transport.send(view.id, ACK, pack(rid=rid, seq=msg.get("seq", 0)),
                                         via=pending.via)
            elif kind == END:
                if msg.get("error"):
                    cls = ActionRefused if str(msg["error"]).startswith("refused") \
                        else ControlError
                    raise cls(f"{view.name}: {msg['error']}")
                yield {"exit": msg.get("code")}
                return

    def _after_silence(self, view: MemberView, verb: str,
                       started_at: float | None) -> dict[str, Any] | None:
        """While waiting: a target that died ends the wait; one that restarted (a new
        incarnation after a restart or reboot) is the action's success."""
        now_view = self.node.core.member(view.id)
        if now_view is None:
            raise ControlError(f"{view.name} is no longer a member")
        if verb != "exec" and started_at is not None and now_view.incarnation > view.incarnation:
            return {"exit": 0, "note": f"{verb}ed: back with incarnation "
                                       f"{now_view.incarnation}"}
        if verb == "exec" and now_view.state in ("dead", "left"):
            raise ControlError(f"{view.name} is {now_view.state}; the command's outcome is "
                               "unknown")
        if verb != "exec" and started_at is not None \
                and time.monotonic() - started_at > REJOIN_TIMEOUT_S:
            raise ControlError(f"{view.name} did not come back within {REJOIN_TIMEOUT_S:g} s")
        return None


def _describe(route: dict[str, Any]) -> str:
    hops = " -> ".join(route.get("via") or ())
    return f"{route['method']} {route['address']}" + (f" via {hops}" if hops else "")


def _valid_argv(argv: Any) -> bool:
    return (isinstance(argv, list) and 0 < len(argv) <= MAX_ARGS
            and all(isinstance(a, str) for a in argv)
            and sum(len(a) for a in argv) <= MAX_ARGV_BYTES)


__all__ = ["ActionRefused", "Actions", "RouteError"]
