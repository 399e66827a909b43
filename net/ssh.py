"""SSH chains for reaching members behind jump hosts, running commands and tunnelling ports.

Why: a member may sit on a network only a bastion can reach. Paramiko has no ProxyJump, so a
chain opens a `direct-tcpip` channel on hop N and runs hop N+1's SSH session inside it.

Security: every hop's host key is checked (pinned fingerprints, or known_hosts like OpenSSH's
StrictHostKeyChecking=yes) right after key exchange and BEFORE authenticating, so no
credential or signature is ever sent to an impostor. Nothing is ever added to known_hosts.

Everything here blocks (paramiko does); async callers use `asyncio.to_thread`. Every failure
leaves the API as an `SshError` whose message names the hop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

import paramiko

from net.addresses import split_hostport
from net.sshkeys import (
    DEFAULT_PORT,
    Hop,
    HopSyntaxError,
    HostKeyError,
    SshConnectError,
    SshError,
    blob_fingerprint,
    host_key_fingerprints,
    local_user,
    parse_hop,
    parse_public_key,
)

__all__ = [
    "Chain",
    "Forwarder",
    "Hop",
    "HopSyntaxError",
    "HostKeyError",
    "SshConnectError",
    "SshError",
    "fingerprint",
    "host_key_fingerprints",
    "parse_hop",
    "proxy_jump",
]

log = logging.getLogger(__name__)

_DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
_KEEPALIVE_S = 15
_BUF = 64 * 1024
_MAX_JUMP_DEPTH = 16
_JOIN_S = 2.0
# Errors paramiko and sockets raise; each is turned into an SshError at the API boundary.
_WIRE_ERRORS = (paramiko.SSHException, OSError, EOFError)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:...` fingerprint of a public key (as `ssh-keygen -lf` prints it)."""
    return blob_fingerprint(key.asbytes())



