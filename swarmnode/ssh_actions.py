"""Remote actions over plain SSH, for when the member's swarmnode cannot be reached at all.

That is when a person most needs them (restart a node whose service hung). The glasses stay
on: every hop's host key is verified (a member's against the fingerprints it signed into its
record, never trust-on-first-use), the swarmnode answering on the target must say it is the
id the action is addressed to, and restart/reboot go through `swarmnode local-action
--expect-id`, which checks the id again on the target itself before it runs anything.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import shlex
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from net import sshkeys
from net.addresses import dial_order, split_hostport
from swarmnode import config as node_config
from swarmnode.control import ControlError
from swarmnode.identity import load_or_create
from swarmnode.routes import Attempt, RouteError, published_host_keys

if TYPE_CHECKING:
    from net.ssh import Chain
    from swarmnode.membership import MemberView
    from swarmnode.node import Node

#: `swarmnode id` on the target is quick; this bounds a hung remote shell.
ID_TIMEOUT_S = 20.0


class Refused(ControlError):
    """Nothing ran: the target is not who the action is addressed to, or refused it."""


def local_refusal(my_id: str, my_name: str, kind: str, cfg: node_config.NodeConfig,
                  target: object, verb: object, force: object) -> str | None:
    """Why this node will not run `verb` addressed to `target`, or None (fail closed).

    One rule set for every path an action arrives by: the ZeroMQ request and `local-action`
    run over SSH."""
    if target != my_id:
        return (f"refused: the action is addressed to {str(target)[:12]}, but this is "
                f"{my_name} ({my_id[:12]})")
    if not cfg.accept_actions:
        return f"refused: {my_name} does not accept remote actions (accept_actions)"
    if verb not in ("exec", "restart", "reboot"):
        return f"refused: unknown action {verb!r}"
    if verb == "reboot" and kind == "bare" and force is not True:
        return f"refused: {my_name} is bare metal; reboot it with --force if you really mean it"
    return None


def run_local(home: Path, verb: str, expect_id: str, force: bool, kind: str) -> int:
    """`swarmnode local-action`: the target end of a restart/reboot sent over SSH."""
    cfg = node_config.load(home)
    me = load_or_create(home)
    refusal = local_refusal(me.id, me.id[:12], cfg.kind or kind, cfg, expect_id, verb, force)
    if refusal is not None or verb == "exec":
        raise Refused(refusal or "refused: exec over SSH runs the command directly")
    command = cfg.restart_command if verb == "restart" else cfg.reboot_command
    return subprocess.run(["/bin/sh", "-c", command], cwd=home, check=False).returncode


async def run_over_ssh(node: Node, view: MemberView, verb: str, argv: list[str], force: bool,
                       failed: RouteError) -> AsyncIterator[dict[str, Any]]:
    """Run the action on `view` over SSH; yields like Actions.request. Raises `failed`
    (with the SSH attempts added) when SSH cannot reach it either."""
    keys = published_host_keys(view)
    if not keys:
        raise failed
    facts = view.record.facts_dict() if view.record else {}
    cfg = node.node_config
    port = int(facts.get("ssh_port", cfg.ssh.port))
    ctl = str(facts.get("ctl") or "swarmnode")
    hops = node.router.jump_hops(view)
    attempts = list(failed.attempts)
    for address in dial_order(view.record.addresses if view.record else (), ()):
        host = split_hostport(address, 0)[0]
        target = sshkeys.Hop(cfg.ssh.user or getpass.getuser(), host, port, frozenset(keys))
        via = tuple(str(h) for h in hops)
        start = time.monotonic()
        try:
            chain = await asyncio.to_thread(node.router.connect_chain, [*hops, target])
        except sshkeys.SshError as exc:
            attempts.append(Attempt("ssh-exec", str(target), str(exc),
                                    time.monotonic() - start, via))
            continue
        try:
            await _check_identity(chain, ctl, view)
            yield {"route": {"method": "ssh-exec", "address": str(target), "via": list(via)}}
            command = shlex.join(argv) if verb == "exec" else " ".join(
                [ctl, "local-action", verb, "--expect-id", view.id]
                + (["--force"] if force else []))
            async for item in _stream(chain, command):
                yield item
            return
        finally:
            chain.close()
    raise RouteError(view.name, attempts)


async def _check_identity(chain: Chain, ctl: str, view: MemberView) -> None:
    out: list[bytes] = []
    try:
        code = await asyncio.to_thread(chain.run, f"{ctl} id", out.append, None, ID_TIMEOUT_S)
    except sshkeys.SshError as exc:
        raise Refused(f"refused: could not ask {chain.hops[-1]} who it is: {exc}") from exc
    answered = b"".join(out).decode(errors="replace").strip().splitlines()
    got = answered[-1] if answered and code == 0 else "(no swarmnode id)"
    if got != view.id:
        raise Refused(f"refused: expected {view.name} ({view.id}) at {chain.hops[-1]}, but "
                      f"swarmnode there is {got}")


async def _stream(chain: Chain, command: str) -> AsyncIterator[dict[str, Any]]:
    """Run `command` in a thread, handing its output to this task as it arrives."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(fd: int):
        def put(data: bytes) -> None:
            item = {"fd": fd, "data": base64.b64encode(data).decode()}
            loop.call_soon_threadsafe(queue.put_nowait, item)
        return put

    def run() -> None:
        try:
            code = chain.run(command, emit(1), emit(2))
            loop.call_soon_threadsafe(queue.put_nowait, {"exit": code})
        except sshkeys.SshError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, {"error": str(exc)})

    worker = loop.run_in_executor(None, run)
    while True:
        item = await queue.get()
        if "error" in item:
            raise ControlError(item["error"])
        yield item
        if "exit" in item:
            await worker
            return
