"""Route resolution and `exec NODE -- true` per route kind, on 5 real hosts (namespaces).

Needs root, sshd (openssh-server) and ssh-keygen. Topology:

    orch 10.42.0.2 ---+--- direct 10.42.0.3                  (same LAN: "reported")
                      +--- gw 10.42.0.1 (NAT) --- natted 192.168.10.25
                      |      port forward 10.42.0.1:17946 -> natted:7946 ("override")
                      +--- jump1 10.42.0.4 (sshd) --- hop1 172.30.0.9          ("ssh, 1 hop")
                                  |
                           jump2 172.30.0.2 (sshd) --- hop2 172.31.0.9         ("ssh, 2 hops")

The jump hosts route while the cluster forms, then jump1 stops forwarding, so hop1 and hop2
are reachable from orch only through SSH (jumps in orch's config.toml). For each member and
`--repeats` times: a fresh `route` (every attempt re-probed, tunnels rebuilt), then `exec NODE
-- true` over the remembered route. Both are timed at orch's control socket (what the CLI
does, minus ~0.3 s of interpreter start-up); the real CLI is timed once per member too.
Nodes run with --fast timers (membership detection only; routes and actions do not use them).

    .venv/bin/python bench/lab_routes.py [--repeats 15] [--worktree]

Results on stdout and in /tmp/swarmnode-bench/lab_routes.json.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import snapshot  # bench/ is on sys.path when run as a script

if __name__ == "__main__":
    snapshot.reexec_on_head(sys.argv[1:])
SRC = snapshot.source()
sys.path.insert(0, str(SRC))

from swarmnode import control  # noqa: E402
from tests.lab import Lab  # noqa: E402
from tests.lab.sshd import keygen, start_sshd  # noqa: E402
from tests.swarm import Swarm  # noqa: E402

PORT = 7946
FORWARD = 17946
KINDS = {"direct": "reported", "natted": "override", "hop1": "ssh (1 hop)",
         "hop2": "ssh (2 hops)"}


def build(lab: Lab) -> None:
    lab.switch("lan")
    ifnames = {}
    for name, addr in (("orch", "10.42.0.2"), ("direct", "10.42.0.3"), ("gw", "10.42.0.1"),
                       ("jump1", "10.42.0.4")):
        lab.host(name)
        ifnames[name] = lab.connect(name, "lan", f"{addr}/24")
    for name in ("natted", "jump2", "hop1", "hop2"):
        lab.host(name)
    lab.link("gw", "natted", "192.168.10.1/24", "192.168.10.25/24")
    lab.default_route("natted", "192.168.10.1")
    lab.forwarding("gw")
    lab.masquerade("gw", "192.168.10.0/24", ifnames["gw"])
    lab.port_forward("gw", "10.42.0.1", FORWARD, f"192.168.10.25:{PORT}")
    lab.link("jump1", "hop1", "172.29.0.1/24", "172.29.0.9/24")
    lab.link("jump1", "jump2", "172.30.0.1/24", "172.30.0.2/24")
    lab.link("jump2", "hop2", "172.31.0.1/24", "172.31.0.9/24")
    lab.route("orch", "172.16.0.0/12", "10.42.0.4")
    lab.route("jump1", "172.31.0.0/24", "172.30.0.2")
    lab.default_route("jump2", "172.30.0.1")
    lab.default_route("hop1", "172.29.0.1")
    lab.default_route("hop2", "172.31.0.1")
    lab.forwarding("jump1")
    lab.forwarding("jump2")


ADDRS = {"orch": "10.42.0.2", "direct": "10.42.0.3", "natted": "192.168.10.25",
         "hop1": "172.29.0.9", "hop2": "172.31.0.9"}


def timed_stream(home: Path, **args: Any) -> float:
    t0 = time.perf_counter()
    items = list(control.stream(home, "exec", **args))
    took = time.perf_counter() - t0
    if items[-1] != {"exit": 0}:
        raise RuntimeError(f"exec failed: {items}")
    return took


def run(repeats: int, root: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Lab("snr", log_dir=root / "lab") as lab:
        build(lab)
        client = keygen(root / "keys" / "id_ed25519")
        jumps = {h: start_sshd(lab, h, a, [client], root / "sshd")
                 for h, a in (("jump1", "10.42.0.4"), ("jump2", "172.30.0.2"))}
        known = root / "known_hosts"
        known.write_text("".join(s.known_hosts_line + "\n" for s in jumps.values()))
        swarm = Swarm(root / "swarm", lab)
        try:
            orch, token = swarm.init("orch", f"{ADDRS['orch']}:{PORT}", host="orch")
            orch.home.mkdir(parents=True, exist_ok=True)
            (orch.home / "config.toml").write_text(f'''
[overrides]
natted = "10.42.0.1:{FORWARD}"
[jumps]
hop1 = ["root@10.42.0.4"]
hop2 = ["root@10.42.0.4", "root@172.30.0.2"]
[ssh]
identity_file = "{client.path}"
known_hosts = ["{known}"]
host_keys = []
''')
            swarm.start(orch)
            members = [swarm.start(swarm.add(n, f"{ADDRS[n]}:{PORT}", host=n), token)
                       for n in KINDS]
            swarm.wait_converged([orch, *members], 30)
            lab.sysctl("jump1", "net.ipv4.ip_forward", "0")
            for n in ("hop1", "hop2"):
                swarm.wait_for(lambda n=n: swarm.state(orch, n) in ("suspect", "dead"), 30,
                               f"{n} cut off")
            for name, kind in KINDS.items():
                route_s, exec_s = [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    route = control.call(orch.home, "route", timeout=60, node=name)
                    route_s.append(time.perf_counter() - t0)
                    if route["method"] is None:
                        raise RuntimeError(f"no route to {name}: {route['error']}")
                    exec_s.append(timed_stream(orch.home, node=name, argv=["true"]))
                t0 = time.perf_counter()
                swarm.cli(orch, "exec", name, "--", "true")
                cli_s = time.perf_counter() - t0
                results[name] = {"kind": kind, "method": route["method"],
                                 "via": route["via"], "route_ms": ms(route_s),
                                 "exec_ms": ms(exec_s), "cli_exec_ms": round(cli_s * 1000, 1)}
                print(f"{name:7} {kind:13} route {results[name]['route_ms']['median']:8.1f} ms"
                      f"  exec {results[name]['exec_ms']['median']:7.1f} ms  (CLI "
                      f"{results[name]['cli_exec_ms']:.0f} ms)", flush=True)
        finally:
            swarm.close()
    return results


def ms(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs) * 1000, 1),
            "min": round(min(xs) * 1000, 1), "max": round(max(xs) * 1000, 1), "n": len(xs),
            "each": [round(x * 1000, 1) for x in xs]}


def main() -> int:
    ap = snapshot.lab_parser(__doc__, "lab_routes", swarmnode=False)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if not snapshot.is_root():
        return 2
    root = Path(tempfile.mkdtemp(prefix="swarmnode-bench-routes-"))
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": snapshot.commit(),
           "repeats": args.repeats, "members": run(args.repeats, root)}
    snapshot.write_result(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
