"""The emerge service's judgements that need no Portage: whose binhost catalog is believed, and
what may be handed to emerge as an atom."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from swarmnode.control import ControlError
from swarmnode.portage.service import EmergeService, check_atoms
from swarmnode.push.release import BUILD


def _member(mid: str, *, binhost: bool = True, state: str = "alive",
            admitted: bool = True) -> SimpleNamespace:
    facts = {"binhost": f"http://{mid}:8080"} if binhost else {}
    return SimpleNamespace(id=mid, state=state, admitted_by="founder" if admitted else None,
                           record=SimpleNamespace(facts_dict=lambda: facts))


def test_only_alive_admitted_build_right_holders_stating_binhost_are_asked() -> None:
    members = [_member("good"), _member("no-right"), _member("dead", state="dead"),
               _member("guest", admitted=False), _member("plain", binhost=False)]
    rights = {BUILD: frozenset({"good", "dead", "guest", "plain"})}
    node = SimpleNamespace(core=SimpleNamespace(members=lambda: members),
                           rights=SimpleNamespace(holders=lambda right: rights.get(right,
                                                                                   frozenset())))
    # a forgotten container stating `binhost` without the build right is never believed
    assert EmergeService(node).binhosts() == ["good"]  # type: ignore[arg-type]


@pytest.mark.parametrize("atom", ["--config-root=/tmp/evil", "-e", "", "a b", "x;rm -rf /",
                                  "$(id)", "a\nb", 7])
def test_an_option_or_shell_text_is_not_an_atom(atom: object) -> None:
    with pytest.raises(ControlError, match="not a package atom"):
        check_atoms([atom])


def test_atoms_and_sets_emerge_takes_are_accepted_and_the_count_is_bounded() -> None:
    atoms = ["@world", "=dev-libs/openssl-3.0.13", ">=app-misc/foo-1.2:0/3", "~sys-libs/z-1",
             "app-lab/tool::lab", "dev-lang/python:3.12"]
    assert check_atoms(atoms) == atoms
    with pytest.raises(ControlError, match="1 to 1000"):
        check_atoms(["app-lab/tool"] * 1001)
    with pytest.raises(ControlError, match="1 to 1000"):
        check_atoms("app-lab/tool")  # type: ignore[arg-type]


def test_an_emerge_nobody_alive_can_build_is_refused_at_once_naming_the_way_out() -> None:
    def member(mid: str, fingerprint: str, state: str = "alive") -> SimpleNamespace:
        facts = {"portage": fingerprint}
        return SimpleNamespace(id=mid, state=state, admitted_by="founder",
                               record=SimpleNamespace(facts_dict=lambda: facts))

    members = [member("o3", "b" * 16), member("gone", "a" * 16, state="dead")]
    service = EmergeService(SimpleNamespace(  # type: ignore[arg-type]
        core=SimpleNamespace(members=lambda: members)))
    with pytest.raises(ControlError, match=r"no alive member has this node's build environ.*"
                                           r"swarmnode nodes"):
        service._check_matching_worker("a" * 16)
    members.append(member("twin", "a" * 16))
    service._check_matching_worker("a" * 16)  # (no error)


def _published_service(monkeypatch: pytest.MonkeyPatch, serves: dict[str, list[set[str]]]):
    """An EmergeService whose build `b` has two packaged jobs done (tool, liba), one failed
    and one done with no package; binhost X's catalog answers are `serves[X]` in turn (the
    last repeats), or BinhostError when it has none. Also: how often each was asked, and every
    question's timeout."""
    from swarmnode.ledger.jobs import Job, JobSpec
    from swarmnode.portage import service as service_module
    from swarmnode.portage.binhost import BinhostError

    pkg = (("binpkgs/app-lab/x-1.gpkg.tar", "d" * 64),)
    jobs = [Job("b", "app-lab_tool-1.0", JobSpec(), state="done", artifacts=pkg),
            Job("b", "app-lab_liba-1", JobSpec(), state="done", artifacts=pkg),
            Job("b", "app-lab_broke-1", JobSpec(), state="failed", artifacts=pkg),
            Job("b", "app-lab_meta-1", JobSpec(), state="done")]

    async def job_env(job: Job) -> dict[str, str]:
        return {"SWARMNODE_PACKAGE_KEY": f"key-{job.name}"}

    asked: dict[str, int] = {}
    timeouts: list[float] = []

    async def query(node: object, binhost: str, keys: list[str], timeout: float):
        assert sorted(keys) == ["key-app-lab_liba-1", "key-app-lab_tool-1.0"]
        n = asked[binhost] = asked.get(binhost, 0) + 1
        timeouts.append(timeout)
        if not serves[binhost]:
            raise BinhostError(f"{binhost} did not answer")
        have = serves[binhost][min(n, len(serves[binhost])) - 1]
        return {k: ("p", "d") for k in keys if k.removeprefix("key-app-lab_") in have}

    monkeypatch.setattr(service_module, "query_binhost", query)
    service = EmergeService(SimpleNamespace(  # type: ignore[arg-type]
        builds=SimpleNamespace(ledger=SimpleNamespace(jobs=lambda b: jobs if b == "b" else []),
                               job_env=job_env),
        member_name=lambda peer: peer.upper()))
    monkeypatch.setattr(service, "binhosts", lambda: sorted(serves))
    return service, asked, timeouts


def test_published_waits_until_the_binhost_serves_every_package_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    service, asked, _ = _published_service(monkeypatch, {"bh": [{"tool-1.0"},
                                                                {"tool-1.0", "liba-1"}]})
    # asked at once: liba is not in yet (a binhost takes a package after its job is done)
    assert asyncio.run(service.published("b")) == {"BH": ["app-lab/liba-1"]}
    # waiting: asked again until it is (the failed job and the one with no package are not
    # waited for)
    assert asyncio.run(service.published("b", wait=30.0)) == {"BH": []} and asked["bh"] == 2
    assert asyncio.run(service.published("unknown", wait=30.0)) == {"BH": []}


def test_published_names_a_binhost_that_does_not_answer_once_the_wait_is_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from swarmnode.portage import service as service_module

    service, asked, timeouts = _published_service(
        monkeypatch, {"bh": [{"tool-1.0", "liba-1"}], "gone": []})
    got = asyncio.run(service.published("b", wait=0.3))
    assert got == {"BH": [], "GONE": "gone did not answer"} and asked["gone"] >= 2
    # no question outlasts the wait by more than a second (a binhost's own limit is QUERY_S)
    assert max(timeouts) == 1.0 < service_module.QUERY_S
