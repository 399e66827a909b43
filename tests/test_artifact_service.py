"""Artifacts between real nodes (in-process, real ZeroMQ with CURVE on loopback).

What must hold: a node fetches an artifact it lacks from a member that has it, byte for byte,
verified; a member serving a corrupt copy is detected and another source finishes the job;
with no honest source left the error names each source and why.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from swarmnode import cluster, control
from swarmnode.artifact_service import ArtifactError
from swarmnode.node import Node, NodeOptions
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


async def until(pred, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def start(node: Node) -> asyncio.Task:
    task = asyncio.ensure_future(node.main())
    await until(lambda: task.done() or control.socket_path(node.home).exists())
    if task.done():
        task.result()
    return task


async def three_nodes(tmp_path) -> list[tuple[Node, asyncio.Task]]:
    token = cluster.init(tmp_path / "a", "c", f"127.0.0.1:{free_port()}", [], 3600)
    nodes = [Node(NodeOptions(home=tmp_path / "a", mdns=False, tailscale=False, fast=True))]
    for i, name in ((2, "b"), (3, "c")):
        listen = f"127.0.0.{i}:{free_port(f'127.0.0.{i}')}"
        nodes.append(Node(NodeOptions(home=tmp_path / name, token=token, listen=listen,
                                      name=name, mdns=False, tailscale=False, fast=True)))
    running = [(n, await start(n)) for n in nodes]
    ids = {n.id for n in nodes}
    await until(lambda: all(n.admitted and {m.id for m in n.core.members()
                                            if m.state == "alive"} == ids for n in nodes))
    return running


async def stop(running) -> None:
    for node, _ in running:
        node._stop.set()
    for _, task in running:
        assert await task == 0


async def test_fetch_from_a_member_and_survive_a_corrupt_source(tmp_path):
    running = await three_nodes(tmp_path)
    (a, _), (b, _), (c, _) = running
    try:
        data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks and a short last one
        digest = a.artifacts.store.put_bytes(data)
        sealed_in: set[str] = set()
        seal = a.transport.sealer.seal

        def watched(msg_type: str, body: bytes) -> bytes:
            if msg_type.startswith("artifact."):
                sealed_in.add(threading.current_thread().name)
            return seal(msg_type, body)

        a.transport.sealer.seal = watched  # type: ignore[method-assign]
        await b.artifacts.fetch(digest, [a.id])
        with b.artifacts.store.open(digest) as f:
            assert f.read() == data
        # the server packed and sealed its replies off its event loop (a push to 39 fetchers
        # would otherwise delay everything else it does, SWIM acks included)
        assert sealed_in and threading.main_thread().name not in sealed_in

        other = os.urandom(1024 * 1024)
        d2 = a.artifacts.store.put_bytes(other)
        assert c.artifacts.store.put_bytes(other) == d2
        bad = bytearray(other)
        bad[500_000] ^= 0xFF
        path = a.artifacts.store.path(d2)
        os.chmod(path, 0o644)
        path.write_bytes(bytes(bad))  # a's disk went bad under the store
        with pytest.raises(ArtifactError) as info:
            await b.artifacts.fetch(d2, [a.id])
        assert "a:" in str(info.value) or a.name in str(info.value)
        assert not b.artifacts.store.has(d2)
        await b.artifacts.fetch(d2, [a.id, c.id])
        with b.artifacts.store.open(d2) as f:
            assert f.read() == other
    finally:
        await stop(running)
