"""The node shell in-process: address changes, NAT observation, control commands."""

from __future__ import annotations

import asyncio

import pytest

import swarmnode.node as node_mod
from swarmnode import cluster, control
from swarmnode.node import Node, NodeOptions
from tests.ports import free_port

pytestmark = pytest.mark.timeout(60)


async def running_node(home, listen: str) -> tuple[Node, asyncio.Task]:
    cluster.init(home, "c", listen, [], 3600)
    node = Node(NodeOptions(home=home, mdns=False, tailscale=False, fast=True))
    task = asyncio.ensure_future(node.main())
    await until(lambda: task.done() or control.socket_path(home).exists())
    if task.done():
        task.result()  # raises what stopped the node
    return node, task


async def until(pred, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stop(node: Node, task: asyncio.Task) -> None:
    node._stop.set()
    assert await task == 0


async def test_changed_addresses_are_resigned_under_the_same_identity(tmp_path, monkeypatch):
    port = free_port()
    listen = f"127.0.0.1:{port}"
    monkeypatch.setattr(node_mod, "ADDRESS_CHECK_S", 0.05)
    node, task = await running_node(tmp_path, listen)
    try:
        before = node.core.record
        monkeypatch.setattr(cluster, "addresses_for", lambda _l, _a: (listen, "100.64.1.2:7946"))
        await until(lambda: "100.64.1.2:7946" in node.core.record.addresses)
        after = node.core.record
        assert after.id == before.id and after.incarnation > before.incarnation
        kinds = [e["kind"] for e in node.store.events()]
        assert "addresses_changed" in kinds
    finally:
        await stop(node, task)


async def test_observed_address_outside_reported_ones_flags_nat(tmp_path):
    node, task = await running_node(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        me = node.id
        node.observe(me, "127.0.0.1")  # one of the reported addresses
        assert node.observed[me].nat is False
        node.observe(me, "10.42.0.1")  # a gateway's address
        assert node.observed[me].nat is True
        [ev] = [e for e in node.store.events() if e["kind"] == "nat_detected"]
        assert ev["observed"] == "10.42.0.1" and ev["reported"] == list(node.addresses)
        view = await node.handle_command("nodes", {})
        assert view[0]["addresses"] == list(node.addresses)  # never the observed address
    finally:
        await stop(node, task)


async def test_control_commands_refuse_clearly(tmp_path):
    node, task = await running_node(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(control.ControlError, match="no node named"):
            await node.handle_command("admit", {"node": "nobody"})
        with pytest.raises(control.ControlError, match="cannot ban itself"):
            await node.handle_command("ban", {"node": node.id[:10]})
        with pytest.raises(control.ControlError, match="unknown command"):
            await node.handle_command("reboot-everything", {})
        status = await node.handle_command("status", {})
        assert status["nodes_alive"] == 1 and status["admitted"] is True
    finally:
        await stop(node, task)


async def test_taken_address_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    node, task = await running_node(tmp_path / "a", listen)
    try:
        cluster.init(tmp_path / "b", "other", listen, [], 3600)
        second = Node(NodeOptions(home=tmp_path / "b", mdns=False, tailscale=False, fast=True))
        with pytest.raises(node_mod.StartError, match="cannot listen on"):
            await second.main()
        assert not control.socket_path(tmp_path / "b").exists()
        with pytest.raises(control.ControlError, match="already running"):
            await Node(NodeOptions(home=tmp_path / "a", mdns=False, tailscale=False)).main()
    finally:
        await stop(node, task)


async def test_a_node_refuses_actions_not_addressed_to_it_or_unsafe(tmp_path):
    from swarmnode.actions import unpack
    from swarmnode.identity import Identity

    node, task = await running_node(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        other = Identity.generate().id
        refuse = node.actions._refusal
        assert refuse(node.id, {"target": node.id, "verb": "exec", "argv": ["true"]}) is None
        wrong = refuse(node.id, {"target": other, "verb": "reboot", "argv": []})
        assert wrong.startswith(f"refused: the action is addressed to {other[:12]}")
        assert node.id[:12] in wrong
        assert "not an admitted member" in refuse(other, {"target": node.id, "verb": "exec",
                                                          "argv": ["true"]})
        assert "unknown action" in refuse(node.id, {"target": node.id, "verb": "rm"})
        assert "needs a command" in refuse(node.id, {"target": node.id, "verb": "exec",
                                                     "argv": "rm -rf /"})
        node.kind = "bare"
        assert "bare metal" in refuse(node.id, {"target": node.id, "verb": "reboot"})
        assert refuse(node.id, {"target": node.id, "verb": "reboot", "force": True}) is None
        for junk in (b"", b"\x93\x01\x02\x03", b"\x81\xa3rid\xc4\x01x", b"\xc1" * 10):
            with pytest.raises(ValueError):
                unpack(junk)
    finally:
        await stop(node, task)


async def test_messages_are_counted_by_type_only_when_of_a_known_type(tmp_path):
    """`received` (status, metrics) counts what a service took: a peer inventing types, or
    sending a body no decoder takes, grows neither the table nor the metric's labels."""
    from types import SimpleNamespace

    from net.transport import Inbound

    node, task = await running_node(tmp_path, f"127.0.0.1:{free_port()}")
    try:
        before = dict(node.received)
        for kind in ("no.such.type", "ping"):
            env = SimpleNamespace(type=kind, sender="x" * 52, body=b"\xc1", epoch=1, seq=1)
            node.on_message(Inbound(env, None, lambda *_: None))  # type: ignore[arg-type]
        assert node.received == before
        assert node.drop_counts().get("malformed_body") == 2
        assert (await node.handle_command("status", {}))["received"] == before
    finally:
        await stop(node, task)


def test_power_notes_slow_down_so_the_swarm_states_at_most_one_a_second():
    assert node_mod.power_note_interval(5) == node_mod.POWER_NOTE_S
    assert node_mod.power_note_interval(40) == 40 / node_mod.POWER_NOTES_PER_S
    for live in (5, 40, 1000):  # notes a second over the swarm
        assert live / node_mod.power_note_interval(live) <= max(
            node_mod.POWER_NOTES_PER_S, live / node_mod.POWER_NOTE_S)


MALLOC_PROBE = """
import ctypes, msgpack
from swarmnode.node import _fix_malloc_thresholds
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(f, ctypes.c_size_t) for f in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
_fix_malloc_thresholds()
before = libc.mallinfo2()
packer = msgpack.Packer()  # holds the 256 KiB buffer each packb allocates and frees
held = libc.mallinfo2()
del packer
freed = libc.mallinfo2()
snapshot = bytearray(4 << 20)
print(held.hblks - before.hblks, freed.arena == held.arena, libc.mallinfo2().hblks - freed.hblks)
"""


def test_a_packing_buffer_comes_from_the_heap_and_stays_there_a_snapshot_gets_its_own_map():
    """The node's malloc thresholds: msgpack's packing buffer is neither mapped (an mmap and
    a munmap per packb) nor trimmed away when freed (a brk per packb); a ledger snapshot of
    MBs gets a mapping of its own, handed back when freed (no heap fragmentation)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["0", "True", "1"], out
