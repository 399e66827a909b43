"""Deterministic, content-addressed bundles of a directory, and their safe extraction.

A bundle is a gzip-compressed tar whose bytes depend only on the directory's content: entries
sorted by path, owners, times and modes normalised, gzip header mtime 0. Its sha256 therefore
names the content, so two nodes that bundle the same tree agree on the digest, and a node can
tell "already installed" from the name alone.

A bundle arrives from another machine, so extraction trusts nothing in it: names, link targets,
member types, sizes and counts are checked before anything is written (on top of tarfile's
``data`` filter), the tree is built in a temporary directory next to the destination, fsynced
and renamed into place. A destination therefore holds a complete release or does not exist.

`PushSpec` is what a payload says about itself in ``swarmnode-push.toml``: its app name and the
commands that restart it and check its health after a switch.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import hashlib
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import tomllib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from swarmnode.files import fsync_dir, sync_tree

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_EXTRACTED_BYTES",
    "MAX_FILES",
    "SELF_APP",
    "SELF_INCLUDE",
    "SPEC_FILE",
    "BundleError",
    "BundleInfo",
    "PushSpec",
    "code_root",
    "extract_bundle",
    "file_digest",
    "load_spec",
    "make_bundle",
]

#: Largest bundle file accepted (compressed): a source tree is a few MB; 256 MiB leaves room
#: for payloads with data files while keeping a transfer to every node bounded.
MAX_BUNDLE_BYTES = 256 << 20
#: Most members (files, directories, links) in a bundle: a checkout of this project has a few
#: hundred; 20000 fits large payloads yet bounds the inodes a hostile bundle can create.
MAX_FILES = 20_000
#: Most bytes a bundle may expand to: gzip can reach ~1000:1, so without this a 256 MiB bundle
#: could fill a node's disk. 1 GiB is 4x the compressed cap, generous for real trees.
MAX_EXTRACTED_BYTES = 1 << 30
#: gzip level. Measured on this repository's 1.7 MB source tar: level 1 gives 513 KB in 17 ms,
#: level 6 gives 426 KB (17 % smaller) in 38 ms, level 9 gives 423 KB in 96 ms; decompression
#: is ~5 ms at every level. A bundle is compressed once per push but sent to and unpacked on
#: every node, so 6 wins: 20 ms once buys ~90 KB less on each of N transfers.
GZIP_LEVEL = 6

SPEC_FILE = "swarmnode-push.toml"
#: The app name of the self-update (swarmnode's own code); payloads may not take it.
SELF_APP = "swarmnode"
#: The top-level packages of swarmnode's own code, bundled by the self-update.
SELF_INCLUDE = ("swarmnode", "net", "cli")
#: Never worth shipping: caches and version-control or environment directories (the target's
#: venv is its own; a .git would ship history and possibly credentials).
SKIP_DIRS = frozenset({"__pycache__", ".git", ".venv"})
SKIP_SUFFIXES = (".pyc",)

#: Bounds for the spec's fields: a typo fails loudly instead of waiting for ever; the spec
#: travels inside a signed note (4 KiB, and gossip packets of 4 KiB), so commands stay short
#: (a longer one belongs in a script in the payload).
MAX_COMMAND = 1024
MAX_HEALTH_TIMEOUT = 3600.0
DEFAULT_HEALTH_TIMEOUT = 30.0
SPEC_KEYS = ("name", "restart", "health", "health_timeout")
#: App names become file names on every node (`<home>/apps/NAME`): a portable alphabet; and
#: the record fact `rel.NAME` that says what a node runs (fact keys are at most 32 long).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,27}")

_DIR_MODE = 0o755
_EXEC_MODE = 0o755
_FILE_MODE = 0o644
_BLOCK = 1 << 20
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: Tar headers and padding on top of the members' bytes: 512-byte header, a PAX header for
#: long names and padding to a block, per member (bounds what the decompressor may produce).
_PER_MEMBER_OVERHEAD = 4096


class BundleError(ValueError):
    """A tree that cannot be bundled, a bundle that cannot be trusted, or a bad push spec."""


@dataclass(frozen=True)
class BundleInfo:
    digest: str  # sha256 hex of the bundle file's bytes: the release's name
    size: int  # bytes of the bundle file
    files: int  # members: files, directories and symlinks


@dataclass(frozen=True)
class _Entry:
    rel: str  # posix path inside the bundle
    path: Path
    kind: str  # "dir", "file" or "link"
    mode: int
    size: int
    target: str = ""


def code_root() -> Path:
    """The directory holding the running `swarmnode`, `net` and `cli` packages."""
    import swarmnode

    return Path(swarmnode.__file__).resolve().parent.parent


def file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------------- making


def make_bundle(root: Path, out: Path, include: Sequence[str] | None = None) -> BundleInfo:
    """Bundle the tree under `root` (only its top-level entries `include`, if given) to `out`.

    `out` is written to a temp file next to it and renamed, so it is complete or absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory")
    tops = _top_entries(root, include)
    entries = sorted(_walk(root, tops), key=lambda e: e.rel)
    total = sum(e.size for e in entries)
    if total > MAX_EXTRACTED_BYTES:
        raise BundleError(f"{root}: {total} bytes of files exceed MAX_EXTRACTED_BYTES "
                          f"({MAX_EXTRACTED_BYTES})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = _CappedWriter(raw, MAX_BUNDLE_BYTES)
            with gzip.GzipFile(filename="", mode="wb", fileobj=sink,  # type: ignore[arg-type]
                               compresslevel=GZIP_LEVEL, mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for entry in entries:
                    _add(tar, entry)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)
    return BundleInfo(digest=sink.sha256.hexdigest(), size=sink.written, files=len(entries))


def _top_entries(root: Path, include: Sequence[str] | None) -> list[str]:
    if include is None:
        return sorted(name for name in os.listdir(root) if not _skipped(name))
    tops = sorted(set(include))
    for name in tops:
        if not name or "/" in name or name in (".", "..") or _skipped(name):
            raise BundleError(f"include: {name!r} is not a top-level entry name")
        if not os.path.lexists(root / name):
            raise BundleError(f"include: {root / name} does not exist")
    return tops


def _skipped(name: str) -> bool:
    return name in SKIP_DIRS or name.endswith(SKIP_SUFFIXES)


def _walk(root: Path, tops: list[str]) -> Iterator[_Entry]:
    """Every entry under the chosen top-level names, without following symlinks."""
    real_root = os.path.realpath(root)
    stack = list(tops)
    count = 0
    while stack:
        rel = stack.pop()
        path = root / rel
        count += 1
        if count > MAX_FILES:
            raise BundleError(f"{root}: more than MAX_FILES ({MAX_FILES}) entries")
        _check_name(rel, str(path))
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            yield _Entry(rel, path, "dir", _DIR_MODE, 0)
            stack.extend(f"{rel}/{name}" for name in os.listdir(path) if not _skipped(name))
        elif stat.S_ISREG(st.st_mode):
            mode = _EXEC_MODE if st.st_mode & 0o111 else _FILE_MODE
            yield _Entry(rel, path, "file", mode, st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            yield _Entry(rel, path, "link", 0o777, 0, _link_target(real_root, rel, path, tops))
        else:
            raise BundleError(f"{path}: not a file, directory or symlink (device, fifo or "
                              "socket); refusing to bundle it")


def _link_target(real_root: str, rel: str, path: Path, tops: list[str]) -> str:
    """The link's target if it is relative and lands inside the bundle, else BundleError."""
    target = os.readlink(path)
    if os.path.isabs(target):
        raise BundleError(f"{path}: symlink to an absolute path ({target}); only relative "
                          "links inside the bundle are kept")
    lexical = PurePosixPath(os.path.normpath(os.path.join(os.path.dirname(rel), target)))
    real = os.path.realpath(path)  # follows chains of links, as a reader on the node would
    inside = os.path.relpath(real, real_root)
    parts = PurePosixPath(inside).parts  # starts with ".." when it resolves outside the root
    if (lexical.parts[:1] == ("..",) or not parts or parts[0] not in tops
            or any(_skipped(p) for p in parts)):
        raise BundleError(f"{path}: symlink target {target!r} is outside the bundle")
    return target


def _check_name(rel: str, shown: str) -> None:
    if _CONTROL_RE.search(rel):
        raise BundleError(f"{shown!r}: control characters in a file name")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise BundleError(f"{shown!r}: file name is not valid UTF-8") from None


def _add(tar: tarfile.TarFile, entry: _Entry) -> None:
    info = tarfile.TarInfo(entry.rel)
    info.mode = entry.mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.kind == "link":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
        tar.addfile(info)
    else:
        # O_NOFOLLOW: a file swapped for a link after the walk must not pull in its target.
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{entry.path}: changed type while bundling")
            info.size = st.st_size
            try:
                tar.addfile(info, f)
            except OSError as e:  # tarfile raises on a file that shrank meanwhile
                raise BundleError(f"{entry.path}: changed while bundling ({e})") from None


class _CappedWriter:
    """Counts and hashes what passes to the bundle file; refuses to grow it past the cap."""

    def __init__(self, raw: BinaryIO, cap: int) -> None:
        self.raw = raw
        self.cap = cap
        self.written = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        n = len(data)
        if self.written + n > self.cap:
            raise BundleError(f"bundle exceeds MAX_BUNDLE_BYTES ({self.cap})")
        self.raw.write(data)
        self.sha256.update(data)
        self.written += n
        return n

    def flush(self) -> None:
        self.raw.flush()


# ------------------------------------------------------------------------------ extracting


def extract_bundle(blob: Path, dest: Path, *, digest: str | None = None) -> None:
    """Extract the bundle `blob` into the new directory `dest` (nothing if `dest` exists).

    With `digest`, the bytes are verified against it first and again while extracting, so a
    blob that changes under us is refused too. On any failure nothing is left at `dest`.
    """
    blob, dest = Path(blob), Path(dest)
    if os.path.lexists(dest):
        return
    with open(blob, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        if size > MAX_BUNDLE_BYTES:
            raise BundleError(f"{blob}: {size} bytes exceed MAX_BUNDLE_BYTES "
                              f"({MAX_BUNDLE_BYTES})")
        if digest is not None:
            got = hashlib.file_digest(raw, "sha256").hexdigest()
            if got != digest:
                raise BundleError(f"bundle digest mismatch: expected {digest}, got {got}")
            raw.seek(0)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
        try:
            hashing = _HashingReader(raw)
            _extract_into(hashing, tmp, str(blob))
            if digest is not None:
                hashing.drain()
                if hashing.sha256.hexdigest() != digest:
                    raise BundleError(f"{blob}: bundle changed while being extracted")
            _check_links(tmp)
            sync_tree(tmp)
            os.chmod(tmp, _DIR_MODE)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not os.path.isdir(dest):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # installed meanwhile by another process
                return
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    fsync_dir(dest.parent)


def _extract_into(raw: _HashingReader, tmp: Path, shown: str) -> None:
    limit = MAX_EXTRACTED_BYTES + MAX_FILES * _PER_MEMBER_OVERHEAD + _BLOCK
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:  # type: ignore[arg-type]
            stream = _BoundedReader(gz, limit)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                seen: dict[str, str] = {}  # path -> "dir", "file", "link" (implicit dirs too)
                total = 0
                for count, member in enumerate(tar, 1):
                    if count > MAX_FILES:
                        raise BundleError(f"{shown}: more than MAX_FILES ({MAX_FILES}) members")
                    name = _check_member(member, seen)
                    total += member.size
                    if total > MAX_EXTRACTED_BYTES:
                        raise BundleError(f"{shown}: member {name!r} takes the extracted size "
                                          f"past MAX_EXTRACTED_BYTES ({MAX_EXTRACTED_BYTES})")
                    tar.extract(member, tmp, filter="data")
            # Read to the end so gzip checks its CRC and length: a corrupt tail is refused too.
            while stream.read(_BLOCK):
                pass
    except tarfile.FilterError as e:
        raise BundleError(f"{shown}: refused member: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BundleError(f"{shown}: corrupt or truncated bundle ({e})") from None
    for d, _dirs, _files in os.walk(tmp):  # directories were created with default modes
        os.chmod(d, _DIR_MODE)


def _check_member(member: tarfile.TarInfo, seen: dict[str, str]) -> str:
    """The member's name if it is safe to extract (see the module docstring), else raise."""
    name = member.name
    path = PurePosixPath(name)
    if not name or name.startswith("/") or path.is_absolute():
        raise BundleError(f"member {name!r}: absolute path")
    if ".." in path.parts:
        raise BundleError(f"member {name!r}: '..' in path")
    if str(path) != name.rstrip("/") or name.startswith("./") or "\\" in name:
        raise BundleError(f"member {name!r}: path is not in normal form")
    _check_name(name, name)
    if member.islnk():
        raise BundleError(f"member {name!r}: hard links are refused")
    if member.issym():
        kind = "link"
        target = member.linkname
        joined = PurePosixPath(os.path.normpath(os.path.join(str(path.parent), target)))
        if not target or os.path.isabs(target) or joined.parts[:1] == ("..",):
            raise BundleError(f"member {name!r}: symlink to {target!r} leaves the tree")
    elif member.isdir():
        kind = "dir"
    elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "file"
    else:
        raise BundleError(f"member {name!r}: devices, fifos and other special files are "
                          "refused")
    if member.size < 0 or member.size > MAX_EXTRACTED_BYTES:
        raise BundleError(f"member {name!r}: {member.size} bytes exceed MAX_EXTRACTED_BYTES "
                          f"({MAX_EXTRACTED_BYTES})")
    key = str(path)
    if key in seen and not (kind == "dir" == seen[key]):
        raise BundleError(f"member {name!r}: appears twice")
    # Nothing may be written through a link or below a file: that is how extraction escapes.
    for parent in list(path.parents)[:-1]:
        pkind = seen.setdefault(str(parent), "dir")
        if pkind != "dir":
            raise BundleError(f"member {name!r}: parent {str(parent)!r} is a {pkind}")
    seen[key] = kind
    return key


def _check_links(tree: Path) -> None:
    """Every extracted link, resolved on disk through any chain, stays inside `tree`."""
    real_tree = os.path.realpath(tree)
    for d, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = os.path.join(d, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if os.path.commonpath([real, real_tree]) != real_tree:
                    rel = os.path.relpath(path, tree)
                    raise BundleError(f"member {rel!r}: symlink resolves outside the tree")


class _HashingReader:
    """Hashes the compressed bytes as the decompressor reads them."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(_BLOCK):
            pass


class _BoundedReader:
    """Refuses to decompress more than `limit` bytes: a gzip bomb stops here, not in RAM."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or self.count + n > self.limit:
            n = self.limit - self.count + 1  # one more than allowed tells a bomb from a fit
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise BundleError(f"bundle expands past MAX_EXTRACTED_BYTES ({MAX_EXTRACTED_BYTES})")
        return data


# ------------------------------------------------------------------------------- push spec


@dataclass(frozen=True)
class PushSpec:
    """How a payload is run: its app name, restart command, health check and its patience."""

    name: str
    restart: str | None = None  # shell command run after the switch (None: nothing to restart)
    health: str | None = None  # shell command, exit 0 = healthy (None: healthy once switched)
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT  # seconds the health check may take to pass

    def __post_init__(self) -> None:
        _check_spec(self.name, self.restart, self.health, self.health_timeout)

    def plain(self) -> dict[str, Any]:
        """A msgpack-able dict (the form sent to other nodes)."""
        return {"name": self.name, "restart": self.restart, "health": self.health,
                "health_timeout": float(self.health_timeout)}

    @classmethod
    def from_plain(cls, data: object) -> PushSpec:
        """The inverse of `plain`, strict: exact keys and types, else ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"push spec: expected a map, got {type(data).__name__}")
        if set(data) != set(SPEC_KEYS):
            raise ValueError(f"push spec: expected keys {sorted(SPEC_KEYS)}, "
                             f"got {sorted(map(str, data))}")
        return cls(name=data["name"], restart=data["restart"], health=data["health"],
                   health_timeout=data["health_timeout"])


def _check_spec(name: object, restart: object, health: object, timeout: object) -> None:
    if type(name) is not str or NAME_RE.fullmatch(name) is None:
        raise BundleError(f"name: {name!r} must be 1-28 characters of [A-Za-z0-9._-], "
                          "starting with a letter or digit")
    for key, value in (("restart", restart), ("health", health)):
        if value is None:
            continue
        if type(value) is not str or not value.strip():
            raise BundleError(f"{key}: must be a non-empty string (a shell command)")
        if len(value) > MAX_COMMAND or "\x00" in value:
            raise BundleError(f"{key}: longer than {MAX_COMMAND} characters or contains NUL")
    if type(timeout) not in (int, float) or not math.isfinite(timeout):  # type: ignore[arg-type]
        raise BundleError(f"health_timeout: must be a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_HEALTH_TIMEOUT:  # type: ignore[operator]
        raise BundleError(f"health_timeout: {timeout!r} is not in (0, {MAX_HEALTH_TIMEOUT:g}]")


def load_spec(root: Path) -> PushSpec:
    """The spec of the payload at `root`: its `swarmnode-push.toml`, or defaults without one."""
    root = Path(root)
    path = root / SPEC_FILE
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{SPEC_FILE}: {e}") from None
    for key in data:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BundleError(f"{SPEC_FILE}: unknown key {key!r}{hint}")
    name = data.get("name", root.resolve().name)
    if name == SELF_APP:
        raise BundleError(f"{SPEC_FILE}: name: {SELF_APP!r} is reserved for swarmnode's own "
                          "code; set another name")
    timeout = data.get("health_timeout", DEFAULT_HEALTH_TIMEOUT)
    if type(timeout) is bool:
        raise BundleError(f"{SPEC_FILE}: health_timeout: must be a number of seconds")
    try:
        return PushSpec(name=name, restart=data.get("restart"), health=data.get("health"),
                        health_timeout=float(timeout) if type(timeout) is int else timeout)
    except BundleError as e:
        hint = " (set `name` in the file)" if "name" not in data and str(e).startswith("name") \
            else ""
        raise BundleError(f"{SPEC_FILE}: {e}{hint}") from None
