"""`swarmnode bootstrap` end to end: real sshd hosts, a jump host, a real founder node.

    orch 10.42.0.2 ---- 10.42.0.3 jump 172.30.0.1 ---- 172.30.0.9 target
    founder node        sshd :22, forwards and          sshd :22; default route via jump
                        masquerades target's traffic

orch cannot route to 172.30.0.0/24: the CLI (run in orch) reaches target only through jump,
and the new node on target reaches the founder through jump's masquerade (the founder answers
over the connection target opened). Every file lives in the test's tmp dir: the namespaces
share this machine's file system, so nothing may go to /etc or /opt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import Lab, unavailable_reason
from tests.lab.sshd import ClientKey, Sshd, keygen, sshd_unavailable_reason, start_sshd
from tests.swarm import REPO, Node, Swarm, lab_swarm_fixture  # noqa: F401 (`lab_swarm`)

ORCH, JUMP, JUMP_FAR, TARGET = "10.42.0.2", "10.42.0.3", "172.30.0.1", "172.30.0.9"
PORT = 7946
CLI_TIMEOUT_S = 150.0

_REASON = unavailable_reason() or sshd_unavailable_reason()
pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(240),
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]
# `--service auto` would install a real service where a service manager runs; there the test
# says `none` itself (the lab's hosts share this machine's /etc).
_HAS_INIT = Path("/run/systemd/system").is_dir() or Path("/sbin/openrc-run").exists()


@dataclass
class BootLab:
    lab: Lab
    swarm: Swarm
    founder: Node
    key: ClientKey
    jump: Sshd
    target: Sshd
    known_hosts: Path  # jump's key only
    home: Path  # HOME of the CLI in orch (empty ~/.ssh)
    prefix: Path
    remote_home: Path

    def bootstrap(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `swarmnode bootstrap root@target --jump root@jump ... ARGS` in orch."""
        argv = [sys.executable, "-m", "cli.main", "--home", str(self.founder.home), "bootstrap",
                f"root@{TARGET}", "--jump", f"root@{JUMP}",
                "--known-hosts", str(self.known_hosts), "--identity-file", str(self.key.path),
                "--prefix", str(self.prefix), "--remote-home", str(self.remote_home), *args]
        env = {"PYTHONPATH": str(REPO), "HOME": str(self.home), "SSH_AUTH_SOCK": ""}
        return self.lab.run("orch", argv, timeout=CLI_TIMEOUT_S, env=env)

    def target_pids(self) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.lab.netns("target")],
                             capture_output=True, text=True, check=True)
        return [int(p) for p in res.stdout.split()]


