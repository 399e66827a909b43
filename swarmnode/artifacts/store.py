"""Content-addressed artifact store: every object is named by the sha256 of its bytes.

Layout under the root (0700, normally ``<home>/artifacts``)::

    objects/ab/cdef...     the object whose digest is "abcdef..." (0644)
    tmp/*.part             objects being written; invisible until complete
    quarantine/            objects that failed re-verification, kept for inspection
    pins/<owner>/<digest>  empty files: `owner` still needs `digest`, so gc keeps it
    lock                   flock: gc takes it exclusive; put and pin take it shared

Why this shape:

* An object is written to a uniquely named temp file in the same filesystem, fsynced, then
  renamed into place (and its directory fsynced). Readers therefore see a complete object or
  none; a crash leaves at most a stale ``tmp/*.part`` that `gc` removes later. Two stores on
  the same directory (two processes, or two instances in one) never share a temp name, and a
  rename over an identical object is harmless, so they cannot corrupt each other.
* Storing an existing object is a no-op (stored once), but it refreshes the object's mtime:
  `gc` spares objects younger than `min_age`, which covers the gap between "stored" and
  "pinned" in a caller. Pins live on disk so they survive restarts and are seen by every
  store on the directory; the lock makes "is it pinned?" and "delete it" one step for gc.
* Objects are never modified in place. `export` hard-links when it can, so a consumer must
  replace an exported file rather than write into it (`verify` would catch it and quarantine
  the object; pass ``link=False`` to get a private copy).
* Every digest entering the API is validated (64 lowercase hex), so a digest taken from the
  network can never name a path outside ``objects/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from swarmnode.files import fsync_dir

__all__ = [
    "DEFAULT_MAX_OBJECT",
    "STALE_TMP_AGE",
    "ArtifactStore",
    "Digest",
    "DigestMismatch",
    "GcResult",
    "Incoming",
    "InvalidDigest",
    "InvalidOwner",
    "ObjectMissing",
    "StoreError",
    "TooLarge",
    "check_digest",
    "digest_bytes",
    "is_digest",
]

Digest = str
"""A sha256 digest as 64 lowercase hex characters."""

DEFAULT_MAX_OBJECT = 8 << 30
"""8 GiB: larger than any binary package or image a build here produces."""
STALE_TMP_AGE = 24 * 3600.0
"""A temp file untouched this long (seconds) belongs to a crashed or abandoned write."""
DEFAULT_GC_MIN_AGE = 600.0
_BLOCK = 1 << 20
_DIR_MODE = 0o700
_FILE_MODE = 0o644
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")


class StoreError(Exception):
    """Base class of the store's errors."""


class InvalidDigest(StoreError, ValueError):
    """Not a digest: expected 64 lowercase hex characters."""


class InvalidOwner(StoreError, ValueError):
    """A pin owner must be 1-128 characters of [A-Za-z0-9._:@+=-], not starting with a symbol."""


class ObjectMissing(StoreError, LookupError):
    """The store has no object with this digest."""


class TooLarge(StoreError):
    """The object would exceed the store's `max_object`."""


class DigestMismatch(StoreError):
    """The bytes do not hash to the digest they were stored under."""


def is_digest(value: object) -> bool:
    return type(value) is str and _DIGEST_RE.fullmatch(value) is not None


def check_digest(value: object) -> Digest:
    """Return `value` if it is a digest, else raise InvalidDigest."""
    if not is_digest(value):
        raise InvalidDigest(f"not a sha256 hex digest: {value!r:.80}")
    return value  # type: ignore[return-value]


def digest_bytes(data: bytes) -> Digest:
    return hashlib.sha256(data).hexdigest()


def _check_owner(owner: object) -> str:
    if type(owner) is not str or _OWNER_RE.fullmatch(owner) is None:
        raise InvalidOwner(f"bad pin owner: {owner!r:.80}")
    return owner


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n


@dataclass(frozen=True, slots=True)
class GcResult:
    removed: tuple[Digest, ...]
    freed: int
    stale_tmp: int
    total: int = 0  # bytes of the objects left


