"""A local demo swarm: nodes on loopback addresses, each a real `swarmnode join` process.

It shows the founding node making a cluster, three nodes joining with a token, an uninvited
"ghost" node that stays pending (no work, no data) until admitted, a node killed with SIGKILL
detected as dead by everyone, a C build submitted from one node (once the founder granted it
the build right) and run across the others
by the elected leader (artifacts verified and collected), the program pushed to every node
(canary first, health-checked), a real Gentoo emerge (each node a fresh Portage prefix: the
lab's seven packages built across the swarm into alpha's signed binhost, a fresh machine
installing from it, and the same emerge again reusing everything), and graceful leaves. Each
node has its own home under ./demo-home, so you can poke at the running swarm with
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
PORT = 17946  # the nodes' (on 127.0.0.1-5); the dashboard is on the next one
MIRROR_OFFSET, BINHOST_OFFSET = 44, 45  # the distfile mirror's and the binhost's ports
NAMES = ["alpha", "bravo", "charlie", "delta"]
BUILDERS = ["alpha", "bravo", "charlie", "ghost"]  # (delta is killed before the emerge)
#: The swarm's signing key's GnuPG home, and the client's keyring (under the demo's home).
GNUPG, KEYRING = "gentoo/swarm-gnupg", "gentoo/client-gnupg"

sys.path.insert(0, str(ROOT))
from tests.lab import portage as gentoo  # noqa: E402 (the lab's ebuilds and prefixes)


def swarmnode(home: Path, *args: str, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "cli", "--home", str(home), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30)
    if check and done.returncode != 0:
        raise SystemExit(f"swarmnode {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def start(home: Path, *args: str) -> subprocess.Popen:
    log = open(home / "node.log", "ab")  # noqa: SIM115 - the child keeps it
    cmd = [sys.executable, "-m", "cli", "--home", str(home), "join", *args]
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


def gentoo_setup(root: Path, homes: dict[str, Path], port: int,
                 procs: dict[str, subprocess.Popen]) -> dict | None:
    """A Portage prefix for each builder and for a fresh client, a distfile mirror, and the
    nodes' config: alpha is also the binhost, signing with the swarm's key."""
    reason = gentoo.unavailable_reason()
    if reason:
        print(f"(the Gentoo step is skipped: {reason})")
        return None
    print("0. a fresh Portage prefix for each node and for a client machine (real Portage)")
    mirror_port, binhost_port = port + MIRROR_OFFSET, port + BINHOST_OFFSET
    gentoo.ensure_portage_user()
    repo = gentoo.write_repo(root / "gentoo/repo")
    procs["mirror"] = subprocess.Popen(  # (in `procs` at once: stopped however the demo ends)
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
         str(gentoo.write_mirror(root / "gentoo/mirror")), str(mirror_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    hosts = [*BUILDERS, "client"]
    made = gentoo.make_prefixes([root / "gentoo" / h for h in hosts], repo,
                                mirror=f"http://127.0.0.1:{mirror_port}")
    prefixes = dict(zip(hosts, made, strict=True))
    gnupg, keyring = root / GNUPG, root / KEYRING
    key = gentoo.signing_key(gnupg)
    gentoo.trust(keyring, gnupg, key)
    for name in BUILDERS:
        extra = (f'roles = ["binhost"]\nbinhost_listen = "127.0.0.1:{binhost_port}"\n'
                 f'binhost_gpg_home = "{gnupg}"\nbinhost_gpg_key = "{key}"\n'
                 if name == "alpha" else "")
        (homes[name] / "config.toml").write_text(
            f'emerge = "{prefixes[name].emerge}"\n{extra}')
    return {"client": prefixes["client"], "keyring": keyring}


def gentoo_step(homes: dict[str, Path], portage: dict) -> None:
    print("8. bravo emerges app-lab/tool: Portage's graph of 7 packages (a C program from a "
          "distfile among them), built once across the swarm into alpha's signed binhost")
    wait_until("every builder's Portage environment is known to bravo", lambda: all(
        m.get("portage_differs") == [] for m in nodes(homes["bravo"])
        if m["name"] in BUILDERS), timeout=60)
    res = subprocess.run(
        [sys.executable, "-m", "cli", "--home", str(homes["bravo"]), "emerge",
         gentoo.TOP, "--wait"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    print(res.stderr.rstrip())
    if res.returncode != 0:
        raise SystemExit("the emerge failed")
    url = json.loads(swarmnode(homes["alpha"], "status", "--json"))["binhost_url"]
    client = portage["client"]
    print(f"  a fresh machine installs it from the binhost (PORTAGE_BINHOST={url}), "
          "checking the swarm's signature on every package")
    subprocess.run([str(client.emerge), "--getbinpkgonly", "--quiet", gentoo.TOP],
                   env={**client.env(), "PORTAGE_BINHOST": url,
                        **gentoo.verifying_env(portage["keyring"])},
                   capture_output=True, text=True, check=True, timeout=300)
    tool = subprocess.run([str(client.root / "usr/bin/lab-tool"), "demo"], capture_output=True,
                          text=True, env=client.env(), check=True)
    print("  " + "\n  ".join(tool.stdout.strip().splitlines()))
    print("  the same emerge again: everything is in the binhost already")
    res = subprocess.run(
        [sys.executable, "-m", "cli", "--home", str(homes["bravo"]), "emerge",
         gentoo.TOP, "--wait"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    print(res.stderr.rstrip() or res.stdout.rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the swarm running")
    parser.add_argument("--home", type=Path, default=HOMES,
                        help=f"where the nodes' homes go (default {HOMES}; emptied first)")
    parser.add_argument("--port", type=int, default=PORT,
                        help=f"the nodes' port (default {PORT}); the dashboard takes the next "
                             f"one, the mirror and binhost +{MIRROR_OFFSET} and +{BINHOST_OFFSET}")
    args = parser.parse_args()
    # SIGTERM (a timeout, a kill) unwinds like ^C: the swarm and mirror are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    shutil.rmtree(args.home, ignore_errors=True)
    homes = {name: args.home / name for name in [*NAMES, "ghost"]}
    for h in homes.values():
        h.mkdir(parents=True)
    addr = {name: f"127.0.0.{i + 1}:{args.port}" for i, name in enumerate([*NAMES, "ghost"])}
    procs: dict[str, subprocess.Popen] = {}
    common = ["--no-mdns", "--no-tailscale", "--fast"]
    try:
        portage = gentoo_setup(args.home, homes, args.port, procs)
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
            [sys.executable, "-m", "cli", "--home", str(homes["alpha"]), "push", str(app),
             "--wait"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        print(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.stdout)
        print(swarmnode(homes["alpha"], "versions"))
        if portage is not None:
            gentoo_step(homes, portage)
        print("9. recent events on alpha")
        print(swarmnode(homes["alpha"], "events", "--limit", "15"))
        print("10. watching: the swarm's draw, and alpha's dashboard (`swarmnode monitor` shows")
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
        if not args.keep:
            gentoo.stop_agents(args.home / GNUPG, args.home / KEYRING)
    print("demo done.")


if __name__ == "__main__":
    main()
