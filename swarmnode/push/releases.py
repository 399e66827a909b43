"""Installed releases on one node and the atomic switch between them.

Layout under the node's home::

    releases/<digest>/   an extracted bundle, named by the sha256 of the bundle's bytes
    current              symlink -> releases/<digest>: swarmnode's own code (the self-update)
    apps/NAME            symlink -> ../releases/<digest>: any other pushed app
    releases.db          switch history, release status, the self-update trial (SQLite)

Why this shape:

* The links are the truth about what runs; the database is the memory of how it got there
  (what came before, what failed). A switch makes a temp link and `os.replace`s it over the
  old one, so every reader sees the old or the new target, never no link. Targets are
  relative, so a home that is moved or mounted elsewhere still works.
* A release directory is complete or absent (see `bundle.extract_bundle`), so "installed" is
  simply "the directory exists", and installing twice is free.
* A node remembers which releases were rolled back here, so it never retries one that
  failed on this machine, and it keeps the release it came from until a newer one is proven.
* swarmnode's own update must survive the new code failing to start at all: the *installed*
  code (the launcher) decides what to run with `launch_root` before importing the node, and
  rolls a release back when its trial runs out or it crashed on start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from swarmnode.db import open_db, transaction
from swarmnode.files import fsync_dir
from swarmnode.push.bundle import NAME_RE, SELF_APP, extract_bundle

__all__ = [
    "BOOT_FAILED_ENV",
    "CURRENT_LINK",
    "LAUNCHER_ENV",
    "MAX_TRIAL_STARTS",
    "SNIPPET",
    "STATUSES",
    "ReleaseError",
    "Releases",
    "Trial",
    "check_app",
    "check_digest",
    "exec_argv",
    "is_digest",
    "launch_root",
]

log = logging.getLogger(__name__)

DB_FILE = "releases.db"
RELEASES_DIR = "releases"
APPS_DIR = "apps"
CURRENT_LINK = "current"
STATUSES = ("installed", "healthy", "rolled_back")
#: Set by a release whose start failed, as "DIGEST:reason", for the launcher it re-execs.
BOOT_FAILED_ENV = "SWARMNODE_BOOT_FAILED"
#: Where the installed code (the launcher) lives, set by the first process of a node and
#: inherited across its execs, so a release can always fall back to it.
LAUNCHER_ENV = "SWARMNODE_LAUNCHER"
#: A release on trial gets one start: a second start before it was found healthy means the
#: first one crashed (or hung and was killed), and looping on a broken release helps nobody.
MAX_TRIAL_STARTS = 2
#: Releases younger than this are never pruned: one may have just been installed for a switch
#: that has not happened yet (seconds), and ten minutes costs only disk.
PRUNE_MIN_AGE = 600.0
#: Leftovers of an extraction or deletion that crashed are removed after a day.
STALE_TMP_AGE = 24 * 3600.0

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS switches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    digest TEXT,            -- NULL: the link was removed (back to the installed code)
    previous TEXT,          -- what the link named before, NULL when there was none
    switched_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS switches_by_app ON switches (app, id);
CREATE TABLE IF NOT EXISTS status (
    app TEXT NOT NULL,
    digest TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL,
    PRIMARY KEY (app, digest)
);
CREATE TABLE IF NOT EXISTS trial (
    id INTEGER PRIMARY KEY CHECK (id = 1),   -- at most one self-update on trial
    digest TEXT NOT NULL,
    previous TEXT,
    deadline REAL NOT NULL,
    starts INTEGER NOT NULL DEFAULT 0
);
"""


class ReleaseError(ValueError):
    """A bad app name or digest, a release that is not installed, or a garbled link."""


@dataclass(frozen=True)
class Trial:
    """swarmnode's own new release, running on probation until it reports healthy."""

    digest: str
    previous: str | None  # the release to go back to; None: the installed code
    deadline: float  # wall clock: not healthy by then means roll back
    starts: int  # times the launcher started it


def is_digest(value: str) -> bool:
    return _DIGEST_RE.fullmatch(value) is not None


