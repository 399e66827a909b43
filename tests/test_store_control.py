"""SQLite state and the local control socket."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from swarmnode import control
from swarmnode.identity import IdentityError, load_or_create
from swarmnode.store import Store


def test_store_persists_values_and_events(tmp_path):
    s = Store(tmp_path)
    s.put(incarnation=7, snapshot={"members": [b"\x01", "x"]})
    s.add_event("member_join", {"id": "abc", "how": "token"})
    s.close()
    s = Store(tmp_path)
    assert s.get("incarnation") == 7
    assert s.get("snapshot") == {"members": [b"\x01", "x"]}
    assert s.get("missing", "d") == "d"
    [ev] = s.events()
    assert ev["kind"] == "member_join" and ev["how"] == "token"
    s.close()


def test_an_unsynced_put_commits_and_the_next_put_is_synced_again(tmp_path):
    """The node's periodic membership snapshot skips the fsync (synchronous=NORMAL for that
    one transaction): it is committed all the same, and the connection goes back to FULL."""
    s = Store(tmp_path)
    s.put(False, snapshot={"members": ["a"]})
    other = Store(tmp_path)  # another connection sees the commit
    assert other.get("snapshot") == {"members": ["a"]}
    other.close()
    assert s._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()


def test_identity_file_is_0600_and_stable(tmp_path):
    a = load_or_create(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / "identity.key").st_mode)
    assert mode == 0o600
    assert load_or_create(tmp_path).id == a.id
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(IdentityError, match="0600"):
        load_or_create(tmp_path)


async def test_control_round_trip_errors_and_bad_requests(tmp_path):
    async def handler(cmd, args):
        if cmd == "boom":
            raise RuntimeError("kaput")
        if cmd == "no":
            raise control.ControlError("refused politely")
        return {"cmd": cmd, "args": args}

    server = await control.serve(tmp_path, handler)
    try:
        mode = stat.S_IMODE(os.stat(control.socket_path(tmp_path)).st_mode)
        assert mode & 0o077 == 0
        result = await asyncio.to_thread(control.call, tmp_path, "echo", x=1)
        assert result == {"cmd": "echo", "args": {"x": 1}}
        with pytest.raises(control.ControlError, match="refused politely"):
            await asyncio.to_thread(control.call, tmp_path, "no")
        with pytest.raises(control.ControlError, match="kaput"):
            await asyncio.to_thread(control.call, tmp_path, "boom")
        reader, writer = await asyncio.open_unix_connection(str(control.socket_path(tmp_path)))
        writer.write(b"{not json\n")
        await writer.drain()
        assert b"malformed request" in await reader.readline()
        writer.close()
        with pytest.raises(control.ControlError, match="already running"):
            await control.serve(tmp_path, handler)
    finally:
        server.close()
        await server.wait_closed()


async def test_control_socket_works_in_a_home_deeper_than_sun_path(tmp_path):
    home = tmp_path / ("d" * 60) / ("e" * 60)
    home.mkdir(parents=True)

    async def handler(cmd, args):
        return cmd

    server = await control.serve(home, handler)
    try:
        assert control.socket_path(home).exists()
        assert await asyncio.to_thread(control.call, home, "deep") == "deep"
    finally:
        server.close()
        await server.wait_closed()


def test_call_without_node_says_so(tmp_path):
    with pytest.raises(control.ControlError, match="no swarmnode is running"):
        control.call(tmp_path, "status")
