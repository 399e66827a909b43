"""`swarmnode bootstrap`: install and start swarmnode on a machine that does not run it yet.

Why copy this node's installation instead of installing from an index: the new member runs
exactly the code (and compiled extensions) the swarm already runs, and needs no network access
beyond the SSH chain. Hence the target must have the same machine architecture and Python
version (and ABI) as this node.

Trust: every hop's host key is verified before anything is sent to it (net.ssh). A hop that
is an admitted member is pinned to the fingerprints it signed into its record; other hops must
be in known_hosts; the target is pinned to `--host-key` when given, else must be in known_hosts,
else nothing is installed (OpenSSH's StrictHostKeyChecking=yes, with the key to check shown).

How the join token reaches the first start: `REMOTE_HOME/join.env` (mode 0600, in the 0700
home) holds `SWARMNODE_JOIN_ARGS="TOKEN --name NAME --listen HOST:PORT"`. The systemd unit
(`EnvironmentFile=-`), the OpenRC script (`start_pre`) and the detached start all pass it to
`swarmnode join`. Once the node is admitted its home remembers cluster, name and listen
address, so bootstrap deletes the file and every later start is a plain `join`.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import platform
import re
import shlex
import sys
import sysconfig
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from net import ssh
from net.addresses import split_hostport
from swarmnode import control
from swarmnode.cluster import DEFAULT_LISTEN
from swarmnode.home import INSTALL_PREFIX, SYSTEM_HOME
from swarmnode.identity import is_node_id
from swarmnode.views import vouched_host_keys

__all__ = [
    "DEFAULT_LISTEN",
    "DEFAULT_PREFIX",
    "DEFAULT_REMOTE_HOME",
    "SERVICES",
    "BootstrapError",
    "Outcome",
    "Request",
    "bootstrap",
    "build_hops",
    "distribution_closure",
    "installation_files",
    "render_join_env",
    "render_openrc",
    "render_systemd_unit",
    "render_wrapper",
    "requirement_name",
    "write_tar",
]

DEFAULT_PREFIX = str(INSTALL_PREFIX)
DEFAULT_REMOTE_HOME = str(SYSTEM_HOME)
SERVICES = ("auto", "systemd", "openrc", "none")
#: The token only has to last until the new node first knocks; a leaked one soon expires.
TOKEN_TTL_S = 3600
WAIT_S = 60.0
POLL_S = 0.25
SSH_TIMEOUT_S = 10.0
COMMAND_S = 60.0
INSTALL_S = 900.0
#: The top-level packages of swarmnode itself (pyproject's `packages`).
PACKAGES = ("swarmnode", "net", "cli")
SHARE = "share/swarmnode"
UNIT_FILE = "swarmnode.service"
INITD_FILE = "swarmnode.initd"
JOIN_ENV = "join.env"
LOG_FILE = "swarmnode.log"
_OUTPUT_CAP = 256 * 1024
_TAIL_LINES = 15

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PATH_RE = re.compile(r"/[A-Za-z0-9._/+@:,=-]*")  # nothing a unit file or sh would expand
_LISTEN_RE = re.compile(r"[A-Za-z0-9.:\[\]-]+")
_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")
_REQUIREMENT_RE = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_EXTRA_RE = re.compile(r"\bextra\b")


class BootstrapError(Exception):
    """Bootstrap failed; the message says where and why (and what to do, where there is a fix)."""


@dataclass(frozen=True)
class Request:
    """What `swarmnode bootstrap` was asked to do."""

    target: str
    jumps: tuple[str, ...] = ()
    user: str | None = None
    host_keys: tuple[str, ...] = ()
    known_hosts: tuple[Path, ...] = ()
    identity_file: str | None = None
    name: str | None = None
    listen: str = DEFAULT_LISTEN
    prefix: str = DEFAULT_PREFIX
    remote_home: str = DEFAULT_REMOTE_HOME
    service: str = "auto"
    wait: bool = True
    wait_s: float = WAIT_S


@dataclass(frozen=True)
class Outcome:
    """The new node: its id, its name (when known), the service chosen, whether admitted."""

    node_id: str
    name: str | None
    service: str
    admitted: bool


# --------------------------------------------------------------------------- checks
def check_request(req: Request) -> None:
    """Refuse options that would end up unquoted in a unit file or shell line, before any I/O."""
    if req.service not in SERVICES:
        raise BootstrapError(f"--service must be one of {', '.join(SERVICES)}, not {req.service!r}")
    if req.name is not None and not _NAME_RE.fullmatch(req.name):
        raise BootstrapError(f"bad --name {req.name!r}: letters, digits, '_', '.', '-' "
                             "(at most 64, starting with a letter or digit)")
    try:
        split_hostport(req.listen)
    except ValueError as e:
        raise BootstrapError(f"bad --listen {req.listen!r}: {e}") from None
    if not _LISTEN_RE.fullmatch(req.listen):
        raise BootstrapError(f"bad --listen {req.listen!r}: give HOST:PORT")
    for option, path in (("--prefix", req.prefix), ("--remote-home", req.remote_home)):
        if not _PATH_RE.fullmatch(path) or path.rstrip("/") == "":
            raise BootstrapError(f"bad {option} {path!r}: an absolute path of letters, digits "
                                 "and ._/+@:,=- (no spaces or quotes)")
    for key in req.host_keys:
        if not _FINGERPRINT_RE.fullmatch(key):
            raise BootstrapError(f"bad --host-key {key!r}: give SHA256:... as `ssh-keygen -lf` "
                                 "prints it")


# --------------------------------------------------------------------------- hops
def build_hops(req: Request, members: Sequence[Mapping[str, Any]]) -> list[ssh.Hop]:
    """The jump hops then the target, each pinned where the swarm or the user vouches for it."""
    try:
        hops = [ssh.parse_hop(text, req.user) for text in (*req.jumps, req.target)]
    except ssh.SshError as e:
        raise BootstrapError(str(e)) from None
    pinned = [replace(h, fingerprints=vouched_host_keys(h.host, members)) for h in hops]
    if req.host_keys:
        pinned[-1] = replace(hops[-1], fingerprints=frozenset(req.host_keys))
    return pinned


def _explain(e: ssh.SshError, target: ssh.Hop) -> str:
    """The SSH error, plus how to get past an unknown target key safely."""
    if isinstance(e, ssh.HostKeyError) and e.hop == target and not e.expected:
        return f"{e}; or pass --host-key {e.got} after checking it out of band"
    return str(e)


# --------------------------------------------------------------------------- what to copy
def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (`PyNaCl` and `pynacl` are one distribution)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str | None:
    """The distribution a requirement names, or None when only an extra (e.g. `test`) wants it.

    Other markers are not evaluated: a distribution whose marker is false here is copied only
    if it happens to be installed, which costs space but never breaks the copy.
    """
    spec, _, marker = requirement.partition(";")
    if _EXTRA_RE.search(marker):
        return None
    match = _REQUIREMENT_RE.match(spec)
    return match.group(1) if match else None


def distribution_closure(root: str = "swarmnode") -> list[metadata.Distribution]:
    """`root` and every installed distribution it requires, transitively (extras skipped)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = canonical_name(todo.pop())
        if name in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == canonical_name(root):
                raise BootstrapError(f"{root} is not installed here (no distribution "
                                     "metadata): install it with pip first") from None
            continue  # not installed: this installation runs without it
        found[name] = dist
        todo.extend(n for r in dist.requires or () if (n := requirement_name(r)))
    return [found[k] for k in sorted(found)]