def check_digest(digest: object) -> str:
    if type(digest) is not str or _DIGEST_RE.fullmatch(digest) is None:
        raise ReleaseError(f"not a sha256 hex digest: {digest!r:.80}")
    return digest


def check_app(app: object) -> str:
    if type(app) is not str or NAME_RE.fullmatch(app) is None:
        raise ReleaseError(f"bad app name {app!r:.80}: 1-28 characters of [A-Za-z0-9._-]")
    return app


class Releases:
    """The releases installed in `home` and which one each app runs."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.dir = self.home / RELEASES_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db: sqlite3.Connection = open_db(self.home / DB_FILE, SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Releases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- releases

    def path(self, digest: str) -> Path:
        return self.dir / check_digest(digest)

    def installed(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def install(self, digest: str, blob: Path) -> Path:
        """Extract the bundle `blob`, verified against `digest`, as `releases/<digest>`."""
        dest = self.path(digest)
        if not dest.is_dir():
            extract_bundle(Path(blob), dest, digest=digest)
            if not dest.is_dir():  # extract_bundle leaves whatever already sits there alone
                raise ReleaseError(f"{dest}: exists and is not a release directory")
        with contextlib.suppress(OSError):
            os.utime(dest)  # fresh: `prune` spares it until it is switched to
        return dest

    def link(self, app: str) -> Path:
        """Where the app's symlink lives."""
        if check_app(app) == SELF_APP:
            return self.home / CURRENT_LINK
        return self.home / APPS_DIR / app

    def _target(self, app: str, digest: str) -> str:
        return f"{RELEASES_DIR}/{digest}" if app == SELF_APP else f"../{RELEASES_DIR}/{digest}"

    def linked(self, app: str) -> str | None:
        """The digest the app's link names (installed or not); None when there is no link.

        ReleaseError when something else sits where the link should be, or it names no
        release: a person has to look at that, guessing would be worse.
        """
        link = self.link(app)
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ReleaseError(f"{link}: not a symlink ({e.strerror})") from None
        digest = os.path.basename(target)
        if target != self._target(app, digest) or _DIGEST_RE.fullmatch(digest) is None:
            raise ReleaseError(f"{link} -> {target}: not a link to a release")
        return digest

    def problem(self, app: str) -> str | None:
        """Why the app has no usable current release although something is at its link."""
        try:
            digest = self.linked(app)
        except ReleaseError as e:
            return str(e)
        if digest is not None and not self.installed(digest):
            return f"{self.link(app)} -> release {digest}, which is not installed (dangling)"
        return None

    def current(self, app: str) -> str | None:
        """The release the app's link points at; None without a usable one (see `problem`)."""
        try:
            digest = self.linked(app)
        except ReleaseError:
            return None
        return digest if digest is not None and self.installed(digest) else None

    def previous(self, app: str) -> str | None:
        """The most recent release the app ran before the current one that could run again.

        Still installed and not rolled back here: after a rollback the failed release is not
        "previous", the one before it is.
        """
        now = self.linked_or_none(app)
        rows = self.db.execute("SELECT digest, previous FROM switches WHERE app = ? "
                               "ORDER BY id DESC", (check_app(app),)).fetchall()
        for row in rows:
            for digest in row:
                if (digest is not None and digest != now and self.installed(digest)
                        and self.failed(app, digest) is None):
                    return str(digest)
        return None

    def linked_or_none(self, app: str) -> str | None:
        """`linked`, with a garbled link read as no link (for callers that must not fail)."""
        try:
            return self.linked(app)
        except ReleaseError:
            return None

    def switched_at(self, app: str) -> float | None:
        row = self.db.execute("SELECT switched_at FROM switches WHERE app = ? "
                              "ORDER BY id DESC LIMIT 1", (check_app(app),)).fetchone()
        return None if row is None else float(row[0])

    def history(self, app: str) -> list[tuple[str | None, str | None, float]]:
        """(digest, previous, switched_at) of every switch of the app, oldest first."""
        return [(d, p, float(t)) for d, p, t in self.db.execute(
            "SELECT digest, previous, switched_at FROM switches WHERE app = ? ORDER BY id",
            (check_app(app),))]

    def apps(self) -> list[str]:
        """Every app with a link or a recorded switch."""
        names = {row[0] for row in self.db.execute("SELECT DISTINCT app FROM switches")}
        if os.path.lexists(self.home / CURRENT_LINK):
            names.add(SELF_APP)
        with contextlib.suppress(FileNotFoundError):
            names.update(n for n in os.listdir(self.home / APPS_DIR) if NAME_RE.fullmatch(n))
        return sorted(names)

    # ------------------------------------------------------------------------- switching

    def switch(self, app: str, digest: str) -> str | None:
        """Point the app at the installed release `digest`; the digest it named before."""
        if not self.installed(digest):
            raise ReleaseError(f"release {digest} is not installed in {self.dir}")
        with transaction(self.db):  # also orders switches made by other processes
            return self._switch(app, digest)

    def _switch(self, app: str, digest: str | None) -> str | None:
        """Repoint (or, with None, remove) the link and record it; inside a transaction."""
        old = self.linked_or_none(app)
        link = self.link(app)
        if digest is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
        else:
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
            os.symlink(self._target(app, digest), tmp)
            try:
                os.replace(tmp, link)  # atomic: readers see the old link or the new one
            except OSError as e:
                os.unlink(tmp)
                raise ReleaseError(f"{link}: cannot replace it with a link ({e.strerror})") \
                    from None
        fsync_dir(link.parent)
        self.db.execute("INSERT INTO switches (app, digest, previous, switched_at) "
                        "VALUES (?, ?, ?, ?)", (app, digest, old, time.time()))
        if digest is not None:
            self.db.execute("INSERT OR IGNORE INTO status (app, digest, status, reason, at) "
                            "VALUES (?, ?, 'installed', '', ?)", (app, digest, time.time()))
        return old

    def mark(self, app: str, digest: str, status: str, reason: str = "") -> None:
        if status not in STATUSES:
            raise ReleaseError(f"unknown status {status!r}; expected one of {STATUSES}")
        with transaction(self.db):
            self._mark(check_app(app), check_digest(digest), status, reason)

    def _mark(self, app: str, digest: str, status: str, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO status (app, digest, status, reason, at) "
                        "VALUES (?, ?, ?, ?, ?)", (app, digest, status, reason, time.time()))

    def status(self, app: str, digest: str) -> tuple[str, str] | None:
        """(status, reason) of the release for the app on this node, None if never seen."""
        row = self.db.execute("SELECT status, reason FROM status WHERE app = ? AND digest = ?",
                              (check_app(app), check_digest(digest))).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def rolled_back(self, limit: int) -> list[tuple[str, str, float]]:
        """(app, digest, when) of the `limit` newest releases rolled back here, one per app."""
        return [(str(a), str(d), float(t)) for a, d, t in self.db.execute(
            "SELECT app, digest, MAX(at) FROM status WHERE status = 'rolled_back' "
            "GROUP BY app ORDER BY MAX(at) DESC LIMIT ?", (limit,))]

    def failed(self, app: str, digest: str) -> str | None:
        """Why the release was rolled back on this node, or None if it was not."""
        st = self.status(app, digest)
        return st[1] if st is not None and st[0] == "rolled_back" else None

    def rollback(self, app: str, reason: str) -> str | None:
        """Switch the app back to `previous` and mark the abandoned release rolled back; the
        digest now current. With nothing to go back to (the app's first release failed) the
        link is removed: None, and a broken first release does not stay live."""
        with transaction(self.db):
            return self._rollback_to(app, self.previous(app), reason)

    def _rollback_to(self, app: str, target: str | None, reason: str) -> str | None:
        abandoned = self.linked_or_none(app)
        self._switch(app, target)
        if abandoned is not None:
            self._mark(app, abandoned, "rolled_back", reason)
        log.warning("rolled %s back from %s to %s: %s", app, abandoned, target, reason)
        return target

    def prune(self, keep: int = 3, min_age: float = PRUNE_MIN_AGE) -> list[str]:
        """Delete releases no app needs; the digests deleted.

        Kept: each app's current and previous release, the last `keep` distinct releases of
        each app's history, the self-update trial's two, and anything younger than `min_age`.
        """
        if keep < 1:
            raise ReleaseError("prune: keep must be at least 1")
        removed: list[str] = []
        with transaction(self.db):
            needed: set[str] = set()
            for app in self.apps():
                needed.update(d for d in (self.linked_or_none(app), self.previous(app)) if d)
                recent: list[str] = []
                for (digest,) in self.db.execute("SELECT digest FROM switches WHERE app = ? "
                                                 "AND digest IS NOT NULL ORDER BY id DESC",
                                                 (app,)):
                    if digest not in recent:
                        recent.append(digest)
                    if len(recent) >= keep:
                        break
                needed.update(recent)
            trial = self.trial()
            if trial is not None:
                needed.update(d for d in (trial.digest, trial.previous) if d)
            now = time.time()
            for name in sorted(os.listdir(self.dir)):
                path = self.dir / name
                age = now - path.lstat().st_mtime
                if name.startswith(".") and name.endswith((".part", ".trash")):
                    if age > STALE_TMP_AGE:
                        shutil.rmtree(path, ignore_errors=True)
                    continue
                if _DIGEST_RE.fullmatch(name) is None or name in needed or age < min_age:
                    continue
                # Renamed first: a half-deleted tree must never look like an installed release.
                trash = self.dir / f".{name}.{uuid.uuid4().hex}.trash"
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
        if removed:
            fsync_dir(self.dir)
        return removed

    # ------------------------------------------------------------------ self-update trial

    def begin_trial(self, digest: str, previous: str | None, deadline: float) -> Trial:
        """Put swarmnode's release `digest` on trial until `deadline` (replacing any other)."""
        check_digest(digest)
        if previous is not None:
            check_digest(previous)
        with transaction(self.db):
            self.db.execute("INSERT OR REPLACE INTO trial (id, digest, previous, deadline, "
                            "starts) VALUES (1, ?, ?, ?, 0)", (digest, previous, float(deadline)))
        return Trial(digest, previous, float(deadline), 0)

    def trial(self) -> Trial | None:
        row = self.db.execute("SELECT digest, previous, deadline, starts FROM trial").fetchone()
        return None if row is None else Trial(row[0], row[1], float(row[2]), int(row[3]))

    def note_start(self) -> Trial | None:
        """Count one start of the release on trial; the trial after it (None if none open)."""
        with transaction(self.db):
            self.db.execute("UPDATE trial SET starts = starts + 1")
            return self.trial()

    def end_trial(self, healthy: bool, reason: str = "") -> str | None:
        """Close the trial; unhealthy goes back to the trial's previous release.

        The digest swarmnode now runs (None: the installed code). A trial whose previous is
        None came from the installed code, so failing it removes the `current` link. Nothing
        happens without an open trial.
        """
        with transaction(self.db):
            trial = self.trial()
            if trial is None:
                return self.current(SELF_APP)
            self.db.execute("DELETE FROM trial")
            if healthy:
                self._mark(SELF_APP, trial.digest, "healthy", reason)
                return self.current(SELF_APP)
            if self.linked_or_none(SELF_APP) != trial.digest:  # switched away meanwhile
                self._mark(SELF_APP, trial.digest, "rolled_back", reason)
                return self.current(SELF_APP)
            target = trial.previous
            if target is not None and not self.installed(target):
                target = None
            return self._rollback_to(SELF_APP, target, reason or "trial failed")


