"""Membership figures of real swarmnode processes on 5 separate hosts (network namespaces).

Needs root (the namespace lab). Five hosts n1..n5 (10.42.0.50-54/24) on one bridge, each with a
multicast route, run the real `swarmnode join` with the SHIPPED DEFAULT timers (no --fast),
`--no-tailscale`, mDNS on. n1 is made the founder with `swarmnode init`; the others join with
its token. By default the product code is a clean snapshot of HEAD (see snapshot.py). Phases:

1. join:  n1..n4 form the cluster; then, `--repeats` times, a fresh home on n5 joins, each at
   its own address (an alias 10.42.0.60+r on n5) so no address is reused (see 5.). Measured:
   time until every other node lists the new id `alive`, from (a) spawning its process, (b) its
   first log line / `node_started` event, (c) its `joined` event (admission answered). All but
   the last leave gracefully (SIGTERM) after their measurement.
2. crash: `--repeats` times, `kill -9` one node (n2..n5 in turn); time until every other node
   lists it `dead`. It is then restarted from its home (time until listed `alive` again, too).
3. idle:  `--idle-seconds` of an idle 5-node cluster: bytes_in/bytes_out deltas from
   `status --json` (node payload), the hosts' interface byte counters (everything on the wire,
   mDNS and TCP/IP headers included), outgoing TCP connection attempts (/proc/net/snmp), CPU
   time, and VmRSS of each node's python process.
4. saturation: `--busy` busy-loop processes (normal priority) saturate both cores for
   `--minutes`; every member_suspect / member_dead / refuted event is collected from each node
   (`events --json`) and each suspicion is classified refuted / dead / unresolved.
5. address reuse: n5 leaves and a fresh identity starts at the same address (a reinstalled
   machine); idle traffic `--reuse-seconds` before and 40 s after, beside each other.

"Lists it alive/dead" is read by polling every node every `--poll` seconds over its control
socket: the same request `swarmnode nodes --json` sends, minus ~0.3 s of interpreter start-up
per call (the real CLI is run once per phase as a check that they agree). Event timestamps from
each node's own log (`events --json`) give the same figures without polling granularity; both
are reported.

    .venv/bin/python bench/lab_membership.py                   # full run, ~16 minutes
    .venv/bin/python bench/lab_membership.py --minutes 1 --repeats 3   # quick look

Results: a summary table on stdout, JSON in /tmp/swarmnode-bench/lab_membership.json. Every
namespace and process the script starts is removed at the end, also on failure or Ctrl-C;
`--keep` keeps the node homes and logs (in /tmp/swarmnode-bench-*) for reading afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from swarmnode import control  # noqa: E402
from tests.lab import Lab  # noqa: E402

HOSTS = 5
PORT = 7946
SWITCH = "lan"
JOIN_ADDR_BASE = 60
TARGETS = {"join_s": 1.0, "dead_s": 6.0, "rss_mb": 60.0, "false_deaths": 0}


def addr_of(i: int) -> str:
    return f"10.42.0.{49 + i}"


@dataclass
class Node:
    host: str  # lab host name n1..n5
    home: Path
    ifname: str
    addr: str = ""  # listen address; default: the host's own
    id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    spawned_at: float = 0.0

    @property
    def listen(self) -> str:
        return f"{self.addr or addr_of(int(self.host[1:]))}:{PORT}"


@dataclass
class Bench:
    lab: Lab
    root: Path
    swarmnode: str
    poll: float
    nodes: dict[str, Node] = field(default_factory=dict)  # host -> current node there
    token: str = ""
    homes_made: int = 0

    # ------------------------------------------------------------------ processes
    def cli(self, node: Node, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return self.lab.run(
            node.host, [self.swarmnode, "--home", str(node.home), *args], timeout=timeout
        )

    def new_home(self, host: str, addr: str = "") -> Node:
        self.homes_made += 1
        home = self.root / f"{host}-{self.homes_made}"
        node = Node(host=host, home=home, ifname=f"to-{SWITCH}", addr=addr)
        res = self.cli(node, "id")
        node.id = res.stdout.strip().splitlines()[-1]
        return node

    def start(self, node: Node, founder: bool = False) -> None:
        argv = [self.swarmnode, "--home", str(node.home), "join"]
        if not founder:
            argv.append(self.token)
        argv += ["--name", node.home.name, "--listen", node.listen, "--no-tailscale"]
        node.log = self.root / f"{node.home.name}.log"
        node.spawned_at = time.time()
        node.proc = self.lab.spawn(node.host, argv, log_path=node.log)
        self.nodes[node.host] = node
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                control.call(node.home, "status", timeout=2)
                return
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.host} exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.host} not ready in 30 s:\n{node.log.read_text()}")
            time.sleep(0.02)

    def stop(self, node: Node) -> None:
        """Graceful: SIGTERM (the node leaves), wait for it to exit."""
        assert node.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGTERM)
        try:
            node.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.lab.kill9(node.proc)

    def python_pid(self, node: Node) -> int:
        """The node's python process (not an `ip netns exec` wrapper, should there be one)."""
        assert node.proc is not None
        todo = [node.proc.pid]
        while todo:
            pid = todo.pop(0)
            with contextlib.suppress(OSError):
                if "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe")):
                    return pid
            todo += _children(pid)
        raise RuntimeError(f"no python process under pid {node.proc.pid}")

    # ------------------------------------------------------------------ observation
    def query(self, node: Node, cmd: str, **args: Any) -> Any:
        return control.call(node.home, cmd, timeout=5, **args)

    def running(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.proc is not None and n.proc.poll() is None]

    def wait_state(
        self, target_id: str, state: str, observers: list[Node], timeout: float
    ) -> dict[str, float] | None:
        """Poll until every observer lists `target_id` in `state`; return {host: wall time the
        observer was first seen doing so}, or None at the timeout."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while True:
            for obs in observers:
                if obs.host in seen:
                    continue
                with contextlib.suppress(control.ControlError, OSError, TimeoutError):
                    members = self.query(obs, "nodes")
                    t = time.time()
                    if any(m["id"] == target_id and m["state"] == state for m in members):
                        seen[obs.host] = t
            if len(seen) == len(observers):
                return seen
            if time.monotonic() > deadline:
                return None
            time.sleep(self.poll)

    def events(self, node: Node) -> list[dict[str, Any]]:
        return self.query(node, "events", limit=10000)

    def event_ts(
        self, node: Node, kind: str, target: str | None = None, after: float = 0.0
    ) -> float | None:
        for ev in self.events(node):
            if ev["kind"] != kind or ev["ts"] < after:
                continue
            if target is None or ev.get("id") == target:
                return float(ev["ts"])
        return None

    def all_alive(self, timeout: float = 60.0) -> bool:
        """Every running node lists every running node alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = True
            run = self.running()
            ids = {n.id for n in run}
            for obs in run:
                try:
                    members = self.query(obs, "nodes")
                except (control.ControlError, OSError, TimeoutError):
                    ok = False
                    break
                alive = {m["id"] for m in members if m["state"] == "alive"}
                if not ids <= alive:
                    ok = False
                    break
            if ok:
                return True
            time.sleep(0.2)
        return False

    def cli_check(self, node: Node, target_id: str, state: str) -> bool:
        """The real `swarmnode nodes --json` agrees with the control-socket poll."""
        res = self.cli(node, "nodes", "--json")
        members = json.loads(res.stdout)
        return any(m["id"] == target_id and m["state"] == state for m in members)


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out += [int(x) for x in text.split()]
    return out


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


