"""`swarmnode push --wait` to every node healthy, beside sequential ssh deploys to the same nodes.

Needs root (namespaces), OpenSSH (sshd, ssh, ssh-keygen); rsync when installed, else the ssh
baseline copies with `tar | ssh tar -x` (said in the output). Two kinds of cluster, one after
the other, each running the real `swarmnode join` with the SHIPPED DEFAULT timers
(`--no-mdns --no-tailscale`):

* lab: `--lab-nodes` (5) namespaces n1.. on one bridge (10.42.0.50.../24), each running a
  swarmnode and a real sshd (own host key, the orchestrator's key authorised);
* loopback, for each size in `--nodes` (5,10,20): nodes on 127.0.0.x of this machine, as in
  tests/test_push_loopback.py, each with its own sshd on 127.0.0.x (a free port), so the ssh
  baseline runs against the same "hosts" as swarmnode at every size.

The payload is a deploy like the original tool's (~2 MB): lib/ holds copies of this repo's
swarmnode/, net/, cli/ and tests/, share/ the docs and 400 kB of incompressible data, bin/ the
`restart` and `health` scripts that both methods run. `restart` stands in for a service restart:
it stops the running instance (a `sleep` whose pid is in a pid file), starts a new one and
records the release's VERSION; `health` checks that instance is alive and runs this VERSION.
Every deploy (warm-ups included) writes a new VERSION first, so nothing is ever cached.

Methods, from one non-leader node granted the push right (the "pusher"; B runs from the same
host), interleaved in a rotating order every repeat so machine noise hits all of them:

* push:    `swarmnode push PAYLOAD --wait --json` (default: 1 canary when > 2 nodes);
* push-c0: the same with `--canary 0`;
* ssh:     the original tool: for each node in turn `rsync -a --delete` over ssh (host keys
           checked against the lab's known_hosts), then `ssh node restart`, `ssh node health`:
           a new ssh connection per step, as the original did;
* ssh-mux: the same over one persistent ssh connection per node (ControlMaster, opened in the
           warm-up): the best case for the ssh approach, for context.

The ssh sessions get a stock Debian root home (see `start_sshd`): this VM's own root .bashrc
runs `pyenv init`, which would add ~90 ms to every ssh command and flatter swarmnode.

Measured: the wall time of each whole command (the push CLI from start to exit; the ssh script
from start to its last health check). That is the headline: what a person waits for. Also
reported for push: the `elapsed` its JSON prints (the pusher's clock, from after bundling to
its last poll) and, from the nodes' own events, push_started -> push_done. A push must end with
`counts` all healthy, an ssh deploy with every node's service on the new VERSION.

`--profile K` (default 2) then, at each size, makes K more pushes per variant, sent straight to
the pusher's control socket with its `push_status` polled every 10 ms: a per-node timeline
(staged, fetching, installed, restarted, healthy), the CPU time all node processes used (is
the machine the limit?), and bundling / extraction of the payload timed in this process.
A push is checked after `--wait` returns: every node's app link and service must be on the new
VERSION; a node that is not is recorded (and waited for), not hidden.

    .venv/bin/python bench/lab_push.py [--repeats 9] [--nodes 5,10,20] [--worktree]

Results: a markdown table on stdout, JSON in /tmp/swarmnode-bench/lab_push.json. Every
namespace, node, sshd and service process the script starts is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from swarmnode import control  # noqa: E402
from swarmnode.push import bundle as bundles  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.sshd import SSHD, ClientKey, Sshd, keygen  # noqa: E402
from tests.ports import free_port  # noqa: E402

PORT = 7946
SWITCH = "lan"
APP = "benchapp"
SERVICE = ("sleep", "3600")  # the stand-in service process (its argv, checked before a kill)
VARIANTS = ("push", "push-c0", "ssh", "ssh-mux")
TARGETS = {"lab_push_s": 1.5, "original_s": 8.0, "ratio_at_5": 5.0}
SSH_OPTS = ("-F", "/dev/null", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10")


# ------------------------------------------------------------------------ where processes run
class Local:
    """This machine's own namespace with the `Lab` interface the code below uses (spawn, run,
    wait_for_log): loopback clusters run their nodes and sshds through it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def spawn(self, host: str | None, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log_path: Path | None = None) -> subprocess.Popen[bytes]:
        path = log_path or self.log_dir / f"{host}-{len(self.procs)}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as log:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                    start_new_session=True)
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def run(self, host: str | None, argv: Sequence[str], timeout: float = 10.0,
            **_: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def wait_for_log(self, proc: subprocess.Popen[bytes], needle: str,
                     timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.logs[proc.pid].read_text(errors="replace")
            if needle in text:
                return text
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} did not print {needle!r}:\n{text}")
            time.sleep(0.02)

    def close(self) -> None:
        for proc in self.procs:  # SIGTERM first: a node leaves gracefully
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


# ------------------------------------------------------------------------------ the payload
def make_payload(root: Path) -> Path:
    d = root / "payload"
    for pkg in ("swarmnode", "net", "cli", "tests"):
        shutil.copytree(SRC / pkg, d / "lib" / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(SRC / "docs", d / "share" / "doc")
    (d / "share" / "assets.bin").write_bytes(random.Random(7).randbytes(400_000))
    (d / "bin").mkdir()
    (d / "bin" / "restart").write_text(f"""#!/bin/sh
# Service restart stand-in: stop the running instance, start the new one, record its version.
set -e
state=${{SERVICE_STATE:-$SWARMNODE_HOME}}
if [ -f "$state/{APP}.pid" ]; then kill "$(cat "$state/{APP}.pid")" 2>/dev/null || true; fi
nohup {" ".join(SERVICE)} >/dev/null 2>&1 </dev/null &
echo $! > "$state/{APP}.pid.tmp"
mv "$state/{APP}.pid.tmp" "$state/{APP}.pid"
cp VERSION "$state/{APP}.version"
""")
    (d / "bin" / "health").write_text(f"""#!/bin/sh
# The instance in the pid file is alive and runs this release.
state=${{SERVICE_STATE:-$SWARMNODE_HOME}}
kill -0 "$(cat "$state/{APP}.pid")" && cmp -s VERSION "$state/{APP}.version"
""")
    for f in ("restart", "health"):
        (d / "bin" / f).chmod(0o755)
    (d / "swarmnode-push.toml").write_text(
        f'name = "{APP}"\nrestart = "sh bin/restart"\nhealth = "sh bin/health"\n'
        "health_timeout = 30\n")
    (d / "VERSION").write_text("0\n")
    return d


def payload_stats(d: Path) -> dict[str, int]:
    files = [p for p in d.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


# ------------------------------------------------------------------------------ the cluster
@dataclass
class Member:
    name: str
    host: str | None  # lab host, None on loopback
    addr: str
    port: int
    home: Path
    id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    ssh_port: int = 22
    deploy: Path = Path()  # the ssh method's app directory on this node
    state: Path = Path()  # the ssh method's service state (pid file, version)

    @property
    def listen(self) -> str:
        return f"{self.addr}:{self.port}"


@dataclass
class Cluster:
    kind: str  # "lab" or "loopback"
    where: Any  # Lab or Local
    root: Path
    swarmnode: str
    members: list[Member] = field(default_factory=list)
    pusher: Member | None = None
    script: dict[str, Path] = field(default_factory=dict)  # ssh variant -> deploy script

    def cli(self, m: Member, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return self.where.run(m.host, [self.swarmnode, "--home", str(m.home), *args],
                              timeout=timeout)

    def query(self, m: Member, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
        return control.call(m.home, cmd, timeout=timeout, **args)

    def start(self, token: str | None = None) -> None:
        founder = self.members[0]
        for m in self.members:
            res = self.cli(m, "id")
            m.id = res.stdout.strip().splitlines()[-1]
        res = self.cli(founder, "init", "--name", "benchpush", "--listen", founder.listen)
        token = res.stdout.strip().splitlines()[-1].strip()
        if not token.startswith("swn1."):
            raise RuntimeError(f"init printed no token: {res.stdout!r} {res.stderr!r}")
        self._spawn(founder, None)
        self._ready(founder)
        for m in self.members[1:]:
            self._spawn(m, token)
        for m in self.members[1:]:
            self._ready(m)
        self._converged(120.0)

    def _spawn(self, m: Member, token: str | None) -> None:
        argv = [self.swarmnode, "--home", str(m.home), "join", *([token] if token else []),
                "--name", m.name, "--listen", m.listen, "--no-mdns", "--no-tailscale"]
        m.proc = self.where.spawn(m.host or m.name, argv, log_path=self.root / f"{m.name}.log")

    def _ready(self, m: Member, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                self.query(m, "status", timeout=2)
                return
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"{m.name} exited:\n{self.log(m)[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{m.name} not ready in {timeout} s:\n{self.log(m)[-3000:]}")
            time.sleep(0.05)

    def _converged(self, timeout: float) -> None:
        ids = {m.id for m in self.members}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(ids <= {x["id"] for x in self.query(m, "nodes") if x["state"] == "alive"}
                       for m in self.members):
                    return
            except (control.ControlError, OSError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{len(self.members)} nodes did not converge in {timeout} s")

    def log(self, m: Member) -> str:
        return (self.root / f"{m.name}.log").read_text(errors="replace")

    def choose_pusher(self) -> Member:
        """A node that is neither the founder nor the leader, granted the push right."""
        leader = None
        deadline = time.monotonic() + 15
        while leader is None and time.monotonic() < deadline:
            leader = self.query(self.members[1], "status").get("leader")
            time.sleep(0.2)
        pusher = next(m for m in self.members[1:] if m.id != leader)
        res = self.cli(self.members[0], "grant", "push", pusher.name)
        if res.returncode != 0:
            raise RuntimeError(f"grant failed: {res.stderr}")
        self.pusher = pusher
        time.sleep(3.0)  # the grant note reaches every node (not measured; ~0.3 s needed)
        return pusher

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(m.proc.pid, signal.SIGTERM)
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=10)


def kill_services(c: Cluster) -> None:
    """The stand-in service instances left running (by pid file; only our `sleep`s)."""
    for m in c.members:
        for state in (m.home, m.state):
            with contextlib.suppress(OSError, ValueError):
                pid = int((state / f"{APP}.pid").read_text())
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
                if [a.decode() for a in argv] == list(SERVICE):
                    os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ ssh baseline
def start_sshd(where: Any, host: str, address: str, port: int, client: ClientKey,
               workdir: Path, home: Path) -> Sshd:
    """tests/lab/sshd.py's sshd (same options), with the session's HOME set to `home` for our
    key (authorized_keys `environment=`, allowed for HOME only). Why: sshd runs commands with
    root's bash, which sources ~/.bashrc for ssh sessions, and this VM's root .bashrc runs
    `pyenv init` (~90 ms per command). A deploy target has a stock root home, so `home` holds
    Debian's stock root .bashrc and .profile."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_key", comment=f"host-{host}")
    (workdir / "authorized_keys").write_text(f'environment="HOME={home}" {client.public}\n')
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    options = {
        "HostKey": workdir / "host_key", "AuthorizedKeysFile": workdir / "authorized_keys",
        "PidFile": workdir / "sshd.pid", "ListenAddress": f"{address}:{port}",
        "StrictModes": "no", "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no", "UsePAM": "no",
        "PermitRootLogin": "prohibit-password", "PermitUserEnvironment": "HOME",
        "LogLevel": "VERBOSE"}
    argv = [SSHD, "-D", "-e", "-f", "/dev/null"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    log_path = workdir / "sshd.log"
    proc = where.spawn(host, argv, log_path=log_path)
    where.wait_for_log(proc, "Server listening on", timeout=10)
    return Sshd(host=host, address=address, port=port, host_key=host_key, proc=proc,
                log_path=log_path)


def stock_root_home(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("bashrc", "profile"):
        stock = Path(f"/usr/share/base-files/dot.{name}")
        (d / f".{name}").write_text(stock.read_text() if stock.exists() else "")
    return d


def ssh_setup(c: Cluster, keys: Path) -> dict[str, Any]:
    """An sshd on every node, a known_hosts with their keys, and the two deploy scripts."""
    client = keygen(keys / "id_ed25519")
    home = stock_root_home(c.root / "root-home")
    lines = []
    for m in c.members:
        if c.kind == "loopback":
            m.ssh_port = free_port(m.addr)
        sshd = start_sshd(c.where, m.host or m.name, m.addr, m.ssh_port, client,
                          c.root / "sshd" / m.name, home)
        lines.append(sshd.known_hosts_line + "\n")
        m.state = c.root / "ssh-deploy" / m.name
        m.deploy = m.state / APP
        m.state.mkdir(parents=True)
    known = keys / "known_hosts"
    known.write_text("".join(lines))
    rsync = shutil.which("rsync")
    opts = [*SSH_OPTS, "-i", str(client.path), "-o", f"UserKnownHostsFile={known}"]
    for variant in ("ssh", "ssh-mux"):
        o = list(opts)
        if variant == "ssh-mux":
            o += ["-o", "ControlMaster=auto", "-o",
                  f"ControlPath={c.root}/mux-%h-%p", "-o", "ControlPersist=900"]
        c.script[variant] = deploy_script(c, variant, o, rsync)
    return {"copy": "rsync -a --delete" if rsync else "tar | ssh tar -x (rsync not installed)",
            "ssh_options": " ".join(opts)}


def deploy_script(c: Cluster, variant: str, opts: list[str], rsync: str | None) -> Path:
    """The original tool as a bash script: per node copy, restart, health, one after another.
    Prints `NODE STEP EPOCH` after each step ($EPOCHREALTIME: no process per timestamp)."""
    ssh = "ssh " + " ".join(shlex.quote(o) for o in opts)
    lines = ["#!/bin/bash", "set -euo pipefail", 'payload="$1"',
             f"ssh_() {{ {ssh} \"$@\"; }}", 'echo "- begin $EPOCHREALTIME"']
    for m in c.members:
        dest, state = shlex.quote(str(m.deploy)), shlex.quote(str(m.state))
        target = f"-p {m.ssh_port} root@{m.addr}"
        if rsync:
            copy = (f'rsync -a --delete -e {shlex.quote(ssh + f" -p {m.ssh_port}")} '
                    f'"$payload/" root@{m.addr}:{dest}/')
        else:
            remote = shlex.quote(f"rm -rf {dest} && mkdir -p {dest} && tar -xf - -C {dest}")
            copy = f'tar -C "$payload" -cf - . | ssh_ {target} {remote}'
        run = f"cd {dest} && SERVICE_STATE={state} sh bin/{{}}"
        lines += [copy, f'echo "{m.name} copied $EPOCHREALTIME"',
                  f"ssh_ {target} {shlex.quote(run.format('restart'))}",
                  f'echo "{m.name} restarted $EPOCHREALTIME"',
                  f"ssh_ {target} {shlex.quote(run.format('health'))}",
                  f'echo "{m.name} healthy $EPOCHREALTIME"']
    path = c.root / f"deploy-{variant}.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_ssh(c: Cluster, variant: str, payload: Path, version: str) -> dict[str, Any]:
    assert c.pusher is not None
    t0 = time.time()
    res = c.where.run(c.pusher.host, ["bash", str(c.script[variant]), str(payload)],
                      timeout=600)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{variant} deploy failed ({res.returncode}): {res.stderr[-2000:]}")
    for m in c.members:
        if (m.state / f"{APP}.version").read_text().strip() != version:
            raise RuntimeError(f"{variant}: {m.name} does not run {version}")
    marks = [ln.split() for ln in res.stdout.splitlines() if ln.strip()]
    begin = float(marks[0][2])
    steps: dict[str, list[float]] = {"copy": [], "restart": [], "health": []}
    prev = begin
    for _name, step, ts in marks[1:]:
        t = float(ts)
        steps[{"copied": "copy", "restarted": "restart", "healthy": "health"}[step]].append(
            t - prev)
        prev = t
    return {"wall_s": wall, "script_s": prev - begin,
            "per_node_s": {k: statistics.median(v) for k, v in steps.items()}}


# ------------------------------------------------------------------------------ swarmnode push
def push_events(c: Cluster, push_id: str, digest: str) -> dict[str, Any]:
    assert c.pusher is not None
    mine = [e for e in c.query(c.pusher, "events", limit=300) if e.get("push") == push_id]
    started = next(e["ts"] for e in mine if e["kind"] == "push_started")
    done = next((e["ts"] for e in mine if e["kind"] in ("push_done", "push_halted")), None)
    healthy = {}
    for m in c.members:
        for e in c.query(m, "events", limit=300):
            if e["kind"] == "push_healthy" and e.get("digest") == digest:
                healthy[m.name] = e["ts"] - started
    return {"started_ts": started, "done_s": None if done is None else done - started,
            "healthy_s": healthy}


def not_on(c: Cluster, version: str) -> dict[str, str]:
    """Nodes whose app link or running service is not on `version`: what each runs."""
    out = {}
    for m in c.members:
        got = (m.home / "apps" / APP / "VERSION").read_text().strip()
        svc = (m.home / f"{APP}.version").read_text().strip()
        if got != version or svc != version:
            out[m.name] = f"app {got}, service {svc}"
    return out


def check_installed(c: Cluster, version: str) -> dict[str, Any] | None:
    """None when every node runs `version` as `push --wait` returns. Otherwise (seen: a canary
    whose periodic catch-up re-applied the previous published release before the new note
    reached it) which nodes did not, and how long until they all did (None: not in 15 s)."""
    stale = not_on(c, version)
    if not stale:
        return None
    t0 = time.monotonic()
    while not_on(c, version) and time.monotonic() - t0 < 15:
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"    ! not on {version} when push returned: {stale}; all on it after "
          f"{took:.2f} s" if not not_on(c, version) else "    ! never converged", flush=True)
    return {"stale": stale, "converged_after_s": None if not_on(c, version) else round(took, 2)}


def run_push(c: Cluster, variant: str, payload: Path, version: str) -> dict[str, Any]:
    assert c.pusher is not None
    argv = ["push", str(payload), "--wait", "--json"]
    if variant == "push-c0":
        argv += ["--canary", "0"]
    t0 = time.time()
    res = c.cli(c.pusher, *argv, timeout=300)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"push failed ({res.returncode}): {res.stdout[-2000:]} "
                           f"{res.stderr[-2000:]}")
    view = json.loads(res.stdout)
    if view["counts"] != {"healthy": len(c.members)}:
        raise RuntimeError(f"push: counts {view['counts']}")
    stale = check_installed(c, version)
    ev = push_events(c, view["push"], view["digest"])
    return {"stale": stale, "wall_s": wall, "elapsed_s": view["elapsed"],
            "events_done_s": ev["done_s"],
            "cli_to_started_s": ev["started_ts"] - t0,
            "canaries": sum(1 for s in view["nodes"].values() if s["canary"]),
            "size": view["size"], "healthy_s": ev["healthy_s"]}


def deploy(c: Cluster, variant: str, payload: Path, tag: str) -> dict[str, Any]:
    version = f"{tag}-{secrets.token_hex(4)}"
    (payload / "VERSION").write_text(version + "\n")
    if variant.startswith("push"):
        return run_push(c, variant, payload, version)
    return run_ssh(c, variant, payload, version)


def measure(c: Cluster, payload: Path, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up, not measured: first connections, page cache, mux masters
        deploy(c, v, payload, f"{c.kind}{len(c.members)}-warm-{v}")
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for v in order:
            out = deploy(c, v, payload, f"{c.kind}{len(c.members)}-{r}-{v}")
            runs[v].append(out)
        print(f"  {c.kind} {len(c.members):2} nodes, repeat {r + 1}/{repeats}: " + ", ".join(
            f"{v} {runs[v][-1]['wall_s']:.2f} s" for v in VARIANTS), flush=True)
    return summarise(runs)


def stats(xs: Sequence[float | None]) -> dict[str, Any]:
    ys = [x for x in xs if x is not None]
    return {"median": round(statistics.median(ys), 3), "max": round(max(ys), 3),
            "min": round(min(ys), 3), "n": len(ys), "each": [round(y, 3) for y in ys]}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v, rs in runs.items():
        s: dict[str, Any] = {"wall_s": stats([r["wall_s"] for r in rs])}
        if v.startswith("push"):
            s["elapsed_s"] = stats([r["elapsed_s"] for r in rs])
            s["events_done_s"] = stats([r["events_done_s"] for r in rs])
            s["cli_to_started_s"] = stats([r["cli_to_started_s"] for r in rs])
            s["canaries"] = rs[0]["canaries"]
            s["bundle_bytes"] = rs[0]["size"]
            s["stale_after_return"] = [r["stale"] for r in rs if r["stale"]]
        else:
            s["per_node_s"] = {k: round(statistics.median(r["per_node_s"][k] for r in rs), 4)
                               for k in ("copy", "restart", "health")}
        out[v] = s
    for v in ("push", "push-c0"):
        b, a = out["ssh"]["wall_s"]["median"], out[v]["wall_s"]["median"]
        out[f"ratio_ssh_over_{v}"] = round(b / a, 2)
        # the same ratio per repeat (each repeat ran both back to back)
        out[f"ratio_ssh_over_{v}_per_repeat"] = stats(
            [x["wall_s"] / y["wall_s"] for x, y in zip(runs["ssh"], runs[v], strict=True)])
    return out


# ------------------------------------------------------------------------------ profiling
def cpu_seconds(c: Cluster) -> float:
    """CPU time of every node process so far, with its reaped children (the hooks)."""
    return sum(snapshot.cpu_seconds(m.proc.pid, children=True)  # type: ignore[union-attr]
               for m in c.members)


def profile(c: Cluster, payload: Path, k: int) -> dict[str, Any]:
    """Pushes sent straight to the control socket, `push_status` polled every 10 ms: when each
    node reached each state, relative to push_started (bundling is before it)."""
    assert c.pusher is not None
    out: dict[str, Any] = {}
    for variant in ("push", "push-c0"):
        timelines = []
        for i in range(k):
            version = f"profile-{variant}-{i}-{secrets.token_hex(4)}"
            (payload / "VERSION").write_text(version + "\n")
            cpu0 = cpu_seconds(c)
            t0 = time.time()
            view = c.query(c.pusher, "push", timeout=120, path=str(payload),
                           canary=0 if variant == "push-c0" else None)
            t_ret = time.time()
            seen: dict[str, dict[str, float]] = {}
            while True:
                now = time.time()
                for n in view["nodes"].values():
                    seen.setdefault(n["name"], {}).setdefault(n["state"], now)
                if view["done"]:
                    break
                time.sleep(0.01)
                view = c.query(c.pusher, "push_status", push=view["push"])
            t_done_seen = time.time()
            cpu = cpu_seconds(c) - cpu0
            stale = check_installed(c, version)
            ev = push_events(c, view["push"], view["digest"])
            st = ev["started_ts"]
            canaries = {n["name"] for n in view["nodes"].values() if n["canary"]}
            timelines.append({
                "request_to_started_s": round(st - t0, 3),
                "request_returned_s": round(t_ret - st, 3),
                "done_s": round(ev["done_s"], 3), "done_seen_s": round(t_done_seen - st, 3),
                "node_cpu_s": round(cpu, 3),
                "cores_busy": round(cpu / (t_done_seen - t0), 2),
                "canaries": sorted(canaries),
                "nodes": {name: {s: round(t - st, 3) for s, t in states.items()}
                          for name, states in seen.items()},
                "healthy_event_s": {n: round(t, 3) for n, t in ev["healthy_s"].items()},
                "stale": stale,
            })
        out[variant] = timelines
    out["local"] = local_costs(payload, c.root / "profile-local", len(c.members))
    return out


def summary_of_profile(prof: dict[str, Any]) -> str:
    parts = []
    for v in ("push", "push-c0"):
        ts = prof[v]
        parts.append(f"{v}: started->done {statistics.median(t['done_s'] for t in ts):.3f} s, "
                     f"node CPU {statistics.median(t['node_cpu_s'] for t in ts):.2f} s "
                     f"({statistics.median(t['cores_busy'] for t in ts):.2f} cores busy)")
    local = {k: v for k, v in prof["local"].items() if k.endswith("_s")}
    return "; ".join(parts) + f"; here: {local}"


def local_costs(payload: Path, tmp: Path, n: int) -> dict[str, Any]:
    """Bundling and extracting the payload in this process (medians of 5), extraction with and
    without its syncfs (`sync_tree`), and `n` extractions at once in `n` processes
    (a rollout's installs on this one machine), with and without it."""
    tmp.mkdir(parents=True, exist_ok=True)
    make, extract, nofsync = [], [], []
    for i in range(5):
        t = time.perf_counter()
        info = bundles.make_bundle(payload, tmp / f"b{i}.tar.gz")
        make.append(time.perf_counter() - t)
        extract.append(_extract((tmp / f"b{i}.tar.gz", tmp / f"x{i}", info.digest, True)))
        nofsync.append(_extract((tmp / f"b{i}.tar.gz", tmp / f"y{i}", info.digest, False)))
    blob = tmp / "b0.tar.gz"
    ctx = multiprocessing.get_context("fork")
    together = {}
    for fsync in (True, False):
        with ctx.Pool(n) as pool:
            pool.map(time.sleep, [0.05] * n, chunksize=1)  # every worker forked and idle
            t = time.perf_counter()
            pool.map(_extract, [(blob, tmp / f"p{fsync}{i}", info.digest, fsync)
                                for i in range(n)], chunksize=1)
            together[fsync] = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)
    return {"make_bundle_s": round(statistics.median(make), 4),
            "extract_bundle_s": round(statistics.median(extract), 4),
            "extract_without_sync_s": round(statistics.median(nofsync), 4),
            f"extract_x{n}_parallel_s": round(together[True], 3),
            f"extract_x{n}_parallel_without_sync_s": round(together[False], 3),
            "bundle_bytes": info.size, "members": info.files}


def _extract(job: tuple[Path, Path, str, bool]) -> float:
    blob, dest, digest, fsync = job
    real = bundles.sync_tree
    if not fsync:
        bundles.sync_tree = lambda _p: None  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        bundles.extract_bundle(blob, dest, digest=digest)
        return time.perf_counter() - t
    finally:
        bundles.sync_tree = real  # type: ignore[assignment]


# ------------------------------------------------------------------------------ scenarios
def lab_cluster(lab: Lab, root: Path, swarmnode: str, n: int) -> Cluster:
    lab.switch(SWITCH)
    c = Cluster("lab", lab, root, swarmnode)
    for i in range(1, n + 1):
        name, addr = f"n{i}", f"10.42.0.{49 + i}"
        lab.host(name)
        lab.connect(name, SWITCH, f"{addr}/24")
        c.members.append(Member(name, name, addr, PORT, root / "homes" / name))
    return c


def loopback_cluster(local: Local, root: Path, swarmnode: str, n: int) -> Cluster:
    c = Cluster("loopback", local, root, swarmnode)
    for i in range(1, n + 1):
        addr = f"127.0.0.{10 + i}"
        c.members.append(Member(f"p{i}", None, addr, free_port(addr), root / "homes" / f"p{i}"))
    return c


def scenario(c: Cluster, payload: Path, repeats: int, k_profile: int) -> dict[str, Any]:
    t = time.monotonic()
    ssh = ssh_setup(c, c.root / "keys")
    c.start()
    formed = time.monotonic() - t
    pusher = c.choose_pusher()
    print(f"{c.kind}: {len(c.members)} nodes up in {formed:.1f} s; pusher {pusher.name}; "
          f"ssh copy: {ssh['copy']}", flush=True)
    res: dict[str, Any] = {"kind": c.kind, "nodes": len(c.members), "pusher": pusher.name,
                           "ssh": ssh, **measure(c, payload, repeats)}
    if k_profile:
        res["profile"] = profile(c, payload, k_profile)
        print(f"  profile: {summary_of_profile(res['profile'])}", flush=True)
    res["seconds"] = round(time.monotonic() - t, 1)
    return res


# ------------------------------------------------------------------------------ report
def fmt(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f} / {s['max']:.2f} s"


def report(res: dict[str, Any]) -> str:
    rows = ["| where | nodes | push, 1 canary | push, `--canary 0` | ssh, sequential | "
            "ssh ÷ push | ssh ÷ push c0 | ssh, persistent connections |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["scenarios"]:
        canary = s["push"]["canaries"]
        rows.append(
            f"| {s['kind']} | {s['nodes']} | {fmt(s['push']['wall_s'])}"
            f"{'' if canary == 1 else f' ({canary} canaries)'} | "
            f"{fmt(s['push-c0']['wall_s'])} | {fmt(s['ssh']['wall_s'])} | "
            f"{s['ratio_ssh_over_push']:.1f}x | {s['ratio_ssh_over_push-c0']:.1f}x | "
            f"{fmt(s['ssh-mux']['wall_s'])} |")
    rows += ["", "| where | nodes | push: JSON `elapsed` | push: started → done (events) | "
             "push c0: `elapsed` | push c0: started → done | CLI start → push_started | "
             "a node not on the new release as `--wait` returned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["scenarios"]:
        p, p0 = s["push"], s["push-c0"]
        rows.append(f"| {s['kind']} | {s['nodes']} | {fmt(p['elapsed_s'])} | "
                    f"{fmt(p['events_done_s'])} | {fmt(p0['elapsed_s'])} | "
                    f"{fmt(p0['events_done_s'])} | {p['cli_to_started_s']['median']:.2f} s | "
                    f"{len(p['stale_after_return'])} + {len(p0['stale_after_return'])} of "
                    f"{p['wall_s']['n']} + {p0['wall_s']['n']} |")
    rows += ["", "| where | nodes | ssh per node: copy | restart | health |",
             "|---|---:|---:|---:|---:|"]
    for s in res["scenarios"]:
        pn = s["ssh"]["per_node_s"]
        rows.append(f"| {s['kind']} | {s['nodes']} | {pn['copy'] * 1000:.0f} ms | "
                    f"{pn['restart'] * 1000:.0f} ms | {pn['health'] * 1000:.0f} ms |")
    return "\n".join(rows)


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "lab_push")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--nodes", default="5,10,20",
                    help="loopback cluster sizes, comma-separated ('' for none)")
    ap.add_argument("--lab-nodes", type=int, default=5, help="lab hosts (0: no lab run)")
    ap.add_argument("--profile", type=int, default=2,
                    help="timeline pushes per variant after each size's repeats (0: none)")
    ap.add_argument("--keep", action="store_true", help="keep homes and logs")
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    if any(n < 3 or n > 200 for n in sizes):
        print("--nodes: sizes 3..200", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="swarmnode-bench-push-"))
    payload = make_payload(base)
    t_all = time.monotonic()
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
        "command": shlex.join([".venv/bin/python", "bench/lab_push.py", *sys.argv[1:]]),
        "repeats": args.repeats, "payload": payload_stats(payload), "targets": TARGETS,
        "loadavg_start": os.getloadavg(), "scenarios": []}
    print(f"payload: {res['payload']['files']} files, {res['payload']['bytes'] / 1e6:.2f} MB;"
          f" load average {res['loadavg_start'][0]:.2f}", flush=True)
    try:
        if args.lab_nodes:
            root = base / "lab"
            with Lab("snp", log_dir=root / "lablog") as lab:
                c = lab_cluster(lab, root, args.swarmnode, args.lab_nodes)
                try:
                    res["scenarios"].append(scenario(c, payload, args.repeats, args.profile))
                finally:
                    c.stop()
                    kill_services(c)
        for n in sizes:
            root = base / f"loopback{n}"
            local = Local(root / "log")
            c = loopback_cluster(local, root, args.swarmnode, n)
            try:
                res["scenarios"].append(scenario(c, payload, args.repeats, args.profile))
            finally:
                for m in c.members:  # the ssh-mux masters: ssh -O exit, by their socket
                    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                        subprocess.run(["ssh", "-F", "/dev/null", "-o",
                                        f"ControlPath={root}/mux-%h-%p", "-p",
                                        str(m.ssh_port), "-O", "exit", m.addr],
                                       capture_output=True, timeout=5, check=False)
                local.close()
                kill_services(c)
    finally:
        res["seconds"] = round(time.monotonic() - t_all, 1)
        res["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"homes and logs kept in {base}")
    print()
    print(f"    {res['command']}   # commit {res['commit']}, {res['seconds'] / 60:.1f} min")
    print()
    print(report(res))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
