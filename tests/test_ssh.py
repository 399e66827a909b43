"""SSH chains (net.ssh): hop parsing, fingerprints, ssh config, and real multi-hop sshd chains.

Why real sshd in the lab: ProxyJump, host key checks before authentication and tunnelling only
mean something against the server the product meets in the field, across hosts the client
cannot route to directly.

Lab network (no forwarding anywhere, so orch can only reach jump1):

    orch 10.42.0.2 -- 10.42.0.3 jump1 172.30.0.1 -- 172.30.0.2 jump2 172.31.0.1 -- 172.31.0.9 target
                                sshd :22                   sshd :22                    sshd :2222
"""

from __future__ import annotations

import getpass
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest

from net.ssh import (
    Chain,
    Hop,
    HopSyntaxError,
    HostKeyError,
    SshError,
    _check_host_key,
    _hosts_match,
    _read_known_hosts,
    fingerprint,
    host_key_fingerprints,
    parse_hop,
    proxy_jump,
)
from tests.lab import Lab, unavailable_reason
from tests.lab.sshd import (
    ClientKey,
    Sshd,
    key_fingerprint,
    keygen,
    sshd_unavailable_reason,
    start_sshd,
)

REPO = Path(__file__).resolve().parent.parent
_NO_KEYGEN = shutil.which("ssh-keygen") is None
needs_keygen = pytest.mark.skipif(_NO_KEYGEN, reason="needs ssh-keygen (openssh-client)")


# =========================================================================== unit: hops
@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("alice@example.com", "alice", "example.com", 22),
        ("bob@10.0.0.1:2222", "bob", "10.0.0.1", 2222),
        ("  bob@10.0.0.1:2222 ", "bob", "10.0.0.1", 2222),
        ("carol@[fe80::1]:22", "carol", "fe80::1", 22),
        ("carol@[fd00::1]:2200", "carol", "fd00::1", 2200),
        ("dave@fd00::1", "dave", "fd00::1", 22),
        ("e@x@jump", "e@x", "jump", 22),
    ],
)
def test_parse_hop(text: str, user: str, host: str, port: int) -> None:
    assert parse_hop(text) == Hop(user, host, port)


def test_parse_hop_default_user() -> None:
    assert parse_hop("jump", default_user="ops") == Hop("ops", "jump", 22)
    assert parse_hop("jump:2022").user == getpass.getuser()
    assert parse_hop("root@jump", default_user="ops").user == "root"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "user@", "@host", "host:", "host:0", "host:70000", "host:ab", "us er@host",
     "user@ho st", "[host]:22", "[fe80::1", "[fe80::1]x", "a@b/c", "fe80::1:zz:"],
)
def test_parse_hop_rejects_junk(text: str) -> None:
    with pytest.raises(HopSyntaxError) as info:
        parse_hop(text, default_user="u")
    assert isinstance(info.value, SshError)
    assert isinstance(info.value, ValueError)


def test_hop_str_and_validation() -> None:
    assert str(Hop("root", "10.0.0.1")) == "root@10.0.0.1:22"
    assert str(Hop("root", "fe80::1", 2222)) == "root@[fe80::1]:2222"
    hop = Hop("root", "h", fingerprints={"SHA256:a"})  # type: ignore[arg-type]
    assert hop.fingerprints == frozenset({"SHA256:a"})
    assert hash(hop) == hash(Hop("root", "h", fingerprints=frozenset({"SHA256:a"})))
    for bad in (0, 65536, True):
        with pytest.raises(SshError):
            Hop("root", "h", bad)
    with pytest.raises(SshError):
        Hop("", "h")


# =========================================================================== unit: keys
@needs_keygen
@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_fingerprint_matches_ssh_keygen(tmp_path: Path, key_type: str) -> None:
    key = keygen(tmp_path / f"id_{key_type}", key_type)
    loaded = paramiko.PKey.from_path(key.path)
    assert fingerprint(loaded) == key_fingerprint(key.path)
    assert fingerprint(loaded).startswith("SHA256:")
    assert not fingerprint(loaded).endswith("=")