def if_bytes(lab: Lab, host: str, ifname: str) -> tuple[int, int]:
    res = lab.run(
        host,
        [
            "cat",
            f"/sys/class/net/{ifname}/statistics/rx_bytes",
            f"/sys/class/net/{ifname}/statistics/tx_bytes",
        ],
        check=True,
    )
    rx, tx = res.stdout.split()
    return int(rx), int(tx)


def med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def mx(xs: list[float]) -> float | None:
    return round(max(xs), 3) if xs else None


# ---------------------------------------------------------------------- phases
def build(lab: Lab) -> None:
    lab.switch(SWITCH)
    for i in range(1, HOSTS + 1):
        h = f"n{i}"
        lab.host(h)
        ifname = lab.connect(h, SWITCH, f"{addr_of(i)}/24")
        lab.multicast_route(h, ifname)


def form_cluster(b: Bench) -> None:
    founder = b.new_home("n1")
    res = b.cli(founder, "init", "--name", "benchlab", "--listen", founder.listen)
    b.token = res.stdout.strip().splitlines()[-1].strip()
    if not b.token.startswith("swn1."):
        raise RuntimeError(f"init printed no token: {res.stdout!r} {res.stderr!r}")
    b.start(founder, founder=True)
    for i in range(2, HOSTS):
        b.start(b.new_home(f"n{i}"))
    if not b.all_alive(60):
        raise RuntimeError("n1..n4 did not converge in 60 s")


