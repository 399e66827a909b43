"""`swarmnode bootstrap`, the parts that need no network: rendered service files, what is
copied, host key pinning, compatibility checks, option checks and the CLI's failure path.

The whole command against real sshd hosts is in test_bootstrap_lab.py.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli.bootstrap as cli_bootstrap
from cli.main import app
from net.ssh import Hop, HostKeyError
from swarmnode import bootstrap as bs
from swarmnode.bootstrap import BootstrapError, Request

REPO = Path(__file__).resolve().parent.parent
PREFIX, HOME = "/opt/sn", "/var/lib/sn"
TOKEN = "swn1.AbC-_x"
FP = "SHA256:" + "A" * 43


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines()]


# --------------------------------------------------------------------------- rendered files
def test_systemd_unit() -> None:
    lines = _lines(bs.render_systemd_unit(PREFIX, HOME))
    assert lines[0] == "[Unit]"
    for line in ("After=network-online.target", "Wants=network-online.target", "[Service]",
                 f"EnvironmentFile=-{HOME}/join.env",
                 f"ExecStart={PREFIX}/bin/swarmnode --home {HOME} join $SWARMNODE_JOIN_ARGS",
                 "KillSignal=SIGTERM", "Restart=on-failure", "RestartSec=2", "[Install]",
                 "WantedBy=multi-user.target"):
        assert line in lines, line
    assert lines.index("[Unit]") < lines.index("[Service]") < lines.index("[Install]")
    assert TOKEN not in "\n".join(lines)


def _source_openrc(tmp_path: Path, join_env: str | None) -> str:
    """Run the OpenRC script's start_pre in sh (as openrc-run would) and return command_args."""
    home = tmp_path / "home"
    home.mkdir(parents=True)
    if join_env is not None:
        (home / "join.env").write_text(join_env)
    script = tmp_path / "swarmnode.initd"
    script.write_text(bs.render_openrc(PREFIX, str(home)))
    res = subprocess.run(["sh", "-c", f'. "{script}" && start_pre && echo "$command_args"'],
                         capture_output=True, text=True, check=True, timeout=10)
    return res.stdout.strip()


def test_openrc_script(tmp_path: Path) -> None:
    text = bs.render_openrc(PREFIX, HOME)
    lines = _lines(text)
    assert text.startswith("#!/sbin/openrc-run\n")
    for line in (f'command="{PREFIX}/bin/swarmnode"', f'command_args="--home {HOME} join"',
                 "command_background=yes", 'pidfile="/run/swarmnode.pid"', "depend() {",
                 "need net", "start_pre() {"):
        assert line in lines, line
    assert subprocess.run(["sh", "-n", "-c", text], check=False).returncode == 0
    # The token (from join.env) is added on the first start only, while the file exists.
    env = bs.render_join_env(TOKEN, "tarn", "10.0.0.5:7946")
    assert _source_openrc(tmp_path / "a", env) == (
        f"--home {tmp_path}/a/home join {TOKEN} --name tarn --listen 10.0.0.5:7946")
    assert _source_openrc(tmp_path / "b", None) == f"--home {tmp_path}/b/home join"


def test_join_env_and_wrapper(tmp_path: Path) -> None:
    env = bs.render_join_env(TOKEN, None, "0.0.0.0:7946")
    assert f'SWARMNODE_JOIN_ARGS="{TOKEN} --listen 0.0.0.0:7946"' in _lines(env)
    path = tmp_path / "join.env"
    path.write_text(bs.render_join_env(TOKEN, "n1", "[fd00::1]:7946"))
    res = subprocess.run(["sh", "-c", f'. "{path}"; printf "%s\\n" $SWARMNODE_JOIN_ARGS'],
                         capture_output=True, text=True, check=True)
    assert res.stdout.split("\n")[:-1] == [TOKEN, "--name", "n1", "--listen", "[fd00::1]:7946"]
    assert _lines(bs.render_wrapper(PREFIX)) == [
        "#!/bin/sh", "# swarmnode, copied here by `swarmnode bootstrap`",
        f'exec {PREFIX}/bin/python -I -m cli "$@"']


