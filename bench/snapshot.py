"""Run a benchmark against one commit, not against a working tree that may change meanwhile.

A benchmark takes minutes, and node processes started at different moments import whatever
source is on disk at that moment: edits made during a run would mix versions in one cluster.
So by default a benchmark re-executes itself on a clean `git archive` of HEAD, unpacked in
/tmp/swarmnode-bench/src-<commit>, with PYTHONPATH pointing there (it takes precedence over
the editable install, so the `swarmnode` command and every import use the snapshot).
`--worktree` skips this and measures the working tree as it is.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENV = "SWARMNODE_BENCH_SRC"
BASE = Path("/tmp/swarmnode-bench")


def source() -> Path:
    """The source tree this process measures (the snapshot, or the repository itself)."""
    return Path(os.environ.get(ENV, str(REPO)))


def commit(src: Path | None = None) -> str:
    """The commit the source tree is (a snapshot records it in COMMIT)."""
    src = src or source()
    marker = src / "COMMIT"
    if marker.exists():
        return marker.read_text().strip()
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return out + ("+worktree-changes" if dirty else "")


def unpack(rev: str) -> Path:
    """A clean snapshot of commit `rev` (any name git knows: HEAD, HEAD~1, a hash), unpacked
    once in BASE/src-<short hash>, with its hash in COMMIT."""
    rev = subprocess.run(
        ["git", "rev-parse", "--short", f"{rev}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dest = BASE / f"src-{rev}"
    if not (dest / "COMMIT").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", rev], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / "COMMIT").write_text(rev + "\n")
    # with bytecode, as an install has: each node started would otherwise compile its code
    # again where bytecode writes are off (0.3 s of CPU per start)
    compileall.compile_dir(dest, quiet=1)
    return dest


def env_for(dest: Path) -> dict[str, str]:
    """This process's environment for a child that measures the snapshot in `dest`: the
    snapshot first on PYTHONPATH (before the editable install), and marked as one."""
    env = dict(os.environ)
    env[ENV] = str(dest)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(dest), env.get("PYTHONPATH")) if p)
    return env


def reexec_on_head(argv: list[str]) -> None:
    """Unless already on a snapshot (or --worktree was given), re-run this script on HEAD."""
    if ENV in os.environ or "--worktree" in argv:
        return
    dest = unpack("HEAD")
    env = env_for(dest)
    print(f"benchmarking commit {commit(dest)} (snapshot in {dest})", flush=True)
    script = str(Path(sys.argv[0]).resolve())
    os.execve(sys.executable, [sys.executable, script, *argv], env)


def lab_parser(doc: str, name: str, *, swarmnode: bool = True) -> argparse.ArgumentParser:
    """The options every lab benchmark takes: `--worktree` (see `reexec_on_head`), `--out`
    (BASE/NAME.json) and, for those that run nodes, `--swarmnode` (the command)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--worktree", action="store_true",
                    help="measure the working tree instead of a snapshot of HEAD")
    ap.add_argument("--out", type=Path, default=BASE / f"{name}.json")
    if swarmnode:
        ap.add_argument("--swarmnode", default=str(Path(sys.executable).parent / "swarmnode"))
    return ap


def write_result(out: Path, res: dict[str, Any]) -> None:
    """A benchmark's figures as JSON at `out`, and where they went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"JSON: {out}")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU time of process `pid` so far, from /proc (with its reaped children: the jobs or
    hooks it ran)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15 if children else 13]) / os.sysconf("SC_CLK_TCK")


def is_root() -> bool:
    """Lab benchmarks make network namespaces: say so and give up without root."""
    if os.geteuid() == 0:
        return True
    print("needs root (network namespaces)", file=sys.stderr)
    return False