# --------------------------------------------------------------------------- known_hosts
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """OpenSSH host patterns: only `*` and `?` are wildcards (`[` is literal, as in `[h]:p`)."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _hashed_match(entry: str, name: str) -> bool:
    """Match a hashed (`|1|salt|hash`) known_hosts host field against a name."""
    parts = entry.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt = base64.b64decode(parts[2], validate=True)
        want = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    got = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(got, want)


def _hosts_match(field: str, name: str) -> bool:
    """Whether a known_hosts host field names `name`; a matching `!pattern` vetoes."""
    if field.startswith("|"):
        return _hashed_match(field, name)
    matched = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if _pattern_regex(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True)
class _KnownKey:
    marker: str  # "", "@revoked" or "@cert-authority"
    hosts: str
    key_type: str
    blob: bytes
    source: str  # "path:line", for messages


def _read_known_hosts(paths: Iterable[Path]) -> list[_KnownKey]:
    """Parse OpenSSH known_hosts files; missing files and malformed lines are skipped."""
    keys: list[_KnownKey] = []
    for path in paths:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else ""
            if len(fields) < 3:
                continue
            blob = parse_public_key(fields[1], fields[2])
            if blob is not None:
                keys.append(_KnownKey(marker, fields[0], fields[1], blob, f"{path}:{lineno}"))
    return keys


def _default_known_hosts() -> list[Path]:
    return [Path("~/.ssh/known_hosts").expanduser()]


# Host key algorithms a known_hosts key type can be offered under.
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def _prefer_key_types(transport: paramiko.Transport, known: Sequence[_KnownKey]) -> None:
    """Ask first for host key types we already know, as OpenSSH does; else a server with
    several keys could offer one we have never seen and look like an impostor."""
    if not known:
        return
    options = transport.get_security_options()
    current = list(options.key_types)
    wanted = {alg for k in known for alg in _ALGORITHMS.get(k.key_type, (k.key_type,))}
    first = [alg for alg in current if alg in wanted]
    if first:
        options.key_types = tuple(first + [alg for alg in current if alg not in wanted])


def _check_host_key(
    hop: Hop,
    where: str,
    key: paramiko.PKey,
    known: Sequence[_KnownKey],
    known_paths: Sequence[Path],
) -> None:
    """Raise HostKeyError unless the offered key is pinned for, or known for, this hop.

    `known` holds the known_hosts entries whose host field names this hop; `where` is how
    messages name the hop.
    """
    got = fingerprint(key)
    offered = f"{key.get_name()} key {got}"
    if hop.fingerprints:
        if got in {f.rstrip("=") for f in hop.fingerprints}:
            return
        expected = set(hop.fingerprints)
        raise HostKeyError(
            f"host key mismatch for {where}: it offered {offered}, expected "
            f"{' or '.join(sorted(expected))}; refusing to authenticate (possible impostor)",
            hop, expected, got,
        )
    blob = key.asbytes()
    for entry in known:
        if entry.marker == "@revoked" and entry.blob == blob:
            raise HostKeyError(
                f"host key of {where} ({offered}) is revoked ({entry.source})", hop, set(), got
            )
    plain = [e for e in known if not e.marker]
    if any(e.blob == blob for e in plain):
        return
    if plain:
        expected = {blob_fingerprint(e.blob) for e in plain}
        sources = ", ".join(e.source for e in plain)
        raise HostKeyError(
            f"host key mismatch for {where}: it offered {offered}, known_hosts ({sources}) "
            f"expects {' or '.join(sorted(expected))}; refusing to authenticate "
            "(possible impostor)",
            hop, expected, got,
        )
    files = ", ".join(str(p) for p in known_paths) or "(none)"
    raise HostKeyError(
        f"host key of {where} is unknown: it offered {offered}, which is in no known_hosts "
        f"file ({files}) and no fingerprint was pinned; verify it and add it first",
        hop, set(), got,
    )


# --------------------------------------------------------------------------- ssh config
def _split_jump(entry: str) -> tuple[str | None, str, int | None]:
    """Split one ProxyJump entry `[ssh://][user@]alias[:port]` into its parts."""
    text = entry.strip().removeprefix("ssh://")
    user, at, hostport = text.rpartition("@")
    if at and not user:
        raise HopSyntaxError(f"empty user in ProxyJump entry {entry!r}")
    explicit_port = "]:" in hostport if hostport.startswith("[") else hostport.count(":") == 1
    try:
        alias, port = split_hostport(hostport, DEFAULT_PORT)
    except ValueError as e:
        raise HopSyntaxError(f"bad ProxyJump entry {entry!r}: {e}") from None
    return user or None, alias, port if explicit_port else None


def _jump_hop(config: paramiko.SSHConfig, entry: str) -> tuple[str, Hop]:
    """Resolve a ProxyJump entry through the config (HostName/User/Port); explicit parts win."""
    user, alias, port = _split_jump(entry)
    options = config.lookup(alias)
    try:
        port = port or int(options.get("port", DEFAULT_PORT))
    except ValueError:
        raise SshError(f"bad Port {options.get('port')!r} for {alias!r} in ssh config") from None
    hop = Hop(
        user=user or options.get("user") or local_user(),
        host=options.get("hostname", alias),
        port=port,
    )
    return alias, hop


def _jumps(config: paramiko.SSHConfig, host: str, seen: frozenset[str]) -> list[Hop]:
    """Hops before `host`; `seen` holds the hosts already expanded, to stop loops."""
    value = (config.lookup(host).get("proxyjump") or "").strip()
    if not value or value.lower() == "none":
        return []
    resolved = [_jump_hop(config, entry) for entry in value.split(",") if entry.strip()]
    if not resolved:
        return []
    first_alias = resolved[0][0]
    if first_alias == host:  # e.g. `Host *` also matching the bastion itself
        return [hop for _, hop in resolved[1:]]
    if first_alias in seen or len(seen) > _MAX_JUMP_DEPTH:
        raise SshError(f"ProxyJump loop in ssh config via {first_alias!r}")
    # Like `ssh -J`, the first jump host is reached through its own ProxyJump, if any.
    return _jumps(config, first_alias, seen | {host}) + [hop for _, hop in resolved]


def proxy_jump(host: str, config_path: Path | None = None) -> list[Hop]:
    """The jump hosts ~/.ssh/config puts before `host` (its ProxyJump), first hop first.

    A missing config or `ProxyJump none` gives []. The hops carry no pinned fingerprints.
    """
    path = Path(config_path) if config_path is not None else Path("~/.ssh/config").expanduser()
    try:
        config = paramiko.SSHConfig.from_path(str(path))
        return _jumps(config, host, frozenset())
    except FileNotFoundError:
        return []
    except SshError:
        raise
    except (OSError, paramiko.SSHException, ValueError) as e:
        raise SshError(f"cannot read ssh config {path}: {e}") from None


# --------------------------------------------------------------------------- identities
def _load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):
        raise SshError(f"private key {path} is encrypted; load it into ssh-agent") from None
    except (OSError, paramiko.SSHException, ValueError, paramiko.UnknownKeyType) as e:
        raise SshError(f"cannot load private key {path}: {e}") from None


def _identities(key_filename: str | None) -> tuple[list[paramiko.PKey], paramiko.Agent | None]:
    """The keys to offer: the given file only, else the agent's keys then ~/.ssh/id_*."""
    if key_filename is not None:
        return [_load_key(Path(key_filename).expanduser())], None
    keys: list[paramiko.PKey] = []
    agent: paramiko.Agent | None = None
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent = paramiko.Agent()
            keys.extend(agent.get_keys())
        except _WIRE_ERRORS as e:
            log.debug("ssh-agent unusable: %s", e)
    for name in _DEFAULT_IDENTITIES:
        path = Path("~/.ssh").expanduser() / name
        if path.is_file():
            try:
                keys.append(_load_key(path))
            except SshError as e:
                log.debug("skipping identity: %s", e)
    if not keys:
        if agent is not None:
            agent.close()
        raise SshError(
            "no SSH private key: pass key_filename, load a key into ssh-agent, or create "
            "~/.ssh/id_ed25519"
        )
    return keys, agent