def phase_join(b: Bench, repeats: int) -> dict[str, Any]:
    runs = []
    for r in range(repeats):
        # Each fresh identity gets its own address (an alias on n5): an address that a departed
        # identity reported is never reused here, see phase_address_reuse for why.
        addr = f"10.42.0.{JOIN_ADDR_BASE + r}"
        b.lab.run("n5", ["ip", "addr", "add", f"{addr}/24", "dev", f"to-{SWITCH}"], check=True)
        node = b.new_home("n5", addr)
        observers = [n for n in b.running()]
        b.start(node)
        seen = b.wait_state(node.id, "alive", observers, timeout=60)
        if seen is None:
            raise RuntimeError(f"join {r}: {node.id[:12]} not alive everywhere in 60 s")
        done = max(seen.values())
        started = b.event_ts(node, "node_started")
        joined = b.event_ts(node, "joined")
        ev_seen = [
            b.event_ts(o, "member_join", node.id, after=node.spawned_at - 1)
            or b.event_ts(o, "member_alive", node.id, after=node.spawned_at - 1)
            for o in observers
        ]
        ev_done = max(t for t in ev_seen if t is not None) if all(ev_seen) else None
        run = {
            "repeat": r,
            "id": node.id[:12],
            "from_spawn_s": round(done - node.spawned_at, 3),
            "from_started_s": round(done - started, 3) if started else None,
            "from_joined_s": round(done - joined, 3) if joined else None,
            "started_after_spawn_s": round(started - node.spawned_at, 3) if started else None,
            "joined_after_started_s": round(joined - started, 3) if joined and started else None,
            "events_from_joined_s": round(ev_done - joined, 3) if ev_done and joined else None,
            "events_from_started_s": round(ev_done - started, 3) if ev_done and started else None,
        }
        if r == 0:
            run["cli_agrees"] = all(b.cli_check(o, node.id, "alive") for o in observers)
        runs.append(run)
        print(f"  join #{r}: {run}", flush=True)
        if r < repeats - 1:
            b.stop(node)
            left = b.wait_state(node.id, "left", observers, timeout=30)
            if left is None:
                print(f"  warning: {node.id[:12]} not listed `left` everywhere in 30 s", flush=True)
            time.sleep(3)
    keys = [
        "from_spawn_s",
        "from_started_s",
        "from_joined_s",
        "started_after_spawn_s",
        "joined_after_started_s",
        "events_from_joined_s",
        "events_from_started_s",
    ]
    summary = {}
    for k in keys:
        xs = [r[k] for r in runs if r.get(k) is not None]
        summary[k] = {"median": med(xs), "max": mx(xs), "min": round(min(xs), 3) if xs else None}
    return {"runs": runs, "summary": summary}