def test_detached_start_passes_the_token_and_returns_at_once(tmp_path: Path) -> None:
    prefix, home = tmp_path / "prefix", tmp_path / "home"
    (prefix / "bin").mkdir(parents=True)
    home.mkdir()
    fake = prefix / "bin" / "swarmnode"
    fake.write_text(f'#!/bin/sh\nsleep 0.3\necho "$@" > "{tmp_path}/args"\n')
    fake.chmod(0o755)
    (home / "join.env").write_text(bs.render_join_env(TOKEN, "n1", "10.0.0.5:7946"))
    started = time.monotonic()
    subprocess.run(["sh", "-c", bs.service_start("none", str(prefix), str(home))],
                   check=True, timeout=10)
    assert time.monotonic() - started < 0.3  # detached: the SSH command does not wait for it
    deadline = time.monotonic() + 10
    while not (tmp_path / "args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "args").read_text().split() == [
        "--home", str(home), "join", TOKEN, "--name", "n1", "--listen", "10.0.0.5:7946"]


def test_service_commands() -> None:
    systemd = bs.service_start("systemd", PREFIX, HOME)
    assert f"{PREFIX}/share/swarmnode/swarmnode.service /etc/systemd/system/" in systemd
    assert "systemctl daemon-reload" in systemd and "systemctl enable swarmnode" in systemd
    openrc = bs.service_start("openrc", PREFIX, HOME)
    assert "/etc/init.d/swarmnode" in openrc and "rc-update add swarmnode default" in openrc
    assert "setsid" in bs.service_start("none", PREFIX, HOME)
    assert [bs.resolve_service("auto", f) for f in ("systemd", "openrc", "none")] == [
        "systemd", "openrc", "none"]
    assert bs.resolve_service("none", "systemd") == "none"


# --------------------------------------------------------------------------- what is copied
@pytest.mark.parametrize(("requirement", "name"), [
    ("pyzmq>=26", "pyzmq"),
    ("markdown-it-py (>=2.2.0)", "markdown-it-py"),
    ('cffi>=2.0.0 ; platform_python_implementation != "PyPy"', "cffi"),
    ('pytest>=8; extra == "test"', None),
    ("ipywidgets (>=7.5.1,<9) ; extra == 'jupyter'", None),
    ("zope.interface", "zope.interface"),
])
def test_requirement_name(requirement: str, name: str | None) -> None:
    assert bs.requirement_name(requirement) == name


def test_distribution_closure() -> None:
    names = {bs.canonical_name(d.metadata["Name"]) for d in bs.distribution_closure()}
    wanted = {"swarmnode", "pyzmq", "msgpack", "paramiko", "zeroconf", "typer", "pynacl", "rich",
              # and their requirements
              "cryptography", "bcrypt", "cffi", "pycparser", "ifaddr", "markdown-it-py", "mdurl",
              "pygments"}
    assert wanted <= names, wanted - names
    assert not names & {"pytest", "pytest-timeout", "hypothesis", "ruff", "pluggy"}


@pytest.fixture(scope="module")
def packed() -> dict[str, tarfile.TarInfo | bytes]:
    """The real tar stream of this installation: member name -> TarInfo, plus some contents."""
    files = bs.installation_files()
    with bs.tar_stream(files) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        found: dict[str, tarfile.TarInfo | bytes] = {}
        for info in tar:
            found[info.name] = info
            if info.name == "cli/main.py":
                found["cli/main.py:data"] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return found


