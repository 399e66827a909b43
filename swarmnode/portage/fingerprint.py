"""The build-environment fingerprint: the settings of a node's Portage that change what a
binary package contains, hashed so that nodes can compare them in their facts.

What goes in (`Fingerprint.values`, readable; a key is left out when Portage has no value):

* `CHOST`, `ARCH`, `profile`: the target a package is built for and the profile's defaults.
* `CFLAGS`, `CXXFLAGS`, `LDFLAGS`, `FFLAGS`, `FCFLAGS`, `RUSTFLAGS`: the code the compiler
  emits; `CC`, `CXX`: a make.conf that picks another compiler (clang) than `compiler` says.
* `USE`: the global USE as Portage computes it, USE_EXPAND flattened in, so `CPU_FLAGS_*`,
  `PYTHON_TARGETS`, `L10N` and FEATURES=test (`test`) are covered by it.
* `FEATURES`: only those in BINARY_FEATURES, which change the files packed into a binary
  package (stripping, debug files, docs, permissions).
* `PKG_INSTALL_MASK`: files left out of binary packages.
* `compiler`, `libc`: what emerge --info names (gcc-config's slot, e.g. `gcc-13`; the libc
  package, or the glibc Portage's Python runs on when no libc package is installed).
* `repos`: each repository's head commit, else its timestamp: which ebuilds a plan sees.

Left out, on purpose: ACCEPT_KEYWORDS and masks (they choose versions; a binary package's
version is already part of its name), MAKEOPTS, BINPKG_COMPRESS and BINPKG_FORMAT (how, not
what, is built: clients read every format), EPREFIX (Portage relocates binary packages of a
Prefix, see ../shared/PORTAGE.md) and the paths (DISTDIR, PKGDIR, PORTAGE_TMPDIR).

`hash` covers every key; `abi` every key but `USE` and `repos`. A binary package is reused by
the abi together with its own USE (per-package USE is what a binary has; the global USE is
only the default of it), and a repository sync must not invalidate the binhost. Nodes compare
per-key short hashes (`key_hashes`, the `portage_keys` fact) to name what differs.

Everything here is pure: the probe that runs emerge lives in swarmnode/portage/env.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

#: What `portageq envvar` is asked for (one command; emerge --info prints only the variables
#: the repository's profiles/info_vars lists, and LDFLAGS is often not among them).
VARIABLES = ("CHOST", "ARCH", "CFLAGS", "CXXFLAGS", "LDFLAGS", "FFLAGS", "FCFLAGS", "RUSTFLAGS",
             "CC", "CXX", "USE", "FEATURES", "PKG_INSTALL_MASK")
#: FEATURES that change the files of a binary package; the others change how Portage works
#: (sandboxes, locks, logs, fetching) or what it does after a build.
BINARY_FEATURES = frozenset({
    "binpkg-docompress", "binpkg-dostrip", "compressdebug", "dedupdebug", "installsources",
    "nodoc", "noinfo", "noman", "nostrip", "packdebug", "sfperms", "splitdebug", "suidctl",
    "xattr"})
#: The keys from emerge --info's header and repository sections.
INFO_KEYS = ("profile", "compiler", "libc", "repos")
KEYS = VARIABLES + INFO_KEYS
#: Keys that are not part of the abi (see the module docstring).
NOT_ABI = frozenset({"USE", "repos"})

#: Record facts (each a string within the 256 characters a fact may hold).
FACT_HASH, FACT_ABI, FACT_KEYS = "portage", "portage_abi", "portage_keys"
FACTS = (FACT_HASH, FACT_ABI, FACT_KEYS)
HASH_HEX = 16
#: Per-key hashes name what differs; equality is decided by the full hash. 24 bits keep the
#: `portage_keys` fact of every key in KEYS under 256 characters.
KEY_HASH_HEX = 6
#: Bounds on readable values received from a member (a real USE is a few KiB).
MAX_VALUE = 16 * 1024
MAX_VALUES = 64

_HEADER = re.compile(r"^Portage (\S+) \((.*)\)\s*$")
_UNAME_LIBC = re.compile(r"-with-(glibc|musl|libc)(\d[\w.]*)\s*$")
_REPO_FIELD = re.compile(r"^ {4}([\w -]+): (.*)$")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_KEY_HASH = re.compile(rf"[0-9a-f]{{{KEY_HASH_HEX}}}")
_VAR_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_ENVVAR = re.compile(r"^[A-Z][A-Z0-9_]*=")


class FingerprintError(ValueError):
    """Portage's output could not be read; the message says what was missing."""


