"""The build-environment fingerprint: parsed from real Portage output (fixtures captured from
lab prefixes), hashed, compared, stated in the record and asked for over the swarm.

Fixtures (tests/fixtures/, captured from tests/lab/portage.py prefixes on Debian 12):
`portage-info-lab.txt` / `portage-envvar-lab.txt` a prefix as made; `-o3` the same with
`CFLAGS="-O3 -pipe"` in make.conf; `portage-info-nogcc.txt` emerge --info with no gcc on
PATH; `portage-info-git.txt` with the repository synced by git (a head commit).
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from swarmnode.membership.messages import MAX_FACT_VALUE
from swarmnode.portage.env import ENV, ENV_REPLY, probe
from swarmnode.portage.fingerprint import (
    FACT_ABI,
    FACT_HASH,
    FACT_KEYS,
    KEYS,
    Fingerprint,
    FingerprintError,
    check_values,
    compare_facts,
    describe,
    differing,
    fingerprint_of,
    parse_envvar,
    parse_info,
    read_key_hashes,
)
from swarmnode.portage.host import PortageHost
from swarmnode.worker import unpack_map
from tests.attacker import Attacker
from tests.lab import portage as lab_portage
from tests.ports import free_port
from tests.swarm import (
    Swarm,
    loopback_addr,
    swarm_fixture,  # noqa: F401 (the `swarm` fixture)
)

FIXTURES = Path(__file__).parent / "fixtures"
LAB_TIMESTAMP = "Sun, 06 Dec 2026 00:00:00 +0000"
#: The lab fixture's hash. It is the reuse key's input across releases: a change to the
#: canonical encoding must be deliberate (every binhost entry would stop matching).
LAB_HASH = "b3952a5d3f2e5317"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def lab_fingerprint(envvar: str = "lab", info: str = "lab") -> Fingerprint:
    return fingerprint_of(parse_info(fixture(f"portage-info-{info}.txt")),
                          parse_envvar(fixture(f"portage-envvar-{envvar}.txt")))


# -- parsing real output ------------------------------------------------------------------

def test_emerge_info_header_and_repositories_are_read() -> None:
    info = parse_info(fixture("portage-info-lab.txt"))
    assert (info.portage, info.profile, info.compiler) == ("3.0.83", "lab/amd64", "gcc-12")
    # no libc package in a prefix's vdb: Portage says "unavailable", the uname line tells
    assert info.libc == "glibc-2.36"
    assert info.repos == {"lab": LAB_TIMESTAMP}


def test_a_git_synced_repository_is_named_by_its_head_commit() -> None:
    info = parse_info(fixture("portage-info-git.txt"))
    assert info.repos == {"lab": "43193bbbd158d7a4548da0c5d4293b32212a09a3"}


def test_no_gcc_leaves_the_compiler_out_and_differs_by_it_alone() -> None:
    info = parse_info(fixture("portage-info-nogcc.txt"))
    assert info.compiler is None and info.profile == "lab/amd64"
    without = lab_fingerprint(info="nogcc")
    assert "compiler" not in without.values
    assert differing(lab_fingerprint().key_hashes, without.key_hashes) == ["compiler"]


def test_output_without_the_portage_header_is_refused() -> None:
    with pytest.raises(FingerprintError, match="no `Portage VERSION"):
        parse_info("!!! something went wrong\n")
    with pytest.raises(FingerprintError, match="fields"):
        parse_info("Portage 3.0.83 (python 3.11, lab/amd64)\n")


def test_portageq_values_are_unquoted_and_empty_ones_left_out() -> None:
    values = parse_envvar(fixture("portage-envvar-lab.txt"))
    assert values["CFLAGS"] == "-O2 -pipe"
    assert values["LDFLAGS"] == "-Wl,-O1 -Wl,--as-needed"  # not in emerge --info here
    assert "FFLAGS" not in values and "CC" not in values
    assert parse_envvar(fixture("portage-envvar-o3.txt"))["CFLAGS"] == "-O3 -pipe"
    assert parse_envvar("CFLAGS='-O2\n   -pipe'\nCXX=''\n") == {"CFLAGS": "-O2 -pipe"}
    with pytest.raises(FingerprintError):
        parse_envvar("CFLAGS='-O2\n")


def test_the_fingerprint_keeps_what_changes_binary_packages() -> None:
    values = lab_fingerprint().values
    assert values == {
        "ARCH": "amd64", "CHOST": "x86_64-pc-linux-gnu", "CFLAGS": "-O2 -pipe",
        "CXXFLAGS": "-O2 -pipe", "LDFLAGS": "-Wl,-O1 -Wl,--as-needed",
        "USE": "amd64 doc elibc_glibc kernel_linux userland_GNU",
        "FEATURES": "binpkg-docompress binpkg-dostrip",  # not distlocks, parallel-fetch...
        "profile": "lab/amd64", "compiler": "gcc-12", "libc": "glibc-2.36",
        "repos": f"lab: {LAB_TIMESTAMP}"}


# -- hashes -------------------------------------------------------------------------------

def test_the_hash_is_stable_and_independent_of_order() -> None:
    fp = lab_fingerprint()
    assert fp.hash == LAB_HASH
    assert Fingerprint(dict(reversed(fp.values.items()))).hash == LAB_HASH
    assert len(fp.abi) == 16 and fp.abi != fp.hash


def test_cflags_change_hash_and_abi_use_and_repos_only_the_hash() -> None:
    plain, o3 = lab_fingerprint(), lab_fingerprint("o3", "o3")
    assert o3.hash != plain.hash and o3.abi != plain.abi
    assert differing(plain.key_hashes, o3.key_hashes) == ["CFLAGS"]
    for key, value in (("USE", "amd64 elibc_glibc"), ("repos", "lab: 43193bb")):
        other = Fingerprint({**plain.values, key: value})
        assert other.hash != plain.hash and other.abi == plain.abi, key
        assert differing(plain.key_hashes, other.key_hashes) == [key]


def test_differing_names_keys_missing_on_either_side() -> None:
    assert differing({"A": "1", "B": "2"}, {"B": "3", "C": "4"}) == ["A", "B", "C"]
    assert differing({"A": "1"}, {"A": "1"}) == []


def test_every_key_fits_one_fact() -> None:
    full = Fingerprint({k: "x" * 1000 for k in KEYS})
    facts = full.facts()
    assert set(facts) == {FACT_HASH, FACT_ABI, FACT_KEYS}
    assert len(facts[FACT_KEYS]) <= MAX_FACT_VALUE
    assert read_key_hashes(facts[FACT_KEYS]) == full.key_hashes


# -- comparing members' facts -------------------------------------------------------------

def test_nodes_column_from_the_facts_of_two_members() -> None:
    plain, o3 = lab_fingerprint().facts(), lab_fingerprint("o3", "o3").facts()
    assert compare_facts(plain, dict(plain)) == []
    assert compare_facts(plain, o3) == ["CFLAGS"]
    assert compare_facts(plain, {"cores": 4}) is None
    assert compare_facts({}, plain) is None
    assert compare_facts(plain, {**o3, FACT_KEYS: plain[FACT_KEYS]}) == ["?"]
    assert [describe(d) for d in ([], ["CFLAGS", "USE"], None)] == [
        "same", "differs: CFLAGS, USE", "-"]


def test_malformed_key_hashes_from_a_member_are_skipped() -> None:
    assert read_key_hashes(7) == {}
    assert read_key_hashes("CFLAGS=abcdef USE=xyz 9=abcdef =abcdef CHOST=abcdef0 ARCH=012345"
                           ) == {"CFLAGS": "abcdef", "ARCH": "012345"}


def test_readable_values_from_a_member_are_bounded() -> None:
    assert check_values({"CFLAGS": "-O2"}) == {"CFLAGS": "-O2"}
    for bad in ([], {"CFLAGS": 1}, {"x y": "1"}, {"CFLAGS": "\x1b]0;pwned\x07"},
                {"USE": "a" * 20000}, {f"K{i}": "" for i in range(65)}):
        with pytest.raises(ValueError):
            check_values(bad)


# -- real Portage -------------------------------------------------------------------------

_REASON = lab_portage.unavailable_reason()
needs_portage = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory) -> tuple[lab_portage.Prefix, ...]:
    """Two lab prefixes: as made, and with CFLAGS="-O3 -pipe"."""
    root = tmp_path_factory.mktemp("portage")
    lab_portage.ensure_portage_user()
    repo = lab_portage.write_repo(root / "repo")
    with ThreadPoolExecutor(2) as pool:
        made = [pool.submit(lab_portage.make_prefix, root / name, repo, make_conf=conf)
                for name, conf in (("plain", ""), ("o3", 'CFLAGS="-O3 -pipe"\n'))]
        return tuple(f.result() for f in made)


@needs_portage
@pytest.mark.timeout(120)
async def test_probing_real_portage(prefixes: tuple[lab_portage.Prefix, ...]) -> None:
    plain, o3 = [await probe(PortageHost(p.emerge)) for p in prefixes]
    assert plain.values["CFLAGS"] == "-O2 -pipe" and o3.values["CFLAGS"] == "-O3 -pipe"
    assert plain.values["profile"] == "lab/amd64"
    assert plain.values["repos"] == f"lab: {LAB_TIMESTAMP}"
    assert differing(plain.key_hashes, o3.key_hashes) == ["CFLAGS"]
    assert await probe(PortageHost(prefixes[0].emerge)) == plain  # the same again


@needs_portage
@pytest.mark.timeout(180)
def test_nodes_state_their_fingerprint_and_members_compare_it(
        swarm: Swarm, prefixes: tuple[lab_portage.Prefix, ...]) -> None:
    first, token = swarm.init("n1", loopback_addr(1))
    nodes = [first, swarm.add("n2", loopback_addr(2)), swarm.add("n3", loopback_addr(3))]
    for node, prefix in zip(nodes, prefixes, strict=False):  # n3: no Portage
        node.home.mkdir(parents=True, exist_ok=True)
        (node.home / "config.toml").write_text(f'emerge = "{prefix.emerge}"\n')
    swarm.start(first)
    for node in nodes[1:]:
        swarm.start(node, token)
    swarm.wait_converged(nodes, 20)

    shown = ("n1", "n2", "n3") if shutil.which("emerge") is None else ("n1", "n2")

    def column(observer: str) -> dict[str, object]:  # (n3 has Portage where PATH has one)
        return {m["name"]: m["portage_differs"] for m in swarm.cli_json(observer, "nodes")
                if m["name"] in shown}

    expected = {"n1": [], "n2": ["CFLAGS"], "n3": None}
    swarm.wait_for(lambda: column("n1") == {n: expected[n] for n in shown}, 20,
                   "n1 compares every member's fingerprint with its own")
    if "n3" in shown:
        assert column("n3") == {"n1": None, "n2": None, "n3": None}
        assert swarm.cli_json(first, "portage-env", "n3")["values"] is None
    table = swarm.cli(first, "nodes").stdout
    assert "differs: CFLAGS" in table and "same" in table

    mine = swarm.cli_json(first, "portage-env")
    assert mine["values"]["CFLAGS"] == "-O2 -pipe" and mine["differs"] is None
    theirs = swarm.cli_json(first, "portage-env", "n2")
    assert theirs["values"]["CFLAGS"] == "-O3 -pipe" and theirs["differs"] == ["CFLAGS"]
    text = swarm.cli(first, "portage-env", "n2").stdout
    assert "-O3 -pipe" in text and "compared with this node: differs: CFLAGS" in text

    asyncio.run(_only_members_are_answered(swarm))


async def _only_members_are_answered(swarm: Swarm) -> None:
    """A member gets the values; a stranger's request and a reply nobody asked for are
    dropped and counted."""
    n1, n2 = swarm.nodes["n1"], swarm.nodes["n2"]

    async def dropped(reason: str, before: int) -> None:
        async with asyncio.timeout(10):
            while swarm.query(n1, "status")["drops"].get(reason, 0) == before:
                await asyncio.sleep(0.05)

    before = swarm.query(n1, "status")["drops"]
    async with Attacker(n2.home, n1.listen, n1.id) as member:
        assert await member.send(ENV, {"rid": b"r" * 8})
        reply = unpack_map((await member.recv(5.0, ENV_REPLY)).body)
        assert reply["values"]["CFLAGS"] == "-O2 -pipe"
        assert await member.send(ENV_REPLY, {"rid": b"u" * 8, "values": {"CFLAGS": "-O0"}})
        await dropped("unasked_portage_reply", before.get("unasked_portage_reply", 0))
        assert await member.send(ENV, {"values": {}})
        await dropped("malformed_portage", before.get("malformed_portage", 0))
    async with Attacker(None, n1.listen, n1.id) as stranger:
        assert await stranger.send(ENV, {"rid": b"s" * 8})
        await dropped("not_member", before.get("not_member", 0))
        assert not [e for e in stranger.inbox if e.type == ENV_REPLY]


def test_a_configured_emerge_that_is_not_there_stops_the_start(tmp_path: Path) -> None:
    from swarmnode import cluster
    from swarmnode.node import Node, NodeOptions, StartError

    cluster.init(tmp_path, "c", f"127.0.0.1:{free_port()}", [], 3600)
    (tmp_path / "config.toml").write_text(f'emerge = "{tmp_path / "nope/emerge"}"\n')
    with pytest.raises(StartError, match="is not an executable"):
        Node(NodeOptions(home=tmp_path, mdns=False, tailscale=False, fast=True))
