"""Real, separate hosts on one machine, built from Linux network namespaces.

Why: the swarm's bugs live in addressing (NAT, routed hops, mDNS scope, partitions), which an
in-process fake cannot reproduce. Each lab host is a namespace with its own interfaces, routes,
iptables and processes, so a node under test sees exactly what it would see on a real network,
while nothing ever touches the machine's own network: hosts only get addresses and routes
inside namespaces this module created.

Everything a `Lab` creates is recorded the moment it exists, so `close()` can undo a partial
setup, and `close()` is idempotent. Namespace names carry a random token so concurrent runs (other
engineers, CI jobs on the same VM) never collide.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, NoReturn

__all__ = [
    "Host",
    "HostRef",
    "Lab",
    "LabError",
    "LabUnavailable",
    "unavailable_reason",
]

# Interface names are limited to 15 chars (IFNAMSIZ - 1); veth ends are named "to-<peer>",
# so logical names stay at 12 chars or less.
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_BRIDGE = "br0"
_TEARDOWN_DEADLINE_S = 5.0
_POLL_S = 0.02


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


class LabUnavailable(LabError):
    """The machine cannot run the lab (not root, `ip` missing, kernel feature missing)."""


def unavailable_reason() -> str | None:
    """Say why the lab cannot run here, or None when it can.

    Why: tests must skip with a reason a human can act on rather than fail obscurely.
    """
    if os.geteuid() != 0:
        return "network-namespace lab needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "network-namespace lab needs iproute2 (`ip`): apt-get install -y iproute2"
    return None


@dataclass(frozen=True)
class Host:
    """A lab node: a host or a switch, each living in its own namespace."""

    name: str
    netns: str
    kind: Literal["host", "switch"]

    def __str__(self) -> str:
        return self.name


HostRef = str | Host


def _default_unsupported(reason: str) -> NoReturn:
    raise LabUnavailable(reason)


class Lab:
    """A set of namespaces (hosts and switches) and the processes started in them.

    Use as a context manager (or through the `lab` pytest fixture); everything is torn down on
    exit even when the body raised.
    """

    def __init__(
        self,
        prefix: str = "sn",
        *,
        log_dir: Path | str | None = None,
        on_unsupported: Callable[[str], NoReturn] | None = None,
    ) -> None:
        """`on_unsupported(reason)` is called (and must raise) when a kernel feature such as
        netem is missing; the pytest fixture passes `pytest.skip` so such tests skip."""
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
        self.prefix = prefix
        self.token = secrets.token_hex(3)
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._on_unsupported = on_unsupported or _default_unsupported
        self._nodes: dict[str, Host] = {}
        self._created: list[str] = []  # namespace names, in creation order
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}
        self._log_files: list[IO[bytes]] = []
        self._cuts: set[tuple[str, str]] = set()
        self._closed = False

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Lab:
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailable(reason)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError:
            if exc is None:  # do not mask the test's own failure
                raise

    # ----------------------------------------------------------------- naming
    @property
    def netns_names(self) -> list[str]:
        """Every namespace this lab created (and has not yet removed)."""
        return list(self._created)

    def netns(self, ref: HostRef) -> str:
        """The namespace name of a host or switch."""
        return self._node(ref).netns

    @property
    def log_dir(self) -> Path:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"swarmnode-lab-{self.token}-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir

    def _node(self, ref: HostRef) -> Host:
        name = ref.name if isinstance(ref, Host) else ref
        try:
            return self._nodes[name]
        except KeyError:
            raise LabError(f"unknown lab node {name!r}") from None

    def _new_node(self, name: str, kind: Literal["host", "switch"]) -> Host:
        if self._closed:
            raise LabError("lab already closed")
        if not _NAME_RE.match(name):
            raise ValueError(f"node name must match {_NAME_RE.pattern}: {name!r}")
        if name in self._nodes:
            raise LabError(f"node {name!r} already exists")
        ns = f"{self.prefix}{self.token}-{name}"
        _cmd(["ip", "netns", "add", ns])
        self._created.append(ns)  # recorded before anything else can fail
        node = Host(name=name, netns=ns, kind=kind)
        self._nodes[name] = node
        _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        return node

    # ----------------------------------------------------------------- topology
    def host(self, name: str) -> Host:
        """Create a host: a fresh namespace with only `lo`, up."""
        return self._new_node(name, "host")

    def switch(self, name: str) -> Host:
        """Create a switch: a namespace holding one Linux bridge (`br0`).

        STP and multicast snooping are off so ports forward at once and mDNS floods to every port.
        """
        node = self._new_node(name, "switch")
        ns = node.netns
        _cmd(["ip", "-n", ns, "link", "add", _BRIDGE, "type", "bridge",
              "stp_state", "0", "mcast_snooping", "0"])
        _cmd(["ip", "-n", ns, "link", "set", _BRIDGE, "up"])
        return node

    def _veth(self, a: Host, if_a: str, b: Host, if_b: str) -> None:
        for ifname in (if_a, if_b):
            if not _IFNAME_RE.match(ifname):
                raise ValueError(f"bad interface name {ifname!r} (max 15 chars)")
        _cmd(["ip", "-n", a.netns, "link", "add", if_a, "type", "veth",
              "peer", "name", if_b, "netns", b.netns])

    def connect(
        self,
        host: HostRef,
        switch: HostRef,
        addr_cidr: str,
        *,
        ifname: str | None = None,
    ) -> str:
        """Plug a host into a switch port and give it `addr_cidr`; returns the host's ifname.

        The host side is named `to-<switch>` unless `ifname` is given.
        """
        h, sw = self._node(host), self._node(switch)
        if sw.kind != "switch":
            raise LabError(f"{sw.name!r} is not a switch")
        if_host = ifname or f"to-{sw.name}"
        if_port = f"to-{h.name}"
        self._veth(h, if_host, sw, if_port)
        _cmd(["ip", "-n", sw.netns, "link", "set", if_port, "master", _BRIDGE])
        _cmd(["ip", "-n", sw.netns, "link", "set", if_port, "up"])
        _cmd(["ip", "-n", h.netns, "addr", "add", addr_cidr, "dev", if_host])
        _cmd(["ip", "-n", h.netns, "link", "set", if_host, "up"])
        return if_host

    def link(
        self,
        host_a: HostRef,
        host_b: HostRef,
        addr_a: str,
        addr_b: str,
        *,
        ifname_a: str | None = None,
        ifname_b: str | None = None,
    ) -> tuple[str, str]:
        """A direct cable (veth pair) between two hosts; returns (ifname_a, ifname_b).

        Ends are named `to-<other host>` unless given.
        """
        a, b = self._node(host_a), self._node(host_b)
        if_a = ifname_a or f"to-{b.name}"
        if_b = ifname_b or f"to-{a.name}"
        self._veth(a, if_a, b, if_b)
        for node, ifname, addr in ((a, if_a, addr_a), (b, if_b, addr_b)):
            _cmd(["ip", "-n", node.netns, "addr", "add", addr, "dev", ifname])
            _cmd(["ip", "-n", node.netns, "link", "set", ifname, "up"])
        return if_a, if_b

    def route(self, host: HostRef, dest_cidr: str, via: str) -> None:
        """Add a unicast route `dest_cidr via <gateway address>` on a host."""
        _cmd(["ip", "-n", self.netns(host), "route", "add", dest_cidr, "via", via])

    def default_route(self, host: HostRef, via: str) -> None:
        """Add the host's default route."""
        self.route(host, "default", via)

    def multicast_route(self, host: HostRef, ifname: str) -> None:
        """Route 224.0.0.0/4 out of `ifname`: mDNS needs it on hosts without a default route."""
        _cmd(["ip", "-n", self.netns(host), "route", "add", "224.0.0.0/4", "dev", ifname])

    def sysctl(self, host: HostRef, key: str, value: str) -> None:
        """Set a (per-namespace) sysctl on a host."""
        self._exec_checked(host, ["sysctl", "-qw", f"{key}={value}"])

    def forwarding(self, gw: HostRef) -> None:
        """Make a host route packets between its interfaces (IPv4 forwarding on)."""
        self.sysctl(gw, "net.ipv4.ip_forward", "1")

    def masquerade(self, gw: HostRef, src_cidr: str, out_if: str) -> None:
        """NAT traffic from `src_cidr` leaving `out_if` to the gateway's own address.

        This is the incident's setup: peers behind it are seen as the gateway's address.
        """
        self.forwarding(gw)
        self._iptables(gw, ["-t", "nat", "-A", "POSTROUTING", "-s", src_cidr,
                            "-o", out_if, "-j", "MASQUERADE"])

    def port_forward(self, gw: HostRef, addr: str, port: int, to: str) -> None:
        """DNAT TCP `addr:port` on `gw` to `to` ("host:port"): a router's port forward, the
        kind of path an operator writes into `overrides` for a node behind NAT."""
        self._iptables(gw, ["-t", "nat", "-A", "PREROUTING", "-d", addr, "-p", "tcp",
                            "--dport", str(port), "-j", "DNAT", "--to-destination", to])

    def cut(self, host: HostRef, peer_addr: str) -> None:
        """Partition: drop everything between `host` and `peer_addr` (both directions).

        Idempotent; applied on `host` only, so the peer sees silence (or, for the cut host's
        own sends, an immediate EPERM).
        """
        key = (self._node(host).name, peer_addr)
        if key in self._cuts:
            return
        self._iptables(host, ["-I", "INPUT", "-s", peer_addr, "-j", "DROP"])
        self._iptables(host, ["-I", "OUTPUT", "-d", peer_addr, "-j", "DROP"])
        self._cuts.add(key)

    def uncut(self, host: HostRef, peer_addr: str) -> None:
        """Heal a partition made by `cut`; a no-op when there is none."""
        key = (self._node(host).name, peer_addr)
        if key not in self._cuts:
            return
        self._iptables(host, ["-D", "INPUT", "-s", peer_addr, "-j", "DROP"])
        self._iptables(host, ["-D", "OUTPUT", "-d", peer_addr, "-j", "DROP"])
        self._cuts.discard(key)

    def netem(
        self,
        host: HostRef,
        ifname: str,
        *,
        loss: float | None = None,
        delay_ms: float | None = None,
    ) -> None:
        """Impair egress on an interface: `loss` in percent (0-100), `delay_ms` latency.

        Replaces any previous impairment; with neither argument it removes it. Calls
        `on_unsupported` when the kernel lacks sch_netem (seen on some CI kernels).
        """
        ns = self.netns(host)
        if loss is None and delay_ms is None:
            res = self.run(host, ["tc", "qdisc", "del", "dev", ifname, "root"], timeout=10)
            if res.returncode != 0 and "No such file" not in res.stderr \
                    and "Cannot delete qdisc with handle of zero" not in res.stderr:
                raise LabError(f"tc qdisc del in {ns}: {res.stderr.strip()}")
            return
        args = ["tc", "qdisc", "replace", "dev", ifname, "root", "netem"]
        if loss is not None:
            if not 0 <= loss <= 100:
                raise ValueError(f"loss is a percentage 0-100, got {loss}")
            args += ["loss", f"{loss}%"]
        if delay_ms is not None:
            if delay_ms < 0:
                raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
            args += ["delay", f"{delay_ms}ms"]
        if shutil.which("tc") is None:
            self._on_unsupported("netem needs `tc` (iproute2)")
        res = self.run(host, args, timeout=10)
        if res.returncode != 0:
            if "qdisc kind is unknown" in res.stderr:
                self._on_unsupported("kernel lacks sch_netem: `tc qdisc ... netem` unsupported")
            raise LabError(f"{' '.join(args)} in {ns}: {res.stderr.strip()}")

    def _iptables(self, host: HostRef, args: list[str]) -> None:
        if shutil.which("iptables") is None:
            self._on_unsupported("lab needs iptables: apt-get install -y iptables")
        self._exec_checked(host, ["iptables", "-w", "5", *args])

    def _exec_checked(self, host: HostRef, argv: Sequence[str]) -> None:
        res = self.run(host, argv, timeout=15)
        if res.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} in {self.netns(host)} failed ({res.returncode}): "
                f"{res.stderr.strip()}"
            )

    # ----------------------------------------------------------------- processes
    def _argv(self, host: HostRef, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of strings, not one string")
        return ["ip", "netns", "exec", self.netns(host), *argv]

    @staticmethod
    def _env(env: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(os.environ)
        merged.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            merged.update(env)
        return merged

    def spawn(
        self,
        host: HostRef,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process on a host; stdout and stderr go to a log file.

        `env` is merged over the current environment (plus PYTHONUNBUFFERED=1, so log polling
        sees output at once). The process gets its own session, so `kill9` takes its children
        too. Without `log_path` the log is `<log_dir>/<host>-<n>.log`; see `log_path(proc)`.
        """
        node = self._node(host)
        if self._closed:
            raise LabError("lab already closed")
        path = Path(log_path) if log_path is not None else (
            self.log_dir / f"{node.name}-{len(self._procs)}.log"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("ab")
        self._log_files.append(log)
        proc = subprocess.Popen(
            self._argv(node, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(env),
            start_new_session=True,
        )
        self._procs.append(proc)
        self._logs[proc.pid] = path
        return proc

    def run(
        self,
        host: HostRef,
        argv: Sequence[str],
        timeout: float = 10.0,
        *,
        env: Mapping[str, str] | None = None,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a host to completion, capturing text stdout/stderr."""
        return subprocess.run(
            self._argv(host, argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(env),
            check=check,
        )

    def kill9(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
        """Crash a spawned process (SIGKILL to its whole session/process group); returns
        its exit status once reaped."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                proc.kill()
        return proc.wait(timeout=timeout)

    def crash(self, host: HostRef) -> None:
        """A host losing power: SIGKILL every process in its namespace (a node and the jobs
        it started in their own process groups alike)."""
        errors = _kill_netns_pids(self.netns(host))
        if errors:
            raise LabError("; ".join(errors))

    def send_signal(self, host: HostRef, sig: signal.Signals) -> None:
        """Send `sig` to every process in a host's namespace: SIGSTOP/SIGCONT pause and resume
        the whole host (a node and its jobs alike), as a frozen VM would."""
        _kill_all(_netns_pids(self.netns(host)), sig)

    def log_path(self, proc: subprocess.Popen[bytes]) -> Path:
        """Where a spawned process's output goes."""
        return self._logs[proc.pid]

    def read_log(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything the process has written so far."""
        return self.log_path(proc).read_text(errors="replace")

    def wait_for_log(
        self,
        proc: subprocess.Popen[bytes],
        needle: str,
        timeout: float = 5.0,
        *,
        count: int = 1,
    ) -> str:
        """Wait until `needle` appears `count` times in the process's log; return the log.

        Raises LabError (with the log) at the deadline or as soon as the process has exited
        without printing it, so a crashed server fails fast instead of timing out.
        """
        deadline = time.monotonic() + timeout
        while True:
            exited = proc.poll() is not None
            text = self.read_log(proc)
            if text.count(needle) >= count:
                return text
            if exited:
                raise LabError(
                    f"process {proc.pid} exited ({proc.returncode}) before printing "
                    f"{needle!r} x{count}; log:\n{text}"
                )
            if time.monotonic() >= deadline:
                raise LabError(f"timed out after {timeout}s waiting for {needle!r} x{count}; "
                               f"log:\n{text}")
            time.sleep(_POLL_S)

    # ----------------------------------------------------------------- teardown
    def close(self) -> None:
        """Kill every process started in the lab's namespaces, then delete the namespaces.

        Safe to call twice and after a partial setup. Keeps going past failures and raises one
        LabError listing them at the end, so a leak is never silent.
        """
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in self._procs:
            try:
                self.kill9(proc)
            except (OSError, subprocess.TimeoutExpired) as e:
                errors.append(f"kill pid {proc.pid}: {e}")
        for log in self._log_files:
            log.close()
        for ns in reversed(self._created):
            errors.extend(_kill_netns_pids(ns))
        for ns in reversed(self._created):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0 and "No such file" not in res.stderr:
                errors.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self._created.clear()
        if errors:
            raise LabError("lab teardown incomplete:\n" + "\n".join(errors))


def _cmd(argv: list[str], timeout: float = 15.0) -> None:
    """Run a setup command in the root namespace's view (`ip -n ...`); raise with stderr."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")


def _netns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         check=False)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _kill_netns_pids(ns: str) -> list[str]:
    """SIGKILL everything whose network namespace is `ns`, until none is left or a deadline.

    Why a loop: a process may fork between listing and killing; and `ip netns del` alone
    would leave such processes holding the namespace (and its addresses) alive.
    """
    deadline = time.monotonic() + _TEARDOWN_DEADLINE_S
    while True:
        pids = _netns_pids(ns)
        if not pids:
            return []
        if time.monotonic() >= deadline:
            return [f"processes still alive in {ns}: {pids}"]
        _kill_all(pids)
        time.sleep(_POLL_S)


def _kill_all(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