# --------------------------------------------------------------------------- chain
def _describe(e: BaseException) -> str:
    """A short reason for messages (socket timeouts stringify as "timed out" or nothing)."""
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e).strip() or type(e).__name__


class _Closes:
    """`with` support for the objects here: leaving the block closes them."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Link:
    """One connected hop: its transport and the socket or channel it runs over."""

    hop: Hop
    transport: paramiko.Transport
    sock: socket.socket | paramiko.Channel

    def close(self) -> None:
        with contextlib.suppress(*_WIRE_ERRORS):
            self.transport.close()
        with contextlib.suppress(*_WIRE_ERRORS):
            self.sock.close()


class Chain(_Closes):
    """A connected SSH chain; the last hop is the host commands run on."""

    def __init__(self, hops: Sequence[Hop], timeout: float) -> None:
        """Use `Chain.connect`; this only sets up an empty, unconnected chain."""
        self.hops: tuple[Hop, ...] = tuple(hops)
        self.timings: list[tuple[Hop, float]] = []
        self._timeout = timeout
        self._links: list[_Link] = []
        self._agent: paramiko.Agent | None = None
        self._forwarders: list[Forwarder] = []
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def connect(
        cls,
        hops: Sequence[Hop],
        *,
        known_hosts: Sequence[Path] = (),
        key_filename: str | None = None,
        timeout: float = 10.0,
    ) -> Chain:
        """Connect hop by hop (blocking); each hop's key is verified before authenticating.

        `timeout` bounds each step of each hop (TCP connect or tunnel open, SSH handshake,
        authentication).
        """
        hops = tuple(hops)
        if not hops:
            raise SshError("no SSH hops to connect to")
        paths = [Path(p) for p in known_hosts] or _default_known_hosts()
        known = _read_known_hosts(paths) if not all(h.fingerprints for h in hops) else []
        keys, agent = _identities(key_filename)
        chain = cls(hops, timeout)
        chain._agent = agent
        try:
            for index, hop in enumerate(hops):
                chain._connect_hop(index, hop, known, paths, keys)
        except BaseException:
            chain.close()
            raise
        return chain

    # ------------------------------------------------------------- connecting
    def _where(self, index: int) -> str:
        hop = self.hops[index]
        return f"{hop} (hop {index + 1} of {len(self.hops)})"

    def _fail(self, index: int, reason: str) -> SshConnectError:
        return SshConnectError(f"cannot connect to {self._where(index)}: {reason}",
                               self.hops[index], reason)

    def _dial(self, index: int, hop: Hop) -> socket.socket | paramiko.Channel:
        """A byte stream to the hop: TCP for the first, a tunnel via the previous otherwise."""
        if index == 0:
            try:
                sock = socket.create_connection((hop.host, hop.port), timeout=self._timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames
                return sock
            except _WIRE_ERRORS as e:
                raise self._fail(index, f"TCP connect failed: {_describe(e)}") from None
        prev = self._links[-1]
        try:
            return prev.transport.open_channel(
                "direct-tcpip", (hop.host, hop.port), ("127.0.0.1", 0), timeout=self._timeout
            )
        except paramiko.ChannelException as e:
            reason = f"{prev.hop} could not reach it: {e.text or _describe(e)}"
        except _WIRE_ERRORS as e:
            reason = f"tunnel through {prev.hop} failed: {_describe(e)}"
        raise self._fail(index, reason)

    def _handshake(self, index: int, transport: paramiko.Transport) -> paramiko.PKey:
        """Run key exchange (bounded by the timeout); return the server's host key."""
        done = threading.Event()
        try:
            transport.start_client(event=done)
        except _WIRE_ERRORS as e:
            raise self._fail(index, f"SSH handshake failed: {_describe(e)}") from None
        if not done.wait(self._timeout):
            raise self._fail(index, f"SSH handshake timed out after {self._timeout:g}s")
        if not transport.is_active():
            error = transport.get_exception()
            reason = _describe(error) if error is not None else "connection closed"
            raise self._fail(index, f"SSH handshake failed: {reason}")
        try:
            return transport.get_remote_server_key()
        except _WIRE_ERRORS as e:
            raise self._fail(index, f"no host key from server: {_describe(e)}") from None

    def _authenticate(
        self, index: int, transport: paramiko.Transport, keys: Sequence[paramiko.PKey]
    ) -> None:
        user = self.hops[index].user
        for key in keys:
            try:
                transport.auth_publickey(user, key)
            except paramiko.BadAuthenticationType as e:
                allowed = ", ".join(e.allowed_types) or "none"
                raise self._fail(index, f"server does not accept public keys "
                                        f"(allows: {allowed})") from None
            except paramiko.AuthenticationException:
                continue
            except _WIRE_ERRORS as e:
                raise self._fail(index, f"authentication failed: {_describe(e)}") from None
            if transport.is_authenticated():
                return
        raise self._fail(index, f"public key authentication failed for user {user!r} "
                                f"({len(keys)} key(s) tried)")

    def _connect_hop(
        self,
        index: int,
        hop: Hop,
        known: Sequence[_KnownKey],
        known_paths: Sequence[Path],
        keys: Sequence[paramiko.PKey],
    ) -> None:
        started = time.monotonic()
        sock = self._dial(index, hop)
        try:
            transport = paramiko.Transport(sock)
        except _WIRE_ERRORS as e:
            sock.close()
            raise self._fail(index, _describe(e)) from None
        self._links.append(_Link(hop, transport, sock))  # from now on close() cleans it up
        transport.banner_timeout = self._timeout
        transport.handshake_timeout = self._timeout
        transport.auth_timeout = self._timeout
        mine = [k for k in known if _hosts_match(k.hosts, hop.known_hosts_name)]
        if not hop.fingerprints:
            _prefer_key_types(transport, [k for k in mine if not k.marker])
        key = self._handshake(index, transport)
        _check_host_key(hop, self._where(index), key, mine, known_paths)
        self._authenticate(index, transport, keys)
        transport.set_keepalive(_KEEPALIVE_S)
        self.timings.append((hop, time.monotonic() - started))
        log.debug("ssh: %s up in %.3fs", self._where(index), self.timings[-1][1])

    # ------------------------------------------------------------- using
    @property
    def active(self) -> bool:
        """Every hop still connected (a route over this chain is still good)."""
        return (not self._closed and len(self._links) == len(self.hops)
                and all(link.transport.is_active() for link in self._links))

    def _last(self) -> _Link:
        if self._closed or len(self._links) != len(self.hops):
            raise SshError(f"SSH chain to {self.hops[-1]} is closed", self.hops[-1])
        link = self._links[-1]
        if not link.transport.is_active():
            raise SshError(f"SSH connection to {link.hop} was lost", link.hop)
        return link

    def run(
        self,
        command: str,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        timeout: float | None = None,
        stdin: BinaryIO | bytes | None = None,
    ) -> int:
        """Run `command` on the last hop, streaming its output; return its exit status.

        `stdin` (bytes, or a binary stream read in chunks until EOF) is fed to the command,
        then its stdin is closed; without it the command gets an empty stdin. The status is
        -1 when the command died from a signal. A command still running after `timeout`
        seconds raises SshError (its channel is closed).
        """
        link = self._last()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            chan = link.transport.open_session(timeout=self._timeout)
        except _WIRE_ERRORS as e:
            raise SshError(f"{link.hop}: cannot open a session: {_describe(e)}", link.hop) from None
        feeder: _Feeder | None = None
        try:
            chan.exec_command(command)
            if stdin is None:
                chan.shutdown_write()  # the command gets no stdin
            else:
                source = io.BytesIO(stdin) if isinstance(stdin, bytes | bytearray) else stdin
                feeder = _Feeder(chan, source)
            finished = self._pump_output(chan, deadline, on_stdout, on_stderr)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not finished or not chan.status_event.wait(remaining):
                raise SshError(f"{link.hop}: command timed out after {timeout:g}s", link.hop)
            if chan.exit_status < 0 and not link.transport.is_active():
                raise SshError(f"{link.hop}: connection lost while running a command", link.hop)
            status = chan.recv_exit_status()
        except _WIRE_ERRORS as e:
            raise SshError(f"{link.hop}: command failed: {_describe(e)}", link.hop) from None
        finally:
            with contextlib.suppress(*_WIRE_ERRORS):
                chan.close()
            if feeder is not None:
                feeder.join()
        if feeder is not None and feeder.error is not None:
            raise SshError(f"{link.hop}: cannot read the command's input: {feeder.error}",
                           link.hop)
        return status

    @staticmethod
    def _pump_output(
        chan: paramiko.Channel,
        deadline: float | None,
        on_stdout: Callable[[bytes], None] | None,
        on_stderr: Callable[[bytes], None] | None,
    ) -> bool:
        """Hand output to the callbacks as it arrives, until the command's EOF (or close).

        Returns False when the deadline passed first.
        """
        while True:
            while chan.recv_ready():
                data = chan.recv(_BUF)
                if data and on_stdout is not None:
                    on_stdout(data)
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(_BUF)
                if data and on_stderr is not None:
                    on_stderr(data)
            if (chan.eof_received or chan.closed) and not (
                chan.recv_ready() or chan.recv_stderr_ready()
            ):
                return True
            wait = 1.0
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return False
            select.select([chan], [], [], min(wait, 1.0))

    def open_channel(self, host: str, port: int) -> paramiko.Channel:
        """A `direct-tcpip` channel from the last hop to host:port (a socket-like stream)."""
        link = self._last()
        try:
            return link.transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=self._timeout
            )
        except paramiko.ChannelException as e:
            reason = e.text or _describe(e)
        except _WIRE_ERRORS as e:
            reason = _describe(e)
        raise SshConnectError(f"{link.hop} could not open a tunnel to {host}:{port}: {reason}",
                              link.hop, reason)

    def forward(self, host: str, port: int) -> Forwarder:
        """Listen on 127.0.0.1:<free port>; pipe each connection to host:port via the last hop."""
        last = self._last()
        try:
            forwarder = Forwarder(lambda: self.open_channel(host, port), f"{host}:{port}")
        except OSError as e:
            raise SshError(f"cannot listen on 127.0.0.1 to forward {host}:{port} via "
                           f"{last.hop}: {_describe(e)}", last.hop) from None
        with self._lock:
            closed = self._closed
            if not closed:
                self._forwarders.append(forwarder)
        if closed:
            forwarder.close()
            raise SshError(f"SSH chain to {self.hops[-1]} is closed", self.hops[-1])
        return forwarder

    def close(self) -> None:
        """Close forwarders, then every hop, last first. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            forwarders, self._forwarders = self._forwarders, []
        for forwarder in forwarders:
            forwarder.close()
        for link in reversed(self._links):
            link.close()
        if self._agent is not None:
            with contextlib.suppress(*_WIRE_ERRORS):
                self._agent.close()



class _Feeder:
    """Copies a local stream to a command's stdin in its own thread, then sends EOF.

    Why a thread: the caller must keep draining the command's output meanwhile, or a command
    that writes before it has read all its input would block both sides.
    """

    def __init__(self, chan: paramiko.Channel, source: BinaryIO) -> None:
        self.error: str | None = None  # why the source could not be read, if it could not
        self._chan = chan
        self._source = source
        self._thread = threading.Thread(target=self._run, name="ssh-stdin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._source.read(_BUF)
            except (OSError, ValueError) as e:  # ValueError: the source was closed
                self.error = _describe(e)
                # Abort rather than send EOF; the command still sees its input end, so
                # callers whose input matters send a self-checking format (gzip).
                self._chan.close()
                return
            try:
                if not data:
                    self._chan.shutdown_write()
                    return
                self._chan.sendall(data)
            except _WIRE_ERRORS:  # the command ended or the channel closed: stop feeding
                return

    def join(self) -> None:
        """Wait (bounded: a source may block forever) for the copy to stop."""
        self._thread.join(_JOIN_S)


# --------------------------------------------------------------------------- forwarding
class _Pipe:
    """One forwarded connection: a local socket and its channel, pumped by two threads.

    Why blocking threads and no select on the channel: closing wakes both at once
    (`shutdown` ends a blocked socket recv/send, `Channel.close` a blocked channel recv/send).
    """

    def __init__(self, sock: socket.socket, chan: paramiko.Channel) -> None:
        # ZeroMQ frames are small and latency-bound: Nagle plus delayed ACKs would hold
        # each reply ~40 ms on the local leg of the tunnel.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.chan = chan
        self._lock = threading.Lock()
        self._running = 2
        self._closed = False

    def run(self) -> None:
        """Pump both directions; returns when both are done (runs one in the caller)."""
        other = threading.Thread(target=self._to_local, name="ssh-fwd-in", daemon=True)
        other.start()
        self._to_remote()
        other.join()

    def _to_remote(self) -> None:
        try:
            while data := self.sock.recv(_BUF):
                self.chan.sendall(data)
            with contextlib.suppress(*_WIRE_ERRORS):
                self.chan.shutdown_write()  # pass the local half-close on
        except _WIRE_ERRORS as e:
            log.debug("ssh forward: local side ended: %s", _describe(e))
            self.close()
        self._done()

    def _to_local(self) -> None:
        try:
            while data := self.chan.recv(_BUF):
                self.sock.sendall(data)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
        except _WIRE_ERRORS as e:
            log.debug("ssh forward: remote side ended: %s", _describe(e))
            self.close()
        self._done()

    def _done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.close()

    def close(self) -> None:
        """Wake both pumps and release the socket and channel. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(*_WIRE_ERRORS):
            self.chan.close()
        with contextlib.suppress(OSError):
            self.sock.close()