class ArtifactStore:
    """The node's artifact store under `root`. Thread-safe; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, max_object: int = DEFAULT_MAX_OBJECT):
        if type(max_object) is not int or max_object < 0:
            raise ValueError("max_object must be a non-negative int")
        self.root = Path(root)
        self.max_object = max_object
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        os.chmod(self.root, _DIR_MODE)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        self._pins = self.root / "pins"
        for d in (self._objects, self._tmp, self._quarantine, self._pins):
            d.mkdir(exist_ok=True, mode=_DIR_MODE)
        self._lockfile = self.root / "lock"
        self._lockfile.touch(mode=0o600, exist_ok=True)

    # ------------------------------------------------------------------ reading

    def path(self, digest: Digest) -> Path:
        """Where the object lives; raises ObjectMissing if it is not stored."""
        p = self._object_path(digest)
        if not p.is_file():
            raise ObjectMissing(digest)
        return p

    def has(self, digest: Digest) -> bool:
        return self._object_path(digest).is_file()

    def size(self, digest: Digest) -> int:
        try:
            return self._object_path(digest).stat().st_size
        except FileNotFoundError:
            raise ObjectMissing(digest) from None

    def open(self, digest: Digest) -> BinaryIO:
        """The object opened for reading (binary); raises ObjectMissing."""
        try:
            return open(self._object_path(digest), "rb")
        except FileNotFoundError:
            raise ObjectMissing(digest) from None

    def digests(self) -> Iterator[Digest]:
        """Every stored digest (in no particular order); stray files are skipped."""
        for sub in sorted(self._objects.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sub.iterdir():
                d = sub.name + f.name
                if is_digest(d) and f.is_file():
                    yield d

    def verify(self, digest: Digest) -> bool:
        """Re-hash the object. A corrupt object is quarantined (and counted): returns False."""
        h = hashlib.sha256()
        with self.open(digest) as f:
            while block := f.read(_BLOCK):
                h.update(block)
        if h.hexdigest() == digest:
            return True
        self.quarantine(digest)
        return False

    def quarantine(self, digest: Digest) -> Path | None:
        """Move a (corrupt) object out of `objects/`; returns where it went, None if absent."""
        src = self._object_path(digest)
        dest = self._quarantine / f"{digest}.{time.time_ns()}.{uuid.uuid4().hex[:8]}"
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            return None
        fsync_dir(src.parent)
        self._count("quarantined")
        return dest

    def export(
        self,
        digest: Digest,
        dest: str | os.PathLike[str],
        *,
        link: bool = True,
        overwrite: bool = False,
    ) -> bool:
        """Place the object at `dest` atomically: a hard link when possible, else a copy.

        Returns True when hard-linked (then `dest` shares the object's inode: replace it, never
        write into it). Raises FileExistsError if `dest` exists and not `overwrite`.
        """
        src = self.path(digest)
        dest = Path(dest)
        if not overwrite and os.path.lexists(dest):
            raise FileExistsError(dest)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
        linked = False
        if link:
            try:
                os.link(src, tmp)
                linked = True
            except FileNotFoundError:
                raise ObjectMissing(digest) from None
            except OSError:  # EXDEV, EPERM, EMLINK, no hard links on this filesystem: copy
                pass
        try:
            if not linked:
                self._copy_out(digest, tmp)
            if overwrite:
                os.replace(tmp, dest)
            else:
                os.link(tmp, dest)  # fails if dest appeared meanwhile; never clobbers
                os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return linked

    def _copy_out(self, digest: Digest, tmp: Path) -> None:
        with self.open(digest) as src, open(tmp, "xb") as out:
            shutil.copyfileobj(src, out, _BLOCK)
            out.flush()
            os.fchmod(out.fileno(), _FILE_MODE)
            os.fsync(out.fileno())

    # ------------------------------------------------------------------ writing

    def put_file(self, path: str | os.PathLike[str], *, expected: Digest | None = None) -> Digest:
        """Store a copy of the file at `path` (hashed while copying); returns its digest.

        Raises TooLarge past `max_object` and DigestMismatch if `expected` is given and wrong;
        either way nothing is stored.
        """
        with open(path, "rb") as src:
            return self._put_stream(src, expected)

    def put_bytes(self, data: bytes, *, expected: Digest | None = None) -> Digest:
        if len(data) > self.max_object:
            raise TooLarge(f"{len(data)} bytes > {self.max_object}")
        return self._put_stream(io.BytesIO(data), expected)

    def incoming(self, digest: Digest) -> Incoming:
        """A temp file to receive `digest` into, chunk by chunk in any order (see `Incoming`)."""
        return Incoming(self, check_digest(digest))

    def _put_stream(self, src: BinaryIO, expected: Digest | None) -> Digest:
        if expected is not None:
            check_digest(expected)
        fd, tmp = self._new_tmp()
        moved = False
        try:
            h = hashlib.sha256()
            size = 0
            while block := src.read(_BLOCK):
                size += len(block)
                if size > self.max_object:
                    raise TooLarge(f"more than {self.max_object} bytes")
                h.update(block)
                _write_all(fd, block)
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise DigestMismatch(f"content hashes to {digest}, expected {expected}")
            moved = self._install(fd, Path(tmp), digest, size)
            return digest
        finally:
            os.close(fd)
            if not moved:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _new_tmp(self) -> tuple[int, str]:
        return tempfile.mkstemp(dir=self._tmp, prefix=f"{os.getpid()}-", suffix=".part")

    def _install(self, fd: int, tmp: Path, digest: Digest, size: int) -> bool:
        """Make a complete, hashed temp file the object `digest` (unless already stored).

        Returns True when the temp file was renamed (its name is then no longer ours to unlink).
        """
        os.fchmod(fd, _FILE_MODE)
        os.fsync(fd)
        final = self._object_path(digest)
        with self._locked(fcntl.LOCK_SH):
            try:
                existing = final.stat().st_size
            except FileNotFoundError:
                existing = None
            if existing == size:
                # Stored once. Touch it so a concurrent gc's min_age spares it.
                os.utime(final)
                self._count("deduplicated")
                return False
            # Absent, or a size that proves the stored copy corrupt: (re)place it.
            final.parent.mkdir(exist_ok=True, mode=_DIR_MODE)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        self._count("stored")
        return True

    # ------------------------------------------------------------------ pins and gc

    def pin(self, digest: Digest, owner: str) -> None:
        """Record that `owner` (a job, a build, "binhost", ...) needs `digest`; gc keeps it.

        The object need not be stored yet: pin first, then fetch, and gc cannot slip between.
        """
        check_digest(digest)
        d = self._pins / _check_owner(owner)
        with self._locked(fcntl.LOCK_SH):
            d.mkdir(exist_ok=True, mode=_DIR_MODE)
            (d / digest).touch(mode=0o600, exist_ok=True)

    def unpin(self, digest: Digest, owner: str) -> None:
        check_digest(digest)
        with contextlib.suppress(FileNotFoundError):
            (self._pins / _check_owner(owner) / digest).unlink()

    def release(self, owner: str) -> int:
        """Drop every pin of `owner`, and its directory (a worker releases one per job run:
        left to gc, they would pile up between passes); returns how many pins there were."""
        d = self._pins / _check_owner(owner)
        n = 0
        with contextlib.suppress(FileNotFoundError):
            for f in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    n += 1
        # exclusive, not between a `pin`'s mkdir and its file; not waiting for a gc pass (which
        # removes it then); fails if pinned meanwhile
        with contextlib.suppress(OSError), self._locked(fcntl.LOCK_EX | fcntl.LOCK_NB):
            d.rmdir()
        return n

    def pins(self, digest: Digest) -> frozenset[str]:
        """The owners pinning `digest`."""
        check_digest(digest)
        return frozenset(d.name for d in self._pins.iterdir() if (d / digest).exists())

    def pinned(self, owner: str | None = None) -> frozenset[Digest]:
        """Digests pinned by `owner`, or by anyone."""
        dirs = [self._pins / _check_owner(owner)] if owner is not None else self._pins.iterdir()
        out: set[Digest] = set()
        for d in dirs:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                out.update(f.name for f in d.iterdir() if is_digest(f.name))
        return frozenset(out)

    def gc(
        self,
        keep: Iterable[Digest] = (),
        *,
        min_age: float = DEFAULT_GC_MIN_AGE,
        tmp_age: float = STALE_TMP_AGE,
        now: float | None = None,
        max_bytes: int | None = None,
        limit: int | None = None,
    ) -> GcResult:
        """Delete objects that are neither pinned, in `keep`, nor younger than `min_age` s,
        oldest first: with `max_bytes`, only until the objects total at most that many bytes;
        at most `limit` of them (a bounded pass).

        Also removes temp files untouched for `tmp_age` s (left by crashes) and empty pin
        directories. Holds the store lock exclusively, so no pin or put interleaves.
        """
        keep_set = {check_digest(d) for d in keep}
        now = time.time() if now is None else now
        removed: list[Digest] = []
        freed = total = stale = 0
        with self._locked(fcntl.LOCK_EX):
            keep_set |= self.pinned()
            candidates: list[tuple[float, Digest, int]] = []
            for d in list(self.digests()):
                with contextlib.suppress(FileNotFoundError):
                    st = self._object_path(d).stat()
                    total += st.st_size
                    if d not in keep_set and st.st_mtime <= now - min_age:
                        candidates.append((st.st_mtime, d, st.st_size))
            for _mtime, d, size in sorted(candidates):
                if ((limit is not None and len(removed) >= limit)
                        or (max_bytes is not None and total <= max_bytes)):
                    break
                with contextlib.suppress(FileNotFoundError):
                    self._object_path(d).unlink()
                    removed.append(d)
                    freed += size
                    total -= size
            for f in self._tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if f.stat().st_mtime <= now - tmp_age:
                        f.unlink()
                        stale += 1
            for d in self._pins.iterdir():
                with contextlib.suppress(OSError):
                    d.rmdir()  # only succeeds when empty
        self._count("gc_removed", len(removed))
        return GcResult(tuple(removed), freed, stale, total)

    def owners(self) -> dict[str, float]:
        """Every pin owner, with when it last pinned something (its directory's mtime)."""
        out: dict[str, float] = {}
        for d in self._pins.iterdir():
            with contextlib.suppress(OSError):
                out[d.name] = d.stat().st_mtime
        return out

    # ------------------------------------------------------------------ internals

    def _object_path(self, digest: Digest) -> Path:
        d = check_digest(digest)
        return self._objects / d[:2] / d[2:]

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        # A fresh open file description per use: flock then also excludes other threads.
        with open(self._lockfile, "rb") as f:
            fcntl.flock(f.fileno(), how)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[key] += n


class Incoming:
    """An object being received in chunks, written at their offsets in any order.

    `commit(size)` truncates to `size`, fsyncs and hashes the file. On a match the file becomes
    the object and True is returned; on a mismatch False is returned and the file is kept, so
    the caller can rewrite the bad chunks and commit again. `abort` (or leaving the `with`
    block uncommitted) deletes it.
    """

    def __init__(self, store: ArtifactStore, digest: Digest) -> None:
        self.store = store
        self.digest = digest
        self._fd, tmp = store._new_tmp()
        self._tmp = Path(tmp)
        self._open = True

    def write(self, offset: int, data: bytes) -> None:
        self._check_open()
        if type(offset) is not int or offset < 0 or offset + len(data) > self.store.max_object:
            raise TooLarge(f"write at {offset}+{len(data)} beyond {self.store.max_object}")
        _write_all(self._fd, data, offset)

    def commit(self, size: int) -> bool:
        self._check_open()
        if type(size) is not int or not 0 <= size <= self.store.max_object:
            raise TooLarge(f"size {size} beyond {self.store.max_object}")
        os.ftruncate(self._fd, size)
        h = hashlib.sha256()
        offset = 0
        while block := os.pread(self._fd, _BLOCK, offset):
            h.update(block)
            offset += len(block)
        if h.hexdigest() != self.digest:
            return False
        moved = self.store._install(self._fd, self._tmp, self.digest, size)
        self._close(unlink=not moved)
        return True

    def abort(self) -> None:
        self._close(unlink=True)

    def _close(self, unlink: bool) -> None:
        if self._open:
            self._open = False
            os.close(self._fd)
            if unlink:
                with contextlib.suppress(FileNotFoundError):
                    self._tmp.unlink()

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("incoming object already committed or aborted")

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
