"""Artifact store: stored once, atomic writes, verification and quarantine, pins and gc, export."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from swarmnode.artifacts.store import (
    ArtifactStore,
    DigestMismatch,
    InvalidDigest,
    InvalidOwner,
    ObjectMissing,
    StoreError,
    TooLarge,
    check_digest,
    digest_bytes,
)

DATA = b"binary package contents\n" * 100
D = hashlib.sha256(DATA).hexdigest()
OTHER = b"another artifact"
OD = hashlib.sha256(OTHER).hexdigest()
BAD_DIGESTS = [
    "",
    "abc",
    D.upper(),
    D[:-1],
    D + "0",
    "../" + D[3:],
    "g" * 64,
    None,
    1,
    D.encode(),
]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _tmp_files(store: ArtifactStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


def test_put_and_read_back(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.put_bytes(DATA) == D
    src = tmp_path / "pkg.tbz2"
    src.write_bytes(OTHER)
    assert store.put_file(src) == OD
    assert store.has(D) and store.has(OD)
    assert store.size(D) == len(DATA)
    with store.open(D) as f:
        assert f.read() == DATA
    assert store.path(D) == store.root / "objects" / D[:2] / D[2:]
    assert sorted(store.digests()) == sorted([D, OD])
    assert _mode(store.root) == 0o700
    assert _mode(store.path(D)) == 0o644
    assert _tmp_files(store) == []


def test_existing_root_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    ArtifactStore(root)
    assert _mode(root) == 0o700


def test_stored_once(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_bytes(DATA)
    inode = store.path(D).stat().st_ino
    src = tmp_path / "again"
    src.write_bytes(DATA)
    assert store.put_file(src) == D
    assert store.put_bytes(DATA) == D
    assert store.path(D).stat().st_ino == inode
    assert list(store.digests()) == [D]
    assert store.counters["stored"] == 1
    assert store.counters["deduplicated"] == 2
    assert _tmp_files(store) == []


def test_put_replaces_a_stored_copy_of_the_wrong_size(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_bytes(DATA)
    store.path(D).write_bytes(DATA[:10])  # truncated by a bad disk, say
    store.put_bytes(DATA)
    assert store.verify(D)


def test_empty_object(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    d = store.put_bytes(b"")
    assert d == hashlib.sha256(b"").hexdigest()
    assert store.size(d) == 0 and store.verify(d)


def test_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    class Flaky(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(errno.EIO, "disk went away")
            return b"x" * 1000

    store = ArtifactStore(tmp_path)
    with pytest.raises(OSError):
        store._put_stream(Flaky(), None)  # type: ignore[arg-type]
    assert list(store.digests()) == []
    assert _tmp_files(store) == []


def test_crash_before_rename_never_shows_a_partial_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)

    def crash(*a: object) -> None:
        raise KeyboardInterrupt  # the process dies between fsync and rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put_bytes(DATA)
    monkeypatch.undo()
    assert not store.has(D)
    assert list(store.digests()) == []


def test_stale_temp_files_are_invisible_and_collected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    # What a killed writer leaves behind: a partial temp file, never renamed.
    partial = store.root / "tmp" / "1234-abcd.part"
    partial.write_bytes(DATA[:100])
    fresh = store.root / "tmp" / "1235-abcd.part"
    fresh.write_bytes(DATA[:50])
    old = time.time() - 2 * 24 * 3600
    os.utime(partial, (old, old))
    assert not store.has(D) and list(store.digests()) == []
    result = store.gc()
    assert result.stale_tmp == 1
    assert not partial.exists() and fresh.exists()  # a live write elsewhere is left alone


def test_verify_quarantines_corrupt_objects(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_bytes(DATA)
    assert store.verify(D)
    p = store.path(D)
    p.write_bytes(b"X" + DATA[1:])  # same size, different bytes
    assert not store.verify(D)
    assert not store.has(D)
    [q] = list((store.root / "quarantine").iterdir())
    assert q.name.startswith(D) and q.read_bytes()[0:1] == b"X"
    assert store.counters["quarantined"] == 1
    with pytest.raises(ObjectMissing):
        store.verify(D)
    assert store.put_bytes(DATA) == D and store.verify(D)  # can be fetched again


def test_missing_objects(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.has(D)
    for fn in (store.path, store.size, store.open, store.verify):
        with pytest.raises(ObjectMissing):
            fn(D)
    with pytest.raises(ObjectMissing):
        store.export(D, tmp_path / "out")
    assert store.quarantine(D) is None


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_invalid_digests_rejected_everywhere(tmp_path: Path, bad: object) -> None:
    store = ArtifactStore(tmp_path)
    calls = [
        store.has,
        store.size,
        store.open,
        store.path,
        store.verify,
        store.incoming,
        store.quarantine,
        lambda d: store.pin(d, "job-1"),
        lambda d: store.unpin(d, "job-1"),
        lambda d: store.pins(d),
        lambda d: store.export(d, tmp_path / "x"),
        lambda d: store.put_bytes(DATA, expected=d if d is not None else ""),
        lambda d: store.gc(keep=[d]),
        check_digest,
    ]
    for fn in calls:
        with pytest.raises(InvalidDigest):
            fn(bad)  # type: ignore[operator]
    assert issubclass(InvalidDigest, ValueError) and issubclass(InvalidDigest, StoreError)


def test_expected_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(DigestMismatch):
        store.put_bytes(DATA, expected=OD)
    assert not store.has(D) and not store.has(OD)
    assert store.put_bytes(DATA, expected=D) == D
    assert _tmp_files(store) == []


def test_size_limit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_object=10)
    assert store.put_bytes(b"0123456789") == digest_bytes(b"0123456789")
    with pytest.raises(TooLarge):
        store.put_bytes(b"0123456789a")
    src = tmp_path / "big"
    src.write_bytes(b"z" * 11)
    with pytest.raises(TooLarge):
        store.put_file(src)
    assert list(store.digests()) == [digest_bytes(b"0123456789")]
    assert _tmp_files(store) == []
    with store.incoming(D) as inc, pytest.raises(TooLarge):
        inc.write(5, b"123456")
    with pytest.raises(ValueError):
        ArtifactStore(tmp_path, max_object=-1)


def test_pins_and_gc(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    keep, pinned, loose = b"keep me", b"pinned", b"loose"
    dk, dp, dl = (store.put_bytes(x) for x in (keep, pinned, loose))
    store.pin(dp, "job:42")
    store.pin(dp, "binhost")
    assert store.pins(dp) == {"job:42", "binhost"}
    assert store.pinned("job:42") == {dp}
    assert store.pinned() == {dp}
    # Everything is young: nothing goes with the default grace period.
    assert store.gc().removed == ()
    result = store.gc(keep=[dk], min_age=0)
    assert result.removed == (dl,) and result.freed == len(loose)
    assert store.has(dk) and store.has(dp) and not store.has(dl)
    store.unpin(dp, "job:42")
    store.unpin(dp, "job:42")  # idempotent
    assert store.gc(min_age=0).removed == (dk,)
    assert store.has(dp)
    assert store.release("binhost") == 1
    assert store.pinned() == frozenset()
    assert not (store.root / "pins" / "binhost").exists()  # released: no directory left
    assert store.release("binhost") == 0
    assert store.gc(min_age=0).removed == (dp,)
    store.pin(dk, "job:42")
    store.unpin(dk, "job:42")
    store.gc(min_age=0)
    assert not (store.root / "pins" / "job:42").exists()  # empty pin dirs are collected
    store.pin(dk, "job:42")  # (and made again when pinned again)
    assert store.pinned("job:42") == {dk}


def test_pin_before_the_object_arrives(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.pin(D, "job-7")
    store.put_bytes(DATA)
    assert store.gc(min_age=0).removed == ()
    assert store.has(D)


def test_pins_survive_reopening(tmp_path: Path) -> None:
    ArtifactStore(tmp_path).put_bytes(DATA)
    ArtifactStore(tmp_path).pin(D, "build-1")
    assert ArtifactStore(tmp_path).gc(min_age=0).removed == ()


def test_restoring_refreshes_gc_grace(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_bytes(DATA)
    old = time.time() - 3600
    os.utime(store.path(D), (old, old))
    store.put_bytes(DATA)  # stored once, but now recently wanted
    assert store.gc(min_age=600).removed == ()


@pytest.mark.parametrize("owner", ["", "../x", "a/b", ".hidden", "x" * 129, "sp ace", None, 3])
def test_invalid_owners(tmp_path: Path, owner: object) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(InvalidOwner):
        store.pin(D, owner)  # type: ignore[arg-type]


def test_export_hard_links(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "a")
    store.put_bytes(DATA)
    out = tmp_path / "job" / "pkg.tbz2"
    out.parent.mkdir()
    assert store.export(D, out) is True
    assert out.stat().st_ino == store.path(D).stat().st_ino
    with pytest.raises(FileExistsError):
        store.export(D, out)
    copy = tmp_path / "job" / "copy"
    assert store.export(D, copy, link=False) is False
    assert copy.read_bytes() == DATA and copy.stat().st_ino != store.path(D).stat().st_ino
    copy.write_bytes(b"old")
    assert store.export(D, copy, overwrite=True) is True
    assert copy.read_bytes() == DATA
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy", "pkg.tbz2"]  # no temps


def test_export_copies_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "a")
    store.put_bytes(DATA)
    real_link = os.link

    def link(src: str, dst: str) -> None:
        if str(src).startswith(str(store.root)):
            raise OSError(errno.EXDEV, "cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    out = tmp_path / "out"
    assert store.export(D, out) is False
    assert out.read_bytes() == DATA and _mode(out) == 0o644


def test_incoming_out_of_order_and_retry(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    parts = [DATA[i : i + 700] for i in range(0, len(DATA), 700)]
    inc = store.incoming(D)
    for i in reversed(range(len(parts))):
        inc.write(i * 700, parts[i] if i != 1 else b"?" * len(parts[1]))
    assert inc.commit(len(DATA)) is False  # kept for another try
    assert not store.has(D)
    inc.write(700, parts[1])
    assert inc.commit(len(DATA)) is True
    assert store.verify(D) and _tmp_files(store) == []
    with pytest.raises(StoreError):
        inc.write(0, b"x")


def test_incoming_truncates_and_aborts(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.incoming(D) as inc:
        inc.write(0, DATA + b"trailing garbage from a longer manifest")
        assert inc.commit(len(DATA))
    with store.incoming(OD) as inc:
        inc.write(0, b"half")
    assert _tmp_files(store) == [] and not store.has(OD)


def test_incoming_of_an_already_stored_object(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put_bytes(DATA)
    with store.incoming(D) as inc:
        inc.write(0, DATA)
        assert inc.commit(len(DATA))
    assert store.counters["deduplicated"] == 1 and _tmp_files(store) == []


def test_two_stores_on_one_directory(tmp_path: Path) -> None:
    """Writers in two store instances, many threads, same and different contents."""
    a, b = ArtifactStore(tmp_path), ArtifactStore(tmp_path)
    blobs = [bytes([i]) * (50_000 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(store: ArtifactStore, k: int) -> None:
        try:
            for i, blob in enumerate(blobs):
                if (i + k) % 3 == 0:
                    store.pin(digest_bytes(blob), f"w{k}")  # pin first: gc cannot slip between
                store.put_bytes(blob)
                if (i + k) % 3 == 0:
                    store.gc(min_age=0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=((a, b)[k % 2], k)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for blob in blobs:
        d = digest_bytes(blob)
        if a.has(d):
            assert a.verify(d) and b.verify(d)
    assert _tmp_files(a) == []
    # Whatever some writer pinned survived every gc.
    for d in a.pinned():
        assert a.has(d)
