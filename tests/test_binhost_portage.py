"""The binhost with real Portage: packages built by `emerge --buildpkgonly` in a lab prefix are
ingested through Portage's bintree, served over HTTP on loopback and installed by a client
prefix with `emerge --getbinpkgonly`; retention; gpkg signing verified by the client."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarmnode.binhost_service import BinhostHttp
from swarmnode.portage.binhost import Binhost, Catalog, Ingested, Signing
from swarmnode.portage.host import PortageHost
from tests.lab.portage import (
    Prefix,
    ensure_portage_user,
    make_prefixes,
    reindex_entry,
    signing_key,
    stop_agents,
    tamper,
    trust,
    unavailable_reason,
    verifying_env,
    write_repo,
)

_REASON = unavailable_reason() or (None if shutil.which("gpg") else "gpg is not installed")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@dataclass(frozen=True)
class Built:
    """A package file a build job produced, as the binhost gets it."""

    file: Path
    name: str  # its path below the job's PKGDIR
    key: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Lab:
    root: Path
    binhost_host: PortageHost  # the binhost node's Portage
    client: Prefix
    signed_client: Prefix  # FEATURES=binpkg-request-signature
    built: dict[str, Built]


def _run(prefix: Prefix, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(prefix.bin / argv[0]), *argv[1:]], env=prefix.env(**env),
                          capture_output=True, text=True, timeout=300, check=False)


def _build(prefix: Prefix, job: Path, atom: str, **env: str) -> None:
    done = _run(prefix, "emerge", "--buildpkgonly", "--oneshot", atom, PKGDIR=str(job), **env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("binhost")
    ensure_portage_user()
    repo = write_repo(root / "repo")
    builder, host, client, signed = make_prefixes(
        [root / "builder", root / "host", root / "client", root / "sclient"], repo)
    signed.make_conf.write_text(signed.make_conf.read_text()
                                + 'FEATURES="${FEATURES} binpkg-request-signature"\n')
    # three build jobs, each with its own fresh PKGDIR: every package gets build id 1
    _build(builder, root / "job1", "=app-lab/libbase-1.0")
    installed = _run(builder, "emerge", "--usepkgonly", "--oneshot", "=app-lab/libbase-1.0",
                     PKGDIR=str(root / "job1"))
    assert installed.returncode == 0, installed.stderr[-2000:]
    _build(builder, root / "job2", "=app-lab/libb-1.0")
    _build(builder, root / "job3", "=app-lab/libb-1.0", USE="-extra")
    built = {
        "libbase": Built(root / "job1/app-lab/libbase/libbase-1.0-1.gpkg.tar",
                         "app-lab/libbase/libbase-1.0-1.gpkg.tar", "key-libbase"),
        "libb": Built(root / "job2/app-lab/libb/libb-1.0-1.gpkg.tar",
                      "app-lab/libb/libb-1.0-1.gpkg.tar", "key-libb-extra"),
        "libb-noextra": Built(root / "job3/app-lab/libb/libb-1.0-1.gpkg.tar",
                              "app-lab/libb/libb-1.0-1.gpkg.tar", "key-libb-noextra"),
    }
    return Lab(root, PortageHost(host.emerge), client, signed, built)


async def _ingest(binhost: Binhost, built: Built) -> Ingested:
    return await binhost.ingest(built.file, name=built.name, digest=built.digest, key=built.key)


def _index(root: Path) -> list[dict[str, str]]:
    """The Packages index's package entries."""
    blocks = (root / "Packages").read_text().split("\n\n")[1:]
    return [dict(line.split(": ", 1) for line in b.splitlines() if ": " in line)
            for b in blocks if b.strip()]


@pytest.fixture(scope="module")
def served(lab: Lab) -> Iterator[tuple[Path, list[Ingested], int]]:
    """The three packages ingested into one binhost directory and served on loopback."""
    root = lab.root / "served"
    catalog = Catalog(lab.root / "served.db")
    binhost = Binhost(root, lab.binhost_host, catalog, keep=3)
    http = BinhostHttp(root)
    loop = asyncio.new_event_loop()

    async def ingest_all() -> list[Ingested]:
        return [await _ingest(binhost, lab.built[n]) for n in ("libbase", "libb", "libb-noextra")]

    got = loop.run_until_complete(ingest_all())
    _host, port = loop.run_until_complete(http.start("127.0.0.1:0"))
    runner = asyncio.Event()

    def serve() -> None:
        loop.run_until_complete(runner.wait())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield root, got, port
    finally:
        loop.call_soon_threadsafe(runner.set)
        thread.join(10)
        loop.run_until_complete(http.stop())
        loop.close()
        catalog.close()


def test_two_builds_of_one_version_get_their_own_build_ids(served) -> None:
    root, got, _port = served
    assert [(g.cpv, g.build_id) for g in got] == [
        ("app-lab/libbase-1.0", 1), ("app-lab/libb-1.0", 1), ("app-lab/libb-1.0", 2)]
    entries = {e["PATH"]: e for e in _index(root)}
    assert set(entries) == {"app-lab/libbase/libbase-1.0-1.gpkg.tar",
                            "app-lab/libb/libb-1.0-1.gpkg.tar",
                            "app-lab/libb/libb-1.0-2.gpkg.tar"}
    one, two = entries["app-lab/libb/libb-1.0-1.gpkg.tar"], entries[
        "app-lab/libb/libb-1.0-2.gpkg.tar"]
    assert (one["BUILD_ID"], one.get("USE"), two["BUILD_ID"], two.get("USE")) == (
        "1", "extra", "2", None)
    for path, entry in entries.items():  # the index describes the files as they are now
        assert entry["MD5"] == hashlib.md5((root / path).read_bytes()).hexdigest()
    assert not any((root / ".incoming").iterdir())


