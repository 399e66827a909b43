"""Wrong-host SSH (issue 13, the original incident on purpose), with real sshd and swarmnode.

    orch 10.42.0.2 ---+--- lan ---+--- other 10.42.0.3 (sshd; a swarmnode home, not running)
                      |
                      +--- mal 10.42.0.4 (an admitted member running hostile code)

mal re-signs its record with other's address, other's real SSH host key and, first, a shell
fragment as its `ctl`; then a real `swarmnode` executable and the home of another node on
other. With mal down, `swarmnode restart mal` on orch (the founder, an operator) falls back to
SSH. Both must be refused, and nothing may run on other: a fragment is never a ctl, and the
swarmnode on other cannot sign the challenge with mal's key. The old code ran the fragment on
other as root (its `ctl ... id` check printed what the fragment wanted).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, unavailable_reason
from tests.lab.sshd import keygen, sshd_unavailable_reason, start_sshd
from tests.swarm import (
    Node,
    Swarm,
    _env,
    lab_swarm_fixture,  # noqa: F401 (the `lab_swarm` fixture)
)

_REASON = unavailable_reason() or sshd_unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(150),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]

PORT = 7946
JOIN_S = 20.0
ORCH, OTHER, MAL = "10.42.0.2", "10.42.0.3", "10.42.0.4"
#: mal's hostile build: the real node, publishing whatever SSH facts the test hands it.
HOSTILE = ("import json, os, sys\n"
           "from swarmnode import node\n"
           "facts = json.loads(os.environ['HOSTILE_FACTS'])\n"
           "node.Node._ssh_facts = lambda self: facts\n"
           "sys.argv[0] = 'swarmnode'\n"
           "from cli import main as cli\n"
           "cli.launch_node = lambda opts: node.main(opts.to_json())  # (here: no exec)\n"
           "cli.main()\n")


def start_hostile(swarm: Swarm, lab: Lab, mal: Node, token: str, facts: dict[str, object],
                  ) -> None:
    argv = swarm.join_argv(mal, token, extra=["--advertise", f"{OTHER}:{PORT}"])
    argv[:3] = [sys.executable, "-c", HOSTILE]
    env = _env() | {"HOSTILE_FACTS": json.dumps(facts)}
    mal.proc = lab.spawn("mal", argv, env=env, log_path=mal.log)
    swarm.wait_ready(mal)


def test_restart_never_reaches_another_host_over_ssh(lab: Lab, lab_swarm: Swarm,
                                                     tmp_path: Path) -> None:
    swarm = lab_swarm
    lab.switch("lan")
    for host, address in (("orch", ORCH), ("other", OTHER), ("mal", MAL)):
        lab.host(host)
        lab.connect(host, "lan", f"{address}/24")
    client = keygen(tmp_path / "keys" / "id_ed25519")
    sshd = start_sshd(lab, "other", OTHER, [client], tmp_path / "sshd")
    marker = tmp_path / "owned"

    orch, token = swarm.init("orch", f"{ORCH}:{PORT}", host="orch")
    victim = swarm.add("victim", f"{OTHER}:{PORT}", host="other")  # a real home on other
    mal = swarm.add("mal", f"{MAL}:{PORT}", host="mal")
    orch.home.mkdir(parents=True, exist_ok=True)
    (orch.home / "config.toml").write_text(
        f'[ssh]\nidentity_file = "{client.path}"\nhost_keys = []\n')
    swarm.start(orch)

    ctl = str(Path(sys.executable).with_name("swarmnode"))
    fragments = {  # the old `ctl id` check ran `<ctl> id`: this printed mal's id, then owned
        "ctl": f"echo {mal.id}; echo ran-on-$(hostname -I) > {marker}; true",
        "home": str(mal.home)}
    for facts, why in ((fragments, "ctl fact must be an absolute path to 'swarmnode'"),
                       ({"ctl": ctl, "home": str(victim.home)},
                        f"swarmnode there is {victim.id}")):
        start_hostile(swarm, lab, mal, token,
                      {"ssh_keys": sshd.fingerprint, "ssh_port": 22, **facts})
        swarm.wait_for(lambda facts=facts: (swarm.entry(orch, mal) or {}).get("ssh_keys")
                       == [sshd.fingerprint] and swarm.state(orch, mal) == "alive", JOIN_S,
                       "orch holds mal's hostile record")
        swarm.kill9(mal)  # a member that does not answer: restart falls back to SSH
        res = swarm.cli(orch, "restart", "mal", "-v", timeout=90.0, check=False)
        assert res.returncode == 1, res
        assert "refused" in res.stderr and why in res.stderr, res.stderr
        assert not marker.exists(), marker.read_text()
        [event] = [e for e in swarm.events(orch, "action") if e["verb"] == "restart"][-1:]
        assert event["outcome"].startswith("refused"), event
    # the fragment never reached other at all; the real swarmnode there was asked only to
    # prove who it is, over SSH from orch, and nothing else ran
    log = sshd.log()
    assert log.count("Accepted publickey") == 1, log