@dataclass(frozen=True)
class InfoReport:
    """What the fingerprint takes from `emerge --info`."""

    portage: str
    profile: str | None
    compiler: str | None
    libc: str | None
    repos: dict[str, str]  # name -> head commit, else timestamp


def parse_info(text: str) -> InfoReport:
    """Read `emerge --info`: its `Portage V (python, profile, compiler, libc, uname)` header
    and its repository sections. Values Portage calls unavailable come out as None."""
    lines = text.splitlines()
    header = next((m for m in map(_HEADER.match, lines) if m), None)
    if header is None:
        raise FingerprintError("emerge --info printed no `Portage VERSION (...)` line")
    fields = header.group(2).split(", ")  # the libc list is joined by "," alone
    if len(fields) < 5:
        raise FingerprintError(f"emerge --info's header has {len(fields)} fields, not 5")
    profile, compiler, libc = (_available(f) for f in fields[1:4])
    if libc is None:
        libc = _uname_libc(lines)
    return InfoReport(header.group(1), profile, compiler, libc, _repos(lines))


def _available(field: str) -> str | None:
    value = field.strip()
    return None if value.strip("[]") in ("", "unavailable") else value


def _uname_libc(lines: list[str]) -> str | None:
    """The libc of `System uname: ...-with-glibc2.36` (Python's own look at its C library)."""
    for line in lines:
        if line.startswith("System uname:") and (m := _UNAME_LIBC.search(line)):
            return f"{m.group(1)}-{m.group(2)}"
    return None


def _repos(lines: list[str]) -> dict[str, str]:
    """Each repository of the `Repositories:` section: its head commit, else its timestamp."""
    try:
        start = lines.index("Repositories:") + 1
    except ValueError:
        return {}
    repos: dict[str, dict[str, str]] = {}
    name = None
    for line in lines[start:]:
        if _ENVVAR.match(line):
            break  # the variables follow the repositories
        if line and not line[0].isspace():
            name = line.strip()
            repos[name] = {}
        elif name is not None and (m := _REPO_FIELD.match(line)):
            repos[name][m.group(1)] = m.group(2).strip()
    return {n: f.get("head commit") or f.get("timestamp") or "" for n, f in repos.items()}