def phase_crash(b: Bench, repeats: int, settle: float) -> dict[str, Any]:
    runs = []
    victims = [f"n{i}" for i in range(2, HOSTS + 1)]
    for r in range(repeats):
        host = victims[r % len(victims)]
        node = b.nodes[host]
        observers = [n for n in b.running() if n is not node]
        time.sleep(settle)
        t_kill = time.time()
        b.lab.kill9(node.proc)
        seen = b.wait_state(node.id, "dead", observers, timeout=90)
        if seen is None:
            raise RuntimeError(f"crash {r}: {host} not dead everywhere in 90 s")
        done = max(seen.values())
        ev = [b.event_ts(o, "member_dead", node.id, after=t_kill) for o in observers]
        sus = [b.event_ts(o, "member_suspect", node.id, after=t_kill) for o in observers]
        run = {
            "repeat": r,
            "host": host,
            "dead_everywhere_s": round(done - t_kill, 3),
            "dead_first_s": round(min(seen.values()) - t_kill, 3),
            "events_dead_everywhere_s": round(max(ev) - t_kill, 3) if all(ev) else None,
            "first_suspect_s": round(min(t for t in sus if t) - t_kill, 3) if any(sus) else None,
        }
        if r == 0:
            run["cli_agrees"] = all(b.cli_check(o, node.id, "dead") for o in observers)
        # restart the crashed machine from its home: back to alive everywhere
        b.start(node)
        back = b.wait_state(node.id, "alive", observers, timeout=60)
        run["restart_alive_everywhere_s"] = (
            round(max(back.values()) - node.spawned_at, 3) if back else None
        )
        runs.append(run)
        print(f"  crash #{r}: {run}", flush=True)
    summary = {}
    for k in (
        "dead_everywhere_s",
        "dead_first_s",
        "events_dead_everywhere_s",
        "first_suspect_s",
        "restart_alive_everywhere_s",
    ):
        xs = [r[k] for r in runs if r.get(k) is not None]
        summary[k] = {"median": med(xs), "max": mx(xs), "min": round(min(xs), 3) if xs else None}
    return {"runs": runs, "summary": summary}


def tcp_active_opens(lab: Lab, host: str) -> int:
    """Outgoing TCP connection attempts made in the host's namespace so far."""
    lines = [
        ln.split()
        for ln in lab.run(host, ["cat", "/proc/net/snmp"], check=True).stdout.splitlines()
        if ln.startswith("Tcp:")
    ]
    return int(lines[1][lines[0].index("ActiveOpens")])


def sample(b: Bench) -> dict[str, dict[str, Any]]:
    snap = {}
    for n in b.running():
        st = b.query(n, "status")
        pid = b.python_pid(n)
        rx, tx = if_bytes(b.lab, n.host, n.ifname)
        snap[n.host] = {
            "t": time.time(),
            "bytes_in": st["bytes_in"],
            "bytes_out": st["bytes_out"],
            "if_rx": rx,
            "if_tx": tx,
            "cpu_s": snapshot.cpu_seconds(pid),
            "pid": pid,
            "tcp_opens": tcp_active_opens(b.lab, n.host),
            "wrapper_pid": n.proc.pid,
            **proc_status(pid),
            "drops": st["drops"],
        }
    return snap


def phase_idle(b: Bench, seconds: float, settle: float) -> dict[str, Any]:
    if not b.all_alive(60):
        raise RuntimeError("cluster not converged before the idle phase")
    time.sleep(settle)
    return traffic(b, seconds)


