"""Route choice without sockets: the preference race and when a remembered route expires."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from swarmnode.routes import Attempt, Route, Router, _Outcome, _Race


def outcome(method: str, address: str, ok: bool) -> _Outcome:
    attempt = Attempt(method, address, "ok" if ok else "connection_refused", 0.01)
    route = Route("peer", method, address, [], ()) if ok else None
    return _Outcome([attempt], route)


async def test_the_most_preferred_working_route_wins_and_later_ones_are_not_listed():
    race = _Race()
    first: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
    race.start(first, ("reported", "10.0.0.1:7946"))
    race.start(asyncio.sleep(0, outcome("override", "gw:17946", True)), ("override", "gw"))
    await asyncio.sleep(0)
    assert race.winner(grace=10.0) is None  # the better one is still silent: wait (grace)
    first.set_result(outcome("reported", "10.0.0.1:7946", True))
    route = race.winner(grace=10.0)
    assert route is not None and route.method == "reported"
    assert [a.method for a in route.attempts] == ["reported"]


async def test_a_silent_better_route_is_given_up_after_the_grace():
    race = _Race()
    never: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
    race.start(never, ("reported", "10.0.0.1:7946"))
    race.start(asyncio.sleep(0, outcome("override", "gw:17946", True)), ("override", "gw"))
    await asyncio.sleep(0.01)
    assert race.winner(grace=10.0) is None
    route = race.winner(grace=0.0)
    assert route is not None and route.method == "override"
    assert [(a.method, a.result) for a in route.attempts] == [
        ("reported", "no answer yet; a later route won"), ("override", "ok")]
    await asyncio.sleep(0)
    assert never.cancelled()  # the silent probe is stopped


async def test_all_failed_lists_every_attempt():
    race = _Race()
    race.start(asyncio.sleep(0, outcome("reported", "a:1", False)), ("reported", "a:1"))
    race.start(asyncio.sleep(0, outcome("override", "b:2", False)), ("override", "b:2"))
    await asyncio.sleep(0.01)
    assert race.all_failed() and race.winner(grace=0.0) is None
    assert [a.address for a in race.attempts()] == ["a:1", "b:2"]


def test_a_remembered_route_expires_when_the_member_reports_other_addresses():
    record = SimpleNamespace(addresses=("10.0.0.5:7946",))
    view = SimpleNamespace(id="peer", record=record)
    node = SimpleNamespace(core=SimpleNamespace(member=lambda _id: view))
    router = Router(node)  # type: ignore[arg-type]
    router.routes["peer"] = Route("peer", "reported", "10.0.0.5:7946", [], ("10.0.0.5:7946",))
    assert router.cached("peer") is router.routes["peer"]
    record.addresses = ("10.0.0.9:7946",)  # it moved (DHCP, a new interface)
    assert router.cached("peer") is None


JUMPS = """\
import json, sys
from pathlib import Path
from types import SimpleNamespace
from swarmnode.routes import Router

config = Path(sys.argv[1])
ssh = SimpleNamespace(config=str(config), user="me")
node = SimpleNamespace(node_config=SimpleNamespace(ssh=ssh, jumps_for=lambda *_: []),
                       core=SimpleNamespace(members=lambda: []))
view = SimpleNamespace(id="peer", name="target", record=None)
hops = Router(node).jump_hops(view)
print(json.dumps([[h.host for h in hops], "paramiko" in sys.modules]))
"""


@pytest.mark.parametrize(("config", "hops", "paramiko"), [
    (None, [], False),
    ("Host target\n    User root\n", [], False),
    ("Host target\n    proxyJUMP j1,j2\n", ["j1", "j2"], True),
])
def test_ssh_jumps_are_read_from_the_ssh_config_and_paramiko_loads_only_for_a_proxyjump(
        tmp_path: Path, config: str | None, hops: list[str], paramiko: bool) -> None:
    path = tmp_path / "ssh_config"
    if config is not None:
        path.write_text(config)
    done = subprocess.run([sys.executable, "-c", JUMPS, str(path)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [hops, paramiko]
