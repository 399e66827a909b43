"""This node's Portage environment in the swarm: the probe that takes its fingerprint, the
record facts that state it, and the member-only request for the readable values.

The probe runs `emerge --info` and `portageq envvar` side by side (~0.4 s here) in the
background after start-up, so the node listens at once; until it is done the node states no
fingerprint, which makes it match nobody (no Portage jobs) rather than a guess. It runs again
every PROBE_EVERY_S, so a repository sync or an edited make.conf shows without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

import msgpack

from net.transport import Inbound
from swarmnode.control import ControlError
from swarmnode.portage.fingerprint import (
    FACTS,
    VARIABLES,
    Fingerprint,
    FingerprintError,
    check_values,
    differing,
    fingerprint_of,
    parse_envvar,
    parse_info,
)
from swarmnode.portage.host import PortageError, PortageHost
from swarmnode.views import resolve_node
from swarmnode.worker import unpack_map

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

ENV, ENV_REPLY = "portage.env", "portage.env_reply"
TYPES = frozenset({ENV, ENV_REPLY})
#: A changed environment (a sync, an edited make.conf) is stated within this long; a probe
#: costs two Portage start-ups (~0.5 s of CPU each).
PROBE_EVERY_S = 600.0
#: A failed probe (Portage broken, or too slow under load) is tried again sooner.
RETRY_S = 60.0
#: emerge --info takes well under a second here; a loaded machine with large repositories a
#: few seconds. Beyond this it is hung.
PROBE_TIMEOUT_S = 60.0
#: How long `portage-env NODE` waits for the member's answer.
ASK_TIMEOUT_S = 5.0
#: Bytes of a request or reply: real values are a few KiB (a reply that would be larger says
#: so instead); each value is also bounded by MAX_VALUE when it arrives.
MAX_REPLY = 256 * 1024


async def probe(host: PortageHost, timeout: float = PROBE_TIMEOUT_S) -> Fingerprint:
    """The fingerprint of `host`'s Portage; PortageError when a command fails or its output
    cannot be read."""
    env = host.env(NOCOLOR="true")
    (info_rc, info, info_err), (var_rc, variables, var_err) = await asyncio.gather(
        host.run([str(host.emerge), "--info"], env=env, timeout=timeout),
        host.run([host.tool("portageq"), "envvar", "-v", *VARIABLES], env=env, timeout=timeout))
    if info_rc != 0:
        raise PortageError(f"emerge --info failed ({info_rc}): {_tail(info_err)}")
    if var_rc not in (0, 1):  # 1: some variable is unset
        raise PortageError(f"portageq envvar failed ({var_rc}): {_tail(var_err)}")
    try:
        return fingerprint_of(parse_info(info.decode("utf-8", "replace")),
                              parse_envvar(variables.decode("utf-8", "replace")))
    except FingerprintError as exc:
        raise PortageError(str(exc)) from None


def _tail(err: bytes) -> str:
    return err.decode("utf-8", "replace").strip()[-300:]


class PortageEnv:
    """The node's side of the fingerprint: `fingerprint` (None until probed, or without
    Portage), the `portage*` facts, and `portage.env` requests from members."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fingerprint: Fingerprint | None = None
        self._asked: dict[bytes, tuple[str, asyncio.Future[dict[str, Any]]]] = {}

    def handles(self, msg_type: str) -> bool:
        return msg_type in TYPES

    async def run(self) -> None:
        """Probe now and every PROBE_EVERY_S; state each new fingerprint in the record."""
        host = self.node.portage
        if host is None:
            return
        while True:
            try:
                fingerprint: Fingerprint | None = await probe(host)
            except PortageError as exc:
                log.warning("no Portage fingerprint (%s): %s", host.emerge, exc)
                fingerprint = None
            if fingerprint != self.fingerprint:
                self.fingerprint = fingerprint
                self._state(fingerprint)
            await asyncio.sleep(PROBE_EVERY_S if fingerprint else RETRY_S)

    def _state(self, fingerprint: Fingerprint | None) -> None:
        """Re-sign the record with the `portage*` facts of `fingerprint` (none for None)."""
        record = self.node.core.record
        facts = {k: v for k, v in record.facts if k not in FACTS}
        if fingerprint is not None:
            facts.update(fingerprint.facts())
            log.info("Portage fingerprint %s (abi %s)", fingerprint.hash, fingerprint.abi)
        self.node.core.update_record(self.node.clock(), facts=facts)
        self.node.flush()

    # -- the member-only request ----------------------------------------------------------

    def on_message(self, inbound: Inbound) -> None:
        """A member asks for the readable values, or answers our question (the node passes
        only admitted members' messages here)."""
        env = inbound.envelope
        try:
            body = unpack_map(env.body, MAX_REPLY)
        except ValueError:
            body = {}
        rid = body.get("rid")
        if not isinstance(rid, bytes) or len(rid) != 8:
            self.node.drops.drop("malformed_portage")
            return
        if env.type == ENV:
            values = self.fingerprint.values if self.fingerprint else None
            reply = msgpack.packb({"rid": rid, "values": values})
            if len(reply) > MAX_REPLY:
                reply = msgpack.packb({"rid": rid, "error": "the values exceed the reply size"})
            inbound.reply(ENV_REPLY, reply)
            return
        asked = self._asked.get(rid)
        if asked is None or asked[0] != env.sender or asked[1].done():
            self.node.drops.drop("unasked_portage_reply")
            return
        asked[1].set_result(body)

    async def ask(self, peer: str) -> dict[str, str] | None:
        """A member's readable values (None: it has no Portage fingerprint); ControlError
        when it does not answer in time or answers nonsense."""
        rid = os.urandom(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._asked[rid] = (peer, fut)
        name = self.node.member_name(peer)
        try:
            self.node.send_raw(peer, ENV, msgpack.packb({"rid": rid}))
            async with asyncio.timeout(ASK_TIMEOUT_S):
                body = await fut
        except TimeoutError:
            raise ControlError(f"{name} did not answer in {ASK_TIMEOUT_S:.0f} s") from None
        finally:
            self._asked.pop(rid, None)
        if "error" in body:
            raise ControlError(f"{name}: {str(body['error'])[:200]}")
        if body.get("values") is None:
            return None
        try:
            return check_values(body["values"])
        except ValueError as exc:
            self.node.drops.drop("malformed_portage")
            raise ControlError(f"{name} sent unreadable values: {exc}") from None

    async def command(self, args: dict[str, Any]) -> dict[str, Any]:
        """The control command `portage_env`: the readable values of this node, or of the
        member `args["node"]` with the keys that differ from this node's."""
        me = self.node.id
        target = resolve_node(self.node.core.members(), str(args.get("node") or me))
        mine = self.fingerprint.values if self.fingerprint else None
        if target.id == me:
            return {"id": me, "name": target.name, "values": mine, "differs": None}
        if not self.node.admitted:
            raise ControlError("this node is not an admitted member")
        if target.admitted_by is None or target.state in ("pending", "banned", "left"):
            raise ControlError(f"{target.name} is {target.state}: it answers no requests")
        theirs = await self.ask(target.id)
        return {"id": target.id, "name": target.name, "values": theirs,
                "differs": differing(mine, theirs) if mine and theirs is not None else None}