Source = Path | bytes
FileList = list[tuple[str, Source]]


def _skipped(parts: Sequence[str]) -> bool:
    """Byte-code and caches are rebuilt on the target; hidden files are editor litter."""
    return (not parts or "__pycache__" in parts or parts[-1].endswith((".pyc", ".pyo"))
            or parts[-1].startswith("."))


def _distribution_files(dist: metadata.Distribution) -> Iterator[tuple[str, Path]]:
    """A distribution's installed files inside site-packages (scripts in bin/ are left out)."""
    name = dist.metadata["Name"]
    recorded = dist.files
    if recorded is None:
        raise BootstrapError(f"cannot copy {name}: its installed files are not recorded "
                             "(no RECORD); reinstall it with pip")
    for entry in recorded:
        path = PurePosixPath(str(entry))
        if path.is_absolute() or ".." in path.parts or _skipped(path.parts):
            continue
        source = Path(str(dist.locate_file(entry)))
        if not source.is_file():
            raise BootstrapError(f"cannot copy {name}: {source} is in its RECORD but missing; "
                                 "reinstall it with pip")
        yield path.as_posix(), source


def _package_files(package: str) -> Iterator[tuple[str, Path]]:
    """A top-level package's files, found where it is imported from (a source tree in a
    development or editable install, site-packages otherwise)."""
    module = importlib.import_module(package)
    if module.__file__ is None:
        raise BootstrapError(f"cannot locate the {package} package (no __file__)")
    root = Path(module.__file__).resolve().parent
    for source in sorted(root.rglob("*")):
        rel = source.relative_to(root).parts
        if source.is_file() and not _skipped(rel):
            yield PurePosixPath(package, *rel).as_posix(), source


