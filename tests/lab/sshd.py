"""A real OpenSSH sshd inside a lab host, for testing SSH chains against the real thing.

Why the real sshd and not a paramiko server: jump-host behaviour (direct-tcpip, refusals,
auth logging) is exactly what the product must cope with in the field.

Each sshd gets its own host key, config-free command line (`-f /dev/null`) and log, runs in
the foreground under `Lab.spawn` (so lab teardown kills it) and listens only on the address
given, inside the lab's namespace.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import HostRef, Lab, LabError

__all__ = [
    "SSHD",
    "ClientKey",
    "Sshd",
    "key_fingerprint",
    "keygen",
    "sshd_unavailable_reason",
    "start_sshd",
]

SSHD = "/usr/sbin/sshd"
_FINGERPRINT_RE = re.compile(r"\b(SHA256:[A-Za-z0-9+/]+)")


def sshd_unavailable_reason() -> str | None:
    """Why a real sshd cannot run here, or None (tests skip with this reason)."""
    if not Path(SSHD).is_file():
        return "needs OpenSSH's sshd: apt-get install -y openssh-server openssh-client"
    if shutil.which("ssh-keygen") is None:
        return "needs ssh-keygen: apt-get install -y openssh-client"
    return None


@dataclass(frozen=True)
class ClientKey:
    """A private key file and its public line (`type base64 comment`)."""

    path: Path
    public: str

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.path)


def keygen(path: Path, key_type: str = "ed25519", comment: str = "lab") -> ClientKey:
    """Generate an unencrypted key pair at `path` / `path`.pub (replacing any old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in (path, path.with_name(path.name + ".pub")):
        old.unlink(missing_ok=True)
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)]
    if key_type == "rsa":
        args[4:4] = ["-b", "2048"]  # fast enough for tests, still accepted by sshd
    subprocess.run(args, check=True, capture_output=True, timeout=30)
    public = path.with_name(path.name + ".pub").read_text().strip()
    return ClientKey(path=path, public=public)


def key_fingerprint(path: Path) -> str:
    """`SHA256:...` of a key file, as `ssh-keygen -lf` reports it (independent of net.ssh)."""
    out = subprocess.run(["ssh-keygen", "-lf", str(path)], check=True, capture_output=True,
                         text=True, timeout=10).stdout
    match = _FINGERPRINT_RE.search(out)
    if match is None:
        raise LabError(f"no fingerprint in `ssh-keygen -lf {path}` output: {out!r}")
    return match.group(1)


@dataclass
class Sshd:
    """A running sshd: where it listens, its host key and its log."""

    host: str
    address: str
    port: int
    host_key: ClientKey  # the server's key pair; `.public` is what known_hosts records
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def fingerprint(self) -> str:
        return self.host_key.fingerprint

    @property
    def known_hosts_line(self) -> str:
        """This server's line for an OpenSSH known_hosts file (`[addr]:port` off port 22)."""
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        key_type, blob = self.host_key.public.split()[:2]
        return f"{name} {key_type} {blob}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_sshd(
    lab: Lab,
    host: HostRef,
    address: str,
    authorized_keys: Sequence[ClientKey | str],
    tmp_dir: Path,
    *,
    port: int = 22,
    key_type: str = "ed25519",
    timeout: float = 10.0,
) -> Sshd:
    """Start sshd on `host`, listening on address:port, accepting only `authorized_keys`.

    Ready when sshd logs "Server listening" (it has bound by then); fails fast, with its log,
    if it exits first.
    """
    reason = sshd_unavailable_reason()
    if reason is not None:
        raise LabError(reason)
    name = str(host)
    workdir = tmp_dir / f"sshd-{name}-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_key", key_type, comment=f"host-{name}")
    auth_file = workdir / "authorized_keys"
    lines = [k.public if isinstance(k, ClientKey) else k for k in authorized_keys]
    auth_file.write_text("".join(line.strip() + "\n" for line in lines))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    listen = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    options = {
        "HostKey": workdir / "host_key",
        "AuthorizedKeysFile": auth_file,
        "PidFile": workdir / "sshd.pid",
        "ListenAddress": listen,
        "StrictModes": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "UsePAM": "no",
        "PermitRootLogin": "prohibit-password",
        "AllowTcpForwarding": "yes",
        "LogLevel": "VERBOSE",  # logs each publickey attempt: tests check who got a login
        # a fresh host's session: not the test machine's dotfiles (bash sources ~/.bashrc for
        # sshd's commands; one that runs `pyenv init`, whose rehash lock a session killed at
        # teardown leaves behind, held every later command for 60 s)
        "SetEnv": f"HOME={workdir}",
    }
    argv = [SSHD, "-D", "-e", "-f", "/dev/null"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    log_path = workdir / "sshd.log"
    proc = lab.spawn(name, argv, log_path=log_path)
    lab.wait_for_log(proc, "Server listening on", timeout=timeout)
    return Sshd(host=name, address=address, port=port, host_key=host_key, proc=proc,
                log_path=log_path)
