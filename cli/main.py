"""The `swarmnode` command line: a thin typer layer over the node's control socket.

Human output is a rich table; `--json` output is stable for scripts. Commands that need the
running node say clearly when none is running in the home.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.bootstrap import bootstrap
from cli.console import LazyConsole, escape, new_table
from cli.launch import launch_node
from swarmnode import home as homes
from swarmnode.identity import IdentityError, is_node_id, load_or_create
from swarmnode.options import DEFAULT_LISTEN, NodeOptions
from swarmnode.portage.fingerprint import describe

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="swarmnode: one program on every node of a peer-to-peer build swarm.",
)
# Pipes get wide lines rather than truncated ids and addresses.
out = LazyConsole(width=None if sys.stdout.isatty() else 200)
err = LazyConsole(stderr=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="node home dir (default: $SWARMNODE_HOME or the state dir)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]


class State:
    home: Path = Path(".")


state = State()


@app.callback()
def main_options(home: HomeOpt = None) -> None:
    state.home = homes.resolve(home)


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def ask(cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    from swarmnode import control

    try:
        return control.call(state.home, cmd, timeout=timeout, **args)
    except control.ControlError as exc:
        fail(str(exc))
    except TimeoutError:
        fail(f"the node in {state.home} did not answer in time")


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


@app.command("id")
def show_id() -> None:
    """Print this node's id (made on first use)."""
    try:
        out.print(load_or_create(state.home).id, highlight=False)
    except IdentityError as exc:
        fail(str(exc))


@app.command()
def init(
    name: Annotated[str, typer.Option("--name", help="cluster name")],
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on")] = DEFAULT_LISTEN,
    advertise: Annotated[list[str] | None, typer.Option(help="extra reported address")] = None,
    ttl: Annotated[str, typer.Option(help="token lifetime, e.g. 24h, 90m")] = "24h",
) -> None:
    """Make a new cluster with this node as its first member and print a join token."""
    from swarmnode import cluster
    from swarmnode import token as tokens

    try:
        made = cluster.init(state.home, name, listen, advertise or [], tokens.parse_duration(ttl))
    except (cluster.ClusterError, ValueError) as exc:
        fail(str(exc))
    err.print(f"cluster [bold]{name}[/bold] created; this node is its first member.")
    err.print("start it with `swarmnode join`; join other nodes with this token:")
    out.print(made, highlight=False, soft_wrap=True)


@app.command()
def token(
    ttl: Annotated[str, typer.Option(help="token lifetime, e.g. 24h, 90m")] = "24h",
) -> None:
    """Print a fresh join token (from the running node, or offline from this home)."""
    from swarmnode import cluster, control
    from swarmnode import token as tokens

    try:
        seconds = tokens.parse_duration(ttl)
    except ValueError as exc:
        fail(str(exc))
    if control.socket_path(state.home).exists():
        out.print(ask("token", ttl=seconds), highlight=False, soft_wrap=True)
        return
    try:
        out.print(cluster.offline_token(state.home, seconds), highlight=False, soft_wrap=True)
    except cluster.ClusterError as exc:
        fail(str(exc))


@app.command()
def join(
    join_token: Annotated[str | None, typer.Argument(metavar="[TOKEN]")] = None,
    name: Annotated[str | None, typer.Option(help="this node's name")] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default: 0.0.0.0:7946)")] = None,
    advertise: Annotated[list[str] | None, typer.Option(help="extra reported address")] = None,
    seed: Annotated[list[str] | None, typer.Option(help="HOST:PORT or ID@HOST:PORT")] = None,
    no_mdns: Annotated[bool, typer.Option("--no-mdns", help="no mDNS discovery")] = False,
    no_tailscale: Annotated[
        bool, typer.Option("--no-tailscale", help="no seeds from `tailscale status`")
    ] = False,
    fast: Annotated[bool, typer.Option(hidden=True, help="fast timers (tests, demo)")] = False,
) -> None:
    """Run this node in the foreground until SIGINT/SIGTERM (then leave gracefully)."""
    opts = NodeOptions(
        home=state.home,
        token=join_token,
        name=name,
        listen=listen,
        advertise=tuple(advertise or ()),
        seeds=tuple(seed or ()),
        mdns=not no_mdns,
        tailscale=not no_tailscale,
        fast=fast,
    )
    launch_node(opts)


