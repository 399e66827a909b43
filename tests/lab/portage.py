"""Real Gentoo Portage for the lab: an ebuild repository of our own and fresh Portage prefixes.

Facts behind it are in ../shared/PORTAGE.md: Portage from the package index runs in a plain
venv as a Gentoo Prefix (the venv directory is the host's EPREFIX; `etc/portage`, `var/db/pkg`
and `usr/` live inside it), so every lab host gets its own venv and its own `emerge`.

The repository `lab` (EAPI 8, no eclasses) has seven packages::

    tool-1.0      DEPEND libmid; BDEPEND hello (runs it while building); RDEPEND libmid hello;
                  PDEPEND labdocs
    libmid-1.0    DEPEND+RDEPEND liba libb          (the diamond: both need libbase)
    liba-1.0      DEPEND+RDEPEND app-lab/libbase:=  (a sub-slot dependency)
    libb-1.0      DEPEND+RDEPEND libbase; IUSE +extra changes the file it installs
    libbase-1.0   SLOT 0/1
    hello-1.0     a C program compiled with gcc from a distfile (hello-1.0.tar.gz)
    labdocs-2.1-r1

so tool -> libmid -> liba -> libbase is a build-time chain of depth 3, and `emerge --pretend
--tree` prints libbase once although libb needs it too. Every library's src_compile reads the
files its dependencies installed in ${ESYSROOT}: a package built without them installed fails.

The distfile is fetched from the mirror the host's make.conf names (GENTOO_MIRRORS); SRC_URI
points at a `.invalid` name that never resolves, so nothing leaves the lab.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PORTAGE = "portage==3.0.83"
#: The portage wheel is kept here once downloaded (scripts/setup fills it), so that making a
#: prefix needs no network.
WHEELS = Path(__file__).resolve().parents[2] / ".cache" / "wheels"

#: What the lab turns off, as in ../shared/PORTAGE.md: the sandboxes need unshare() (refused in
#: some containers), userpriv needs a python the portage user may run, and the rest is noise.
FEATURES_OFF = ("-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox "
                "-network-sandbox -pid-sandbox -news -merge-wait")

_HEADER = """# Copyright 2026 swarmnode lab
# Distributed under the terms of the GNU General Public License v2
EAPI=8
HOMEPAGE="https://example.invalid/lab"
LICENSE="GPL-2"
KEYWORDS="amd64"
"""

EBUILDS: dict[str, str] = {
    "app-lab/libbase/libbase-1.0.ebuild": """
DESCRIPTION="Lab base library (sub-slot 1)"
SLOT="0/1"
S=${WORKDIR}

src_unpack() { echo "base ${PV}" > base.txt || die; }
src_install() { insinto /usr/share/libbase; doins base.txt; }
""",
    "app-lab/liba/liba-1.0.ebuild": """
DESCRIPTION="Lab library a, built against libbase's sub-slot"
SLOT="0"
S=${WORKDIR}
DEPEND="app-lab/libbase:="
RDEPEND="${DEPEND}"

src_unpack() { echo "a ${PV}" > a.txt || die; }
src_compile() { cat "${ESYSROOT}"/usr/share/libbase/base.txt >> a.txt || die; }
src_install() { insinto /usr/share/liba; doins a.txt; }
""",
    "app-lab/libb/libb-1.0.ebuild": """
DESCRIPTION="Lab library b; USE=extra changes what it installs"
SLOT="0"
IUSE="+extra"
S=${WORKDIR}
DEPEND="app-lab/libbase"
RDEPEND="${DEPEND}"

src_unpack() { echo "b ${PV}" > b.txt || die; }
src_compile() {
	cat "${ESYSROOT}"/usr/share/libbase/base.txt >> b.txt || die
	if use extra; then echo "b extra" >> b.txt || die; fi
}
src_install() {
	insinto /usr/share/libb
	doins b.txt
	if use extra; then newins b.txt extra.txt; fi
}
""",
    "app-lab/libmid/libmid-1.0.ebuild": """
DESCRIPTION="Lab middle library: needs liba and libb (both need libbase)"
SLOT="0"
S=${WORKDIR}
DEPEND="app-lab/liba app-lab/libb"
RDEPEND="${DEPEND}"