def test_tar_stream_holds_the_installation(packed: dict[str, tarfile.TarInfo | bytes]) -> None:
    names = {n for n in packed if not n.endswith(":data")}
    for name in ("cli/main.py", "cli/bootstrap.py", "swarmnode/node.py", "net/transport.py",
                 "net/ssh.py", "zmq/__init__.py", "nacl/__init__.py", "paramiko/__init__.py",
                 "msgpack/__init__.py", "zeroconf/__init__.py", "typer/__init__.py"):
        assert name in names, name
    assert any(n.startswith("zmq/") and ".so" in n for n in names)  # compiled extensions too
    assert any(n.startswith("pyzmq-") and n.endswith(".dist-info/RECORD") for n in names)
    assert "swarmnode-0.1.0.dist-info/METADATA" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.endswith(".pth") or "__editable__" in n]
    assert not [n for n in names if n.startswith(("/", "..")) or "/../" in n]
    assert not [n for n in names if n.split("/")[0] in ("pytest", "_pytest", "hypothesis")]
    assert packed["cli/main.py:data"] == (REPO / "cli" / "main.py").read_bytes()
    infos = [i for i in packed.values() if isinstance(i, tarfile.TarInfo)]
    assert {(i.uid, i.gid, i.uname) for i in infos} == {(0, 0, "root")}
    assert {i.mode for i in infos} <= {0o644, 0o755}


def test_tar_stream_reports_an_unreadable_file(tmp_path: Path) -> None:
    files: bs.FileList = [("a.txt", b"a"), ("gone.py", tmp_path / "gone.py")]
    with pytest.raises(BootstrapError, match=r"cannot pack.*gone\.py"), \
            bs.tar_stream(files) as stream:
        stream.read()


def test_tar_stream_reader_may_stop_early() -> None:
    big: bs.FileList = [(f"f{i}", bytes(1_000_000)) for i in range(8)]
    started = time.monotonic()
    with bs.tar_stream(big) as stream:
        stream.read(10)
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- hops and keys
MEMBERS = [
    {"id": "a", "name": "bastion", "state": "alive", "admitted_by": "a",
     "addresses": ["10.42.0.3:7946"], "ssh_keys": ["SHA256:bastion"]},
    {"id": "b", "name": "ghost", "state": "pending", "admitted_by": None,
     "addresses": ["10.42.0.4:7946", "172.30.0.9:7946"], "ssh_keys": ["SHA256:ghost"]},
    {"id": "c", "name": "old", "state": "banned", "admitted_by": "a",
     "addresses": ["10.42.0.5:7946"], "ssh_keys": ["SHA256:banned"]},
]


def test_build_hops_pins_members_and_the_given_host_key() -> None:
    req = Request(target="root@172.30.0.9", jumps=("10.42.0.3", "ops@bastion:2222",
                                                   "10.42.0.4", "10.42.0.5"), user="me")
    hops = bs.build_hops(req, MEMBERS)
    assert hops == [
        Hop("me", "10.42.0.3", 22, frozenset({"SHA256:bastion"})),
        Hop("ops", "bastion", 2222, frozenset({"SHA256:bastion"})),  # by member name
        Hop("me", "10.42.0.4", 22),  # a pending node vouches for nothing: known_hosts
        Hop("me", "10.42.0.5", 22),  # nor does a banned one
        Hop("root", "172.30.0.9", 22),
    ]
    pinned = bs.build_hops(Request(target="root@172.30.0.9:2222", host_keys=(FP,)), MEMBERS)
    assert pinned == [Hop("root", "172.30.0.9", 2222, frozenset({FP}))]
    with pytest.raises(BootstrapError, match="bad SSH"):
        bs.build_hops(Request(target="root@"), [])


def test_unknown_target_key_message_says_how_to_pass_it() -> None:
    target, jump = Hop("root", "t"), Hop("root", "j")
    unknown = HostKeyError("host key of root@t:22 is unknown", target, set(), FP)
    assert bs._explain(unknown, target).endswith(
        f"pass --host-key {FP} after checking it out of band")
    mismatch = HostKeyError("host key mismatch for root@t:22", target, {"SHA256:x"}, FP)
    assert "--host-key" not in bs._explain(mismatch, target)
    on_jump = HostKeyError("host key of root@j:22 is unknown", jump, set(), FP)
    assert "--host-key" not in bs._explain(on_jump, target)


# --------------------------------------------------------------------------- checks
LOCAL = {"arch": "x86_64", "python": "3.11", "abi": ".cpython-311-x86_64-linux-gnu.so"}