@app.command()
def nodes(as_json: JsonOpt = False) -> None:
    """List every member: state, reported addresses, observed address, facts."""
    members = ask("nodes")
    if as_json:
        emit_json(members)
        return
    table = new_table(title=f"{len(members)} nodes")
    for col in ("id", "name", "state", "addresses", "observed", "kind", "arch", "cores", "ver",
                "portage"):
        table.add_column(col)
    for m in members:
        style = {"pending": "yellow", "dead": "red", "suspect": "magenta", "banned": "red"}
        observed = (m["observed"] or "-") + (" [bold](nat)[/bold]" if m["nat"] else "")
        table.add_row(
            m["id"][:12] + ("*" if m.get("self") else ""),
            m["name"] + (" [bold cyan](leader)[/]" if m.get("leader") else ""),
            f"[{style.get(m['state'], 'green')}]{m['state']}[/]",
            "\n".join(m["addresses"]),
            observed,
            str(m["kind"] or "-"),
            str(m["arch"] or "-"),
            str(m["cores"] or "-"),
            str(m["version"] or "-") + (f" @{m['release'][:8]}" if m.get("release") else ""),
            describe(m.get("portage_differs")),
        )
    out.print(table)


@app.command("portage-env")
def portage_env(
    node: Annotated[str | None, typer.Argument(
        help="another member (name, id or unique id prefix); default: this node")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The Portage build environment behind a node's fingerprint, readable: this node's, or
    NODE's (asked over the swarm) with the keys that differ from this node's."""
    info = ask("portage_env", **({"node": node} if node else {}))
    if as_json:
        emit_json(info)
        return
    if info["values"] is None:
        fail(f"{info['name']} states no Portage fingerprint (no Portage, or not probed yet)")
    for key, value in sorted(info["values"].items()):
        out.print(f"[bold]{key:>16}[/bold]  {escape(value)}", highlight=False)
    if node:
        differs = info["differs"]
        out.print("\ncompared with this node: " + (describe(differs) if differs is not None
                  else "nothing to compare (this node states no fingerprint)"), highlight=False)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """This node's id, name, cluster, alive members, cores online, pending nodes."""
    info = ask("status")
    if as_json:
        emit_json(info)
        return
    names = {m["id"]: m["name"] for m in ask("nodes")} if info.get("leader") else {}
    for key in ("id", "name", "cluster", "nodes_alive", "cores_online", "pending", "leader",
                "term"):
        value = named(info[key], names) if key == "leader" else info[key]
        out.print(f"[bold]{key:>13}[/bold]  {value}", highlight=False)
    if info.get("disk"):  # the fullest of its file systems (jobs, artifacts)
        worst = min(info["disk"], key=lambda d: d["free"] - d["threshold"])
        state = "LOW: takes no jobs" if info["disk_low"] else "ok"
        out.print(f"[bold]{'disk':>13}[/bold]  {state}, {worst['free'] / 2**30:.1f} GiB free "
                  f"of {worst['total'] / 2**30:.1f} ({worst['path']})", highlight=False)


def named(value: Any, names: dict[str, str]) -> str:
    """A node id as its name and the id's first 8 characters (a list, each so); else as is."""
    if isinstance(value, str) and is_node_id(value):
        return f"{names.get(value, '?')}({value[:8]})"
    if isinstance(value, list):
        return ",".join(named(v, names) for v in value)
    return str(value)


@app.command()
def events(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="how many")] = 50,
) -> None:
    """Recent cluster events seen by this node (joins, admissions, bans, NAT, failures)."""
    items = ask("events", limit=limit)
    if as_json:
        emit_json(items)
        return
    names = {m["id"]: m["name"] for m in ask("nodes")}

    for ev in items:
        when = time.strftime("%H:%M:%S", time.localtime(ev.pop("ts")))
        ev.pop("seq", None)
        kind = ev.pop("kind")
        subject = named(ev.pop("id"), names) if "id" in ev else ""
        rest = " ".join(f"{k}={named(v, names)}" for k, v in ev.items())
        out.print(f"{when} [bold]{kind:<15}[/bold] {subject} {rest}", highlight=False)