def _own_metadata(dist: metadata.Distribution) -> Iterator[tuple[str, bytes]]:
    """swarmnode's own dist-info, written afresh: an editable install's files (a .pth or a
    finder pointing at a source tree) must not be copied."""
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    info = f"{canonical_name(dist.metadata['Name']).replace('-', '_')}-{dist.version}.dist-info"
    yield f"{info}/METADATA", text.encode()
    yield f"{info}/INSTALLER", b"swarmnode-bootstrap\n"
    yield f"{info}/top_level.txt", "".join(p + "\n" for p in PACKAGES).encode()


def installation_files(root: str = "swarmnode") -> FileList:
    """Everything the copy needs in site-packages, as (path inside site-packages, source)."""
    files: dict[str, Source] = {}
    for dist in distribution_closure(root):
        if canonical_name(dist.metadata["Name"]) == canonical_name(root):
            files.update(_own_metadata(dist))
        else:
            files.update(_distribution_files(dist))
    for package in PACKAGES:
        files.update(_package_files(package))
    return sorted(files.items())


def payload_size(files: FileList) -> int:
    return sum(len(s) if isinstance(s, bytes) else s.stat().st_size for _, s in files)


def write_tar(out: BinaryIO, files: FileList) -> None:
    """A gzipped tar of `files` into a stream; owners and modes normalised (root, 644/755).

    Level 1: the link is usually the bottleneck, not the CPU, and gzip's check lets the target
    tell a cut stream from a whole one.
    """
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT,
                         dereference=True) as tar:
        now = int(time.time())
        for arcname, source in files:
            if isinstance(source, bytes):
                info = tarfile.TarInfo(arcname)
                info.size, info.mtime = len(source), now
            else:
                info = tar.gettarinfo(str(source), arcname)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            if isinstance(source, bytes):
                tar.addfile(info, io.BytesIO(source))
                continue
            with source.open("rb") as f:
                tar.addfile(info, f)


@contextlib.contextmanager
def tar_stream(files: FileList) -> Iterator[BinaryIO]:
    """A readable tar.gz of `files`, produced by a thread as it is read: no temporary file."""
    read_fd, write_fd = os.pipe()
    reader, writer = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    errors: list[str] = []

    def produce() -> None:
        try:
            with writer:
                write_tar(writer, files)
        except BrokenPipeError:
            pass  # the reader stopped early; it reports why
        except (OSError, tarfile.TarError) as e:
            errors.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=produce, name="bootstrap-tar", daemon=True)
    thread.start()
    try:
        yield reader
    finally:
        reader.close()  # wakes a producer whose reader gave up
        thread.join()
    if errors:
        raise BootstrapError(f"cannot pack this installation: {errors[0]}")