@pytest.fixture
def boot(lab: Lab, lab_swarm: Swarm, tmp_path: Path) -> BootLab:
    for name in ("orch", "jump", "target"):
        lab.host(name)
    to_orch, _ = lab.link("jump", "orch", f"{JUMP}/24", f"{ORCH}/24")
    lab.link("jump", "target", f"{JUMP_FAR}/24", f"{TARGET}/24")
    lab.default_route("target", JUMP_FAR)
    lab.masquerade("jump", "172.30.0.0/24", to_orch)

    key = keygen(tmp_path / "keys" / "id_ed25519")
    servers = tmp_path / "servers"
    jump = start_sshd(lab, "jump", JUMP, [key], servers)
    target = start_sshd(lab, "target", TARGET, [key], servers)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(jump.known_hosts_line + "\n")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)

    founder, _ = lab_swarm.init("orch", f"{ORCH}:{PORT}", host="orch")
    lab_swarm.start(founder)
    return BootLab(lab, lab_swarm, founder, key, jump, target, known_hosts, home,
                   tmp_path / "opt", tmp_path / "remote-home")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def test_bootstrap_installs_and_joins_through_a_jump_host(boot: BootLab) -> None:
    direct = boot.lab.run("orch", [sys.executable, "-c", "import socket; socket.create_connection("
                                   f"('{TARGET}', 22), timeout=2)"])
    assert direct.returncode != 0, "orch must not reach target directly"

    service = ("--service", "none") if _HAS_INIT else ()
    started = time.monotonic()
    res = boot.bootstrap("--host-key", boot.target.fingerprint, "--name", "target",
                         "--listen", f"{TARGET}:{PORT}", *service)
    elapsed = time.monotonic() - started
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    print(f"bootstrap took {elapsed:.1f}s\n{res.stderr}")
    assert "Traceback" not in res.stderr
    name, node_id = res.stdout.split()[-2:]
    assert name == "target"
    if not _HAS_INIT:
        assert "no service manager found" in res.stderr  # auto -> none in the lab
    assert "(service: none)" in res.stderr

    # The founder lists it alive and admitted, under the address it reports.
    swarm = boot.swarm
    entry = swarm.wait_for(
        lambda: next((m for m in swarm.members(boot.founder) if m["id"] == node_id
                      and m["state"] == "alive" and m["admitted_by"]), None),
        10.0, "the founder lists the new node alive and admitted")
    assert (entry["name"], entry["addresses"]) == ("target", [f"{TARGET}:{PORT}"])
    # It reached us over jump's masquerade, so we observed it there: the NAT case.
    assert entry["observed"].startswith(JUMP) and entry["nat"] is True, entry

    # Files: the copy, the wrapper, both service files; the token is gone again.
    share = boot.prefix / "share" / "swarmnode"
    unit = (share / "swarmnode.service").read_text()
    assert (f"ExecStart={boot.prefix}/bin/swarmnode --home {boot.remote_home} join "
            "$SWARMNODE_JOIN_ARGS") in unit
    assert (share / "swarmnode.initd").read_text().startswith("#!/sbin/openrc-run\n")
    assert os.access(boot.prefix / "bin" / "swarmnode", os.X_OK)
    site = next((boot.prefix / "lib").glob("python3.*/site-packages"))
    assert (site / "cli" / "main.py").read_bytes() == (REPO / "cli" / "main.py").read_bytes()
    assert not list(site.rglob("__editable__*"))
    assert not (boot.remote_home / "join.env").exists()
    assert (boot.remote_home / "identity.key").stat().st_mode & 0o777 == 0o600

    # The node runs in target's namespace, from the copy (its compiled extensions loaded),
    # isolated (-I) as the service started its CLI, which exec'd the node alone.
    python = [f"{boot.prefix}/bin/python", "-I", "-c"]
    command = ["--home", str(boot.remote_home), "join"]
    pids = [p for p in boot.target_pids()
            if _cmdline(p)[:3] == python and _cmdline(p)[8:11] == command]
    assert len(pids) == 1, [(p, _cmdline(p)) for p in boot.target_pids()]
    pid = pids[0]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(site / "zmq") in maps and str(REPO) not in maps
    assert f"inet {TARGET}/" in boot.lab.run("target", ["ip", "-4", "-o", "addr"]).stdout

    # Teardown kills what bootstrap started on target (it is no child of this test).
    boot.lab.close()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived the lab's teardown"


def test_unverified_target_key_is_refused_and_nothing_installed(boot: BootLab) -> None:
    # A pinned key that is not the target's (jump's, a real key): a mismatch.
    res = boot.bootstrap("--host-key", boot.jump.fingerprint, "--name", "target")
    assert res.returncode == 1, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr
    assert f"root@{TARGET}:22" in message and "mismatch" in message
    assert boot.target.fingerprint in message and boot.jump.fingerprint in message

    # No --host-key and target absent from known_hosts: unknown, with the key to check.
    res = boot.bootstrap("--name", "target")
    print(res.stderr)
    assert res.returncode == 1, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr
    assert f"root@{TARGET}:22" in message and "unknown" in message
    assert f"pass --host-key {boot.target.fingerprint} after checking it out of band" in message

    # Nothing was installed, and target never saw an authentication attempt.
    assert not boot.prefix.exists() and not boot.remote_home.exists()
    log = boot.lab.wait_for_log(boot.target.proc, "[preauth]", count=2)
    assert f"Connection from {JUMP_FAR}" in log
    assert "publickey" not in log and "Accepted" not in log
    assert "Accepted publickey for root" in boot.jump.log()  # the jump was used, verified
    assert [m["id"] for m in boot.swarm.members(boot.founder)] == [boot.founder.id]


def test_remote_failures_are_reported_with_their_reason(boot: BootLab, tmp_path: Path) -> None:
    pin = ("--host-key", boot.target.fingerprint, "--service", "none")
    # A prefix that exists and is something else is never replaced.
    taken = tmp_path / "taken"
    (taken / "data").mkdir(parents=True)
    res = boot.bootstrap(*pin, "--prefix", str(taken))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{taken} on root@{TARGET}:22 exists and is not a swarmnode copy" in res.stderr
    assert [p.name for p in taken.iterdir()] == ["data"]

    # The install itself fails on target (a file where a directory must be): its stderr shows.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    res = boot.bootstrap(*pin, "--prefix", str(blocker / "opt"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    print(res.stderr)
    assert f"installing failed on root@{TARGET}:22 (exit 1)" in res.stderr
    assert "Not a directory" in res.stderr
    assert not boot.remote_home.exists()