@needs_keygen
def test_host_key_fingerprints(tmp_path: Path) -> None:
    keys = [keygen(tmp_path / f"ssh_host_{t}_key", t) for t in ("ed25519", "ecdsa")]
    (tmp_path / "ssh_host_junk_key.pub").write_text("this is not a key\n")
    (tmp_path / "ssh_host_lie_key.pub").write_text(
        "ssh-rsa " + keys[0].public.split()[1] + "\n"  # an ed25519 blob claiming to be RSA
    )
    (tmp_path / "ssh_host_empty_key.pub").write_text("")
    (tmp_path / "ssh_host_bin_key.pub").write_bytes(b"\xff\xfe\x00garbage")
    paths = [*sorted(tmp_path.glob("*.pub")), tmp_path / "missing.pub", tmp_path]
    assert host_key_fingerprints(paths) == sorted(key_fingerprint(k.path) for k in keys)
    assert isinstance(host_key_fingerprints(), list)  # this machine's; may be empty


SSH_CONFIG = """
Host target
    HostName 172.31.0.9
    ProxyJump j1,carol@j2:2200

Host j1
    HostName 10.42.0.3
    User alice
    Port 2022

Host j2
    HostName 172.30.0.2
    User bob

Host deep
    HostName 10.8.8.8
    ProxyJump ssh://j3

Host j3
    HostName 10.9.9.9
    ProxyJump j1

Host direct
    ProxyJump none

Host v6
    ProxyJump dave@[fd00::5]:2200,[fd00::6]

Host loop1
    ProxyJump loop2

Host loop2
    ProxyJump loop1

Host *
    User zed
"""


