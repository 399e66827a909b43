"""A local demo swarm: nodes on loopback addresses, each a real `swarmnode join` process.

It shows the founding node making a cluster, three nodes joining with a token, an uninvited
"ghost" node that stays pending (no work, no data) until admitted, a node killed with SIGKILL
detected as dead by everyone, a C build submitted from one node (once the founder granted it
the build right) and run across the others
by the elected leader (artifacts verified and collected), the program pushed to every node
(canary first, health-checked), and graceful leaves. Each node has
its own home under ./demo-home, so you can poke at the running swarm with
`swarmnode --home demo-home/NAME ...` (pass --keep to leave it running).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOMES = ROOT / "demo-home"
PORT = 17946
NAMES = ["alpha", "bravo", "charlie", "delta"]


def swarmnode(home: Path, *args: str, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "cli.main", "--home", str(home), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
    if check and done.returncode != 0:
        raise SystemExit(f"swarmnode {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def start(home: Path, *args: str) -> subprocess.Popen:
    log = open(home / "node.log", "ab")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "cli.main", "--home", str(home), "join", *args]
    return subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)


def nodes(home: Path) -> list[dict]:
    try:
        return json.loads(swarmnode(home, "nodes", "--json"))
    except (SystemExit, json.JSONDecodeError):
        return []


def wait_until(what: str, pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            print(f"  ok: {what}")
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: gave up waiting for: {what}")


def states(home: Path) -> dict[str, str]:
    return {n["name"]: n["state"] for n in nodes(home)}


def holds(home: Path, right: str, name: str) -> bool:
    """Whether the node in `home` has heard the grant of `right` to member `name`."""
    ids = [n["id"] for n in nodes(home) if n["name"] == name]
    events = json.loads(swarmnode(home, "events", "--json", "--limit", "10000"))
    return bool(ids) and any(e["kind"] == "note" and e.get("topic") == "grant"
                             and e.get("key") == f"{right}:{ids[0]}" for e in events)


def show(home: Path) -> None:
    print(swarmnode(home, "nodes"))


def write_project(root: Path, parts: int = 6) -> Path:
    """A small C program in `parts` files: one job per file, a link job, a test run."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(parts):
        (src / f"part{i}.c").write_text(f"int part{i}(void) {{ return {i + 1}; }}\n")
        jobs.append(f'[jobs.part{i}]\ncmd = "gcc -O2 -c src/part{i}.c -o part{i}.o"\n'
                    f'inputs = ["src/part{i}.c"]\noutputs = ["part{i}.o"]\n')
    decls = "".join(f"int part{i}(void);\n" for i in range(parts))
    total = " + ".join(f"part{i}()" for i in range(parts))
    (src / "main.c").write_text(
        f'#include <stdio.h>\n{decls}int main(void) {{ printf("hello from the swarm: '
        f'%d parts\\n", {total}); return 0; }}\n')
    deps = ", ".join(f'"part{i}"' for i in range(parts))
    jobs.append(f'[jobs.link]\ncmd = "gcc -O2 -o hello-swarm src/main.c part*.o"\n'
                f'inputs = ["src/main.c"]\ndeps = [{deps}]\noutputs = ["hello-swarm"]\n')
    # artifacts are content (no mode bits): the check makes its own executable copy
    jobs.append('[jobs.check]\ncmd = "cp hello-swarm run && chmod +x run && ./run > result.txt"'
                '\ndeps = ["link"]\noutputs = ["result.txt"]\n')
    plan = root / "plan.toml"
    plan.write_text('name = "hello"\n\n' + "\n".join(jobs))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the swarm running")
    parser.add_argument("--home", type=Path, default=HOMES,
                        help=f"where the nodes' homes go (default {HOMES}; emptied first)")
    args = parser.parse_args()
    shutil.rmtree(args.home, ignore_errors=True)
    homes = {name: args.home / name for name in [*NAMES, "ghost"]}
    for h in homes.values():
        h.mkdir(parents=True)
    addr = {name: f"127.0.0.{i + 1}:{PORT}" for i, name in enumerate([*NAMES, "ghost"])}
    procs: dict[str, subprocess.Popen] = {}
    common = ["--no-mdns", "--no-tailscale", "--fast"]
    try:
        print("1. alpha makes the cluster `demo` and prints a join token")
        token = swarmnode(homes["alpha"], "init", "--name", "demo", "--listen", addr["alpha"])
        token = token.strip()
        procs["alpha"] = start(homes["alpha"], "--name", "alpha", *common)
        print("2. bravo, charlie and delta join with the token")
        for name in NAMES[1:]:
            procs[name] = start(homes[name], token, "--name", name, "--listen", addr[name],
                                *common)
        wait_until("4 members alive in alpha's view",
                   lambda: list(states(homes["alpha"]).values()).count("alive") == 4)
        wait_until("every member sees all 4 alive", lambda: all(
            list(states(homes[n]).values()).count("alive") == 4 for n in NAMES))
        show(homes["alpha"])
        print("3. a forgotten container shows up without a token: it is listed, but pending")
        procs["ghost"] = start(homes["ghost"], "--name", "ghost", "--listen", addr["ghost"],
                               "--seed", addr["bravo"], *common)
        wait_until("ghost is pending everywhere", lambda: all(
            states(homes[n]).get("ghost") == "pending" for n in NAMES))
        print(swarmnode(homes["charlie"], "status"))
        print("4. an operator recognises it and admits it (alpha, the founder, holds every "
              "right; an ordinary member may not)")
        print(swarmnode(homes["alpha"], "admit", "ghost"))
        wait_until("ghost is alive everywhere", lambda: all(
            states(homes[n]).get("ghost") == "alive" for n in NAMES))
        print("5. delta is killed with SIGKILL: the others detect it")
        procs["delta"].send_signal(signal.SIGKILL)
        procs["delta"].wait()
        wait_until("delta marked dead by all others", lambda: all(
            states(homes[n]).get("delta") == "dead" for n in ["alpha", "bravo", "charlie"]),
            timeout=30)
        show(homes["bravo"])
        print("6. alpha (the founder) lets bravo submit builds; bravo submits a C build, the "
              "elected leader spreads its jobs over the swarm")
        print(swarmnode(homes["alpha"], "grant", "build", "bravo"))
        wait_until("every live node holds bravo's build right", lambda: all(
            holds(homes[n], "build", "bravo") for n in ["alpha", "bravo", "charlie", "ghost"]))
        plan = write_project(args.home / "project")
        out = args.home / "out"
        print(swarmnode(homes["bravo"], "build", str(plan), "--wait", "--out", str(out)))
        print(swarmnode(homes["bravo"], "jobs"))
        prog = out / "link" / "hello-swarm"
        prog.chmod(0o755)
        result = subprocess.run([str(prog)], capture_output=True, text=True, check=True)
        print(f"  the artifact {prog} runs: {result.stdout.strip()}")
        print("7. alpha pushes the program to every node: a canary first, then the rest")
        app = args.home / "hello-app"
        (app / "bin").mkdir(parents=True)
        shutil.copy2(prog, app / "bin" / "hello-swarm")
        (app / "swarmnode-push.toml").write_text(
            'name = "hello"\nhealth = "bin/hello-swarm | grep -q hello"\n')
        res = subprocess.run(
            [sys.executable, "-m", "cli.main", "--home", str(homes["alpha"]), "push", str(app),
             "--wait"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        print(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.stdout)
        print(swarmnode(homes["alpha"], "versions"))
        print("8. recent events on alpha")
        print(swarmnode(homes["alpha"], "events", "--limit", "15"))
        print("9. watching: the swarm's draw, and alpha's dashboard (`swarmnode monitor` shows")
        print("   the same in a terminal)")
        status = json.loads(swarmnode(homes["alpha"], "status", "--json"))
        print(f"  {status['cores_online']} of {status['cores_total']} cores online, "
              f"{status['cluster_watts']} W in the swarm ({status['power_source']})")
        print("  " + swarmnode(homes["alpha"], "dashboard").strip())
        if args.keep:
            print("swarm left running (open the URL above); stop it with: "
                  f"pkill -f '{args.home}'")
            procs.clear()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print("demo done.")


if __name__ == "__main__":
    main()