def traffic(b: Bench, seconds: float) -> dict[str, Any]:
    s0 = sample(b)
    time.sleep(seconds)
    s1 = sample(b)
    per = {}
    for h in s0:
        a, z = s0[h], s1[h]
        dt = z["t"] - a["t"]
        per[h] = {
            "seconds": round(dt, 1),
            "in_Bps": round((z["bytes_in"] - a["bytes_in"]) / dt, 1),
            "out_Bps": round((z["bytes_out"] - a["bytes_out"]) / dt, 1),
            "if_rx_Bps": round((z["if_rx"] - a["if_rx"]) / dt, 1),
            "if_tx_Bps": round((z["if_tx"] - a["if_tx"]) / dt, 1),
            "cpu_pct": round(100 * (z["cpu_s"] - a["cpu_s"]) / dt, 2),
            "tcp_connects_per_s": round((z["tcp_opens"] - a["tcp_opens"]) / dt, 2),
            "rss_mb": round(z["VmRSS"] / 1024, 1),
            "hwm_mb": round(z["VmHWM"] / 1024, 1),
            "pid": z["pid"],
            "wrapper_pid": z["wrapper_pid"],
        }
    summary = {}
    for k in (
        "in_Bps",
        "out_Bps",
        "if_rx_Bps",
        "if_tx_Bps",
        "cpu_pct",
        "tcp_connects_per_s",
        "rss_mb",
        "hwm_mb",
    ):
        xs = [p[k] for p in per.values()]
        summary[k] = {"median": med(xs), "max": mx(xs), "min": min(xs)}
    return {"per_node": per, "summary": summary}


def phase_address_reuse(b: Bench, seconds: float) -> dict[str, Any]:
    """A machine is reinstalled (new identity, same address): n5 leaves gracefully and a fresh
    home starts at the very same address. Idle traffic is measured again once the departed
    identity is past gossip_to_the_dead_time (30 s), beside the same figure just before."""
    node = b.nodes["n5"]
    before = traffic(b, seconds)
    b.stop(node)
    others = [n for n in b.running()]
    b.wait_state(node.id, "left", others, timeout=30)
    fresh = b.new_home("n5", node.addr)
    b.start(fresh)
    if not b.all_alive(60):
        raise RuntimeError("fresh identity at a reused address did not converge")
    time.sleep(40)
    after = traffic(b, seconds)
    return {"address": fresh.listen, "before": before, "after": after}


BUSY = "import os\nwhile True:\n    pass\n"


def phase_saturation(b: Bench, minutes: float, busy: int) -> dict[str, Any]:
    if not b.all_alive(60):
        raise RuntimeError("cluster not converged before the saturation phase")
    nodes = b.running()
    pids = {n.host: b.python_pid(n) for n in nodes}
    cpu0 = {h: snapshot.cpu_seconds(p) for h, p in pids.items()}
    hogs: list[subprocess.Popen[bytes]] = []
    t0 = time.time()
    load = []
    try:
        for _ in range(busy):
            hogs.append(subprocess.Popen([sys.executable, "-c", BUSY]))
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            load.append(float(Path("/proc/loadavg").read_text().split()[0]))
            dead = [n.host for n in nodes if n.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"node process exited during saturation: {dead}")
    finally:
        for h in hogs:
            h.kill()
        for h in hogs:
            h.wait()
    t1 = time.time()
    cpu = {h: round(100 * (snapshot.cpu_seconds(p) - cpu0[h]) / (t1 - t0), 2)
           for h, p in pids.items()}
    time.sleep(2)  # let refutations in flight land
    names = {n.id: n.host for n in nodes}
    found: list[dict[str, Any]] = []
    per_obs: dict[str, list[dict[str, Any]]] = {}
    for obs in nodes:
        evs = [e for e in b.events(obs) if e["ts"] >= t0]
        per_obs[obs.host] = evs
        for e in evs:
            if e["kind"] in ("member_suspect", "member_dead", "refuted", "member_left"):
                found.append(
                    {
                        "observer": obs.host,
                        "kind": e["kind"],
                        "ts": round(e["ts"], 3),
                        "t_rel_s": round(e["ts"] - t0, 1),
                        "about": names.get(e.get("id", ""), e.get("id", "")[:12]),
                        "incarnation": e.get("incarnation"),
                        "by": names.get(e.get("by", ""), (e.get("by") or "")[:12]),
                    }
                )
    suspicions = []
    for obs_host, evs in per_obs.items():
        for i, e in enumerate(evs):
            if e["kind"] != "member_suspect":
                continue
            later = evs[i + 1 :]
            outcome = "unresolved"
            for f in later:
                if f.get("id") != e["id"]:
                    continue
                if f["kind"] == "member_alive" and f.get("incarnation", 0) > e["incarnation"]:
                    outcome = f"refuted after {f['ts'] - e['ts']:.2f} s"
                    break
                if f["kind"] == "member_dead":
                    outcome = f"dead after {f['ts'] - e['ts']:.2f} s"
                    break
            suspicions.append(
                {
                    "observer": obs_host,
                    "about": names.get(e["id"], e["id"][:12]),
                    "t_rel_s": round(e["ts"] - t0, 1),
                    "outcome": outcome,
                }
            )
    deaths = [f for f in found if f["kind"] == "member_dead"]
    log_lines: dict[str, list[str]] = {}
    if found:
        for n in nodes:
            assert n.log is not None
            lines = [
                ln
                for ln in n.log.read_text(errors="replace").splitlines()
                if any(
                    k in ln for k in ("member_suspect", "member_dead", "refuted", "member_alive")
                )
            ]
            # keep only lines from the saturation window (log time is local wall time)
            log_lines[n.host] = [
                ln
                for ln in lines
                if ln[:19] >= time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0))
            ][:200]
    still = b.all_alive(30)
    return {
        "minutes": minutes,
        "busy_processes": busy,
        "loadavg_1m_samples": load,
        "node_cpu_pct": cpu,
        "suspect_events": sum(1 for f in found if f["kind"] == "member_suspect"),
        "suspicions": suspicions,
        "unrefuted_suspicions": [s for s in suspicions if not s["outcome"].startswith("refuted")],
        "dead_events": len(deaths),
        "refuted_events": sum(1 for f in found if f["kind"] == "refuted"),
        "events": found,
        "log_lines": log_lines,
        "all_alive_after": still,
    }