def test_proxy_jump(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(SSH_CONFIG)
    j1 = Hop("alice", "10.42.0.3", 2022)
    assert proxy_jump("target", config) == [j1, Hop("carol", "172.30.0.2", 2200)]
    # j3 is itself reached through its own ProxyJump, as `ssh -J` does.
    assert proxy_jump("deep", config) == [j1, Hop("zed", "10.9.9.9", 22)]
    assert proxy_jump("v6", config) == [Hop("dave", "fd00::5", 2200), Hop("zed", "fd00::6", 22)]
    assert proxy_jump("direct", config) == []
    assert proxy_jump("nowhere", config) == []
    assert proxy_jump("j2", config) == []
    assert proxy_jump("target", tmp_path / "missing") == []
    with pytest.raises(SshError, match="loop"):
        proxy_jump("loop1", config)


# =========================================================================== unit: host keys
@needs_keygen
def test_known_hosts_matching(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k")
    key_type, blob = key.public.split()[:2]
    hashed = tmp_path / "hashed"
    hashed.write_text(f"10.1.1.1 {key_type} {blob}\n[10.1.1.2]:2222 {key_type} {blob}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(hashed)], check=True, capture_output=True)
    entries = _read_known_hosts([hashed])
    assert [e.hosts[:3] for e in entries] == ["|1|", "|1|"]
    assert _hosts_match(entries[0].hosts, "10.1.1.1")
    assert not _hosts_match(entries[0].hosts, "10.1.1.2")
    assert _hosts_match(entries[1].hosts, "[10.1.1.2]:2222")
    assert not _hosts_match(entries[1].hosts, "10.1.1.2")
    assert _hosts_match("*.lan,!bad.lan", "good.lan")
    assert not _hosts_match("*.lan,!bad.lan", "bad.lan")
    assert _hosts_match("[10.0.0.?]:2222", "[10.0.0.7]:2222")
    assert not _hosts_match("[10.0.0.?]:2222", "10.0.0.7")
    assert _hosts_match("Jump.LAN", "jump.lan")


@needs_keygen
def test_check_host_key(tmp_path: Path) -> None:
    server = paramiko.PKey.from_path(keygen(tmp_path / "server").path)
    other = keygen(tmp_path / "other")
    got = fingerprint(server)
    hop = Hop("root", "h")
    _check_host_key(Hop("root", "h", fingerprints=frozenset({got})), "h", server, [], [])
    with pytest.raises(HostKeyError, match="mismatch") as info:
        _check_host_key(Hop("root", "h", fingerprints=frozenset({"SHA256:x"})), "h", server,
                        [], [])
    assert (info.value.expected, info.value.got) == ({"SHA256:x"}, got)

    server_line = f"h {server.get_name()} {server.get_base64()}\n"
    other_line = "h " + " ".join(other.public.split()[:2]) + "\n"
    files = {"good": server_line, "bad": other_line, "revoked": "@revoked * " + server_line[2:],
             "junk": "h ssh-ed25519 !!!\nh\n# comment\n\n1024 35 12345 old-ssh1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    known = _read_known_hosts([tmp_path / "junk", tmp_path / "good"])
    _check_host_key(hop, "h", server, known, [])
    with pytest.raises(HostKeyError, match="mismatch") as info:
        _check_host_key(hop, "h", server, _read_known_hosts([tmp_path / "bad"]), [])
    assert info.value.expected == {other.fingerprint}
    with pytest.raises(HostKeyError, match="unknown") as info:
        _check_host_key(hop, "h", server, _read_known_hosts([tmp_path / "junk"]), [])
    assert (info.value.expected, info.value.got, info.value.hop) == (set(), got, hop)
    assert got in str(info.value)
    revoked = _read_known_hosts([tmp_path / "good", tmp_path / "revoked"])
    with pytest.raises(HostKeyError, match="revoked"):
        _check_host_key(hop, "h", server, revoked, [])


def test_connect_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(SshError, match="no SSH hops"):
        Chain.connect([])
    with pytest.raises(SshError, match="cannot load private key"):
        Chain.connect([Hop("root", "h")], key_filename=str(tmp_path / "nope"))


# =========================================================================== lab
# Runs in orch: connects a chain per the JSON spec, does one action, prints one RESULT line.
# Any exception other than SshError escapes as a traceback (and a non-zero exit).
DRIVER = r"""
import json, os, socket, sys, threading, time
from pathlib import Path
from net.ssh import Chain, HostKeyError, Hop, SshError

spec = json.loads(sys.argv[1])
hops = [Hop(h["user"], h["host"], h["port"], frozenset(h["fingerprints"])) for h in spec["hops"]]
result = {}


def echo_roundtrip(address, payload):
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as c:
        sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while data := c.recv(65536):
            got += data
        sender.join()
    return bytes(got) == payload


def forward(chain):
    fwd = chain.forward(spec["fwd_host"], spec["fwd_port"])
    payloads = [os.urandom(n) for n in (1, 1000, 300_000, 2_000_000)]
    oks = [None] * len(payloads)
    def one(i):
        oks[i] = echo_roundtrip(fwd.address, payloads[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    result["echo_ok"] = oks
    host, port = fwd.address.rsplit(":", 1)
    held = socket.create_connection((host, int(port)), timeout=5)
    held.sendall(b"still here")
    result["held_echo"] = held.recv(100).decode()
    started = time.monotonic()
    fwd.close()
    fwd.close()
    result["close_s"] = time.monotonic() - started
    try:
        result["held_after_close"] = held.recv(100).decode()
    except OSError as e:
        result["held_after_close"] = type(e).__name__
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        result["listening_after_close"] = True
    except OSError:
        result["listening_after_close"] = False
    result["bad_tunnel"] = None
    try:
        chain.open_channel("127.0.0.1", 1)
    except SshError as e:
        result["bad_tunnel"] = [type(e).__name__, str(e)]


def feed(chain):
    import hashlib, io
    payload = os.urandom(3_000_000)
    out, err = [], []
    # The command fills its stderr before reading stdin: feeding must not stop draining.
    status = chain.run("head -c 2000000 /dev/zero >&2; sha256sum", out.append, err.append,
                       timeout=30, stdin=io.BytesIO(payload))
    digest = b"".join(out).split()[0].decode()
    result["big"] = [status, digest == hashlib.sha256(payload).hexdigest(), len(b"".join(err))]
    out = []
    status = chain.run("cat; echo end", out.append, stdin=b"hi\n")
    result["bytes"] = [status, b"".join(out).decode()]
    out = []
    result["empty"] = [chain.run("wc -c", out.append, stdin=b""), b"".join(out).decode().strip()]
    t0 = time.monotonic()  # a command that ignores its input does not hang the caller
    result["ignored"] = [chain.run("exit 4", stdin=io.BytesIO(payload * 10)), time.monotonic() - t0]

    class Broken(io.RawIOBase):
        def readable(self):
            return True
        def readinto(self, b):
            raise OSError("disk on fire")
    try:
        chain.run("cat > /dev/null; echo took-it-whole", out.append, stdin=Broken(), timeout=10)
        result["broken"] = "no error"
    except SshError as e:
        result["broken"] = str(e)
    result["after_broken"] = chain.run("true")


started = time.monotonic()
try:
    chain = Chain.connect(hops, known_hosts=[Path(p) for p in spec["known_hosts"]],
                          key_filename=spec["key"], timeout=spec["timeout"])
    with chain:
        result["timings"] = [[str(hop), s] for hop, s in chain.timings]
        if spec["action"] == "run":
            out, err = [], []
            result["status"] = chain.run(spec["command"], out.append, err.append, timeout=20)
            result["stdout"] = b"".join(out).decode()
            result["stderr"] = b"".join(err).decode()
            if spec.get("stream"):
                chunks = []
                chain.run("echo first; sleep 0.6; echo second",
                          lambda data: chunks.append((time.monotonic(), data.decode())))
                result["chunks"] = chunks
                t0 = time.monotonic()
                try:
                    chain.run("sleep 5", timeout=0.5)
                except SshError as e:
                    result["slow"] = [str(e), time.monotonic() - t0]
                result["still_works"] = chain.run("true")
        elif spec["action"] == "forward":
            forward(chain)
        elif spec["action"] == "stdin":
            feed(chain)
    chain.close()
    try:
        chain.run("true")
    except SshError as e:
        result["after_close"] = str(e)
except SshError as e:
    result["error"] = type(e).__name__
    result["message"] = str(e)
    result["hop"] = str(e.hop) if e.hop is not None else None
    if isinstance(e, HostKeyError):
        result["expected"] = sorted(e.expected)
        result["got"] = e.got
result["elapsed"] = time.monotonic() - started
print("RESULT " + json.dumps(result), flush=True)
"""

ECHO_SERVER = """
import socket, sys, threading
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

ORCH, JUMP1, JUMP1_FAR, JUMP2, JUMP2_FAR, TARGET = (
    "10.42.0.2", "10.42.0.3", "172.30.0.1", "172.30.0.2", "172.31.0.1", "172.31.0.9"
)
TARGET_PORT = 2222
ECHO_PORT = 7000

_REASON = unavailable_reason() or sshd_unavailable_reason()


def lab_test(fn: Any) -> Any:
    """Mark a test as a lab test (root, sshd); skipped with the reason where it cannot run."""
    for mark in (pytest.mark.lab, pytest.mark.timeout(60),
                 pytest.mark.skipif(_REASON is not None, reason=_REASON or "")):
        fn = mark(fn)
    return fn


@dataclass
class SshLab:
    """The chain network with sshd on jump1, jump2 and target, plus a client HOME for orch."""

    lab: Lab
    key: ClientKey
    extra_keys: dict[str, ClientKey]
    jump1: Sshd
    jump2: Sshd
    target: Sshd
    home: Path  # HOME of the client in orch: empty ~/.ssh unless a test fills it

    def hop(self, sshd: Sshd, *, pin: str | bool | None = True) -> dict[str, Any]:
        """A hop spec; `pin=True` pins the server's real key, a string pins that, None none."""
        pins = [sshd.fingerprint] if pin is True else [pin] if isinstance(pin, str) else []
        return {"user": "root", "host": sshd.address, "port": sshd.port, "fingerprints": pins}

    def chain(self, *, pin: bool = True) -> list[dict[str, Any]]:
        return [self.hop(s, pin=True if pin else None)
                for s in (self.jump1, self.jump2, self.target)]

    def drive(self, hops: list[dict[str, Any]], *, action: str = "connect",
              key: str | bool | None = True, known_hosts: tuple[str, ...] = (),
              timeout: float = 5.0, **extra: Any) -> dict[str, Any]:
        """Run DRIVER in orch and return its RESULT (asserting it exited cleanly)."""
        spec = {"hops": hops, "action": action, "timeout": timeout,
                "key": str(self.key.path) if key is True else key or None,
                "known_hosts": list(known_hosts), **extra}
        env = {"PYTHONPATH": str(REPO), "HOME": str(self.home), "SSH_AUTH_SOCK": ""}
        res = self.lab.run("orch", [sys.executable, "-c", DRIVER, json.dumps(spec)],
                           timeout=45, env=env)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        assert res.returncode == 0 and lines, f"driver failed:\n{res.stdout}\n{res.stderr}"
        result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
        return result


@pytest.fixture
def ssh_lab(lab: Lab, tmp_path: Path) -> SshLab:
    for name in ("orch", "jump1", "jump2", "target"):
        lab.host(name)
    lab.link("orch", "jump1", f"{ORCH}/24", f"{JUMP1}/24")
    lab.link("jump1", "jump2", f"{JUMP1_FAR}/24", f"{JUMP2}/24")
    lab.link("jump2", "target", f"{JUMP2_FAR}/24", f"{TARGET}/24")
    keys = tmp_path / "keys"
    key = keygen(keys / "id_ed25519")
    extra = {t: keygen(keys / f"id_{t}", t) for t in ("ecdsa", "rsa")}
    authorized = [key, *extra.values()]
    servers = tmp_path / "servers"
    jump1 = start_sshd(lab, "jump1", JUMP1, authorized, servers)
    jump2 = start_sshd(lab, "jump2", JUMP2, authorized, servers)
    target = start_sshd(lab, "target", TARGET, authorized, servers, port=TARGET_PORT)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    return SshLab(lab, key, extra, jump1, jump2, target, home)


def _log_after(lab: Lab, sshd: Sshd, needle: str) -> str:
    """sshd's log once it has logged `needle` (its per-connection lines arrive async)."""
    return lab.wait_for_log(sshd.proc, needle, timeout=5)


@lab_test
def test_two_hop_chain_runs_command_on_target(ssh_lab: SshLab) -> None:
    direct = ssh_lab.lab.run("orch", [sys.executable, "-c",
                                      f"import socket; socket.create_connection(('{TARGET}', "
                                      f"{TARGET_PORT}), timeout=2)"])
    assert direct.returncode != 0, "orch must not be able to reach target directly"

    command = "sh -c 'ip -4 -o addr show; echo to-stderr >&2; exit 3'"
    result = ssh_lab.drive(ssh_lab.chain(), action="run", command=command, stream=True)
    assert "error" not in result, result
    assert result["status"] == 3
    assert f"inet {TARGET}/" in result["stdout"]
    assert JUMP1 not in result["stdout"] and JUMP2 not in result["stdout"]
    assert result["stderr"] == "to-stderr\n"
    assert [hop for hop, _ in result["timings"]] == [
        f"root@{JUMP1}:22", f"root@{JUMP2}:22", f"root@{TARGET}:{TARGET_PORT}"]
    assert all(0 < s < 5 for _, s in result["timings"])
    assert "is closed" in result["after_close"]
    # Output is streamed as it arrives, not collected at the end.
    (t_first, first), (t_last, last) = result["chunks"][0], result["chunks"][-1]
    assert (first, last) == ("first\n", "second\n") and t_last - t_first > 0.4
    message, elapsed = result["slow"]
    assert "timed out" in message and TARGET in message and elapsed < 3
    assert result["still_works"] == 0
    # The target saw the login coming from jump2, i.e. through the chain.
    _log_after(ssh_lab.lab, ssh_lab.target, f"Accepted publickey for root from {JUMP2_FAR}")


@lab_test
def test_known_hosts_and_default_identity(ssh_lab: SshLab) -> None:
    """Plain, hashed and `[host]:port` known_hosts entries; the key from ~/.ssh/id_ed25519."""
    ssh_dir = ssh_lab.home / ".ssh"
    known = ssh_dir / "known_hosts"
    known.write_text(ssh_lab.jump2.known_hosts_line + "\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    with known.open("a") as f:
        f.write("# a comment\n\ngarbage line\n")
        f.write(ssh_lab.jump1.known_hosts_line + "\n")
        f.write(ssh_lab.target.known_hosts_line + "\n")
    shutil.copy(ssh_lab.key.path, ssh_dir / "id_ed25519")
    result = ssh_lab.drive(ssh_lab.chain(pin=False), action="run", command="echo ok", key=None)
    assert (result.get("error"), result.get("status"), result.get("stdout")) == (None, 0, "ok\n")

    # Only another key listed for jump1: a mismatch, refused before auth. (Had any file also
    # listed jump1's real key, it would be accepted, as OpenSSH does.)
    bad = ssh_dir / "bad_known_hosts"
    bad.write_text(f"{JUMP1} {' '.join(ssh_lab.target.host_key.public.split()[:2])}\n")
    result = ssh_lab.drive(ssh_lab.chain(pin=False), known_hosts=(str(bad),))
    assert result["error"] == "HostKeyError", result
    assert result["hop"] == f"root@{JUMP1}:22"
    assert (result["expected"], result["got"]) == ([ssh_lab.target.fingerprint],
                                                  ssh_lab.jump1.fingerprint)
    assert "mismatch" in result["message"]


@lab_test
def test_ecdsa_and_rsa_client_keys(ssh_lab: SshLab) -> None:
    for key_type, key in ssh_lab.extra_keys.items():
        result = ssh_lab.drive(ssh_lab.chain(), action="run", command="echo ok",
                               key=str(key.path))
        assert result.get("stdout") == "ok\n", (key_type, result)


@lab_test
def test_forward_pipes_tcp_to_target(ssh_lab: SshLab) -> None:
    lab = ssh_lab.lab
    echo = lab.spawn("target", [sys.executable, "-c", ECHO_SERVER, str(ECHO_PORT)])
    lab.wait_for_log(echo, "listening")
    # 127.0.0.1 is resolved on the last hop: only target's own echo server can answer.
    result = ssh_lab.drive(ssh_lab.chain(), action="forward", fwd_host="127.0.0.1",
                           fwd_port=ECHO_PORT)
    assert "error" not in result, result
    assert result["echo_ok"] == [True, True, True, True]
    assert result["held_echo"] == "still here"
    assert result["close_s"] < 3
    assert result["held_after_close"] in ("", "ConnectionResetError")
    assert result["listening_after_close"] is False
    kind, message = result["bad_tunnel"]
    assert kind == "SshConnectError" and f"{TARGET}:{TARGET_PORT}" in message


@lab_test
def test_run_feeds_stdin(ssh_lab: SshLab) -> None:
    result = ssh_lab.drive(ssh_lab.chain(), action="stdin")
    assert "error" not in result, result
    assert result["big"] == [0, True, 2_000_000]
    assert result["bytes"] == [0, "hi\nend\n"]
    assert result["empty"] == [0, "0"]
    status, elapsed = result["ignored"]
    assert status == 4 and elapsed < 5
    assert "cannot read the command's input: disk on fire" in result["broken"]
    assert TARGET in result["broken"]
    assert result["after_broken"] == 0


@lab_test
def test_wrong_fingerprint_on_middle_hop(ssh_lab: SshLab) -> None:
    hops = ssh_lab.chain()
    wrong = ssh_lab.target.fingerprint  # a real key, just not jump2's
    hops[1] = ssh_lab.hop(ssh_lab.jump2, pin=wrong)
    result = ssh_lab.drive(hops, action="run", command="touch /tmp/should-not-run")
    assert result["error"] == "HostKeyError", result
    assert result["hop"] == f"root@{JUMP2}:22"
    assert (result["expected"], result["got"]) == ([wrong], ssh_lab.jump2.fingerprint)
    assert JUMP2 in result["message"] and "hop 2 of 3" in result["message"]
    # jump2 got a connection but not a single authentication attempt; target got nothing.
    log = _log_after(ssh_lab.lab, ssh_lab.jump2, "[preauth]")
    assert f"Connection from {JUMP1_FAR}" in log
    assert "publickey" not in log and "Accepted" not in log
    assert "Connection from" not in ssh_lab.target.log()


@lab_test
def test_unknown_host_key_is_refused(ssh_lab: SshLab) -> None:
    result = ssh_lab.drive(ssh_lab.chain(pin=False), action="run", command="true")
    assert result["error"] == "HostKeyError", result
    assert result["hop"] == f"root@{JUMP1}:22"
    assert (result["expected"], result["got"]) == ([], ssh_lab.jump1.fingerprint)
    assert "unknown" in result["message"] and ssh_lab.jump1.fingerprint in result["message"]
    log = _log_after(ssh_lab.lab, ssh_lab.jump1, "[preauth]")
    assert "publickey" not in log and "Accepted" not in log


@lab_test
def test_unreachable_hops(ssh_lab: SshLab) -> None:
    timeout = 1.5
    nobody = {"user": "root", "port": 22, "fingerprints": ["SHA256:x"]}
    cases = [
        # (hops, hop named in the error): silent first hop, silent middle hop, refused port
        ([{**nobody, "host": "10.42.0.99"}, ssh_lab.hop(ssh_lab.jump2)], "root@10.42.0.99:22"),
        ([ssh_lab.hop(ssh_lab.jump1), {**nobody, "host": "172.30.0.77"}],
         "root@172.30.0.77:22"),
        ([ssh_lab.hop(ssh_lab.jump1), {**nobody, "host": JUMP2, "port": 2200}],
         f"root@{JUMP2}:2200"),
    ]
    for hops, named in cases:
        result = ssh_lab.drive(hops, timeout=timeout)
        assert result.get("error") == "SshConnectError", result
        assert result["hop"] == named and named in result["message"], result
        assert result["elapsed"] < 2 * timeout + 1, result