@app.command()
def voters(
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="make exactly these nodes the voters (repeatable)")] = None,
    auto: Annotated[bool, typer.Option(
        "--auto", help="back to automatic: the longest-admitted live members")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The members that vote in leader elections (automatic: the longest-admitted alive, at
    most 5). --set/--auto change them cluster-wide (committed through the leader; operators
    only)."""
    if set_ or auto:
        ask("set_voters", timeout=60.0, nodes=[] if auto else set_)
    info = ask("status")
    names = {m["id"]: m["name"] for m in ask("nodes")}
    chosen = [{"id": v, "name": names.get(v, "?"), "leader": v == info["leader"]}
              for v in info["voters"]]
    pinned = info.get("voters_pinned") or []
    if as_json:
        emit_json({"term": info["term"], "leader": info["leader"], "voters": chosen,
                   "pinned": pinned})
        return
    for v in chosen:
        mark = "  (leader)" if v["leader"] else ""
        out.print(f"{v['id'][:12]}  {v['name']}{mark}", highlight=False)
    if pinned:
        wanted = ", ".join(names.get(v, v[:12]) for v in pinned)
        out.print(f"set by an operator: {wanted} (swarmnode voters --auto to undo)",
                  highlight=False)


def _node_command(cmd: str, node: str, **extra: Any) -> None:
    result = ask(cmd, node=node, **extra)
    out.print(result, highlight=False)


@app.command()
def admit(node: Annotated[str, typer.Argument(help="name, id or unique id prefix")]) -> None:
    """Admit a pending node: it becomes a member and may get work and code."""
    _node_command("admit", node)


@app.command()
def ban(node: Annotated[str, typer.Argument(help="name, id or unique id prefix")]) -> None:
    """Remove a node for good (gossiped and persisted; it is refused at the handshake)."""
    _node_command("ban", node)


@app.command()
def pause(node: Annotated[str, typer.Argument(help="name, id or unique id prefix")]) -> None:
    """Give a node no new work (its running jobs finish), whichever node leads, until resumed
    (operators only)."""
    _node_command("pause", node, timeout=60.0)


@app.command()
def resume(node: Annotated[str, typer.Argument(help="name, id or unique id prefix")]) -> None:
    """Undo `pause`: the node gets work again (operators only)."""
    _node_command("resume", node, timeout=60.0)


@app.command()
def rename(
    node: Annotated[str, typer.Argument(help="name, id or unique id prefix")],
    new_name: Annotated[str, typer.Argument(metavar="NEWNAME")],
) -> None:
    """Give a member a new name (gossiped; the last rename wins)."""
    _node_command("rename", node, name=new_name)


NodeArg = Annotated[str, typer.Argument(help="name, id or unique id prefix")]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="reach the node only at this HOST:PORT")
]


@app.command()
def route(node: NodeArg, address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """How this node reaches NODE: every attempt (method, address, result, time) and the
    route chosen; exits 1 when every attempt failed."""
    result = ask("route", timeout=60.0, node=node, address=address)
    if as_json:
        emit_json(result)
    else:
        table = new_table(title=f"route to {node}")
        for col in ("method", "address", "result", "time", "via"):
            table.add_column(col)
        for a in result["attempts"]:
            colour = "green" if a["result"] == "ok" else "red"
            table.add_row(a["method"], a["address"], f"[{colour}]{a['result']}[/]",
                          f"{a['seconds'] * 1000:.1f} ms", " -> ".join(a["via"]) or "-")
        out.print(table)
        if result["method"]:
            via = " via " + " -> ".join(result["via"]) if result["via"] else ""
            out.print(f"chosen: {result['method']} {result['address']}{via}", highlight=False)
    if not result["method"]:
        fail(result["error"])


def _act(verb: str, node: str, argv: list[str], force: bool, address: str | None,
         verbose: bool) -> int:
    """Stream a remote action's output here; the remote exit code is returned."""
    from swarmnode import control

    code: int | None = None
    try:
        for item in control.stream(state.home, verb, node=node, argv=argv, force=force,
                                   address=address):
            if "route" in item and verbose:
                r = item["route"]
                err.print(f"route: {r['method']} {r['address']}", highlight=False)
            elif "fd" in item:
                target = sys.stdout.buffer if item["fd"] == 1 else sys.stderr.buffer
                target.write(base64.b64decode(item["data"]))
                target.flush()
            elif "exit" in item:
                code = item["exit"]
                if item.get("note"):
                    err.print(item["note"], highlight=False)
    except control.ControlError as exc:
        fail(str(exc))
    return 0 if code is None else int(code)


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="say which route is used")]


