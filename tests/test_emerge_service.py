"""The emerge service's judgements that need no Portage: whose binhost catalog is believed, and
what may be handed to emerge as an atom."""

from __future__ import annotations

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