class Forwarder(_Closes):
    """A local TCP listener whose connections are tunnelled through a Chain's last hop."""

    def __init__(self, open_channel: Callable[[], paramiko.Channel], target: str) -> None:
        """Use `Chain.forward`; `open_channel` opens one tunnel per accepted connection."""
        self._open = open_channel
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="ssh-fwd-accept",
                                          daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._listener, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                conn, _ = self._listener.accept()
            except OSError as e:
                if not self._closed:
                    log.warning("ssh forward to %s: accept failed: %s", self._target, e)
                return
            worker = threading.Thread(target=self._serve, args=(conn,), name="ssh-fwd-out",
                                      daemon=True)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._threads.add(worker)
            worker.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                chan = self._open()
            except SshError as e:
                log.warning("ssh forward: %s", e)
                conn.close()
                return
            pipe = _Pipe(conn, chan)
            with self._lock:
                closed = self._closed
                if not closed:
                    self._pipes.add(pipe)
            if closed:
                pipe.close()
                return
            pipe.run()
            with self._lock:
                self._pipes.discard(pipe)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def close(self) -> None:
        """Stop listening and close every open pipe; idempotent and bounded in time."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pipes, threads = list(self._pipes), list(self._threads)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._acceptor.join(_JOIN_S)
        for pipe in pipes:
            pipe.close()
        deadline = time.monotonic() + _JOIN_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