# --------------------------------------------------------------------------- rendered files
def render_wrapper(prefix: str) -> str:
    """`PREFIX/bin/swarmnode`. `-I`: never import a `cli` or `swarmnode` from the cwd."""
    return ("#!/bin/sh\n"
            "# swarmnode, copied here by `swarmnode bootstrap`\n"
            f'exec {prefix}/bin/python -I -m cli "$@"\n')


def render_systemd_unit(prefix: str, home: str) -> str:
    """The systemd unit; `$SWARMNODE_JOIN_ARGS` is empty (no arguments) without join.env."""
    return f"""[Unit]
Description=swarmnode build swarm member
After=network-online.target
Wants=network-online.target

[Service]
# The join token, until this node is first admitted (`swarmnode bootstrap` deletes it then).
EnvironmentFile=-{home}/{JOIN_ENV}
ExecStart={prefix}/bin/swarmnode --home {home} join $SWARMNODE_JOIN_ARGS
# SIGTERM makes the node leave gracefully (members see `left`, not `dead`).
KillSignal=SIGTERM
TimeoutStopSec=10
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def render_openrc(prefix: str, home: str) -> str:
    """The OpenRC init script (Gentoo), equivalent to the systemd unit."""
    return f"""#!/sbin/openrc-run
# swarmnode build swarm member (written by `swarmnode bootstrap`)

description="swarmnode build swarm member"
command="{prefix}/bin/swarmnode"
command_args="--home {home} join"
command_background=yes
pidfile="/run/swarmnode.pid"
output_log="{home}/{LOG_FILE}"
error_log="{home}/{LOG_FILE}"
# SIGTERM makes the node leave gracefully; give it 10 s.
retry="TERM/10/KILL/5"

depend() {{
	need net
}}

start_pre() {{
	# The join token, until this node is first admitted (`swarmnode bootstrap` deletes it).
	if [ -r "{home}/{JOIN_ENV}" ]; then
		. "{home}/{JOIN_ENV}"
		command_args="$command_args $SWARMNODE_JOIN_ARGS"
	fi
}}
"""


def render_join_env(token: str, name: str | None, listen: str) -> str:
    """join.env: read by systemd's EnvironmentFile and by sh alike (no quoting needed)."""
    args = [token, *(("--name", name) if name else ()), "--listen", listen]
    return ("# written by `swarmnode bootstrap`; deleted once this node is admitted\n"
            f'SWARMNODE_JOIN_ARGS="{" ".join(args)}"\n')


def detached_start(prefix: str, home: str) -> str:
    """The start without a service manager: its own session, so it outlives the SSH session."""
    q = shlex.quote
    return (f"cd / && . {q(home + '/' + JOIN_ENV)} && "
            f"setsid {q(prefix + '/bin/swarmnode')} --home {q(home)} join $SWARMNODE_JOIN_ARGS "
            f"</dev/null >>{q(home + '/' + LOG_FILE)} 2>&1 &")


def service_start(service: str, prefix: str, home: str) -> str:
    """Install and start the service (or start detached, for `none`)."""
    share = f"{prefix}/{SHARE}"
    q = shlex.quote
    if service == "systemd":
        return (f"install -m 0644 {q(share + '/' + UNIT_FILE)} /etc/systemd/system/{UNIT_FILE}"
                " && systemctl daemon-reload && systemctl enable swarmnode"
                " && systemctl restart swarmnode")
    if service == "openrc":
        return (f"install -m 0755 {q(share + '/' + INITD_FILE)} /etc/init.d/swarmnode"
                " && rc-update add swarmnode default && rc-service swarmnode restart")
    return detached_start(prefix, home)