@pytest.mark.parametrize(("remote", "words"), [
    ({**LOCAL, "arch": "aarch64"}, ["aarch64", "x86_64"]),
    ({"arch": "x86_64"}, ["python3 is not installed", "3.11"]),
    ({**LOCAL, "python": "3.12"}, ["Python 3.12", "Python 3.11"]),
    ({**LOCAL, "abi": ".cpython-311-x86_64-linux-musl.so"}, ["musl", "gnu"]),
])
def test_check_compatible_names_both_sides(remote: dict[str, str], words: list[str]) -> None:
    with pytest.raises(BootstrapError) as info:
        bs.check_compatible(remote, LOCAL, "root@t:22")
    assert "root@t:22" in str(info.value)
    for word in words:
        assert word in str(info.value)
    bs.check_compatible(LOCAL, LOCAL, "root@t:22")
    assert set(bs.local_facts()) == set(LOCAL)


def test_parse_facts() -> None:
    assert bs.parse_facts("arch=x86_64\nnoise\nabi=.so=x\n") == {"arch": "x86_64", "abi": ".so=x"}


@pytest.mark.parametrize(("change", "match"), [
    ({"service": "upstart"}, "--service"),
    ({"name": "two words"}, "--name"),
    ({"listen": "nohost"}, "--listen"),
    ({"listen": "$(reboot):1"}, "--listen"),
    ({"prefix": "relative/path"}, "--prefix"),
    ({"prefix": "/"}, "--prefix"),
    ({"remote_home": "/var/lib/my node"}, "--remote-home"),
    ({"remote_home": "/var/%h"}, "--remote-home"),
    ({"host_keys": ("MD5:aa:bb",)}, "--host-key"),
])
def test_check_request_refuses_bad_options(change: dict[str, object], match: str) -> None:
    good = Request(target="root@h", name="n-1.a", listen="[fd00::1]:7946", host_keys=(FP,))
    bs.check_request(good)
    with pytest.raises(BootstrapError, match=match):
        bs.check_request(Request(**{**good.__dict__, **change}))  # type: ignore[arg-type]


def test_scripts_quote_paths() -> None:
    assert bs.write_script("/x/y.env", 0o600) == (
        "mkdir -p /x && (umask 077 && cat > /x/y.env.new) && chmod 600 /x/y.env.new "
        "&& mv -f /x/y.env.new /x/y.env")
    for script in (bs.preflight_script(PREFIX, HOME), bs.install_script(PREFIX),
                   bs.verify_script(PREFIX, HOME)):
        assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0


# --------------------------------------------------------------------------- the CLI
def test_cli_defaults_match_the_module() -> None:
    assert (cli_bootstrap.DEFAULT_PREFIX, cli_bootstrap.DEFAULT_REMOTE_HOME,
            cli_bootstrap.DEFAULT_LISTEN) == (bs.DEFAULT_PREFIX, bs.DEFAULT_REMOTE_HOME,
                                              bs.DEFAULT_LISTEN)


def test_cli_without_a_running_node_fails_clearly(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "bootstrap", "root@h",
                                   "--host-key", FP])
    assert res.exit_code == 1, res.output
    assert "no swarmnode is running" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "bootstrap", "root@h",
                                   "--service", "upstart"])
    assert res.exit_code == 1 and "--service must be one of" in res.output


def test_tar_roundtrip_extracts_with_the_data_filter(tmp_path: Path) -> None:
    """What the target runs on the stream: the same extraction code, here on a small tar."""
    buf = io.BytesIO()
    src = tmp_path / "tool"
    src.write_text("#!/bin/sh\n")
    src.chmod(0o700)
    bs.write_tar(buf, [("pkg/__init__.py", b"x = 1\n"), ("pkg/tool", src)])
    dest = tmp_path / "site"
    dest.mkdir()
    subprocess.run([sys.executable, "-c", bs._EXTRACT, str(dest)], input=buf.getvalue(), check=True)
    assert (dest / "pkg" / "__init__.py").read_text() == "x = 1\n"
    assert (dest / "pkg" / "tool").stat().st_mode & 0o777 == 0o755
