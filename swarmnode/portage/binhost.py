"""The binary package host: packages go in through Portage's own code, a catalog says which
package key each one was built for, a retention policy bounds it, HTTP reads are checked here.

Ingest (`Binhost.ingest`): the package a job produced is copied to `<root>/.incoming/` and
handed to swarmnode/portage/bintree_tool.py under the Python that runs this node's `emerge`,
with PKGDIR=<root>. Portage gives it a new build id (binpkg-multi-instance: every job's fresh
PKGDIR made it 1), writes that id into the package, signs it when a key is configured, and
`bintree.inject` moves it into place and rewrites `Packages`: one ingest at a time.

Retention (`expired`): the newest `keep` builds per CAT/PN and SLOT stay. Per slot, not per
version: a version bump must let old versions go (per version, every version ever built would
stay for good), while parallel slots (python:3.11 and :3.12) are different packages to a user.

The catalog (`Catalog`, SQLite) maps a package key -- an opaque string the submitter made from
cpv, USE, build-environment fingerprint and slot-operator bindings -- to the instance built
for it and the sha256 of the file as the job produced it (pinned in the artifact store, so any
member can fetch it by digest).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from net.addresses import split_hostport
from swarmnode.build.executor import NICENESS
from swarmnode.db import open_db, transaction
from swarmnode.portage.host import PortageError, PortageHost

#: The job env variable that carries a package's key (set by the submitter of an emerge).
PACKAGE_KEY_ENV = "SWARMNODE_PACKAGE_KEY"
MAX_KEY = 128
#: Keys in one `binhost.query`: its reply (key, path, digest per key, at most ~460 bytes) must
#: fit one 1 MiB wire frame; `query_binhost` splits longer lists.
MAX_QUERY_KEYS = 2000
#: A path below the binhost directory (CAT/PN/PF-BUILDID.gpkg.tar) in a reply.
MAX_PATH = 255
#: Portage's binary package formats (xpak-era and GPKG), and its index files.
BINARY_PACKAGES = (".tbz2", ".xpak", ".gpkg.tar")
INDEX_FILES = ("Packages", "Packages.gz")
INCOMING = ".incoming"
TOOL = Path(__file__).with_name("bintree_tool.py")
_SHA256 = re.compile(r"[0-9a-f]{64}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packages (
    path TEXT PRIMARY KEY,
    key TEXT,
    digest TEXT NOT NULL,
    build_id INTEGER,
    cpv TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS packages_key ON packages(key);
"""


class BinhostError(RuntimeError):
    """An ingest, a prune or a query failed; the message says which step and why."""


@dataclass(frozen=True)
class Signing:
    """The swarm's GPG key: gpkg packages are signed with it before they are indexed."""

    home: Path
    key: str

    def env(self) -> dict[str, str]:
        """Portage's signing settings, and verification of the new signature with the same
        keyring as this user (Portage would verify as `nobody`, who cannot read it)."""
        gpg = shutil.which("gpg") or "/usr/bin/gpg"
        return {"BINPKG_GPG_SIGNING_GPG_HOME": str(self.home),
                "BINPKG_GPG_SIGNING_KEY": self.key,
                # one ingest at a time: no flock on /run/lock, which a Prefix may not have
                "BINPKG_GPG_SIGNING_BASE_COMMAND": f"{gpg} --sign --armor [PORTAGE_CONFIG]",
                "BINPKG_GPG_VERIFY_GPG_HOME": str(self.home),
                "GPG_VERIFY_USER_DROP": "", "GPG_VERIFY_GROUP_DROP": ""}


@dataclass(frozen=True)
class Ingested:
    path: str  # below the binhost directory
    cpv: str
    build_id: int | None  # None: kept without Portage, not indexed


@dataclass(frozen=True)
class Pruned:
    removed: tuple[str, ...] = ()  # paths below the binhost directory
    unused: frozenset[str] = frozenset()  # digests no kept instance was built from any more
    refused: tuple[str, ...] = ()  # expired, but not indexed regular files inside: left alone


@dataclass(frozen=True)
class Instance:
    path: str
    cp: str
    slot: str
    build_id: int
    build_time: int


def expired(instances: Iterable[Instance], keep: int) -> list[str]:
    """The paths beyond the newest `keep` builds of each CAT/PN:SLOT (newest by build time,
    then build id)."""
    groups: dict[tuple[str, str], list[Instance]] = {}
    for inst in instances:
        groups.setdefault((inst.cp, inst.slot), []).append(inst)
    old: list[str] = []
    for group in groups.values():
        group.sort(key=lambda i: (i.build_time, i.build_id), reverse=True)
        old += [i.path for i in group[keep:]]
    return sorted(old)