# --------------------------------------------------------------------------- remote commands
# Prints key=value facts about the target; argv: remote home, prefix.
_PROBE = r"""
import os, socket, sys, sysconfig
print("python=%d.%d" % sys.version_info[:2])
print("abi=%s" % sysconfig.get_config_var("EXT_SUFFIX"))
home, prefix = sys.argv[1:3]
try:
    os.chdir(home)  # a relative name: a deep home would overflow a socket address
    socket.socket(socket.AF_UNIX).connect("control.sock")
    print("running=1")
except OSError:
    print("running=0")
if not os.path.lexists(prefix):
    state = "absent"
elif os.path.isfile(os.path.join(prefix, "pyvenv.cfg")) and \
        os.path.isfile(os.path.join(prefix, "bin", "swarmnode")):
    state = "swarmnode"
elif os.path.isdir(prefix) and not os.listdir(prefix):
    state = "empty"
else:
    state = "other"
print("prefix=" + state)
"""

# Extracts a tar.gz from stdin into argv[1]; a cut stream fails gzip's check.
_EXTRACT = r"""
import sys, tarfile
kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|gz") as tar:
    tar.extractall(sys.argv[1], **kw)
"""


def preflight_script(prefix: str, home: str) -> str:
    q = shlex.quote
    return (f'echo "arch=$(uname -m)"\n'
            f"if command -v python3 >/dev/null 2>&1; then "
            f"python3 -c {q(_PROBE)} {q(home)} {q(prefix)}; fi\n"
            "if [ -d /run/systemd/system ]; then echo init=systemd\n"
            "elif [ -x /sbin/openrc-run ]; then echo init=openrc\n"
            "else echo init=none; fi\n")


def install_script(prefix: str) -> str:
    """A fresh venv (an earlier swarmnode copy there is replaced), the tar from stdin in it."""
    q = shlex.quote
    python = q(prefix + "/bin/python")
    return ("set -e\numask 022\n"
            f"python3 -m venv --clear --without-pip {q(prefix)}\n"
            f"site=$({python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')\n"
            f'{python} -c {q(_EXTRACT)} "$site"\n')


def write_script(path: str, mode: int) -> str:
    """Store stdin as `path` (mode `mode`), replacing it in one step."""
    q = shlex.quote
    tmp = q(path + ".new")
    parent = q(str(PurePosixPath(path).parent))
    return (f"mkdir -p {parent} && (umask 077 && cat > {tmp}) && chmod {mode:o} {tmp} "
            f"&& mv -f {tmp} {q(path)}")


def verify_script(prefix: str, home: str) -> str:
    """Import what the node needs (compiled extensions load), then print the node's id."""
    q = shlex.quote
    return (f"{q(prefix + '/bin/python')} -I -c 'import swarmnode.node, cli.main' && "
            f"{q(prefix + '/bin/swarmnode')} --home {q(home)} id")


class _Capture:
    """Collects a command's output, keeping only the last `_OUTPUT_CAP` bytes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > _OUTPUT_CAP:
            del self.data[:-_OUTPUT_CAP]

    def text(self) -> str:
        return self.data.decode(errors="replace")


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n  ".join(lines[-_TAIL_LINES:]) or "(no output)"


def _remote(chain: ssh.Chain, script: str, what: str, *, timeout: float = COMMAND_S,
            stdin: BinaryIO | bytes | None = None) -> str:
    """Run a POSIX sh script on the target; its stdout, or BootstrapError with stderr's tail."""
    out, err = _Capture(), _Capture()
    status = chain.run("sh -c " + shlex.quote(script), out, err, timeout=timeout, stdin=stdin)
    if status != 0:
        reason = "killed by a signal" if status < 0 else f"exit {status}"
        raise BootstrapError(f"{what} failed on {chain.hops[-1]} ({reason}):\n  "
                             f"{_tail(err.text() or out.text())}")
    return out.text()


def parse_facts(text: str) -> dict[str, str]:
    """`key=value` lines into a dict (later lines win)."""
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