# ---------------------------------------------------------------------- report
def report(res: dict[str, Any]) -> None:
    def f(x: Any, unit: str = "") -> str:
        return "-" if x is None else f"{x}{unit}"

    print("\n================ summary (5 nodes, default timers) ================")
    j = res.get("join", {}).get("summary")
    if j:
        print(f"join visible everywhere (n={len(res['join']['runs'])}), median / max:")
        for k, label in (
            ("from_joined_s", "from `joined` event"),
            ("from_started_s", "from first log line (node_started)"),
            ("from_spawn_s", "from process spawn"),
            ("started_after_spawn_s", "  (spawn -> node_started)"),
            ("joined_after_started_s", "  (node_started -> joined)"),
            ("events_from_joined_s", "  events: joined -> last member_join"),
        ):
            print(f"  {label:40} {f(j[k]['median'], ' s'):>9} / {f(j[k]['max'], ' s')}")
        print(f"  target < {TARGETS['join_s']} s")
    c = res.get("crash", {}).get("summary")
    if c:
        print(f"kill -9 -> dead everywhere (n={len(res['crash']['runs'])}), median / max:")
        for k, label in (
            ("dead_everywhere_s", "polled (nodes list)"),
            ("events_dead_everywhere_s", "events (member_dead ts)"),
            ("first_suspect_s", "  first member_suspect"),
            ("dead_first_s", "  first node lists it dead"),
            ("restart_alive_everywhere_s", "  restart -> alive everywhere"),
        ):
            print(f"  {label:40} {f(c[k]['median'], ' s'):>9} / {f(c[k]['max'], ' s')}")
        print(f"  target < {TARGETS['dead_s']} s")
    i = res.get("idle", {}).get("summary")
    if i:
        s = res["idle"]
        secs = next(iter(s["per_node"].values()))["seconds"]
        print(f"idle, {secs} s, per node, median / max:")
        for k, label in (
            ("in_Bps", "node payload in (B/s)"),
            ("out_Bps", "node payload out (B/s)"),
            ("if_rx_Bps", "interface rx (B/s)"),
            ("if_tx_Bps", "interface tx (B/s)"),
            ("cpu_pct", "CPU (% of one core)"),
            ("tcp_connects_per_s", "TCP connects/s"),
            ("rss_mb", "VmRSS (MB)"),
            ("hwm_mb", "VmHWM (MB)"),
        ):
            print(f"  {label:40} {f(i[k]['median']):>9} / {f(i[k]['max'])}")
        print(f"  target RSS < {TARGETS['rss_mb']} MB")
    s = res.get("saturation")
    if s:
        print(
            f"CPU saturation, {s['minutes']} min, {s['busy_processes']} busy loops "
            f"(loadavg {s['loadavg_1m_samples'][-1] if s['loadavg_1m_samples'] else '-'}):"
        )
        print(f"  member_suspect events  {s['suspect_events']}")
        print(f"  unrefuted suspicions   {len(s['unrefuted_suspicions'])}")
        print(f"  member_dead events     {s['dead_events']}  (target 0)")
        print(f"  refuted (self)         {s['refuted_events']}")
        print(f"  all alive afterwards   {s['all_alive_after']}")
        print(f"  node CPU % during load {s['node_cpu_pct']}")
        for ev in s["events"]:
            print(f"    {ev}")
    a = res.get("address_reuse")
    if a:
        print(
            f"idle traffic before / after a new identity took over {a['address']} "
            "(median per node):"
        )
        for k, label in (
            ("if_rx_Bps", "interface rx (B/s)"),
            ("if_tx_Bps", "interface tx (B/s)"),
            ("in_Bps", "node payload in (B/s)"),
            ("tcp_connects_per_s", "TCP connects/s"),
            ("cpu_pct", "CPU %"),
        ):
            print(
                f"  {label:40} {f(a['before']['summary'][k]['median']):>9} / "
                f"{f(a['after']['summary'][k]['median'])}"
            )
    r = res.get("rss_after")
    if r:
        print(f"VmRSS after everything (MB): {r}")