def valid_key(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_KEY and value.isprintable()


def package_key(env: Mapping[str, Any]) -> str | None:
    """A job's package key (from its env), if it has a valid one."""
    key = env.get(PACKAGE_KEY_ENV)
    return key if valid_key(key) else None


def parse_keys(value: Any) -> tuple[list[str], int]:
    """The valid, distinct keys of a query and how many were dropped; BinhostError when it is
    not a list of at most MAX_QUERY_KEYS."""
    if not isinstance(value, list) or len(value) > MAX_QUERY_KEYS:
        raise BinhostError(f"keys: expected a list of at most {MAX_QUERY_KEYS}")
    keys = [k for k in value if valid_key(k)]
    return list(dict.fromkeys(keys)), len(value) - len(keys)


def parse_found(value: Any, asked: set[str]) -> dict[str, tuple[str, str]]:
    """A query reply's `found` map, keeping only well-formed answers to keys that were asked."""
    if not isinstance(value, dict):
        raise BinhostError("found: expected a map")
    out: dict[str, tuple[str, str]] = {}
    for key, item in value.items():
        if (key in asked and isinstance(item, list) and len(item) == 2
                and _relative(item[0]) and isinstance(item[1], str)
                and _SHA256.fullmatch(item[1])):
            out[key] = (item[0], item[1])
    return out


def _relative(path: Any) -> bool:
    return (isinstance(path, str) and 0 < len(path) <= MAX_PATH and path.isprintable()
            and not path.startswith("/") and ".." not in path.split("/"))


def served_file(root: Path, raw_path: str) -> Path | None:
    """The file a GET of `raw_path` (the request target's path as sent, percent-encoded)
    serves: `Packages`, `Packages.gz` or a binary package, a regular file below `root` reached
    without a symlink. None for everything else: `..`, empty or hidden segments, backslashes,
    NUL, what still holds a `%` once decoded (double encoding), other files."""
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if not path.startswith("/") or any(c in path for c in "%\\\0"):
        return None
    parts = path[1:].split("/")
    if any(not p or p.startswith(".") for p in parts):
        return None
    name = parts[-1]
    if not (name.endswith(BINARY_PACKAGES) or (len(parts) == 1 and name in INDEX_FILES)):
        return None
    base = os.path.realpath(root)
    full = os.path.join(base, *parts)
    if os.path.realpath(full) != full or not os.path.isfile(full):
        return None
    return Path(full)


def binhost_url(listen: str, addresses: Iterable[str]) -> str:
    """What a client sets as PORTAGE_BINHOST for a listener on `listen` (HOST:PORT); a
    wildcard host is replaced by the node's first reported address."""
    host, port = split_hostport(listen, 0)
    if host in ("", "0.0.0.0", "::"):
        host = next((split_hostport(a, 0)[0] for a in addresses), "127.0.0.1")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Catalog:
    """Package key -> the instances built for it, in `<home>/binhost.db`."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record(self, key: str | None, path: str, digest: str, build_id: int | None,
               cpv: str, ts: float | None = None) -> None:
        with transaction(self._db) as db:
            db.execute("INSERT OR REPLACE INTO packages (path, key, digest, build_id, cpv, ts) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (path, key, digest, build_id, cpv, time.time() if ts is None else ts))

    def forget(self, paths: Iterable[str]) -> set[str]:
        """Drop the rows of removed instances; the digests no kept row refers to any more."""
        paths = list(paths)
        with transaction(self._db) as db:
            gone = {d for (d,) in _select(db, "SELECT digest FROM packages WHERE path IN ({})",
                                          paths)}
            db.executemany("DELETE FROM packages WHERE path = ?", [(p,) for p in paths])
            still = {d for (d,) in _select(db, "SELECT digest FROM packages WHERE digest IN ({})",
                                           sorted(gone))}
        return gone - still

    def lookup(self, keys: Iterable[str]) -> dict[str, tuple[str, str]]:
        """For each known key, (path, digest) of its newest instance."""
        newest: dict[str, tuple[float, int, str, str]] = {}
        rows = _select(self._db, "SELECT key, ts, build_id, path, digest FROM packages "
                                 "WHERE key IN ({})", list(keys))
        for key, ts, build_id, path, digest in rows:
            rank = (ts, build_id or 0, path, digest)
            if key not in newest or rank > newest[key]:
                newest[key] = rank
        return {k: (v[2], v[3]) for k, v in newest.items()}


def _select(db: sqlite3.Connection, sql: str, values: list[str]) -> list[tuple[Any, ...]]:
    """`sql` with its `IN ({})` over `values`, 500 at a time (SQLite's parameter limit)."""
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(values), 500):
        chunk = values[i:i + 500]
        rows += db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
    return rows


class Binhost:
    """One binhost directory: ingests (one at a time), retention, the catalog."""

    def __init__(self, root: Path, portage: PortageHost | None, catalog: Catalog, *,
                 keep: int, signing: Signing | None = None) -> None:
        self.root = root
        self.portage = portage
        self.catalog = catalog
        self.keep = keep
        self.signing = signing
        self._lock = asyncio.Lock()

    async def ingest(self, package: Path, *, name: str, digest: str,
                     key: str | None) -> Ingested:
        """Add `package` (a binary package file, sha256 `digest`, `name` its path below the
        job's PKGDIR) to the binhost and the catalog (`prune` applies retention after). Without
        Portage it is kept at `name` (never over another file) and not indexed: raises
        BinhostError saying so after keeping it."""
        async with self._lock:
            if self.portage is None:
                await asyncio.to_thread(self._keep_unindexed, package, name)
                self.catalog.record(key, name, digest, None, name)
                raise BinhostError(f"no Portage on this node: {name} kept, but no Packages "
                                   "index can be written (set `emerge` in config.toml)")
            staged = self.root / INCOMING / f"{uuid.uuid4().hex}{_suffix(name)}"
            staged.parent.mkdir(parents=True, exist_ok=True)
            try:
                await asyncio.to_thread(shutil.copyfile, package, staged)
                got = await self._tool("ingest", {"file": str(staged),
                                                  "sign": self.signing is not None})
            finally:
                staged.unlink(missing_ok=True)
            path, cpv, build_id = got.get("path"), got.get("cpv"), got.get("build_id")
            if not (_relative(path) and isinstance(cpv, str) and type(build_id) is int):
                raise BinhostError(f"the ingest answered {got!r:.200}")
            self.catalog.record(key, path, digest, build_id, cpv)
            return Ingested(path, cpv, build_id)

    def _keep_unindexed(self, package: Path, name: str) -> None:
        dest = self.root / name
        if not _relative(name) or dest.exists():
            raise BinhostError(f"no Portage on this node and {name!r} cannot be kept: taken "
                               "or not a plain path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package, dest)

    async def prune(self) -> Pruned:
        """Apply retention. Removes nothing unless Portage listed the instances, and each
        removal rewrites the index before the file goes (bintree.remove)."""
        async with self._lock:
            if self.portage is None:
                return Pruned()
            listed = (await self._tool("list", {})).get("instances")
            try:
                instances = [Instance(str(i["path"]), str(i["cp"]), str(i["slot"]),
                                      int(i["build_id"] or 0), int(i["build_time"] or 0))
                             for i in listed]  # type: ignore[union-attr]
            except (KeyError, TypeError, ValueError) as exc:
                raise BinhostError(f"the instance list is malformed: {exc}") from None
            old = expired(instances, self.keep)
            if not old:
                return Pruned()
            got = await self._tool("remove", {"paths": old})
            removed = tuple(p for p in got.get("removed", []) if p in old)
            refused = tuple(p for p in got.get("refused", []) if p in old)
            return Pruned(removed, frozenset(self.catalog.forget(removed)), refused)

    async def _tool(self, command: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run bintree_tool.py `command` under Portage's Python with PKGDIR = the binhost."""
        assert self.portage is not None
        env = self.portage.env(PKGDIR=str(self.root), **(self.signing.env() if self.signing
                                                          else {}))
        env.pop("FEATURES", None)  # the binhost host's make.conf decides, not our caller's env
        try:
            status, out, err = await self.portage.run(  # (niced as jobs are: it is
                ["nice", "-n", str(NICENESS), self.portage.python(), str(TOOL), command],
                stdin=json.dumps(request).encode(), env=env)  # background work beside them)
        except PortageError as exc:
            raise BinhostError(f"{command}: {exc}") from None
        try:
            answer = json.loads(out)
        except ValueError:
            answer = None
        if status != 0 or not isinstance(answer, dict) or "error" in answer:
            said = answer.get("error") if isinstance(answer, dict) else out[-300:]
            tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise BinhostError(f"{command} failed (exit {status}): {said}"
                               + (f"; {' / '.join(tail)}" if tail else ""))
        return answer


def _suffix(name: str) -> str:
    return next(s for s in BINARY_PACKAGES if name.endswith(s))
