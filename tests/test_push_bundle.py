"""Bundles: reproducible digests, what goes in, and every refusal on the way out."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import msgpack
import pytest

from swarmnode.push import bundle
from swarmnode.push.bundle import (
    SELF_INCLUDE,
    BundleError,
    PushSpec,
    code_root,
    extract_bundle,
    load_spec,
    make_bundle,
)


def write(path: Path, text: str = "x", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def tree(root: Path, reverse: bool = False) -> Path:
    """A small source tree; `reverse` creates it in the opposite order (other dir order)."""
    steps = [
        lambda: write(root / "pkg" / "__init__.py", "VERSION = 1\n"),
        lambda: write(root / "pkg" / "mod.py", "def f():\n    return 2\n"),
        lambda: write(root / "bin" / "run.sh", "#!/bin/sh\necho hi\n", 0o755),
        lambda: write(root / "README", "read me\n"),
        lambda: (root / "empty").mkdir(parents=True),
        lambda: (root / "pkg").mkdir(parents=True, exist_ok=True)
        or os.symlink("mod.py", root / "pkg" / "alias.py"),
    ]
    for step in reversed(steps) if reverse else steps:
        step()
    return root


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".part"))


# ------------------------------------------------------------------------------- making


def test_same_content_same_digest(tmp_path: Path) -> None:
    a = tree(tmp_path / "a")
    b = tree(tmp_path / "b", reverse=True)
    # Different times, owners and non-significant mode bits must not change a byte.
    for path in b.rglob("*"):
        os.utime(path, (1_000_000, 1_234_567), follow_symlinks=False)
        if os.geteuid() == 0:
            os.lchown(path, 4321, 4321)
    (b / "README").chmod(0o600)
    (b / "bin" / "run.sh").chmod(0o700)
    one = make_bundle(a, tmp_path / "a.tgz")
    two = make_bundle(b, tmp_path / "b.tgz")
    assert one == two
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()
    assert one.digest == hashlib.sha256((tmp_path / "a.tgz").read_bytes()).hexdigest()
    assert one.size == (tmp_path / "a.tgz").stat().st_size
    assert one.files == 8  # bin, empty, pkg; 4 files; 1 link
    (b / "pkg" / "mod.py").write_text("def f():\n    return 3\n")
    assert make_bundle(b, tmp_path / "c.tgz").digest != one.digest


def test_members_are_normalised_and_sorted(tmp_path: Path) -> None:
    root = tree(tmp_path / "src")
    make_bundle(root, tmp_path / "x.tgz")
    raw = (tmp_path / "x.tgz").read_bytes()
    assert raw[4:8] == b"\0\0\0\0"  # gzip header mtime
    with tarfile.open(tmp_path / "x.tgz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    modes = {m.name: m.mode for m in members}
    assert modes["bin/run.sh"] == 0o755 and modes["README"] == 0o644 and modes["pkg"] == 0o755
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0)
    assert {m.name: m.linkname for m in members if m.issym()} == {"pkg/alias.py": "mod.py"}


def test_round_trip_keeps_exec_bit_links_and_empty_dirs(tmp_path: Path) -> None:
    root = tree(tmp_path / "src")
    info = make_bundle(root, tmp_path / "x.tgz")
    dest = tmp_path / "out"
    extract_bundle(tmp_path / "x.tgz", dest, digest=info.digest)
    assert (dest / "pkg" / "mod.py").read_text() == "def f():\n    return 2\n"
    assert os.stat(dest / "bin" / "run.sh").st_mode & stat.S_IXUSR
    assert not os.stat(dest / "README").st_mode & stat.S_IXUSR
    assert os.readlink(dest / "pkg" / "alias.py") == "mod.py"
    assert (dest / "empty").is_dir()
    assert leftovers(tmp_path) == []
    # An existing destination is left alone: releases are immutable.
    (dest / "README").write_text("changed")
    extract_bundle(tmp_path / "x.tgz", dest)
    assert (dest / "README").read_text() == "changed"


def test_include_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for top in ("swarmnode", "net", "cli", "tests"):
        write(root / top / "__init__.py")
        write(root / top / "__pycache__" / "x.cpython-311.pyc")
    write(root / "swarmnode" / "stale.pyc")
    write(root / ".git" / "config")
    write(root / ".venv" / "bin" / "python")
    write(root / "swarmnode" / "sub" / ".git" / "HEAD")
    write(root / "README.md")
    make_bundle(root, tmp_path / "self.tgz", SELF_INCLUDE)
    with tarfile.open(tmp_path / "self.tgz") as tar:
        names = tar.getnames()
    assert names == ["cli", "cli/__init__.py", "net", "net/__init__.py", "swarmnode",
                     "swarmnode/__init__.py", "swarmnode/sub"]
    make_bundle(root, tmp_path / "all.tgz")
    with tarfile.open(tmp_path / "all.tgz") as tar:
        names = tar.getnames()
    assert "README.md" in names and "tests/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".git" in n
                or ".venv" in n]
    with pytest.raises(BundleError, match="nope"):
        make_bundle(root, tmp_path / "bad.tgz", ("swarmnode", "nope"))
    with pytest.raises(BundleError, match="top-level"):
        make_bundle(root, tmp_path / "bad.tgz", ("swarmnode/sub",))


def test_code_root_holds_the_packages() -> None:
    root = code_root()
    for name in SELF_INCLUDE:
        assert (root / name / "__init__.py").is_file()


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "../src2/x"])
def test_make_refuses_links_leaving_the_tree(tmp_path: Path, target: str) -> None:
    root = tree(tmp_path / "src")
    os.symlink(target, root / "pkg" / "bad")
    with pytest.raises(BundleError, match="pkg/bad"):
        make_bundle(root, tmp_path / "x.tgz")
    assert not (tmp_path / "x.tgz").exists()


def test_make_refuses_link_chains_and_links_out_of_the_included_part(tmp_path: Path) -> None:
    root = tree(tmp_path / "src")
    # Lexically "s/.." is the root, but s -> sub/up -> .. (= sub's parent) resolves elsewhere.
    (root / "pkg" / "sub").mkdir()
    os.symlink("..", root / "pkg" / "sub" / "up")
    os.symlink("sub/up", root / "pkg" / "s")
    os.symlink("s/../..", root / "pkg" / "t")
    with pytest.raises(BundleError, match="pkg/t"):
        make_bundle(root, tmp_path / "x.tgz")
    os.unlink(root / "pkg" / "t")
    os.symlink("../README", root / "pkg" / "readme")  # inside root, outside the include
    with pytest.raises(BundleError, match="pkg/readme"):
        make_bundle(root, tmp_path / "x.tgz", ["pkg"])
    make_bundle(root, tmp_path / "x.tgz")  # fine when README is in the bundle


def test_make_refuses_fifo(tmp_path: Path) -> None:
    root = tree(tmp_path / "src")
    os.mkfifo(root / "pkg" / "pipe")
    with pytest.raises(BundleError, match="pkg/pipe"):
        make_bundle(root, tmp_path / "x.tgz")


def test_make_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree(tmp_path / "src")
    (root / "noise.bin").write_bytes(os.urandom(50_000))
    monkeypatch.setattr(bundle, "MAX_FILES", 5)
    with pytest.raises(BundleError, match="MAX_FILES"):
        make_bundle(root, tmp_path / "x.tgz")
    monkeypatch.setattr(bundle, "MAX_FILES", 100)
    monkeypatch.setattr(bundle, "MAX_BUNDLE_BYTES", 20_000)
    with pytest.raises(BundleError, match="MAX_BUNDLE_BYTES"):
        make_bundle(root, tmp_path / "x.tgz")
    assert not (tmp_path / "x.tgz").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(bundle, "MAX_BUNDLE_BYTES", 1 << 20)
    monkeypatch.setattr(bundle, "MAX_EXTRACTED_BYTES", 40_000)
    with pytest.raises(BundleError, match="MAX_EXTRACTED_BYTES"):
        make_bundle(root, tmp_path / "x.tgz")


# --------------------------------------------------------------------------- extracting


def craft(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A hand-made bundle, for the things make_bundle never produces."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


BAD_MEMBERS = {
    "absolute": ([(member("/tmp/evil"), b"x")], "absolute"),
    "dotdot": ([(member("a/../../evil"), b"x")], "'..'"),
    "link_out": ([(member("l", tarfile.SYMTYPE, "../../etc"), None)], "leaves the tree"),
    "link_abs": ([(member("l", tarfile.SYMTYPE, "/etc/passwd"), None)], "leaves the tree"),
    "hardlink": ([(member("a"), b"x"), (member("h", tarfile.LNKTYPE, "a"), None)],
                 "hard link"),
    "device": ([(member("dev", tarfile.CHRTYPE), None)], "devices"),
    "fifo": ([(member("pipe", tarfile.FIFOTYPE), None)], "fifos"),
    "through_link": ([(member("d", tarfile.DIRTYPE), None),
                      (member("l", tarfile.SYMTYPE, "d"), None),
                      (member("l/x"), b"x")], "parent 'l' is a link"),
    "twice": ([(member("a"), b"x"), (member("a"), b"y")], "twice"),
    "not_normal": ([(member("./a"), b"x")], "normal form"),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_extract_refuses(tmp_path: Path, case: str) -> None:
    members, message = BAD_MEMBERS[case]
    blob = craft(tmp_path / "bad.tgz", members)
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(BundleError, match=message):
        extract_bundle(blob, home / "dest")
    assert list(home.iterdir()) == []  # no dest, no temp dir
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("late", [False, True])
def test_extract_refuses_link_chain_escape(tmp_path: Path, late: bool) -> None:
    # Every link is lexically inside, but t -> s/.. with s -> sub/up -> .. resolves outside.
    # With `late`, s comes after t: when t is written s does not exist, so t looks harmless
    # to tarfile's filter; only the check of the finished tree sees the escape.
    links = [(member("s", tarfile.SYMTYPE, "sub/up"), None),
             (member("t", tarfile.SYMTYPE, "s/.."), None)]
    blob = craft(tmp_path / "bad.tgz", [
        (member("sub", tarfile.DIRTYPE), None),
        (member("sub/up", tarfile.SYMTYPE, ".."), None),
        *(links[::-1] if late else links),
    ])
    with pytest.raises(BundleError, match="outside"):
        extract_bundle(blob, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path) == []


def test_extract_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = craft(tmp_path / "big.tgz", [(member(f"f{i}"), bytes(30_000)) for i in range(4)])
    monkeypatch.setattr(bundle, "MAX_FILES", 3)
    with pytest.raises(BundleError, match="MAX_FILES"):
        extract_bundle(blob, tmp_path / "d1")
    monkeypatch.setattr(bundle, "MAX_FILES", 100)
    monkeypatch.setattr(bundle, "MAX_EXTRACTED_BYTES", 20_000)
    with pytest.raises(BundleError, match="MAX_EXTRACTED_BYTES"):  # one member too big
        extract_bundle(blob, tmp_path / "d2")
    monkeypatch.setattr(bundle, "MAX_EXTRACTED_BYTES", 100_000)
    with pytest.raises(BundleError, match="MAX_EXTRACTED_BYTES"):  # all of them too big
        extract_bundle(blob, tmp_path / "d3")
    monkeypatch.setattr(bundle, "MAX_BUNDLE_BYTES", 100)
    with pytest.raises(BundleError, match="MAX_BUNDLE_BYTES"):
        extract_bundle(blob, tmp_path / "d4")
    assert [p.name for p in tmp_path.iterdir()] == ["big.tgz"]


def test_extract_stops_a_gzip_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A valid tar followed by megabytes of zeros: tarfile stops early, the drain must not.
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        tar.addfile(member("a"), io.BytesIO(b""))
    blob = tmp_path / "bomb.tgz"
    blob.write_bytes(gzip.compress(inner.getvalue() + bytes(8 << 20)))
    monkeypatch.setattr(bundle, "MAX_EXTRACTED_BYTES", 1 << 20)
    monkeypatch.setattr(bundle, "MAX_FILES", 10)
    with pytest.raises(BundleError, match="expands past"):
        extract_bundle(blob, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_extract_refuses_truncated_and_corrupt(tmp_path: Path) -> None:
    root = tree(tmp_path / "src")
    (root / "noise.bin").write_bytes(os.urandom(20_000))
    make_bundle(root, tmp_path / "ok.tgz")
    raw = (tmp_path / "ok.tgz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        extract_bundle(tmp_path / "cut.tgz", tmp_path / "d1")
    flipped = bytearray(raw)
    flipped[-6] ^= 0xFF  # inside the gzip trailer: only a full read notices
    (tmp_path / "flip.tgz").write_bytes(bytes(flipped))
    with pytest.raises(BundleError, match="corrupt or truncated"):
        extract_bundle(tmp_path / "flip.tgz", tmp_path / "d2")
    (tmp_path / "junk.tgz").write_bytes(b"not a bundle at all")
    with pytest.raises(BundleError, match="corrupt or truncated"):
        extract_bundle(tmp_path / "junk.tgz", tmp_path / "d3")
    assert not {"d1", "d2", "d3"} & {p.name for p in tmp_path.iterdir()}
    assert leftovers(tmp_path) == []


def test_extract_checks_the_digest(tmp_path: Path) -> None:
    info = make_bundle(tree(tmp_path / "src"), tmp_path / "ok.tgz")
    raw = bytearray((tmp_path / "ok.tgz").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / "bad.tgz").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="bundle digest mismatch"):
        extract_bundle(tmp_path / "bad.tgz", tmp_path / "dest", digest=info.digest)
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- push spec


def spec_dir(tmp_path: Path, text: str | None, name: str = "webapp") -> Path:
    root = tmp_path / name
    root.mkdir()
    if text is not None:
        (root / "swarmnode-push.toml").write_text(text)
    return root


def test_spec_defaults_and_full(tmp_path: Path) -> None:
    assert load_spec(spec_dir(tmp_path, None)) == PushSpec(name="webapp")
    root = spec_dir(tmp_path, 'name = "api"\nrestart = "systemctl restart api"\n'
                    'health = "curl -fs localhost:8080/health"\nhealth_timeout = 5\n', "x")
    spec = load_spec(root)
    assert spec == PushSpec("api", "systemctl restart api", "curl -fs localhost:8080/health",
                            5.0)
    assert type(spec.health_timeout) is float
    wire = msgpack.unpackb(msgpack.packb(spec.plain()))
    assert PushSpec.from_plain(wire) == spec


@pytest.mark.parametrize(("text", "message"), [
    ('helth = "true"\n', "unknown key 'helth' (did you mean 'health'?)"),
    ("restart = 5\n", "restart"),
    ('restart = ""\n', "restart"),
    ("health = ['a']\n", "health"),
    ('health_timeout = "30"\n', "health_timeout"),
    ("health_timeout = true\n", "health_timeout"),
    ("health_timeout = 0\n", "health_timeout"),
    ("health_timeout = 3601.0\n", "health_timeout"),
    ("health_timeout = nan\n", "health_timeout"),
    ('name = "bad name"\n', "name"),
    ('name = "-x"\n', "name"),
    ("name = 3\n", "name"),
    ('name = "swarmnode"\n', "reserved"),
    ("name = \n", "swarmnode-push.toml"),
])
def test_spec_refusals(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BundleError, match=r"swarmnode-push\.toml") as err:
        load_spec(spec_dir(tmp_path, text))
    assert message in str(err.value)


def test_spec_name_from_a_bad_directory_name(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="set `name`"):
        load_spec(spec_dir(tmp_path, None, "has space"))
    with pytest.raises(BundleError, match="reserved"):
        load_spec(spec_dir(tmp_path, None, "swarmnode"))


def test_spec_from_plain_is_strict() -> None:
    good = PushSpec("api", None, "true", 2.5).plain()
    assert PushSpec.from_plain(good).health == "true"
    assert PushSpec.from_plain(dict(good, name="swarmnode")).name == "swarmnode"  # self-update
    for bad in ([1], {**good, "extra": 1}, {k: v for k, v in good.items() if k != "health"},
                dict(good, name=b"api"), dict(good, restart=1), dict(good, health_timeout=True),
                dict(good, health_timeout=-1.0), dict(good, health_timeout="1")):
        with pytest.raises(ValueError):
            PushSpec.from_plain(bad)