def local_facts() -> dict[str, str]:
    """This installation's facts, in the form the preflight prints them."""
    return {"arch": platform.machine(), "python": "{}.{}".format(*sys.version_info[:2]),
            "abi": str(sysconfig.get_config_var("EXT_SUFFIX"))}


def check_compatible(remote: Mapping[str, str], local: Mapping[str, str], where: str) -> None:
    """The copy runs there only on the same architecture, Python version and ABI."""
    if remote.get("arch") != local["arch"]:
        raise BootstrapError(f"{where} is {remote.get('arch') or 'of unknown architecture'}, "
                             f"this node is {local['arch']}: the copied installation contains "
                             f"compiled extensions for {local['arch']} only")
    if not remote.get("python"):
        raise BootstrapError(f"python3 is not installed on {where}: install Python "
                             f"{local['python']} there first")
    if remote["python"] != local["python"]:
        raise BootstrapError(f"{where} has Python {remote['python']}, this node runs Python "
                             f"{local['python']}: the copied installation needs Python "
                             f"{local['python']} (its compiled extensions are built for it)")
    if remote.get("abi") != local["abi"]:
        raise BootstrapError(f"{where}'s Python ABI ({remote.get('abi')}) differs from this "
                             f"node's ({local['abi']}), e.g. musl against glibc: the compiled "
                             "extensions would not load there")


def resolve_service(wanted: str, found: str) -> str:
    return found if wanted == "auto" else wanted


# --------------------------------------------------------------------------- the local node
def _ask(home: Path, cmd: str, **args: Any) -> Any:
    try:
        return control.call(home, cmd, **args)
    except control.ControlError as e:
        raise BootstrapError(f"{e}; bootstrap needs the local node for a join token and the "
                             "members' host keys") from None
    except OSError as e:  # TimeoutError included
        raise BootstrapError(f"the node in {home} did not answer: {e}") from None


def wait_admitted(home: Path, node_id: str, timeout: float) -> dict[str, Any]:
    """Poll the local node until it lists `node_id` alive and admitted; return that entry."""
    deadline = time.monotonic() + timeout
    last = "not listed"
    while True:
        try:
            members = control.call(home, "nodes", timeout=5.0)
        except (control.ControlError, OSError) as e:
            last = f"the local node did not answer: {e}"
        else:
            for m in members:
                if m.get("id") == node_id:
                    if m.get("state") == "alive" and m.get("admitted_by"):
                        return dict(m)
                    last = f"listed as {m.get('state')}"
        if time.monotonic() >= deadline:
            raise BootstrapError(f"the new node {node_id[:12]} was not alive and admitted "
                                 f"within {timeout:g}s ({last})")
        time.sleep(POLL_S)


def _remote_log(chain: ssh.Chain, service: str, home: str) -> str:
    """The tail of the new node's log, for a failure message (best effort)."""
    if service == "systemd":
        script = "journalctl -u swarmnode -n 20 --no-pager"
    else:
        script = f"tail -n 20 {shlex.quote(home + '/' + LOG_FILE)}"
    try:
        return _tail(_remote(chain, script, "reading the log"))
    except (BootstrapError, ssh.SshError) as e:
        return f"(unavailable: {e})"


# --------------------------------------------------------------------------- the whole thing
def bootstrap(home: Path, req: Request, say: Callable[[str], None] = lambda _: None) -> Outcome:
    """Install swarmnode on the target, start it with a fresh token and (by default) wait
    until this node lists it alive and admitted. Every failure is a BootstrapError."""
    check_request(req)
    token = _ask(home, "token", ttl=TOKEN_TTL_S)
    hops = build_hops(req, _ask(home, "nodes"))
    target = hops[-1]
    try:
        say(f"connecting to {' -> '.join(str(h) for h in hops)}")
        with ssh.Chain.connect(hops, known_hosts=req.known_hosts, key_filename=req.identity_file,
                               timeout=SSH_TIMEOUT_S) as chain:
            return _on_target(chain, home, req, token, say)
    except ssh.SshError as e:
        raise BootstrapError(_explain(e, target)) from None


