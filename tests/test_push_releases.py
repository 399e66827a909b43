"""Releases on disk: install, the atomic switch, rollback, prune, and the self-update launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmnode.push.bundle import BundleError, make_bundle
from swarmnode.push.releases import (
    BOOT_FAILED_ENV,
    ReleaseError,
    Releases,
    exec_argv,
    launch_root,
)
from swarmnode.push_service import FACT_PREFIX, ROLLBACK_PREFIX, release_facts

SELF = "swarmnode"


def build(tmp_path: Path, files: dict[str, str]) -> tuple[str, Path]:
    """A bundle of a tree holding `files`; (digest, blob)."""
    src = tmp_path / f"src-{len(list(tmp_path.glob('src-*')))}"
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    info = make_bundle(src, tmp_path / f"{src.name}.tgz")
    return info.digest, tmp_path / f"{src.name}.tgz"


@pytest.fixture
def rel(tmp_path: Path) -> Iterator[Releases]:
    with Releases(tmp_path / "home") as releases:
        yield releases


def installed(rel: Releases, tmp_path: Path, n: int) -> list[str]:
    digests = []
    for i in range(n):
        serial = str(len(list(tmp_path.glob("src-*"))))  # distinct content, distinct digest
        digest, blob = build(tmp_path, {"app/VERSION": f"{i}\n", "app/SERIAL": serial})
        rel.install(digest, blob)
        digests.append(digest)
    return digests


def test_install_is_verified_and_idempotent(rel: Releases, tmp_path: Path) -> None:
    digest, blob = build(tmp_path, {"a.txt": "hello"})
    path = rel.install(digest, blob)
    assert path == rel.home / "releases" / digest
    assert (path / "a.txt").read_text() == "hello"
    assert rel.install(digest, tmp_path / "missing.tgz") == path  # already there
    other, blob2 = build(tmp_path, {"a.txt": "other"})
    raw = bytearray(blob2.read_bytes())
    raw[100] ^= 0x01
    blob2.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="bundle digest mismatch"):
        rel.install(other, blob2)
    assert sorted(os.listdir(rel.dir)) == [digest]
    with pytest.raises(ReleaseError, match="digest"):
        rel.install("../../etc", blob)


def test_switch_current_previous_history(rel: Releases, tmp_path: Path) -> None:
    a, b = installed(rel, tmp_path, 2)
    assert rel.current(SELF) is None and rel.previous(SELF) is None and rel.apps() == []
    assert rel.switch(SELF, a) is None
    assert os.readlink(rel.home / "current") == f"releases/{a}"
    assert (rel.home / "current" / "app" / "VERSION").read_text() == "0\n"
    assert rel.switch(SELF, b) == a
    assert (rel.current(SELF), rel.previous(SELF)) == (b, a)
    assert rel.status(SELF, b) == ("installed", "")
    assert rel.switch("web", a) is None
    assert os.readlink(rel.home / "apps" / "web") == f"../releases/{a}"
    assert (rel.home / "apps" / "web" / "app" / "VERSION").read_text() == "0\n"
    assert rel.apps() == [SELF, "web"]
    assert [(d, p) for d, p, _ in rel.history(SELF)] == [(a, None), (b, a)]
    assert rel.switched_at(SELF) == rel.history(SELF)[-1][2]
    assert rel.switched_at("nothing") is None
    with pytest.raises(ReleaseError, match="not installed"):
        rel.switch(SELF, "0" * 64)
    with pytest.raises(ReleaseError, match="app name"):
        rel.switch("../x", a)


def test_a_moved_home_still_works(tmp_path: Path) -> None:
    with Releases(tmp_path / "home") as rel:
        (a,) = installed(rel, tmp_path, 1)
        rel.switch(SELF, a)
        rel.switch("web", a)
    shutil.move(tmp_path / "home", tmp_path / "moved")
    with Releases(tmp_path / "moved") as rel:
        assert rel.current(SELF) == a and rel.current("web") == a
        assert (tmp_path / "moved" / "apps" / "web" / "app" / "VERSION").read_text() == "0\n"


def test_switch_is_atomic(rel: Releases, tmp_path: Path) -> None:
    a, b = installed(rel, tmp_path, 2)
    rel.switch(SELF, a)
    link = rel.home / "current"
    stop = threading.Event()
    seen: dict[str, int] = {}
    missing = 0

    def reader() -> None:
        nonlocal missing
        while not stop.is_set():
            try:
                target = os.readlink(link)
                seen[target] = seen.get(target, 0) + 1
            except FileNotFoundError:
                missing += 1

    thread = threading.Thread(target=reader)
    thread.start()
    switches = 0
    try:  # until the reader has looked thousands of times, across hundreds of switches
        while switches < 200 or sum(seen.values()) < 5000:
            rel.switch(SELF, b if switches % 2 == 0 else a)
            switches += 1
            assert switches < 100_000
    finally:
        stop.set()
        thread.join()
    assert missing == 0
    assert set(seen) == {f"releases/{a}", f"releases/{b}"}
    assert not [n for n in os.listdir(rel.home) if n.endswith(".tmp")]


def test_rollback_and_failed(rel: Releases, tmp_path: Path) -> None:
    a, b, c = installed(rel, tmp_path, 3)
    rel.switch(SELF, a)
    rel.switch(SELF, b)
    rel.switch(SELF, c)
    assert rel.rollback(SELF, "health check failed") == b
    assert rel.current(SELF) == b
    assert rel.status(SELF, c) == ("rolled_back", "health check failed")
    assert rel.failed(SELF, c) == "health check failed"
    assert rel.failed(SELF, b) is None
    assert rel.failed("web", c) is None  # per app
    assert rel.previous(SELF) == a  # not the failed c
    assert rel.rollback(SELF, "again") == a
    assert rel.current(SELF) == a and rel.failed(SELF, a) is None
    rel.mark(SELF, a, "healthy")
    assert rel.status(SELF, a) == ("healthy", "")
    # the first release failing: nothing to go back to, so it does not stay live either
    rel.switch("web", c)
    assert rel.rollback("web", "first one broken") is None
    assert rel.current("web") is None and rel.failed("web", c) == "first one broken"
    # what the node states in its record: each app's latest rollback, newest first
    assert [(app, d) for app, d, _t in rel.rolled_back(4)] == [("web", c), (SELF, b)]
    assert [app for app, _d, _t in rel.rolled_back(1)] == ["web"]
    facts = release_facts(rel)
    assert facts[f"{ROLLBACK_PREFIX}web"].startswith(c + "@")
    assert facts[f"{ROLLBACK_PREFIX}{SELF}"].startswith(b + "@")
    assert facts[f"{FACT_PREFIX}{SELF}"].startswith(a + "@") and f"{FACT_PREFIX}web" not in facts
    with pytest.raises(ReleaseError, match="unknown status"):
        rel.mark(SELF, a, "fine")


def test_dangling_and_garbled_links(rel: Releases, tmp_path: Path) -> None:
    (a,) = installed(rel, tmp_path, 1)
    rel.switch(SELF, a)
    shutil.rmtree(rel.path(a))
    assert rel.current(SELF) is None
    assert "dangling" in (rel.problem(SELF) or "")
    assert launch_root(rel.home, tmp_path, 0.0) is None
    os.unlink(rel.home / "current")
    (rel.home / "current").write_text("not a link")
    assert rel.current(SELF) is None
    assert "not a symlink" in (rel.problem(SELF) or "")
    assert launch_root(rel.home, tmp_path, 0.0) is None
    os.unlink(rel.home / "current")
    os.symlink("/etc", rel.home / "current")
    assert rel.current(SELF) is None and "not a link to a release" in (rel.problem(SELF) or "")


def test_prune(rel: Releases, tmp_path: Path) -> None:
    r = installed(rel, tmp_path, 6)
    for digest in (r[0], r[1], r[2], r[0]):  # web: back to r0; previous is r2
        rel.switch("web", digest)
    rel.switch(SELF, r[3])
    # r4 was installed but never switched to: spared while young, removed when old.
    assert rel.prune(keep=1) == []
    removed = rel.prune(keep=1, min_age=0)
    assert sorted(removed) == sorted([r[1], r[4], r[5]])
    assert sorted(os.listdir(rel.dir)) == sorted([r[0], r[2], r[3]])
    assert rel.current("web") == r[0] and rel.previous("web") == r[2]
    assert rel.current(SELF) == r[3]
    r6, r7 = installed(rel, tmp_path, 2)
    for digest in (r6, r7):
        rel.switch(SELF, digest)
    assert rel.prune(keep=2, min_age=0) == [r[3]]  # self keeps r7, r6; web keeps r0, r2
    assert {r6, r7} <= set(os.listdir(rel.dir))


def test_trial(rel: Releases, tmp_path: Path) -> None:
    a, b = installed(rel, tmp_path, 2)
    rel.switch(SELF, a)
    rel.switch(SELF, b)
    assert rel.trial() is None and rel.note_start() is None
    rel.begin_trial(b, a, deadline=100.0)
    assert rel.note_start().starts == 1  # type: ignore[union-attr]
    assert rel.trial().starts == 1  # type: ignore[union-attr]
    assert rel.end_trial(True) == b
    assert rel.trial() is None and rel.status(SELF, b) == ("healthy", "")
    rel.begin_trial(b, a, deadline=100.0)
    assert rel.end_trial(False, "no heartbeat") == a
    assert rel.current(SELF) == a and rel.failed(SELF, b) == "no heartbeat"


def test_trial_from_the_installed_code(rel: Releases, tmp_path: Path) -> None:
    (a,) = installed(rel, tmp_path, 1)
    rel.switch(SELF, a)
    rel.begin_trial(a, None, deadline=100.0)
    assert rel.end_trial(False, "bad") is None
    assert not os.path.lexists(rel.home / "current")  # back to the installed code
    assert rel.failed(SELF, a) == "bad"


# ------------------------------------------------------------------------------ launching


def on_trial(tmp_path: Path, previous: bool = True) -> tuple[Path, str | None, str]:
    home = tmp_path / "home"
    with Releases(home) as rel:
        a, b = installed(rel, tmp_path, 2)
        if previous:
            rel.switch(SELF, a)
        rel.switch(SELF, b)
        rel.begin_trial(b, a if previous else None, deadline=1000.0)
    return home, (a if previous else None), b


def test_launch_root_without_current(tmp_path: Path) -> None:
    assert launch_root(tmp_path / "home", tmp_path, 0.0) is None


def test_launch_root_runs_current_and_counts_trial_starts(tmp_path: Path) -> None:
    home, a, b = on_trial(tmp_path)
    release_b = (home / "releases" / b).resolve()
    assert launch_root(home, tmp_path, 500.0) == release_b
    with Releases(home) as rel:
        assert rel.trial().starts == 1  # type: ignore[union-attr]
    # The exec'ed release asks again: it already runs that root, nothing is counted.
    assert launch_root(home, release_b, 501.0) is None
    # A second start of the launcher means the first one never came up: roll back.
    assert launch_root(home, tmp_path, 502.0) == (home / "releases" / str(a)).resolve()
    with Releases(home) as rel:
        assert rel.trial() is None
        assert rel.current(SELF) == a and rel.failed(SELF, b) == "crashed on start"


def test_launch_root_rolls_back_after_the_deadline(tmp_path: Path) -> None:
    home, a, b = on_trial(tmp_path)
    assert launch_root(home, tmp_path, 1000.5) == (home / "releases" / str(a)).resolve()
    with Releases(home) as rel:
        assert rel.failed(SELF, b) == "did not come up healthy within the deadline"


def test_launch_root_back_to_the_installed_code(tmp_path: Path) -> None:
    home, _, b = on_trial(tmp_path, previous=False)
    assert launch_root(home, tmp_path, 2000.0) is None
    assert not os.path.lexists(home / "current")
    with Releases(home) as rel:
        assert rel.failed(SELF, b) == "did not come up healthy within the deadline"


def test_launch_root_boot_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, a, b = on_trial(tmp_path)
    with Releases(home) as rel:
        rel.end_trial(True)  # healthy: a later failed start does not roll it back
        monkeypatch.setenv(BOOT_FAILED_ENV, f"{b}:RuntimeError: later")
        assert launch_root(home, tmp_path, 0.0) == rel.path(b).resolve()
        assert BOOT_FAILED_ENV not in os.environ  # consumed, not passed on to builds
        rel.mark(SELF, b, "installed")
        monkeypatch.setenv(BOOT_FAILED_ENV, f"{'0' * 64}:RuntimeError: not current")
        assert launch_root(home, tmp_path, 0.0) == rel.path(b).resolve()
        monkeypatch.setenv(BOOT_FAILED_ENV, f"{b}:RuntimeError: boom")
        assert launch_root(home, tmp_path, 0.0) == rel.path(str(a)).resolve()
        assert rel.failed(SELF, b) == "RuntimeError: boom"


# ---------------------------------------------------------------------------- exec_argv


LAUNCHER_MAIN = """\
import os, sys
def main():
    print("LAUNCHER", os.environ.get("SWARMNODE_BOOT_FAILED"), sys.argv)
