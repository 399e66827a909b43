"""Artifacts between nodes: serve what this node stores, fetch what it needs, over ZeroMQ.

The protocol is the sans-I/O core in swarmnode/artifacts/transfer.py (chunked pull, per-source
credit windows, per-chunk and whole-file verification, failover between sources); the store is
swarmnode/artifacts/store.py under `<home>/artifacts`. This shell answers admitted members'
requests (disk reads in a worker thread, so a large chunk never stalls gossip) and runs one
Receiver per artifact being fetched, with concurrent requests for the same digest sharing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from net.transport import Inbound
from swarmnode.artifacts import (
    MESSAGE_TYPES,
    REQUEST_TYPES,
    ArtifactStore,
    Digest,
    Done,
    Failed,
    Receiver,
    Send,
    Sender,
    TransferError,
    Verify,
    Write,
    check_digest,
    pack,
    unpack,
)
from swarmnode.tasks import TaskSet

if TYPE_CHECKING:
    from swarmnode.node import Node

log = logging.getLogger(__name__)

#: How often a running fetch is ticked (its request timeouts are 10 s; a tenth of that is
#: prompt enough to retry a lost chunk elsewhere).
TICK_S = 1.0


class ArtifactError(RuntimeError):
    """A fetch failed: every source was dropped (the message says why, per source)."""


class _Fetch:
    def __init__(self, service: ArtifactService, digest: Digest, sources: Sequence[str]) -> None:
        node = service.node
        self.service = service
        self.rx = Receiver(digest, list(sources), node.clock())
        self.incoming = service.store.incoming(digest)
        self.wake = asyncio.Event()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        node = self.service.node
        try:
            while not self.done.done():
                self.wake.clear()  # before carrying out: a message arriving meanwhile re-wakes
                await self._carry_out()
                if self.done.done():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self.wake.wait()
                self.rx.tick(node.clock())
        except Exception as exc:  # the store failing under us: report, never crash the node
            if not self.done.done():
                self.done.set_exception(ArtifactError(f"{type(exc).__name__}: {exc}"))
        finally:
            if not self.done.done():
                self.done.set_exception(ArtifactError("fetch stopped"))
            with contextlib.suppress(Exception):
                self.incoming.abort()

    async def _carry_out(self) -> None:
        """Everything the receiver wants done, including what doing it makes it want next
        (a verification's result yields Done at once)."""
        while outputs := self.rx.drain():
            await self._carry_out_batch(outputs)

    async def _carry_out_batch(self, outputs) -> None:
        node = self.service.node
        for out in outputs:
            if isinstance(out, Send):
                msg_type, body = pack(out.msg)
                node.send_raw(out.to, msg_type, body)
            elif isinstance(out, Write):
                self.incoming.write(out.offset, out.data)
            elif isinstance(out, Verify):
                ok = await asyncio.to_thread(self.incoming.commit, out.size)
                self.rx.verified(node.clock(), ok)
            elif isinstance(out, Done):
                self.done.set_result(None)
            elif isinstance(out, Failed):
                reasons = ", ".join(f"{node.member_name(s)}: {r}"
                                    for s, r in sorted(self.rx.failures.items()))
                self.done.set_exception(ArtifactError(
                    f"cannot fetch {out.digest[:16]}: {out.reason}"
                    + (f" ({reasons})" if reasons else "")))


class ArtifactService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = ArtifactStore(node.home / "artifacts")
        self.sender = Sender(self.store)
        # One reader thread: the sender's manifest cache is not shared between threads, and
        # one disk reader keeps serving from competing with the node for both cores.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="artifacts")
        self._fetches: dict[Digest, _Fetch] = {}
        self._tasks = TaskSet()

    def handles(self, msg_type: str) -> bool:
        return msg_type in MESSAGE_TYPES

    def on_message(self, inbound: Inbound) -> None:
        env = inbound.envelope
        try:
            msg = unpack(env.type, env.body)
        except TransferError:
            self.node.drops.drop("malformed_artifact")
            return
        if env.type in REQUEST_TYPES:
            self._spawn(self._serve(inbound, msg))
            return
        fetch = self._fetches.get(msg.digest)
        if fetch is None:
            self.node.drops.drop("unexpected_artifact_reply")
            return
        fetch.rx.handle(self.node.clock(), env.sender, msg)
        fetch.wake.set()

    async def _serve(self, inbound: Inbound, msg) -> None:
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._io, self.sender.handle, inbound.sender, msg)
        if reply is not None:
            inbound.reply(*pack(reply.msg))

    async def fetch(self, digest: Digest, sources: Sequence[str]) -> None:
        """Make `digest` present in this node's store, pulling it from `sources` (member ids)
        when missing; raises ArtifactError naming each source's failure."""
        check_digest(digest)
        if self.store.has(digest):
            return
        fetch = self._fetches.get(digest)
        if fetch is None:
            fetch = _Fetch(self, digest, [s for s in sources if s != self.node.id])
            self._fetches[digest] = fetch
            task = self._spawn(fetch.run())
            task.add_done_callback(lambda _t: self._fetches.pop(digest, None))
        else:
            self.add_sources(digest, sources)
        await asyncio.shield(fetch.done)

    def add_sources(self, digest: Digest, sources: Sequence[str]) -> None:
        """More members to pull a fetch under way from (nodes that got the file since)."""
        fetch = self._fetches.get(digest)
        if fetch is None:
            return
        for source in sources:
            if source != self.node.id:
                fetch.rx.add_source(self.node.clock(), source)
        fetch.wake.set()

    def _spawn(self, coro) -> asyncio.Task[None]:
        return self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.close()
        self._io.shutdown(wait=False, cancel_futures=True)