@app.command("exec", context_settings={"ignore_unknown_options": True})
def exec_(
    node: NodeArg,
    command: Annotated[list[str], typer.Argument(metavar="-- CMD...", help="command to run")],
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run CMD on NODE (verified by its identity): output streams here, and the exit code is
    the remote command's."""
    raise typer.Exit(_act("exec", node, command, False, address, verbose))


@app.command()
def restart(node: NodeArg, address: AddressOpt = None, verbose: VerboseOpt = False) -> None:
    """Restart the swarmnode service on NODE (its `restart_command`)."""
    raise typer.Exit(_act("restart", node, [], False, address, verbose))


@app.command()
def reboot(
    node: NodeArg,
    force: Annotated[bool, typer.Option("--force", help="also reboot bare metal")] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Reboot NODE (its `reboot_command`); bare-metal nodes only with --force."""
    raise typer.Exit(_act("reboot", node, [], force, address, verbose))


@app.command()
def build(
    plan: Annotated[str, typer.Argument(
        metavar="PLAN|wait",
        help="the plan (TOML: \\[jobs.NAME] tables); or `wait`, to follow BUILD, already "
             "submitted, from any node")],
    build_id: Annotated[str | None, typer.Argument(
        metavar="BUILD", help="with `wait`: the build id", show_default=False)] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="write DIR/JOB/PATH")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow progress; non-zero exit "
                                                     "if any job fails")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a build from this node; the elected leader schedules it across the swarm. This
    node needs the build right (`swarmnode grant build NODE`, from a holder of it).
    `build wait BUILD [--out DIR]` re-attaches from any node (its submitter may be gone: the
    ledger is on every node): progress, the end, and the artifacts."""
    if plan == "wait":
        if not build_id:
            fail("name the build: swarmnode build wait BUILD")
        wait = True
    elif build_id is not None:
        fail(f"one plan at a time (or `wait BUILD`), not {plan!r} and {build_id!r}")
    else:
        build_id = ask("build", timeout=60.0, plan=str(Path(plan).expanduser().absolute()))
    if not wait and out_dir is None:
        if as_json:
            emit_json({"build": build_id})
        else:
            out.print(build_id, highlight=False)
        return
    status = _follow(build_id, quiet=as_json)
    if out_dir is not None:
        status["files"] = ask("fetch_outputs", timeout=600.0, build=build_id,
                              out=str(out_dir.expanduser().absolute()))
    if as_json:
        emit_json(status)
    if not status["ok"]:
        raise typer.Exit(1)


def _follow(build_id: str, quiet: bool) -> dict[str, Any]:
    """Follow the build until every job is done, blocked or cancelled; show progress (the
    node answers at each change, at most four times a second, and at the end at once)."""
    last = ""
    known = None
    while True:
        status = ask("build_status", timeout=15.0, build=build_id, wait=5.0, known=known)
        known = status["progress"]
        p = status["progress"]
        running = ", ".join(f"{n}: {c}" for n, c in sorted(status["running"].items()))
        line = (f"{build_id}: {p['done']}/{p['total']} done, {p['running'] + p['assigned']} "
                f"running ({running or '-'}), {p['blocked']} blocked")
        if line != last and not quiet:
            err.print(line, highlight=False)
            last = line
        if status["finished"]:
            if not status["ok"] and not quiet:
                for j in ask("jobs", build=build_id):
                    if j["state"] != "done":
                        err.print(f"[red]{j['job']}[/red] {j['state']}: {j['reason']}",
                                  highlight=False)
            return status


@app.command()
def push(
    path: Annotated[Path | None, typer.Argument(
        help="directory to deploy (default: this node's own swarmnode code)")] = None,
    canary: Annotated[int | None, typer.Option(
        "--canary", help="nodes updated first (default: 1 when there are more than 2)")] = None,
    wave: Annotated[int | None, typer.Option(
        "--wave", help="then at most this many at once (default: a quarter of the nodes, "
                       "at least 4; 0: all at once)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the rollout; non-zero exit "
                                                     "naming any node that failed")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Deploy a release to every node, peer-to-peer, canaries first, rolled back if unhealthy."""
    where = str(path.expanduser().absolute()) if path is not None else None
    view = ask("push", timeout=120.0, path=where, canary=canary, wave=wave)
    if wait:
        view = _follow_push(view, quiet=as_json)
    if as_json:
        emit_json(view)
    elif not wait:
        out.print(f"{view['push']}: {view['app']} {view['digest'][:12]} to "
                  f"{len(view['nodes'])} nodes", highlight=False)
    if wait and (view["halted"] or view["failures"]):
        raise typer.Exit(1)


PUSH_STATES = ("staged", "fetching", "installed", "restarted", "healthy", "rolled_back",
               "failed", "timed_out", "offline", "waiting")


def _follow_push(view: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """Poll the pusher until the rollout is done or halted; a self-update ends with the pusher
    itself restarting, so then wait until it answers again running the new release."""
    last = ""
    push_id = view["push"]
    while not view["done"]:
        line = f"{push_id} {_bar(view['counts'])} " + ", ".join(
            f"{view['counts'][s]} {s.replace('_', ' ')}" for s in PUSH_STATES
            if view["counts"].get(s))
        if line != last and not quiet:
            err.print(line, highlight=False)
            last = line
        if view["phase"] == "self":
            return _await_self_update(view)
        view = ask("push_status", push=push_id, wait=2.0)  # answers at the next change
    if not quiet:
        if view["halted"]:
            err.print(f"[red]halted[/red]: {view['halted']}", highlight=False)
        for f in view["failures"]:
            err.print(f"[red]{f['name']}[/red] {f['state'].replace('_', ' ')}: {f['reason']}",
                      highlight=False)
        if not view["halted"] and not view["failures"]:
            err.print(f"{push_id}: every node healthy in {view['elapsed']:.2f} s",
                      highlight=False)
    return view


def _bar(counts: dict[str, int], width: int = 20) -> str:
    """Nodes settled (healthy, or failed one way or another) out of all, as a bar."""
    total = sum(counts.values()) or 1
    done = sum(n for s, n in counts.items() if s not in ("staged", "fetching", "installed",
                                                        "restarted", "waiting"))
    filled = round(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _await_self_update(view: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    from swarmnode import control

    deadline = time.monotonic() + timeout
    started = time.time() - view["elapsed"]
    me = next(n for n, s in view["nodes"].items() if s["state"] in ("staged", "fetching",
                                                                   "installed", "restarted"))
    while time.monotonic() < deadline:
        try:
            status = control.call(state.home, "status", timeout=2.0)
        except (control.ControlError, TimeoutError, OSError):
            time.sleep(0.05)
            continue
        # the new process, not the old one answering while it shuts down (it already shows
        # the switched release link): started after the push began, and ready
        booted = time.time() - float(status.get("uptime_s", float("inf")))
        if status.get("release") == view["digest"] and booted >= started - 0.2 \
                and status.get("ready"):
            view["nodes"][me]["state"] = "healthy"
            view["done"], view["phase"] = True, "done"
            view["elapsed"] = time.time() - started
            return view
        time.sleep(0.05)
    view["nodes"][me].update(state="timed_out", reason="did not come back on the new release")
    view["failures"].append({"id": me, "name": view["nodes"][me]["name"], "state": "timed_out",
                             "reason": "did not come back on the new release"})
    return view


@app.command()
def versions(as_json: JsonOpt = False) -> None:
    """Each node's current release per app, when it switched, and drift from the newest."""
    v = ask("versions")
    if as_json:
        emit_json(v)
        return
    table = new_table(title="releases")
    for col in ("node", "state", "app", "release", "switched", "drift"):
        table.add_column(col)
    for n in v["nodes"]:
        apps = n["apps"] or {"-": {"digest": "-", "switched_at": None, "drift": False}}
        for app_name, a in sorted(apps.items()):
            at = a["switched_at"]
            table.add_row(n["name"], n["state"], app_name, (a["digest"] or "-")[:12],
                          time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-",
                          "[red]behind[/]" if a["drift"] else "")
    out.print(table)
    for app_name, r in sorted(v["latest"].items()):
        out.print(f"newest {app_name}: {r['digest'][:12]}", highlight=False)


RightArg = Annotated[str, typer.Argument(help="push (releases), operate (exec, restart, "
                                               "reboot, pause, voters, cancel any build) or "
                                               "build (submit builds)")]


@app.command()
def grant(right: RightArg, node: NodeArg) -> None:
    """Give a member a right: push releases; operate (ask nodes to exec, restart, reboot;
    pause and resume nodes, set the voters, cancel anyone's build); or build (submit builds:
    their jobs run on the workers). No right implies another; the founder holds all three.
    Only a holder of the right can grant it."""
    out.print(ask("grant", right=right, node=node), highlight=False)


@app.command()
def revoke(right: RightArg, node: NodeArg) -> None:
    """Take a right back. Only a holder closer to the founder than NODE can revoke it (the
    founder can revoke anyone; nobody can revoke the founder); rights NODE alone granted
    end with it."""
    out.print(ask("revoke", right=right, node=node), highlight=False)


@app.command()
def emerge(
    atoms: Annotated[list[str], typer.Argument(metavar="ATOM...", help="packages, or @world")],
    pretend_output: Annotated[Path | None, typer.Option(
        "--pretend-output", help="use this saved `emerge --pretend --tree` output instead of "
        "this node's Portage (jobs ordered by its indentation alone)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the plan, submit nothing")]
    = False,
    wait: Annotated[bool, typer.Option("--wait", help="follow each package to the end")]
    = False,
    as_json: JsonOpt = False,
) -> None:
    """Build Gentoo packages across the swarm into the binhost: one job per package this
    node's Portage would merge, ordered by Portage's own dependency graph, run on members with
    this node's build environment; packages the binhost already has are reused."""
    if pretend_output is not None:
        view = _emerge_recorded(pretend_output, dry_run, as_json)
    else:
        view = ask("emerge", timeout=900.0, atoms=atoms, dry_run=dry_run)
    if view is None:
        return
    if dry_run:
        _show_emerge_plan(view, as_json)
        return
    if wait and view["build"]:
        view |= _follow_emerge(view["build"], quiet=as_json)
        if view["ok"] and pretend_output is None:
            view |= _wait_published(view["build"], quiet=as_json)
    view.setdefault("ok", True)
    if as_json:
        emit_json(view)
    elif not wait:
        out.print(view["build"] or "nothing to build", highlight=False)
    if wait and not as_json:
        p = view.get("progress") or {"done": 0, "total": 0}
        failed = p["total"] - p["done"]
        err.print(f"{p['done']} built, " + (f"[red]{failed} not built[/red], " if failed else "")
                  + f"{view['reused']} reused from the binhost"
                  + (f", in {view['seconds']:.1f} s" if view.get("seconds") else ""),
                  highlight=False)
    if not view["ok"]:
        raise typer.Exit(1)


def _emerge_recorded(path: Path, dry_run: bool, as_json: bool) -> dict[str, Any] | None:
    from swarmnode.build.emerge import EmergeError, plan_from_pretend

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        plan = plan_from_pretend(text, name="emerge")
    except (EmergeError, ValueError) as exc:
        fail(str(exc))
    if dry_run:
        return {"jobs": {name: {"cmd": list(j.cmd) if not isinstance(j.cmd, str) else j.cmd,
                                "deps": list(j.deps), "outputs": list(j.outputs)}
                         for name, j in plan.jobs.items()}, "reused": []}
    return {**ask("emerge", timeout=60.0, text=text), "reused": 0, "built": len(plan.jobs)}


def _show_emerge_plan(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(view)
        return
    for name, j in view["jobs"].items():
        out.print(f"{name}  <- {', '.join(j['deps']) or '-'}", highlight=False)
    for cpv in view["reused"]:
        out.print(f"{cpv}  (reused from the binhost)", highlight=False)


def _follow_emerge(build_id: str, quiet: bool) -> dict[str, Any]:
    """Follow an emerge build package by package: each start, end and failure (with the tail
    of Portage's output), and how long it took."""
    from swarmnode.build.emerge import cpv_of

    started, shown, known = time.monotonic(), {}, None
    while True:
        status = ask("build_status", timeout=15.0, build=build_id, wait=5.0, known=known)
        known = status["progress"]
        for j in ask("jobs", build=build_id):
            state = j["state"]
            if quiet or shown.get(j["job"]) == state or state in ("queued", "assigned"):
                continue
            shown[j["job"]] = state
            cpv = cpv_of(j["job"])
            where = f" on {j['node_name']}" if j["node_name"] else ""
            took = f" in {j['seconds']:.1f} s" if j.get("seconds") else ""
            style = {"done": "green", "running": "cyan"}.get(state, "red")
            err.print(f"[{style}]{state:>9}[/] {cpv}{where}{took}"
                      + (f": {j['reason']}" if j["reason"] and state != "done" else ""),
                      highlight=False)
            if state in ("failed", "blocked") and j["node"]:
                _print_tail(f"{build_id}/{j['job']}")
        if status["finished"]:
            return {"ok": status["ok"], "progress": status["progress"],
                    "seconds": round(time.monotonic() - started, 3)}


def _wait_published(build_id: str, quiet: bool) -> dict[str, Any]:
    """Wait until every binhost serves the build's packages (each takes them in a moment
    after their jobs are done): clients install right after `emerge --wait` returns."""
    missing = ask("emerge_published", timeout=75.0, build=build_id, wait=0.0)
    if any(missing.values()):
        if not quiet:
            err.print("waiting for the binhost to take in the last packages", highlight=False)
        missing = ask("emerge_published", timeout=75.0, build=build_id, wait=60.0)
    unpublished = {name: m for name, m in missing.items() if m}
    for name, m in unpublished.items():
        err.print(f"[red]binhost {name} does not serve[/red] "
                  + (", ".join(m) if isinstance(m, list) else m), highlight=False)
    return {"binhosts": sorted(missing), "ok": not unpublished,
            **({"unpublished": unpublished} if unpublished else {})}


def _print_tail(job: str, lines: int = 30) -> None:
    """The end of a job's output (Portage prints why a build failed last)."""
    from swarmnode import control

    try:
        info = control.call(state.home, "logs", timeout=10.0, job=job)
    except (control.ControlError, TimeoutError):
        return
    text = info["output"] if info["output"] is not None else info["log_tail"]
    for line in (text or "").splitlines()[-lines:]:
        err.print(f"          | {line}", highlight=False, markup=False)


@app.command()
def jobs(
    build: Annotated[str | None, typer.Option("--build", help="only this build's jobs")] = None,
    history: Annotated[bool, typer.Option(
        "--history", help="every attempt (node, term, start, end, result) from this node's "
                          "history, builds the ledger has forgotten included")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every job of every build in the ledger: state, node, attempt, how long it ran (a build
    the ledger has forgotten: its end, from the history)."""
    args = {"build": build} if build else {}
    if history:
        _history(ask("jobs", history=True, **args), as_json)
        return
    items = ask("jobs", **args)
    if as_json:
        emit_json(items)
        return
    table = new_table(title=f"{len(items)} jobs")
    for col in ("build", "job", "state", "node", "attempt", "seconds", "reason"):
        table.add_column(col)
    for j in items:
        table.add_row(j["build"], j["job"], j["state"], j["node_name"] or "-",
                      str(j["attempt"]), f"{j['seconds']:.1f}" if j.get("seconds") else "-",
                      (j["reason"] or "")[:60])
    out.print(table)


def _history(rows: list[dict[str, Any]], as_json: bool) -> None:
    """`jobs --history`: one line per attempt (times as the answering node applied them)."""
    if as_json:
        emit_json(rows)
        return
    def when(ts: float | None) -> str:
        return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"

    table = new_table(title=f"{len(rows)} attempts")
    for col in ("build", "job", "attempt", "node", "term", "start", "end", "result", "seconds",
                "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["build"], r["job"], str(r["attempt"]), r["node_name"] or "-",
                      str(r["term"]) if r["term"] is not None else "-",
                      when(r["started"] or r["assigned"]), when(r["ended"]),
                      r["result"] or "-", f"{r['seconds']:.1f}" if r["seconds"] else "-",
                      (r["reason"] or "")[:60])
    out.print(table)


@app.command("history")
def history_(
    since: Annotated[str, typer.Option(help="how far back: 90m, 12h, 7d, up to 90d")] = "1d",
    as_json: JsonOpt = False,
) -> None:
    """The swarm's past from this node's time series: draw and energy, cores online and
    busy, jobs a period, the queue; then the builds that started in it, with energy and cost."""
    from swarmnode.series import rebucket
    from swarmnode.token import parse_duration

    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    view = ask("history", since=seconds)
    if as_json:
        emit_json(view)
        return
    span = view["now"] - view["since"]
    step = max(view["resolution_s"], int(span / 24) // view["resolution_s"]
               * view["resolution_s"])
    rows = rebucket(view["columns"], view["points"], step)
    table = new_table(title=f"the swarm, every {step // 60 or step} {'min' if step >= 60 else 's'}")
    for col in ("from", "W", "kWh", "cores busy", "online", "started", "finished", "failed",
                "queue"):
        table.add_column(col, justify="left" if col == "from" else "right")
    fmt = "%m-%d %H:%M" if span > 86400 else "%H:%M:%S"

    def avg(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        table.add_row(time.strftime(fmt, time.localtime(r["ts"])), avg(r["watts"]),
                      f"{r['joules'] / 3.6e6:.3f}", avg(r["cores_busy"]),
                      avg(r["cores_online"]), str(r["started"]), str(r["finished"]),
                      str(r["failed"]), avg(r["queue"]))
    out.print(table)
    builds = new_table(title=f"{len(view['builds'])} builds")
    for col in ("started", "build", "name", "by", "minutes", "jobs", "failures", "kWh", "cost"):
        builds.add_column(col)
    for b in view["builds"]:
        minutes = (b["ended"] - b["started"]) / 60 if b["ended"] and b["started"] else None
        builds.add_row(time.strftime(fmt, time.localtime(b["started"])), b["build"],
                       b["name"] or "-", b["submitter_name"] or "-",
                       "running" if minutes is None else f"{minutes:.1f}", str(b["jobs"]),
                       str(b["failures"] or 0), f"{(b['joules'] or 0) / 3.6e6:.4f}",
                       "-" if b["cost"] is None else f"{b['cost']:.4f}")
    out.print(builds)


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Check what usually goes wrong (the port from members, NAT, clock skew, mDNS,
    Tailscale, disk, Portage, the home's permissions, the service unit), each with a fix.
    Exits 1 when a check fails."""
    checks = ask("doctor", timeout=30)
    if as_json:
        emit_json(checks)
    else:
        style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        for c in checks:
            out.print(f"[{style[c['status']]}]{c['status']:>4}[/]  [bold]{c['name']}[/bold]  "
                      f"{escape(c['detail'])}", highlight=False)
            if c["fix"]:
                out.print(f"      fix: {escape(c['fix'])}", highlight=False)
    if any(c["status"] == "fail" for c in checks):
        raise typer.Exit(1)


notify_app = typer.Typer(help="Notifications: what needs a person, sent by the leader.",
                         no_args_is_help=True)
app.add_typer(notify_app, name="notify")


@notify_app.command("test")
def notify_test() -> None:
    """Send a test message on every channel this node's config names ([notify])."""
    results = ask("notify_test", timeout=60)
    for channel, result in results.items():
        out.print(f"{channel}: {result}", highlight=False)
    if any(r != "sent" for r in results.values()):
        raise typer.Exit(1)


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="JOB or BUILD/JOB")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing the output "
                                         "until the job ends (across retries)")] = False,
) -> None:
    """A job's state, node and reason from the ledger, and its output (the last 4 KiB) from
    the node that runs or ran it."""
    info = ask("logs", job=job)
    out.print(f"{info['job']}: {info['state']} on {info['node'] or '-'} (attempt "
              f"{info['attempt']})", highlight=False)
    if info["reason"]:
        out.print(f"reason: {info['reason']}", highlight=False)
    if info["failed_on"]:
        out.print(f"failed on: {', '.join(info['failed_on'])}", highlight=False)
    if info["output"] is None:  # its node does not have it: what the ledger kept, if anything
        sys.stdout.write(info["log_tail"])
    seen = _print_output(info, 0)
    attempt = info["attempt"]
    while follow and info["state"] in ("queued", "assigned", "running", "failed"):
        info = ask("logs", timeout=15.0, job=info["job"], since=seen, wait=True)
        if info["attempt"] != attempt:
            attempt, seen = info["attempt"], 0
            out.print(f"[attempt {attempt} on {info['node'] or '-'}]", highlight=False)
        seen = _print_output(info, seen)
        if info["output"] is None:
            time.sleep(0.5)  # not started yet, or its node is not answering
    sys.stdout.flush()


def _print_output(info: dict[str, Any], seen: int) -> int:
    """Print the output `logs` returned after offset `seen`, saying what was skipped (only the
    last 4 KiB are held); the new offset."""
    data, total = info["output"], info["total"]
    if not data:
        return max(seen, total) if data is not None else seen
    skipped = info["start"] - seen
    if skipped > 0:
        sys.stdout.write(f"[... {skipped} bytes not shown ...]\n")
    sys.stdout.write(data)
    sys.stdout.flush()
    return total


@app.command()
def monitor() -> None:
    """The swarm at a glance, refreshed every second: cores, nodes (pending highlighted),
    routes, jobs, builds, events, watts. q quits."""
    from cli import monitor as view  # (rich's Live only when asked for)

    ask("status")  # a clear error, not a blank screen, when no node runs here
    view.run(state.home)


@app.command()
def dashboard(
    bind: Annotated[str | None, typer.Option(
        "--bind", help="serve on HOST[:PORT] instead (kept across restarts); every request "
        "needs the token, which the printed URL carries")] = None,
) -> None:
    """Print the URL of this node's dashboard and Prometheus metrics (/metrics)."""
    info = ask("dashboard", bind=bind or "")
    out.print(info["url"] or "the dashboard is not being served (see the node's log)",
              highlight=False, soft_wrap=True)
    opened = info.get("open_paths") or []  # (an older node: "token_needed" instead)
    err.print("the URL carries this node's dashboard token (every request needs it" +
              (f"; {', '.join(opened)} opened without it in config.toml" if opened else "") +
              f"): share it like a password. It is in {state.home}/dashboard.token",
              highlight=False)


@app.command()
def cancel(build_id: Annotated[str, typer.Argument(metavar="BUILD")]) -> None:
    """Cancel a build: its unfinished jobs are stopped and never rescheduled (its submitter or
    an operator only)."""
    out.print(ask("cancel", timeout=60.0, build=build_id), highlight=False)


@app.command("prove-identity", hidden=True)
def prove_identity(challenge: Annotated[str, typer.Argument(help="hex challenge")]) -> None:
    """Sign an SSH identity challenge with this node's key (asked over SSH before an action)."""
    from swarmnode.ssh_actions import prove

    try:
        out.print(prove(state.home, challenge), highlight=False, soft_wrap=True)
    except (IdentityError, ValueError) as exc:
        fail(str(exc), code=3)


@app.command("local-action", hidden=True)
def local_action(
    verb: Annotated[str, typer.Argument(help="restart or reboot")],
    expect_id: Annotated[str, typer.Option("--expect-id", help="the id the action is for")],
    force: Annotated[bool, typer.Option("--force")] = False,
) -> None:
    """Run this node's restart/reboot command if this node is EXPECT_ID (used over SSH)."""
    from swarmnode.facts import detect_kind
    from swarmnode.ssh_actions import Refused, run_local

    try:
        code = run_local(state.home, verb, expect_id, force, detect_kind())
    except (Refused, ValueError) as exc:
        fail(str(exc), code=3)
    raise typer.Exit(code)


app.command("bootstrap")(bootstrap)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
