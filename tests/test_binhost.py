"""The binhost's logic without Portage: retention, the catalog, query bounds, HTTP paths."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from net.transport import Inbound
from net.wire import PROTOCOL_VERSION, DropCounter, Envelope
from swarmnode.binhost_service import (
    BINHOST_QUERY,
    BINHOST_REPLY,
    BinhostService,
    query_binhost,
)
from swarmnode.config import ConfigError, NodeConfig, parse
from swarmnode.portage.binhost import (
    MAX_QUERY_KEYS,
    Binhost,
    BinhostError,
    Catalog,
    Instance,
    binhost_url,
    expired,
    parse_found,
    parse_keys,
    served_file,
)

D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


def test_retention_keeps_the_newest_builds_per_package_and_slot() -> None:
    libb = [Instance(f"app-lab/libb/libb-1.{v}-{b}.gpkg.tar", "app-lab/libb", "0", b, t)
            for v, b, t in ((0, 1, 100), (0, 2, 200), (1, 1, 300), (1, 2, 50))]
    other_slot = Instance("dev-lang/py/py-3.11-1.gpkg.tar", "dev-lang/py", "3.11", 1, 10)
    newer_slot = Instance("dev-lang/py/py-3.12-1.gpkg.tar", "dev-lang/py", "3.12", 1, 20)
    got = expired([*libb, other_slot, newer_slot], keep=2)
    # per CAT/PN:SLOT across versions, newest by build time: the two oldest of libb go
    assert got == ["app-lab/libb/libb-1.0-1.gpkg.tar", "app-lab/libb/libb-1.1-2.gpkg.tar"]
    assert expired(libb, keep=4) == []


def test_catalog_answers_the_newest_instance_and_forgets_removed_ones(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "binhost.db")
    catalog.record("k1", "a/b/b-1-1.gpkg.tar", D1, 1, "a/b-1", ts=100)
    catalog.record("k1", "a/b/b-1-2.gpkg.tar", D2, 2, "a/b-1", ts=200)
    catalog.record("k2", "a/c/c-1-1.gpkg.tar", D2, 1, "a/c-1", ts=150)
    assert catalog.lookup(["k1", "k2", "nope"]) == {"k1": ("a/b/b-1-2.gpkg.tar", D2),
                                                    "k2": ("a/c/c-1-1.gpkg.tar", D2)}
    # D2 is still kept by k2's row: only D1 is no longer referenced (its pin may go)
    assert catalog.forget(["a/b/b-1-1.gpkg.tar", "a/b/b-1-2.gpkg.tar"]) == {D1}
    assert catalog.lookup(["k1"]) == {}
    assert catalog.forget(["a/c/c-1-1.gpkg.tar"]) == {D2}
    many = [f"key{i}" for i in range(1200)]  # more than SQLite takes as parameters at once
    for i, key in enumerate(many):
        catalog.record(key, f"x/y/y-{i}-1.gpkg.tar", D3, 1, "x/y", ts=i)
    assert len(catalog.lookup(many)) == 1200


def test_query_keys_are_bounded_and_bad_ones_counted() -> None:
    keys, bad = parse_keys(["ok", "", "x" * 129, 7, None, "ok", "tab\there", "y" * 128])
    assert (keys, bad) == (["ok", "y" * 128], 5)
    with pytest.raises(BinhostError):
        parse_keys(["k"] * (MAX_QUERY_KEYS + 1))
    with pytest.raises(BinhostError):
        parse_keys({"k": 1})


def test_a_reply_is_kept_only_for_asked_keys_and_plain_paths() -> None:
    found = {"a": ["c/p/p-1-1.gpkg.tar", D1], "b": ["../x", D1], "c": ["/etc/x", D1],
             "d": ["c/p/p-1-2.gpkg.tar", "nothex"], "e": ["c/p/p-1-3.gpkg.tar", D2],
             "f": "junk"}
    assert parse_found(found, {"a", "b", "c", "d", "f"}) == {"a": ("c/p/p-1-1.gpkg.tar", D1)}
    with pytest.raises(BinhostError):
        parse_found([1, 2], {"a"})


def test_served_files_stay_inside_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "binhost"
    (root / "app-lab/libb").mkdir(parents=True)
    (root / "app-lab/libb/libb-1.0-1.gpkg.tar").write_bytes(b"pkg")
    (root / "Packages").write_text("index")
    (root / ".incoming").mkdir()
    (root / ".incoming/x.gpkg.tar").write_bytes(b"staged")
    (root / "app-lab/notes.txt").write_text("other")
    (tmp_path / "secret.gpkg.tar").write_bytes(b"secret")
    (root / "app-lab/evil").mkdir()
    (root / "app-lab/evil/evil-1-1.gpkg.tar").symlink_to(tmp_path / "secret.gpkg.tar")
    (root / "app-lab/link").symlink_to(tmp_path)
    real = os.path.realpath(root)
    assert served_file(root, "/Packages") == Path(real, "Packages")
    assert served_file(root, "/app-lab/libb/libb-1.0-1.gpkg.tar") is not None
    assert served_file(root, "/app-lab/libb/libb%2D1.0-1.gpkg.tar") is not None
    for bad in ("/../secret.gpkg.tar", "/%2e%2e/secret.gpkg.tar",
                "/app-lab/..%2f..%2fsecret.gpkg.tar", "/%252e%252e/secret.gpkg.tar",
                "//secret.gpkg.tar", "secret.gpkg.tar",
                "/app-lab/evil/evil-1-1.gpkg.tar", "/app-lab/link/secret.gpkg.tar",
                "/.incoming/x.gpkg.tar", "/app-lab/notes.txt", "/app-lab/Packages", "/",
                "/app-lab\\..\\secret.gpkg.tar", "/x%00.gpkg.tar", "/%ff.gpkg.tar",
                "/app-lab/libb/"):
        assert served_file(root, bad) is None, bad


def test_the_binhost_url_names_a_reachable_host() -> None:
    assert binhost_url("127.0.0.1:8080", []) == "http://127.0.0.1:8080"
    assert binhost_url("0.0.0.0:8080", ["192.0.2.7:7946"]) == "http://192.0.2.7:8080"
    assert binhost_url("[::]:81", ["[2001:db8::1]:7946"]) == "http://[2001:db8::1]:81"


def test_binhost_config_keys() -> None:
    got = parse('roles = ["binhost"]\nbinhost_listen = "0.0.0.0:8200"\nbinhost_keep = 5\n'
                'binhost_gpg_home = "/var/lib/swarm/gnupg"\nbinhost_gpg_key = "ABCDEF0123456789"\n')
    assert (got.binhost_listen, got.binhost_keep, got.binhost_gpg_key) == (
        "0.0.0.0:8200", 5, "ABCDEF0123456789")
    assert parse("").binhost_keep == 3
    for bad in ('binhost_listen = "0.0.0.0"', "binhost_keep = 0", 'binhost_keep = "3"',
                'binhost_gpg_home = "/x"', 'binhost_gpg_home = "/x"\nbinhost_gpg_key = "me"'):
        with pytest.raises(ConfigError):
            parse(bad)


def _service(tmp_path: Path) -> BinhostService:
    node = SimpleNamespace(node_config=NodeConfig(roles=("binhost",)), home=tmp_path,
                           portage=None, addresses=("127.0.0.1:7946",), drops=DropCounter())
    return BinhostService(node)  # type: ignore[arg-type]


def _ask(service: BinhostService, body: object) -> list[tuple[str, dict]]:
    replies: list[tuple[str, dict]] = []
    env = Envelope(PROTOCOL_VERSION, BINHOST_QUERY, "peer", 0, 0, msgpack.packb(body))
    service.on_message(Inbound(env, None, lambda t, b: replies.append(
        (t, msgpack.unpackb(b, raw=False)))))
    return replies


def test_the_query_handler_answers_known_keys_and_counts_bad_input(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert isinstance(service.binhost, Binhost)
    service.binhost.catalog.record("k1", "a/b/b-1-1.gpkg.tar", D1, 1, "a/b-1")
    replies = _ask(service, {"rid": b"r1", "keys": ["k1", "unknown", "", 5, "z" * 200]})
    assert replies == [(BINHOST_REPLY, {"rid": b"r1", "binhost": True,
                                        "found": {"k1": ["a/b/b-1-1.gpkg.tar", D1]}})]
    assert service.node.drops["binhost_bad_key"] == 3
    for bad in ({"rid": b"r2", "keys": "k1"}, {"rid": b"r3"}, [1, 2],
                {"rid": b"r4", "keys": ["k"] * (MAX_QUERY_KEYS + 1)}):
        assert _ask(service, bad) == []
    assert service.node.drops["malformed_binhost_query"] == 4
    service.binhost.catalog.close()


async def test_without_portage_a_package_is_kept_and_the_lack_of_an_index_said(
        tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert service.binhost is not None
    package = tmp_path / "libb-1.0-1.gpkg.tar"
    package.write_bytes(b"package")
    with pytest.raises(BinhostError, match="no Packages index"):
        await service.binhost.ingest(package, name="app-lab/libb/libb-1.0-1.gpkg.tar",
                                     digest=D1, key="k")
    assert (service.root / "app-lab/libb/libb-1.0-1.gpkg.tar").read_bytes() == b"package"
    package.write_bytes(b"another build")
    with pytest.raises(BinhostError, match="taken"):  # never over another build's file
        await service.binhost.ingest(package, name="app-lab/libb/libb-1.0-1.gpkg.tar",
                                     digest=D2, key="k2")
    assert (service.root / "app-lab/libb/libb-1.0-1.gpkg.tar").read_bytes() == b"package"
    assert service.binhost.catalog.lookup(["k"]) == {"k": ("app-lab/libb/libb-1.0-1.gpkg.tar",
                                                           D1)}
    assert (await service.binhost.prune()).removed == ()
    service.binhost.catalog.close()


class _Requests:
    """A node's `builds._request` toward a binhost whose catalog is `known`."""

    def __init__(self, known: dict[str, list[str]], answer: bool = True) -> None:
        self.known, self.answer, self.asked = known, answer, []

    async def _request(self, peer: str, msg_type: str, body: dict, timeout: float):
        self.asked.append((peer, msg_type, len(body["keys"])))
        if not self.answer:
            return None
        return {"binhost": True, "found": {k: self.known[k] for k in body["keys"]
                                           if k in self.known} | {"never-asked": ["a/b", D1]}}


async def test_query_binhost_splits_long_lists_and_keeps_valid_answers() -> None:
    keys = [f"k{i}" for i in range(MAX_QUERY_KEYS + 5)] + ["", "x" * 300]
    requests = _Requests({"k1": ["a/b/b-1-1.gpkg.tar", D1], "k2001": ["c/d/d-2-1.gpkg.tar", D2],
                          "k3": ["../escape", D3]})
    node = SimpleNamespace(builds=requests, member_name=lambda peer: peer)
    got = await query_binhost(node, "binhost-id", keys, timeout=5)  # type: ignore[arg-type]
    assert got == {"k1": ("a/b/b-1-1.gpkg.tar", D1), "k2001": ("c/d/d-2-1.gpkg.tar", D2)}
    assert requests.asked == [("binhost-id", BINHOST_QUERY, MAX_QUERY_KEYS),
                              ("binhost-id", BINHOST_QUERY, 5)]
    silent = SimpleNamespace(builds=_Requests({}, answer=False), member_name=lambda p: p)
    with pytest.raises(BinhostError, match="did not answer"):
        await query_binhost(silent, "binhost-id", ["k1"], timeout=0.1)  # type: ignore[arg-type]
