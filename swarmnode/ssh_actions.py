"""Remote actions over plain SSH, for when the member's swarmnode cannot be reached at all.

That is when a person most needs them (restart a node whose service hung). SSH only ever
reaches the member itself:

- every hop's host key is verified (a member's against the fingerprints it signed into its
  record, never trust-on-first-use); that only says which machine answers, and a member can
  name any machine's address and key, so:
- before anything else runs, the far end proves it holds the member's identity key: it signs
  a fresh random challenge (`swarmnode prove-identity`, domain-separated so the signature
  means nothing else), checked here against the member's id. A borrowed address or host key
  is useless without the key; the action then runs over that same authenticated connection;
- nothing a member reports is pasted into a shell: `ctl` must be an absolute path to an
  executable named `swarmnode` and `home` an absolute path, both from a small character set,
  and every command line is built with `shlex.join`;
- restart/reboot go through `swarmnode local-action --expect-id`, which checks the id again on
  the target itself before it runs anything.
"""

from __future__ import annotations

import asyncio
import base64
import getpass
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from net import sshkeys
from net.addresses import dial_order, split_hostport
from swarmnode import config as node_config
from swarmnode.control import ControlError
from swarmnode.identity import KEY_FILE, load_or_create, verify
from swarmnode.routes import Attempt, RouteError, published_host_keys

if TYPE_CHECKING:
    from net.ssh import Chain
    from swarmnode.membership import MemberView
    from swarmnode.node import Node

#: `swarmnode prove-identity` on the target is quick; this bounds a hung remote command.
ID_TIMEOUT_S = 20.0
#: The executable a `ctl` fact may name, and the characters a reported path may hold: enough
#: for any install path, nothing a shell would read as syntax even if quoting were lost.
CTL_NAME = "swarmnode"
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+@%=,:~/-]{1,254}")
#: What the identity proof signs: a tag no other signed body starts with, the challenge and
#: the id it is for (so a proof is for this question only).
PROOF_TAG = b"swarmnode-ssh-identity-v1"
CHALLENGE_BYTES = 32


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


def ctl_facts(home: Path) -> dict[str, str]:
    """The facts that let an operator run swarmnode here over SSH: the `swarmnode` executable
    beside this interpreter and this node's home ({} when either cannot be published)."""
    ctl = str(Path(sys.executable).with_name(CTL_NAME))
    try:
        facts = {"ctl": checked_path(ctl, "ctl", CTL_NAME), "home": checked_path(str(home),
                                                                                 "home")}
    except Refused:
        return {}
    return facts if os.access(ctl, os.X_OK) else {}


def checked_path(value: object, what: str, name: str | None = None) -> str:
    """`value` if it is a plain, normalised absolute path (ending in `/name` when given);
    raises Refused otherwise. Applied to what a member reports before it is ever used."""
    if not isinstance(value, str) or not _SAFE_PATH.fullmatch(value) \
            or os.path.normpath(value) != value \
            or (name is not None and os.path.basename(value) != name):
        must = f"an absolute path to {name!r}" if name else "a plain absolute path"
        raise Refused(f"refused: its {what} fact must be {must}, got {str(value)[:80]!r}")
    return value


def proof_body(challenge: bytes, node_id: str) -> bytes:
    return msgpack.packb([PROOF_TAG, challenge, node_id])


def prove(home: Path, challenge_hex: str) -> str:
    """`swarmnode prove-identity`: the answer of the node in `home` to a challenge,
    `<id> <signature hex>`. Never creates a key (the home is named by the asker): a home
    without one raises ValueError."""
    challenge = bytes.fromhex(challenge_hex)
    if len(challenge) != CHALLENGE_BYTES:
        raise ValueError(f"a challenge is {CHALLENGE_BYTES} bytes")
    if not (home / KEY_FILE).is_file():
        raise ValueError(f"no swarmnode identity in {home}")
    identity = load_or_create(home)
    return f"{identity.id} {identity.sign(proof_body(challenge, identity.id)).hex()}"


def check_proof(node_id: str, challenge: bytes, answer: str) -> str | None:
    """Why `answer` does not prove `node_id` holds its key for `challenge`, or None."""
    fields = answer.split()
    if len(fields) != 2:
        return "no identity proof"
    if fields[0] != node_id:
        return f"swarmnode there is {fields[0][:52]}"
    try:
        signature = bytes.fromhex(fields[1])
    except ValueError:
        return "a malformed identity proof"
    if not verify(node_id, proof_body(challenge, node_id), signature):
        return "a forged identity proof (bad signature)"
    return None


async def run_over_ssh(node: Node, view: MemberView, verb: str, argv: list[str], force: bool,
                       failed: RouteError) -> AsyncIterator[dict[str, Any]]:
    """Run the action on `view` over SSH; yields like Actions.request. Raises `failed`
    (with the SSH attempts added) when SSH cannot reach it either, Refused when the member's
    facts are unusable or the far end does not prove its identity."""
    keys = published_host_keys(view)
    if not keys:
        raise failed
    facts = view.record.facts_dict() if view.record else {}
    try:
        base = [checked_path(facts.get("ctl"), "ctl", CTL_NAME), "--home",
                checked_path(facts.get("home"), "home")]
    except Refused as exc:
        raise Refused(f"{exc}, so SSH is not tried\n{failed}") from None
    cfg = node.node_config
    port = int(facts.get("ssh_port", cfg.ssh.port))
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
            await _check_identity(chain, base, view)
            yield {"route": {"method": "ssh-exec", "address": str(target), "via": list(via)}}
            command = argv if verb == "exec" else [
                *base, "local-action", verb, "--expect-id", view.id,
                *(["--force"] if force else [])]
            async for item in _stream(chain, shlex.join(command)):
                yield item
            return
        finally:
            chain.close()
    raise RouteError(view.name, attempts)


async def _check_identity(chain: Chain, base: list[str], view: MemberView) -> None:
    """The far end signs a fresh challenge with `view`'s key, or nothing more runs there."""
    challenge = os.urandom(CHALLENGE_BYTES)
    command = shlex.join([*base, "prove-identity", challenge.hex()])
    out: list[bytes] = []
    try:
        code = await asyncio.to_thread(chain.run, command, out.append, None, ID_TIMEOUT_S)
    except sshkeys.SshError as exc:
        raise Refused(f"refused: could not ask {chain.hops[-1]} who it is: {exc}") from exc
    lines = b"".join(out).decode(errors="replace").strip().splitlines()
    why = check_proof(view.id, challenge, lines[-1] if lines and code == 0 else "")
    if why is not None:
        raise Refused(f"refused: expected {view.name} ({view.id}) at {chain.hops[-1]}, but it "
                      f"gave {why}; nothing was run there")


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