def _on_target(chain: ssh.Chain, home: Path, req: Request, token: str,
               say: Callable[[str], None]) -> Outcome:
    target, prefix, rhome = chain.hops[-1], req.prefix.rstrip("/"), req.remote_home.rstrip("/")
    service = _preflight(chain, req, prefix, rhome)
    node_id = _install(chain, prefix, rhome, say)
    env = render_join_env(token, req.name, req.listen)
    _remote(chain, write_script(f"{rhome}/{JOIN_ENV}", 0o600), "storing the join token",
            stdin=env.encode())
    if service != "none":
        say(f"installing and starting the {service} service on {target}")
    else:
        why = "no service manager found" if req.service == "auto" else "--service none"
        say(f"{why} on {target}: starting the node detached (log: {rhome}/{LOG_FILE}); "
            f"service files are in {prefix}/{SHARE}")
    _remote(chain, service_start(service, prefix, rhome), f"starting the {service} service")
    if not req.wait:
        say(f"not waiting: {rhome}/{JOIN_ENV} keeps the token until you delete it "
            f"(it expires in {TOKEN_TTL_S // 60} min)")
        return Outcome(node_id, req.name, service, admitted=False)

    say(f"waiting for {node_id[:12]} to be alive and admitted")
    try:
        member = wait_admitted(home, node_id, req.wait_s)
    except BootstrapError as e:
        raise BootstrapError(f"{e}; its log on {target}:\n  "
                             f"{_remote_log(chain, service, rhome)}") from None
    _remote(chain, f"rm -f {shlex.quote(rhome + '/' + JOIN_ENV)}", "deleting the join token")
    return Outcome(node_id, member.get("name"), service, admitted=True)


def _preflight(chain: ssh.Chain, req: Request, prefix: str, rhome: str) -> str:
    """Check the target can take the copy (and does not run a node yet); the service to use."""
    target = chain.hops[-1]
    facts = parse_facts(_remote(chain, preflight_script(prefix, rhome), "checking the target"))
    check_compatible(facts, local_facts(), str(target))
    if facts.get("running") == "1":
        raise BootstrapError(f"a swarmnode already runs in {rhome} on {target}; it needs no "
                             "bootstrap (admit it, or give it a token with `swarmnode token`)")
    if facts.get("prefix") == "other":
        raise BootstrapError(f"{prefix} on {target} exists and is not a swarmnode copy; "
                             "choose another --prefix")
    return resolve_service(req.service, facts.get("init", "none"))


def _install(chain: ssh.Chain, prefix: str, rhome: str, say: Callable[[str], None]) -> str:
    """Copy this installation, write the wrapper and service files, check the copy runs;
    returns the new node's id (its identity is made in the remote home)."""
    target = chain.hops[-1]
    files = installation_files()
    say(f"copying this installation ({len(files)} files, "
        f"{payload_size(files) / 2**20:.1f} MiB) to {prefix} on {target}")
    with tar_stream(files) as stream:
        _remote(chain, install_script(prefix), "installing", timeout=INSTALL_S, stdin=stream)
    share = f"{prefix}/{SHARE}"
    for path, text, mode in ((f"{prefix}/bin/swarmnode", render_wrapper(prefix), 0o755),
                             (f"{share}/{UNIT_FILE}", render_systemd_unit(prefix, rhome), 0o644),
                             (f"{share}/{INITD_FILE}", render_openrc(prefix, rhome), 0o755)):
        _remote(chain, write_script(path, mode), f"writing {path}", stdin=text.encode())
    words = _remote(chain, verify_script(prefix, rhome), "checking the copy").split()
    if not words or not is_node_id(words[-1]):
        raise BootstrapError(f"the copy on {target} printed no node id: {words!r}")
    return words[-1]