"""


def installed_launcher(tmp_path: Path) -> Path:
    """The installed code to fall back to: its CLI prints what it was started with."""
    launcher = tmp_path / "launcher"
    (launcher / "cli").mkdir(parents=True)
    (launcher / "cli" / "__init__.py").write_text("")
    (launcher / "cli" / "main.py").write_text(LAUNCHER_MAIN)
    return launcher


def test_exec_argv_runs_a_release_and_falls_back(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = installed_launcher(tmp_path)
    good, good_blob = build(tmp_path, {
        "cli/__init__.py": "",
        "cli/main.py": "import sys\ndef main():\n    print('GOOD', sys.argv)\n",
    })
    bad, bad_blob = build(tmp_path, {
        "cli/__init__.py": "",
        "cli/main.py": "raise RuntimeError('boom at import')\n",
    })
    home = tmp_path / "home"
    with Releases(home) as rel:
        good_root = rel.install(good, good_blob)
        bad_root = rel.install(bad, bad_blob)
        rel.switch(SELF, good)
        rel.switch(SELF, bad)
    env = {k: v for k, v in os.environ.items() if k != BOOT_FAILED_ENV}
    argv = ["join", "--home", str(home)]

    ok = subprocess.run(exec_argv(good_root, launcher, good, argv), capture_output=True,
                        text=True, env=env, cwd=tmp_path, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"GOOD {['swarmnode', *argv]}"

    broken = subprocess.run(exec_argv(bad_root, launcher, bad, argv), capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=30)
    assert broken.returncode == 0, broken.stderr
    failure = f"{bad}:RuntimeError: boom at import"
    assert broken.stdout.strip() == f"LAUNCHER {failure} {['swarmnode', *argv]}"
    assert "boom at import" in broken.stderr  # the traceback is not swallowed

    # What the launcher then does with it: roll the broken release back.
    monkeypatch.setenv(BOOT_FAILED_ENV, failure)
    assert launch_root(home, launcher, 0.0) == good_root.resolve()
    with Releases(home) as rel:
        assert rel.failed(SELF, bad) == "RuntimeError: boom at import"


def test_exec_argv_runs_the_node_alone_and_a_release_that_cannot_falls_back_through_the_cli(
        tmp_path: Path) -> None:
    launcher = installed_launcher(tmp_path)
    good, good_blob = build(tmp_path, {
        "swarmnode/__init__.py": "",
        "swarmnode/node.py": "import sys\ndef main(options):\n"
                             "    print('NODE', options, sys.argv, 'cli' in sys.modules)\n",
    })
    bad, bad_blob = build(tmp_path, {"swarmnode/__init__.py": "", "cli/__init__.py": ""})
    with Releases(tmp_path / "home") as rel:
        good_root = rel.install(good, good_blob)
        bad_root = rel.install(bad, bad_blob)
    env = {k: v for k, v in os.environ.items() if k != BOOT_FAILED_ENV}
    argv = ["join", "--fast"]

    ok = subprocess.run(exec_argv(good_root, launcher, good, argv, node='{"home": "/x"}'),
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"NODE {{\"home\": \"/x\"}} {['swarmnode', *argv]} False"

    broken = subprocess.run(exec_argv(bad_root, launcher, bad, argv, node='{"home": "/x"}'),
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.strip().startswith(f"LAUNCHER {bad}:ImportError")
    assert broken.stdout.strip().endswith(str(['swarmnode', *argv]))  # its CLI parses again


def test_exec_argv_without_a_launcher_to_fall_back_to(tmp_path: Path) -> None:
    digest, blob = build(tmp_path, {"cli/__init__.py": "", "cli/main.py": "raise KeyError(1)\n"})
    with Releases(tmp_path / "home") as rel:
        root = rel.install(digest, blob)
    argv = exec_argv(root, root, digest, ["status"])
    # An empty digest means "this is the launcher itself": a failure is just a failure.
    argv[argv.index(digest)] = ""
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert done.returncode == 1 and "KeyError" in done.stderr