src_unpack() { echo "mid ${PV}" > mid.txt || die; }
src_compile() {
	cat "${ESYSROOT}"/usr/share/liba/a.txt "${ESYSROOT}"/usr/share/libb/*.txt >> mid.txt || die
}
src_install() { insinto /usr/share/libmid; doins mid.txt; }
""",
    "app-lab/hello/hello-1.0.ebuild": """
DESCRIPTION="Lab hello, a C program built with gcc from a distfile"
SRC_URI="https://distfiles.example.invalid/${P}.tar.gz"
SLOT="0"

src_compile() { emake CC="${CC:-gcc}" CFLAGS="${CFLAGS}" LDFLAGS="${LDFLAGS}"; }
src_install() { dobin hello; dodoc README; }
""",
    "app-lab/labdocs/labdocs-2.1-r1.ebuild": """
DESCRIPTION="Lab documentation, no dependencies"
SLOT="0"
S=${WORKDIR}

src_unpack() { echo "lab docs ${PVR}" > LABDOCS || die; }
src_install() { dodoc LABDOCS; }
""",
    "app-lab/tool/tool-1.0.ebuild": """
DESCRIPTION="Lab tool, the top of the graph"
SLOT="0"
S=${WORKDIR}
DEPEND="app-lab/libmid"
BDEPEND="app-lab/hello"
RDEPEND="${DEPEND} app-lab/hello"
PDEPEND="app-lab/labdocs"

src_unpack() {
	# BDEPEND: hello runs here, on the build host, while building
	"${BROOT}"/usr/bin/hello build > built-with.txt || die
	cat "${ESYSROOT}"/usr/share/libmid/mid.txt >> built-with.txt || die
	{ printf '#!/bin/sh\\ncat <<"EOT"\\n'; cat built-with.txt
	printf 'EOT\\nexec hello "$@"\\n'; } > lab-tool || die
}
src_install() { dobin lab-tool; insinto /usr/share/tool; doins built-with.txt; }
""",
}

def ebuild(description: str, body: str) -> str:
    """An EAPI 8 ebuild of the lab repository (the header every lab package shares)."""
    return _HEADER + f'DESCRIPTION="{description}"\nSLOT="0"\nS=${{WORKDIR}}\n' + body


PACKAGES = tuple(sorted(path.split("/", 2)[0] + "/" + path.split("/")[1] for path in EBUILDS))
TOP = "app-lab/tool"

HELLO_FILES = {
    "hello-1.0/hello.c": (
        '#include <stdio.h>\n\n'
        'int main(int argc, char **argv) {\n'
        '    printf("hello from the swarmnode lab (%s)\\n", argc > 1 ? argv[1] : "no args");\n'
        '    return 0;\n}\n'),
    "hello-1.0/Makefile": "hello: hello.c\n\t$(CC) $(CFLAGS) $(LDFLAGS) -o $@ hello.c\n",
    "hello-1.0/README": "hello 1.0 for the portage lab\n",
}
DISTFILE = "hello-1.0.tar.gz"


def distfile_bytes() -> bytes:
    """The hello tarball, byte-for-byte the same every time (its digests are in the Manifest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, text in sorted(HELLO_FILES.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def manifest_line(name: str, data: bytes) -> str:
    """A thin Manifest's DIST line, with the hashes layout.conf asks for."""
    blake = hashlib.blake2b(data).hexdigest()
    sha512 = hashlib.sha512(data).hexdigest()
    return f"DIST {name} {len(data)} BLAKE2B {blake} SHA512 {sha512}\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_repo(root: Path, ebuilds: Mapping[str, str] = EBUILDS) -> Path:
    """The `lab` repository with profile `lab/amd64`; returns its path."""
    _write(root / "profiles/repo_name", "lab\n")
    _write(root / "profiles/categories", "app-lab\n")
    _write(root / "profiles/arch.list", "amd64\n")
    _write(root / "profiles/profiles.desc", "amd64 lab/amd64 stable\n")
    _write(root / "metadata/layout.conf",
           "masters =\nthin-manifests = true\nsign-manifests = false\nsign-commits = false\n"
           "manifest-hashes = BLAKE2B SHA512\nmanifest-required-hashes = BLAKE2B\n"
           "cache-formats = md5-dict\nprofile-formats = portage-2\n")
    _write(root / "metadata/timestamp.chk", "Sun, 06 Dec 2026 00:00:00 +0000\n")
    _write(root / "profiles/lab/eapi", "8\n")
    _write(root / "profiles/lab/make.defaults",
           'ARCH="amd64"\nACCEPT_KEYWORDS="amd64"\nCHOST="x86_64-pc-linux-gnu"\n'
           'CFLAGS="-O2 -pipe"\nCXXFLAGS="${CFLAGS}"\nLDFLAGS="-Wl,-O1 -Wl,--as-needed"\n'
           'ELIBC="glibc"\nKERNEL="linux"\nUSERLAND="GNU"\n'
           'USE_EXPAND="ELIBC KERNEL USERLAND"\nUSE_EXPAND_HIDDEN="ELIBC KERNEL USERLAND"\n')
    _write(root / "profiles/lab/amd64/eapi", "8\n")
    _write(root / "profiles/lab/amd64/parent", "..\n")
    _write(root / "profiles/lab/amd64/make.defaults", 'USE="doc"\n')
    for rel, body in ebuilds.items():
        _write(root / rel, _HEADER + body.lstrip("\n"))
    _write(root / "app-lab/hello/Manifest", manifest_line(DISTFILE, distfile_bytes()))
    return root


def write_mirror(root: Path) -> Path:
    """A distfile mirror's tree (`<root>/distfiles/<file>`, the layout GENTOO_MIRRORS uses)."""
    (root / "distfiles").mkdir(parents=True, exist_ok=True)
    (root / "distfiles" / DISTFILE).write_bytes(distfile_bytes())
    return root


_WHEEL_LOCK = threading.Lock()


def portage_wheels() -> Path | None:
    """The directory holding the portage wheel, downloading it once; None if it cannot be had."""
    with _WHEEL_LOCK:
        if not any(WHEELS.glob("portage-*.whl")):
            WHEELS.mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS),
                 PORTAGE], capture_output=True, text=True, timeout=300, check=False)
            if done.returncode != 0:
                return None
        return WHEELS


def unavailable_reason() -> str | None:
    """Why real Portage cannot run here, or None."""
    missing = [tool for tool in ("gcc", "make", "tar", "zstd", "bash") if not shutil.which(tool)]
    if missing:
        return f"real Portage needs {', '.join(missing)} (scripts/setup installs them)"
    if portage_wheels() is None:
        return f"cannot download {PORTAGE} (scripts/setup does, once)"
    return None


@dataclass(frozen=True)
class Prefix:
    """One host's Portage: a venv that is the host's EPREFIX."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def emerge(self) -> Path:
        return self.bin / "emerge"

    @property
    def make_conf(self) -> Path:
        return self.root / "etc/portage/make.conf"

    @property
    def pkgdir(self) -> Path:
        return self.root / "var/cache/binpkgs"

    @property
    def distdir(self) -> Path:
        return self.root / "var/cache/distfiles"

    def env(self, **extra: str) -> dict[str, str]:
        """An environment whose PATH finds this prefix's emerge first."""
        path = f"{self.bin}:{self.root / 'usr/bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return {**os.environ, "PATH": path, **extra}

    def installed(self) -> list[str]:
        """The cpvs in the prefix's installed-package database."""
        vdb = self.root / "var/db/pkg"
        return sorted(f"{c.name}/{p.name}" for c in vdb.glob("*") if c.is_dir()
                      for p in c.iterdir() if p.is_dir())


def ensure_portage_user() -> None:
    """The `portage` group and user every Portage command asks for (root only; idempotent)."""
    if os.geteuid() != 0:
        return
    if subprocess.run(["getent", "group", "portage"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "portage"], check=True, capture_output=True)
    if subprocess.run(["getent", "passwd", "portage"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "-g", "portage", "-d", "/var/tmp/portage",
                        "-s", "/bin/false", "-M", "portage"], check=True, capture_output=True)


def make_prefix(root: Path, repo: Path, *, mirror: str = "", make_conf: str = "",
                python: str = sys.executable) -> Prefix:
    """A fresh Portage prefix at `root` using `repo`, fetching distfiles from `mirror` (a URL).

    `make_conf` is appended to the generated make.conf (a later assignment wins), so a test can
    give one host other CFLAGS.
    """
    wheels = portage_wheels()
    if wheels is None:
        raise RuntimeError(f"cannot get {PORTAGE}")
    base = Path(python).resolve()
    subprocess.run([str(base), "-m", "venv", str(root)], check=True, capture_output=True)
    subprocess.run([str(root / "bin/python"), "-m", "pip", "install", "-q", "--no-index",
                    "--find-links", str(wheels), PORTAGE], check=True, capture_output=True,
                   timeout=300)
    prefix = Prefix(root)
    for sub in ("var/cache/binpkgs", "var/cache/distfiles", "var/tmp", "var/log/portage"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _write(prefix.make_conf,
           f'FEATURES="{FEATURES_OFF}"\n'
           f'DISTDIR="{prefix.distdir}"\n'
           f'PKGDIR="{prefix.pkgdir}"\n'
           f'PORTAGE_TMPDIR="{root / "var/tmp"}"\n'
           f'PORTAGE_LOGDIR="{root / "var/log/portage"}"\n'
           f'GENTOO_MIRRORS="{mirror}"\n'
           'ACCEPT_LICENSE="*"\nMAKEOPTS="-j1"\nEMERGE_WARNING_DELAY="0"\nCLEAN_DELAY="0"\n'
           'PORTAGE_ELOG_SYSTEM=""\n'
           + make_conf)
    _write(root / "etc/portage/repos.conf/lab.conf",
           f"[DEFAULT]\nmain-repo = lab\n\n[lab]\nlocation = {repo}\nauto-sync = no\n")
    # the shipped repos.conf names [gentoo] at the unprefixed /var/db/repos/gentoo
    _write(root / "share/portage/config/repos.conf", "[DEFAULT]\nmain-repo = lab\n")
    (root / "etc/portage/make.profile").symlink_to(repo / "profiles/lab/amd64")
    (root / "bin/gtar").symlink_to(shutil.which("tar") or "/bin/tar")
    return prefix


def make_prefixes(roots: Iterable[Path], repo: Path, **kwargs: str) -> list[Prefix]:
    """Several prefixes made side by side (each is mostly a pip install)."""
    roots = list(roots)
    made: dict[Path, Prefix] = {}
    errors: list[BaseException] = []

    def one(root: Path) -> None:
        try:
            made[root] = make_prefix(root, repo, **kwargs)
        except BaseException as exc:  # (re-raised below, in the caller's thread)
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(root,)) for root in roots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [made[root] for root in roots]


# ---------------------------------------------------------------------------------------------
# Signed binary packages: the swarm's key, a client's keyring, and an attacker's edits


def _gpg(home: Path, *argv: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["gpg", "--homedir", str(home), "--batch", *argv], input=stdin,
                          capture_output=True, timeout=60, check=True)
    return done.stdout


def signing_key(home: Path) -> str:
    """A new GnuPG home with a passphrase-less signing key (the swarm's); its fingerprint."""
    home.mkdir(mode=0o700)
    _gpg(home, "--passphrase", "", "--quick-gen-key", "swarm binhost <binhost@lab.invalid>",
         "ed25519", "sign", "never")
    return next(line.split(":")[9] for line in _gpg(
        home, "--list-keys", "--with-colons").decode().splitlines() if line.startswith("fpr"))


def trust(keyring: Path, home: Path, fingerprint: str) -> None:
    """A client's keyring holding the swarm's public key, trusted (getuto's job on Gentoo)."""
    keyring.mkdir(mode=0o700)
    _gpg(keyring, "--import", stdin=_gpg(home, "--export", "--armor", fingerprint))
    _gpg(keyring, "--import-ownertrust", stdin=f"{fingerprint}:6:\n".encode())
    _gpg(keyring, "--check-trustdb")  # Portage verifies with --no-auto-check-trustdb


def stop_agents(*homes: Path) -> None:
    """Stop the gpg-agent that gpg started for each GnuPG home (it outlives the test, until it
    notices its home is gone). A home never made is skipped."""
    for home in homes:
        if home.is_dir():
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                           capture_output=True, timeout=60, check=False)


def verifying_env(keyring: Path) -> dict[str, str]:
    """A client's environment that requires and checks signatures with `keyring` (as this
    user: gpg as `nobody` cannot read a root-owned test keyring)."""
    return {"FEATURES": "binpkg-request-signature", "BINPKG_GPG_VERIFY_GPG_HOME": str(keyring),
            "GPG_VERIFY_USER_DROP": "", "GPG_VERIFY_GROUP_DROP": ""}


def tamper(package: Path) -> None:
    """Change one digest in the package's signed Manifest (the size stays the same)."""
    tampered = package.with_suffix(".tampered")
    with tarfile.open(package) as old, tarfile.open(tampered, "w", format=old.format) as new:
        for member in old.getmembers():
            data = old.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith("/Manifest"):
                at = data.index(b"SHA512 ") + len(b"SHA512 ")
                data = data[:at] + (b"0" if data[at:at + 1] != b"0" else b"1") + data[at + 1:]
            new.addfile(member, io.BytesIO(data))
    os.replace(tampered, package)


def reindex_entry(root: Path, path: str) -> None:
    """Make the index agree with the file again (as one who can write the binhost could), and
    bump its TIMESTAMP so that clients read it."""
    data = (root / path).read_bytes()
    text = (root / "Packages").read_text()
    header, _, body = text.partition("\n\n")
    stamp = next(int(x.split(": ")[1]) for x in header.splitlines() if x.startswith("TIMESTAMP"))
    header = header.replace(f"TIMESTAMP: {stamp}", f"TIMESTAMP: {stamp + 10}")
    blocks = body.split("\n\n")
    for i, block in enumerate(blocks):
        if f"PATH: {path}" in block:
            lines = [f"MD5: {hashlib.md5(data).hexdigest()}" if ln.startswith("MD5:") else
                     f"SHA1: {hashlib.sha1(data).hexdigest()}" if ln.startswith("SHA1:") else ln
                     for ln in block.splitlines()]
            blocks[i] = "\n".join(lines)
    (root / "Packages").write_text(header + "\n\n" + "\n\n".join(blocks))
    (root / "Packages.gz").unlink(missing_ok=True)