# ------------------------------------------------------------------------------ launching


def launch_root(home: Path, running_root: Path, now: float) -> Path | None:
    """The release directory a starting node must exec into, or None to go on as it is.

    Called by the installed code (`swarmnode join`) before it imports the node, and again by
    the exec'ed release (where the answer is None: it is already running that root). Rolls
    back first when the release on trial ran out of time, crashed on start, or reported
    `SWARMNODE_BOOT_FAILED`; a dangling or garbled `current` means the installed code.
    """
    if not os.path.lexists(Path(home) / CURRENT_LINK):
        return None
    running = Path(running_root).resolve()
    with Releases(home) as rel:
        boot_failed = os.environ.pop(BOOT_FAILED_ENV, "")
        if boot_failed:
            _boot_failed(rel, boot_failed)
        trial = rel.trial()
        linked = rel.linked_or_none(SELF_APP)
        if trial is not None and trial.digest == linked:
            if now > trial.deadline:
                rel.end_trial(False, "did not come up healthy within the deadline")
            elif rel.path(trial.digest).resolve() != running:
                noted = rel.note_start()
                if noted is not None and noted.starts >= MAX_TRIAL_STARTS:
                    rel.end_trial(False, "crashed on start")
        digest = rel.current(SELF_APP)
        if digest is None:
            problem = rel.problem(SELF_APP)
            if problem:
                log.warning("running the installed code: %s", problem)
            return None
        root = rel.path(digest).resolve()
        return None if root == running else root