def parse_envvar(text: str) -> dict[str, str]:
    """Read `portageq envvar -v VAR...` (`VAR=shell-quoted value`, a quoted value may span
    lines); whitespace runs become one space, and empty values are left out, as Portage
    treats them as unset."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise FingerprintError(f"portageq printed unreadable quoting: {exc}") from None
    values: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        if _VAR_NAME.fullmatch(key) and (value := " ".join(value.split())):
            values[key] = value
    return values


def fingerprint_of(info: InfoReport, variables: Mapping[str, str]) -> Fingerprint:
    """The fingerprint of one Portage from its emerge --info and portageq envvar."""
    values = {k: v for k in VARIABLES if (v := variables.get(k, "").strip())}
    features = sorted(set(values.pop("FEATURES", "").split()) & BINARY_FEATURES)
    if features:
        values["FEATURES"] = " ".join(features)
    if "USE" in values:
        values["USE"] = " ".join(sorted(set(values["USE"].split())))
    for key, value in (("profile", info.profile), ("compiler", info.compiler),
                       ("libc", info.libc)):
        if value:
            values[key] = value
    if info.repos:
        values["repos"] = "; ".join(f"{n}: {c}" for n, c in sorted(info.repos.items()))
    return Fingerprint(values)


@dataclass(frozen=True)
class Fingerprint:
    """A Portage's build environment: readable values by key (see the module docstring)."""

    values: dict[str, str]

    @property
    def hash(self) -> str:
        """Every key: equal only for nodes whose builds are interchangeable, repos included."""
        return _digest(self.values, HASH_HEX)

    @property
    def abi(self) -> str:
        """Every key but the global USE and the repositories: with a package's own USE, the
        key under which its binary package is reused."""
        return _digest({k: v for k, v in self.values.items() if k not in NOT_ABI}, HASH_HEX)

    @property
    def key_hashes(self) -> dict[str, str]:
        """A short hash per key (KEY_HASH_HEX hex digits), to name the keys that differ."""
        return {k: _digest({k: v}, KEY_HASH_HEX) for k, v in sorted(self.values.items())}

    def facts(self) -> dict[str, str]:
        """The record facts a node states: `portage`, `portage_abi`, `portage_keys`."""
        keys = " ".join(f"{k}={h}" for k, h in self.key_hashes.items())
        return {FACT_HASH: self.hash, FACT_ABI: self.abi, FACT_KEYS: keys}


def _digest(values: Mapping[str, str], hex_digits: int) -> str:
    """blake2b over a canonical JSON encoding (sorted keys, no spaces, UTF-8)."""
    data = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(data.encode(), digest_size=hex_digits // 2,
                           person=b"swarmnode-fp").hexdigest()


def read_key_hashes(fact: object) -> dict[str, str]:
    """The per-key hashes of a member's `portage_keys` fact; malformed entries are skipped
    (a member's facts are its own word, never trusted to be well formed)."""
    if not isinstance(fact, str):
        return {}
    out: dict[str, str] = {}
    for item in fact.split()[:MAX_VALUES]:
        key, _, value = item.partition("=")
        if _KEY.fullmatch(key) and _KEY_HASH.fullmatch(value):
            out[key] = value
    return out


def differing(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The keys whose values (or hashes) differ between `a` and `b`, a key missing on one
    side included, sorted."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def compare_facts(mine: Mapping[str, object], theirs: Mapping[str, object]) -> list[str] | None:
    """How a member's Portage compares with this node's, from both records' facts: None when
    either states no fingerprint, [] when the hashes match, else the keys that differ
    (`?` when the hashes differ but no key hash does)."""
    a, b = mine.get(FACT_HASH), theirs.get(FACT_HASH)
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        return None
    if a == b:
        return []
    return differing(read_key_hashes(mine.get(FACT_KEYS)),
                     read_key_hashes(theirs.get(FACT_KEYS))) or ["?"]


def describe(differs: list[str] | None) -> str:
    """The `nodes` column: `same`, `differs: CFLAGS, USE`, or `-` (no Portage to compare)."""
    if differs is None:
        return "-"
    return "same" if not differs else "differs: " + ", ".join(differs)


def check_values(value: object) -> dict[str, str]:
    """Readable values received from a member: at most MAX_VALUES names, each with one line
    of printable text (nothing to steer a terminal) of at most MAX_VALUE characters;
    ValueError for anything else."""
    if not isinstance(value, dict) or len(value) > MAX_VALUES:
        raise ValueError(f"values: a map of at most {MAX_VALUES} entries")
    for k, v in value.items():
        if not isinstance(k, str) or not _KEY.fullmatch(k):
            raise ValueError("values: a key is not a name")
        if not isinstance(v, str) or len(v) > MAX_VALUE or not v.isprintable():
            raise ValueError(f"values: {k} is not one line of at most {MAX_VALUE} characters")
    return dict(value)