def test_a_client_installs_from_the_served_binhost(lab: Lab, served) -> None:
    _root, _got, port = served
    url = f"http://127.0.0.1:{port}"
    done = _run(lab.client, "emerge", "--getbinpkgonly", "--oneshot", "=app-lab/libbase-1.0",
                PORTAGE_BINHOST=url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # the client picks the build whose USE matches its own: here the one without `extra`
    done = _run(lab.client, "emerge", "--getbinpkgonly", "--oneshot", "=app-lab/libb-1.0",
                PORTAGE_BINHOST=url, USE="-extra")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "app-lab/libb-1.0" in lab.client.installed()
    share = lab.client.root / "usr/share/libb"
    assert (share / "b.txt").exists() and not (share / "extra.txt").exists()


def _get(port: int, target: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """A raw request: the target goes out exactly as written (no client-side normalising)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
                     "Connection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.read(), dict(response.getheaders())


def test_http_serves_only_the_index_and_packages(lab: Lab, served) -> None:
    root, _got, port = served
    (lab.root / "secret.gpkg.tar").write_bytes(b"secret")
    (root / "app-lab/libb/escape-1-1.gpkg.tar").symlink_to(lab.root / "secret.gpkg.tar")
    status, body, headers = _get(port, "/Packages", headers={
        "If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT", "If-None-Match": "*"})
    assert (status, body) == (200, (root / "Packages").read_bytes())  # never 304
    assert "Last-Modified" not in headers
    status, body, headers = _get(port, "/app-lab/libb/libb-1.0-2.gpkg.tar", "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == (root / "app-lab/libb/libb-1.0-2.gpkg.tar").stat(
        ).st_size
    for target in ("/../secret.gpkg.tar", "/%2e%2e/secret.gpkg.tar",
                   "/app-lab/..%2F..%2F..%2Fsecret.gpkg.tar", "/%252e%252e/secret.gpkg.tar",
                   "/app-lab/libb/../../../secret.gpkg.tar", "//secret.gpkg.tar",
                   f"/{lab.root}/secret.gpkg.tar", "/app-lab/libb/escape-1-1.gpkg.tar",
                   "/app-lab/libb/", "/", "/.incoming/"):
        status, body, _h = _get(port, target)
        assert status == 404 and b"secret" not in body, target
    assert _get(port, "/Packages", "POST")[0] == 405
    assert _get(port, "/Packages", "PUT")[0] == 405


async def test_retention_removes_the_oldest_build_and_reindexes(lab: Lab) -> None:
    root = lab.root / "retained"
    catalog = Catalog(lab.root / "retained.db")
    binhost = Binhost(root, lab.binhost_host, catalog, keep=1)
    for name in ("libbase", "libb", "libb-noextra"):
        await _ingest(binhost, lab.built[name])
    pruned = await binhost.prune()
    assert pruned.removed == ("app-lab/libb/libb-1.0-1.gpkg.tar",)
    assert pruned.unused == {lab.built["libb"].digest}
    assert not (root / "app-lab/libb/libb-1.0-1.gpkg.tar").exists()
    assert sorted(e["PATH"] for e in _index(root)) == [
        "app-lab/libb/libb-1.0-2.gpkg.tar", "app-lab/libbase/libbase-1.0-1.gpkg.tar"]
    assert catalog.lookup(["key-libbase", "key-libb-extra", "key-libb-noextra"]) == {
        "key-libbase": ("app-lab/libbase/libbase-1.0-1.gpkg.tar", lab.built["libbase"].digest),
        "key-libb-noextra": ("app-lab/libb/libb-1.0-2.gpkg.tar",
                             lab.built["libb-noextra"].digest)}
    assert (await binhost.prune()).removed == ()
    catalog.close()


async def test_signed_packages_install_and_a_tampered_one_is_refused(lab: Lab) -> None:
    home, keyring = lab.root / "swarm-gnupg", lab.root / "client-gnupg"
    fingerprint = signing_key(home)
    trust(keyring, home, fingerprint)  # the client's keyring (what getuto sets up on Gentoo)
    root = lab.root / "signed"
    catalog = Catalog(lab.root / "signed.db")
    binhost = Binhost(root, lab.binhost_host, catalog, keep=3,
                      signing=Signing(home, fingerprint))
    got = await _ingest(binhost, lab.built["libbase"])
    with tarfile.open(root / got.path) as package:
        assert any(n.endswith("image.tar.zst.sig") for n in package.getnames())
    http = BinhostHttp(root)
    _host, port = await http.start("127.0.0.1:0")
    client_env = {"PORTAGE_BINHOST": f"http://127.0.0.1:{port}", **verifying_env(keyring)}
    try:
        done = await asyncio.to_thread(_run, lab.signed_client, "emerge", "--getbinpkgonly",
                                       "--oneshot", "=app-lab/libbase-1.0", **client_env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "app-lab/libbase-1.0" in lab.signed_client.installed()
        tamper(root / got.path)
        reindex_entry(root, got.path)
        fresh = lab.root / "fresh-pkgdir"  # (the client would use its downloaded copy)
        fresh.mkdir()
        done = await asyncio.to_thread(_run, lab.signed_client, "emerge", "--getbinpkgonly",
                                       "--oneshot", "=app-lab/libbase-1.0", **client_env,
                                       PKGDIR=str(fresh))
        output = done.stdout + done.stderr
        assert done.returncode != 0, output[-2000:]
        assert "verification failed" in output or "GnuPG" in output, output[-2000:]
        assert "Digest verification failed" not in output  # the signature caught it
    finally:
        await http.stop()
        catalog.close()
        stop_agents(home, keyring)