def main(argv: list[str] | None = None) -> int:
    ap = snapshot.lab_parser(__doc__, "lab_membership")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--minutes", type=float, default=10.0, help="saturation phase; 0 skips it")
    ap.add_argument("--busy", type=int, default=4, help="busy-loop processes in saturation")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument(
        "--reuse-seconds",
        type=float,
        default=30.0,
        help="traffic window of the address-reuse check; 0 skips it",
    )
    ap.add_argument("--settle", type=float, default=5.0, help="quiet seconds between crashes")
    ap.add_argument("--poll", type=float, default=0.05)
    ap.add_argument("--keep", action="store_true", help="keep homes and logs (printed path)")
    args = ap.parse_args(argv)
    if not snapshot.is_root():
        return 2
    root = Path(tempfile.mkdtemp(prefix="swarmnode-bench-"))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "commit": snapshot.commit(),
        "source": str(SRC),
        "workdir": str(root),
    }
    ok = False
    try:
        with Lab("snb", log_dir=root / "lab") as lab:
            b = Bench(lab=lab, root=root, swarmnode=args.swarmnode, poll=args.poll)
            build(lab)
            print(f"lab up ({', '.join(lab.netns_names)}); homes and logs in {root}", flush=True)
            form_cluster(b)
            print("n1..n4 converged; join phase", flush=True)
            res["join"] = phase_join(b, args.repeats)
            print("crash phase", flush=True)
            res["crash"] = phase_crash(b, args.repeats, args.settle)
            print("idle phase", flush=True)
            res["idle"] = phase_idle(b, args.idle_seconds, args.settle * 2)
            if args.minutes > 0:
                print(f"saturation phase: {args.minutes} min, {args.busy} busy loops", flush=True)
                res["saturation"] = phase_saturation(b, args.minutes, args.busy)
            if args.reuse_seconds > 0:
                print("address-reuse check", flush=True)
                res["address_reuse"] = phase_address_reuse(b, args.reuse_seconds)
            res["rss_after"] = {
                n.host: round(proc_status(b.python_pid(n))["VmRSS"] / 1024, 1) for n in b.running()
            }
            for n in b.running():
                b.stop(n)
        ok = True
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str))
        report(res)
        print(f"JSON: {args.out}")
        if args.keep or not ok:
            print(f"homes and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
