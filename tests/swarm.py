"""Real swarmnode processes for multi-process tests: start, query, crash, wait, tear down.

Why a harness: the swarm's failures (a node recorded under its gateway's address, a crash not
noticed, a ban that does not stick) only show with real processes talking over real sockets.
Every node here is the real CLI (`python -m cli ... join --fast`), run either on this
machine's loopback addresses or inside a namespace of the lab (`tests/lab`), and every
assertion reads what the CLI contract exposes (`nodes --json`, `status --json`, `events --json`).

Two ways to ask a node something:
- `Swarm.cli(...)` runs the real command line, exactly as a person or script would;
- `Swarm.query(...)` sends the same request over the node's control socket in-process. It is
  what the CLI does underneath, minus ~0.2 s of interpreter start-up, so polling loops can
  measure detection times to tens of milliseconds.

The control socket is a file in the node's home, so it works across network namespaces: lab
nodes are queried from the test process directly.

Failures must be debuggable: a `wait_for` that times out raises with what it waited for, the
last thing it saw, each node's current member list and the tail of every node's log; the
fixtures print the same dump when any other assertion fails. Teardown always runs: SIGTERM,
then SIGKILL, for every node ever started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from swarmnode import control
from tests.ports import free_port

if TYPE_CHECKING:
    from tests.lab import Lab

__all__ = [
    "REPO",
    "Node",
    "Swarm",
    "SwarmError",
    "free_port",
    "lab_swarm_fixture",
    "loopback_addr",
    "managed_swarm",
    "swarm_fixture",
]

REPO = Path(__file__).resolve().parents[1]
CLI: tuple[str, ...] = (sys.executable, "-m", "cli")


def cli_argv(code: Path) -> list[str]:
    """`swarmnode` as installed in the tree `code`: `python -m cli`, or `-m cli.main` for a
    release from before `cli/__main__.py` (the upgrade test's old one)."""
    return [*CLI] if (code / "cli" / "__main__.py").exists() else [*CLI[:2], "cli.main"]
#: How often wait loops poll. Control-socket queries take about a millisecond, so 50 ms keeps
#: measured detection times honest without loading a 2-core machine.
POLL_S = 0.05
#: Lines of each node's log shown in a failure dump.
LOG_TAIL = 150
#: How long a node gets to leave gracefully on SIGTERM before the harness kills it.
STOP_TIMEOUT_S = 10.0
#: How long a freshly spawned node gets to open its control socket.
READY_TIMEOUT_S = 20.0

T = TypeVar("T")


class SwarmError(AssertionError):
    """A swarm condition did not hold (the message carries a full dump of the swarm)."""


def loopback_addr(i: int) -> str:
    """127.0.0.i with a port free for TCP and UDP."""
    host = f"127.0.0.{i}"
    return f"{host}:{free_port(host)}"


def host_of(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0].strip("[]")


@dataclass
class Node:
    """One swarmnode: its home (identity, state, control socket), log and current process."""

    name: str
    home: Path
    listen: str
    log: Path
    id: str = ""
    host: str | None = None  # lab host it runs in; None: this machine
    #: Its installed swarmnode: the tree (`swarmnode`, `net`, `cli`) its CLI and `join` run.
    code: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        return self.listen

    def __str__(self) -> str:
        return f"{self.name}({self.listen})"


class Swarm:
    """The nodes of one test; see the module docstring."""

    def __init__(self, root: Path, lab: Lab | None = None) -> None:
        self.root = root
        self.lab = lab
        self.nodes: dict[str, Node] = {}
        #: The installed swarmnode of nodes added from now on (an older release's, to upgrade).
        self.code = REPO
        #: Checked on every member list fetched: each returns an error text or None. A
        #: violation fails the test at once ("never listed under the gateway's address").
        self.invariants: list[Callable[[Node, list[dict[str, Any]]], str | None]] = []
        self.violations: list[str] = []
        self._last_seen: dict[str, list[dict[str, Any]]] = {}
        self.dumped = False  # a dump went into a failure message already

    # ------------------------------------------------------------------ nodes
    def add(self, name: str, listen: str, host: str | None = None) -> Node:
        """Make a node's home and identity (via `swarmnode id`) without starting it."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists")
        home = self.root / name
        node = Node(name=name, home=home, listen=listen, log=self.root / f"{name}.log",
                    host=host, code=self.code)
        self.nodes[name] = node
        node.id = self.cli(node, "id").stdout.strip().splitlines()[-1]
        return node

    def init(self, name: str, listen: str, cluster: str = "swarmtest",
             host: str | None = None) -> tuple[Node, str]:
        """`swarmnode init` in a new home; returns the node and the printed join token."""
        node = self.add(name, listen, host)
        res = self.cli(node, "init", "--name", cluster, "--listen", listen)
        token = res.stdout.strip().splitlines()[-1].strip()
        if not token.startswith("swn1."):
            raise SwarmError(f"`init` printed no token: stdout={res.stdout!r} "
                             f"stderr={res.stderr!r}")
        return node, token

    def join_argv(self, node: Node, token: str | None = None, seeds: Sequence[str] = (),
                  mdns: bool = False, tailscale: bool = False,
                  extra: Sequence[str] = (), fast: bool = True) -> list[str]:
        argv = [*cli_argv(node.code), "--home", str(node.home), "join"]
        if token:
            argv.append(token)
        argv += ["--name", node.name, "--listen", node.listen]
        for s in seeds:
            argv += ["--seed", s]
        if not mdns:
            argv.append("--no-mdns")
        if not tailscale:
            argv.append("--no-tailscale")
        argv += ["--fast", *extra] if fast else list(extra)
        return argv

    def start(self, node: Node | str, token: str | None = None, seeds: Sequence[str] = (),
              *, mdns: bool = False, tailscale: bool = False, extra: Sequence[str] = (),
              wait: bool = True, cwd: Path | None = None, fast: bool = True) -> Node:
        """Run `swarmnode join` for `node` (in its lab host, if any); by default wait until
        its control socket answers, failing fast with the log if it exits first. `cwd` is
        where `python -m cli` finds the code it runs (default: the node's installed
        code, `node.code`); `fast=False` runs the shipped default timers instead of the
        tests' tenfold faster ones."""
        node = self._node(node)
        if node.running:
            raise SwarmError(f"{node} is already running")
        argv = self.join_argv(node, token, seeds, mdns, tailscale, extra, fast)
        node.starts += 1
        shown = [a[:16] + "..." if a.startswith("swn1.") else a for a in argv[3:]]
        with node.log.open("a") as f:
            f.write(f"\n===== start #{node.starts} at {time.strftime('%H:%M:%S')}: "
                    f"{' '.join(shown)}\n")
        if self.lab is not None and node.host is not None:
            node.proc = self.lab.spawn(node.host, argv, env=_env(), log_path=node.log)
        else:
            with node.log.open("ab") as log:
                node.proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=cwd or node.code, env=_env(), start_new_session=True,
                )
        if wait:
            self.wait_ready(node)
        return node

    def loopback(self, n: int, timeout: float = 20.0) -> tuple[list[Node], str]:
        """n nodes on 127.0.0.1..n: a founder (init + join) and n-1 joining with its token;
        returns them, once every one lists every other alive, and the token."""
        founder, token = self.init("n1", loopback_addr(1))
        self.start(founder)
        nodes = [founder] + [self.start(self.add(f"n{i}", loopback_addr(i)), token)
                             for i in range(2, n + 1)]
        self.wait_converged(nodes, timeout)
        return nodes, token

    def wait_ready(self, node: Node, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.running:
                raise SwarmError(f"{node} exited ({self._rc(node)}) before it answered on its "
                                 f"control socket\n{self.dump()}")
            try:
                if self.query(node, "status", timeout=2.0)["ready"]:
                    return  # listening, its dashboard served
            except (control.ControlError, OSError, TimeoutError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise SwarmError(f"{node} did not answer ready on its control socket within "
                                 f"{timeout}s\n{self.dump()}")
            time.sleep(POLL_S)

    def stop(self, node: Node | str, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (a graceful leave); returns the exit status. Killed if it overstays."""
        node = self._node(node)
        proc = node.proc
        if proc is None:
            raise SwarmError(f"{node} was never started")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9(node)
                raise SwarmError(f"{node} did not exit within {timeout}s of SIGTERM\n"
                                 f"{self.dump()}") from None
        rc = proc.returncode
        node.exits.append(rc)
        return rc

    def kill9(self, node: Node | str) -> None:
        """Crash a node: SIGKILL to its whole process group, then reap it."""
        node = self._node(node)
        proc = node.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)
        node.exits.append(proc.returncode)

    def close(self) -> None:
        """SIGTERM every running node, then SIGKILL whatever is left; never raises."""
        running = [n for n in self.nodes.values() if n.running]
        for n in running:
            with contextlib.suppress(ProcessLookupError, OSError):
                n.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + 5.0
        for n in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
        for n in running:
            with contextlib.suppress(Exception):
                self.kill9(n)

    # ------------------------------------------------------------------ asking nodes
    def cli(self, node: Node | str | Path, *args: str, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real CLI against a node's home (from this process's namespace: the control
        socket is a file, so that reaches lab nodes too), installed there: `node.code`."""
        home, code = (node, REPO) if isinstance(node, Path) else \
            (self._node(node).home, self._node(node).code)
        argv = [*cli_argv(code), "--home", str(home), *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=code,
                             env=_env(), check=False)
        if check and res.returncode != 0:
            raise SwarmError(f"`{' '.join(argv[3:])}` failed ({res.returncode}):\n"
                             f"stdout: {res.stdout}\nstderr: {res.stderr}\n{self.dump()}")
        return res

    def cli_json(self, node: Node | str, *args: str) -> Any:
        res = self.cli(node, *args, "--json")
        try:
            value = json.loads(res.stdout)
        except ValueError:
            raise SwarmError(f"`{' '.join(args)} --json` printed no JSON: {res.stdout!r}") \
                from None
        if args and args[0] == "nodes":
            self._check(self._node(node), value)
        return value

    def query(self, node: Node | str, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
        """The control-socket request the CLI would send; raises control.ControlError."""
        node = self._node(node)
        value = control.call(node.home, cmd, timeout=timeout, **args)
        if cmd == "nodes":
            self._check(node, value)
        return value

    def members(self, observer: Node | str) -> list[dict[str, Any]]:
        return self.query(observer, "nodes")

    def entry(self, observer: Node | str, target: Node | str) -> dict[str, Any] | None:
        """`observer`'s entry for `target` (by id), or None when it does not list it."""
        want = self._node(target).id
        for m in self.members(observer):
            if m["id"] == want:
                return m
        return None

    def state(self, observer: Node | str, target: Node | str) -> str | None:
        e = self.entry(observer, target)
        return None if e is None else e["state"]

    def events(self, node: Node | str, kind: str | None = None) -> list[dict[str, Any]]:
        items = self.query(node, "events", limit=10_000)
        return [e for e in items if kind is None or e.get("kind") == kind]

    def state_right(self, by: Node | str, verb: str, right: str, who: Node | str,
                    seen_by: Iterable[Node | str] | None = None, timeout: float = 20.0) -> None:
        """`swarmnode grant|revoke RIGHT WHO` on `by`, then wait until `seen_by` (by default
        every running node: whichever leads judges a request by what it holds) hold it."""
        target = self._node(who)
        self.cli(by, verb, right, target.name)
        key, topic = f"{right}:{target.id}", "grant" if verb == "grant" else "revoke"
        for n in [self._node(n) for n in seen_by] if seen_by is not None else [
                n for n in self.nodes.values() if n.running]:
            self.wait_for(lambda n=n: any(e["key"] == key and e["topic"] == topic
                                          for e in self.events(n, "note")),
                          timeout, f"{n.name} holds the {topic} of {key}")

    def grant(self, by: Node | str, right: str, *who: Node | str) -> None:
        """`by` grants `right` to each of `who`, every running node holding each grant."""
        for n in who:
            self.state_right(by, "grant", right, n)

    def _check(self, observer: Node, members: list[dict[str, Any]]) -> None:
        self._last_seen[observer.name] = members
        for inv in self.invariants:
            problem = inv(observer, members)
            if problem:
                msg = f"invariant broken on {observer}: {problem}"
                self.violations.append(msg)
                raise SwarmError(f"{msg}\nmember list: {json.dumps(members, indent=1)}\n"
                                 f"{self.dump()}")

    # ------------------------------------------------------------------ waiting
    def wait_for(self, cond: Callable[[], T], timeout: float, what: str) -> T:
        """Poll `cond` until it returns something truthy (returned); at the deadline raise a
        SwarmError with `what`, the last value or error and a dump of the swarm.

        A ControlError (node not up yet, or gone) counts as "not yet", not as a failure.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                value = cond()
                if value:
                    return value
                last = value
            except (control.ControlError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise SwarmError(f"timed out after {timeout}s waiting for: {what}\n"
                                 f"last: {last!r}\n{self.dump()}")
            time.sleep(POLL_S)

    def hold(self, cond: Callable[[], bool], duration: float, what: str) -> None:
        """Check that `cond` stays true for `duration` seconds (for "stays pending",
        "stays banned"): every poll must hold, and it must hold at the end."""
        end = time.monotonic() + duration
        while True:
            ok = cond()
            if not ok:
                raise SwarmError(f"no longer true: {what}\n{self.dump()}")
            if time.monotonic() >= end:
                return
            time.sleep(POLL_S)

    def states(self, observers: Iterable[Node | str], target: Node | str) -> dict[str, Any]:
        return {self._node(o).name: self.state(o, target) for o in observers}

    def wait_state(self, targets: Iterable[Node | str], state: str,
                   observers: Iterable[Node | str], timeout: float) -> float:
        """Wait until every observer lists every target in `state`; returns seconds waited."""
        targets = [self._node(t) for t in targets]
        observers = [self._node(o) for o in observers]
        t0 = time.monotonic()

        def done() -> bool:
            return all(self.state(o, t) == state for o in observers for t in targets)

        self.wait_for(done, timeout,
                      f"{[o.name for o in observers]} all list {[t.name for t in targets]} "
                      f"as {state!r}")
        return time.monotonic() - t0

    def wait_converged(self, nodes: Iterable[Node | str], timeout: float) -> float:
        """Every one of `nodes` lists every one of them alive; returns seconds waited."""
        nodes = list(nodes)
        return self.wait_state(nodes, "alive", nodes, timeout)

    # ------------------------------------------------------------------ diagnostics
    def dump(self) -> str:
        """Every node's member list (live, else the last one seen) and its log tail."""
        self.dumped = True
        parts = ["", "=" * 30 + " swarm dump " + "=" * 30]
        for n in self.nodes.values():
            status = "running" if n.running else f"not running ({self._rc(n)})"
            parts.append(f"--- {n.name} id={n.id[:12]} listen={n.listen} host={n.host} "
                         f"{status}")
            members: Any = None
            if n.running:
                with contextlib.suppress(Exception):
                    members = control.call(n.home, "nodes", timeout=2.0)
            if members is None:
                members = self._last_seen.get(n.name)
                if members is not None:
                    parts.append("    (last member list seen)")
            if n.running:  # its status, with drop counters: best effort
                with contextlib.suppress(Exception):
                    st = control.call(n.home, "status", timeout=2.0)
                    parts.append("    status: " + ", ".join(
                        f"{k}={st[k]}" for k in ("nodes_alive", "pending", "admitted", "drops")
                        if k in st))
            for m in members or []:
                parts.append(
                    f"    {m.get('name')!s:10} {m.get('id', '')[:12]} {m.get('state')!s:8} "
                    f"inc={m.get('incarnation')} addrs={m.get('addresses')} "
                    f"observed={m.get('observed')} nat={m.get('nat')}"
                    f"{' (self)' if m.get('self') else ''}")
        for n in self.nodes.values():
            parts.append(f"----- log of {n.name} ({n.log}) -----")
            try:
                lines = n.log.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                lines = ["(no log)"]
            if len(lines) > LOG_TAIL:
                parts.append(f"... {len(lines) - LOG_TAIL} earlier lines ...")
            parts.extend(lines[-LOG_TAIL:])
        return "\n".join(parts)

    # ------------------------------------------------------------------ helpers
    def _node(self, ref: Node | str) -> Node:
        if isinstance(ref, Node):
            return ref
        try:
            return self.nodes[ref]
        except KeyError:
            raise SwarmError(f"no node named {ref!r} in this swarm") from None

    @staticmethod
    def _rc(node: Node) -> str:
        if node.proc is None:
            return "never started"
        rc = node.proc.poll()
        return "running" if rc is None else f"exit {rc}"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.pop("SWARMNODE_HOME", None)
    return env


def short_root() -> Path:
    """A fresh directory with a short path: a home's control socket path must fit in the
    108 bytes of a Unix socket address, which pytest's tmp_path often exceeds."""
    return Path(tempfile.mkdtemp(prefix=f"sw-{secrets.token_hex(3)}-", dir="/tmp"))


# ---------------------------------------------------------------------- pytest fixtures
@contextlib.contextmanager
def managed_swarm(request: pytest.FixtureRequest, lab: Lab | None = None) -> Iterator[Swarm]:
    root = short_root()
    the_swarm = Swarm(root, lab=lab)
    # The call phase's report is logged (and counted) before fixtures are torn down, so a
    # grown failure count here means this test failed.
    failures_before = request.session.testsfailed
    try:
        yield the_swarm
    finally:
        failed = request.session.testsfailed > failures_before
        if failed and not the_swarm.dumped:  # teardown output is shown with the failure
            print(the_swarm.dump())
        the_swarm.close()
        if failed:
            print(f"swarm homes and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="swarm")
def swarm_fixture(request: pytest.FixtureRequest) -> Iterator[Swarm]:
    """Nodes on this machine's loopback addresses; all stopped at teardown."""
    with managed_swarm(request) as s:
        yield s


@pytest.fixture(name="lab_swarm")
def lab_swarm_fixture(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Swarm]:
    """Nodes that run in the hosts of `lab`; stopped before the lab is torn down."""
    with managed_swarm(request, lab) as s:
        yield s