def _boot_failed(rel: Releases, value: str) -> None:
    """Roll back the release a failed start named, if it is still current and not proven."""
    digest, _, reason = value.partition(":")
    reason = reason.strip() or "failed to start"
    if _DIGEST_RE.fullmatch(digest) is None or rel.linked_or_none(SELF_APP) != digest:
        return
    status = rel.status(SELF_APP, digest)
    if status is not None and status[0] == "healthy":
        # It ran fine before: a later crash is not a bad release, and flapping would be worse.
        log.warning("release %s failed to start (%s) but was healthy; keeping it", digest, reason)
        return
    trial = rel.trial()
    if trial is not None and trial.digest == digest:
        rel.end_trial(False, reason)
        return
    with transaction(rel.db):
        # Nothing to go back to means the installed code: keeping the link would start the
        # broken release again and again.
        rel._rollback_to(SELF_APP, rel.previous(SELF_APP), reason)


#: Runs `swarmnode.node.main(node)` (given the node's options) or else `cli.main.main()` from
#: a release; if that cannot even start, re-execs the launcher (the installed code) with
#: SWARMNODE_BOOT_FAILED so it rolls the release back, through the CLI.
#: argv: root, launcher, digest, node, then the command's own arguments. Stdlib only.
SNIPPET = """\
import os, sys
root, launcher, digest, node = sys.argv[1:5]
args = sys.argv[5:]
sys.path[:] = [root] + [p for p in sys.path if p]
sys.argv = ["swarmnode", *args]
try:
    if node:
        from swarmnode.node import main
        main(node)
    else:
        from cli.main import main
        main()
except Exception as e:
    if not digest:
        raise
    import traceback
    traceback.print_exc()
    os.environ["SWARMNODE_BOOT_FAILED"] = f"{digest}:{type(e).__name__}: {e}"[:1000]
    code = sys.orig_argv[sys.orig_argv.index("-c") + 1]
    flags = sys.orig_argv[1:sys.orig_argv.index("-c")]
    os.execv(sys.executable, [sys.executable, *flags, "-c", code, launcher, launcher, "", "",
                              *args])
"""


def exec_argv(root: Path, launcher: Path, digest: str, argv: list[str],
              node: str = "") -> list[str]:
    """The argv to `os.execv` for running swarmnode from release `root`.

    `launcher` is the installed code to fall back to (with `SWARMNODE_BOOT_FAILED` naming
    `digest`) when the release raises anything but SystemExit; an empty `digest` runs the
    launcher itself (no fallback); `argv` is what typer sees. `node`, the node's options as
    JSON (`NodeOptions.to_json`), runs the node without the CLI; `argv` is then the command
    line a restart or a fallback parses again. The interpreter's flags are kept (`-I`: the
    service runs isolated from the environment).
    """
    flags = subprocess._args_from_interpreter_flags()
    return [sys.executable, *flags, "-c", SNIPPET, str(root), str(launcher),
            check_digest(digest) if digest else "", node, *argv]
