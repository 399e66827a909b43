"""Run by the Python that runs `emerge` (never imported by swarmnode): Portage's own view of
the packages of a plan.

stdin: {"cpvs": ["cat/pkg-1.0", ...]}; stdout: {"distdir": DISTDIR, "packages": {cpv: {
"use": [...], "build": [...], "run": [...], "bindings": [...], "distfiles": [...]}}}

* `use`: the USE the package is built with (Portage's PORTAGE_USE: the flags in its IUSE), the
  part of a binary package that its own USE changes.
* `build`: the cpvs of the plan its DEPEND, BDEPEND and IDEPEND need (USE conditionals
  evaluated with that USE); `run`: those its RDEPEND needs. Matched against the plan's
  packages, because those are the ones the swarm builds; a dependency outside the plan is
  already installed where the plan was made.
* `bindings`: for every `:=` dependency, the "cat/pkg:slot/subslot" it is built against (the
  plan's package, else the installed one): a binary built against another sub-slot is another
  binary.
* `distfiles`: the source archives it fetches with that USE.
"""

import json
import sys

import portage
from portage.dep import Atom, match_from_list, use_reduce
from portage.versions import _pkg_str

BUILD_KEYS = ("DEPEND", "BDEPEND", "IDEPEND")
RUN_KEYS = ("RDEPEND",)
META_KEYS = (*BUILD_KEYS, *RUN_KEYS, "SLOT", "EAPI", "repository")


def atoms(text, use, eapi):
    """The dependency atoms of `text` with USE conditionals evaluated (every || choice)."""
    flat = use_reduce(text, uselist=use, flat=True, token_class=Atom, eapi=eapi)
    return [a for a in flat if isinstance(a, Atom) and not a.blocker]


def main():
    request = json.load(sys.stdin)
    settings = portage.config(clone=portage.settings)
    root = settings["EROOT"]
    portdb = portage.db[root]["porttree"].dbapi
    vardb = portage.db[root]["vartree"].dbapi
    meta = {cpv: dict(zip(META_KEYS, portdb.aux_get(cpv, list(META_KEYS)), strict=True))
            for cpv in request["cpvs"]}
    plan = [_pkg_str(cpv, slot=m["SLOT"], repo=m["repository"], eapi=m["EAPI"])
            for cpv, m in meta.items()]
    out = {}
    for pkg in plan:
        cpv, m = str(pkg), meta[str(pkg)]
        settings.setcpv(pkg, mydb=portdb)
        use = sorted(settings["PORTAGE_USE"].split())
        found = {"build": set(), "run": set(), "bindings": set()}
        for key in (*BUILD_KEYS, *RUN_KEYS):
            for atom in atoms(m[key], use, m["EAPI"]):
                matched = match_from_list(atom, plan)
                found["build" if key in BUILD_KEYS else "run"].update(map(str, matched))
                if atom.slot_operator == "=":
                    chosen = matched or [_pkg_str(c, slot=vardb.aux_get(c, ["SLOT"])[0])
                                         for c in vardb.match(atom)]
                    if chosen:
                        best = portage.best(chosen)
                        found["bindings"].add(f"{best.cp}:{best.slot}/{best.sub_slot}")
        fetch = portdb.getFetchMap(cpv, useflags=use)
        out[cpv] = {"use": use, **{k: sorted(v) for k, v in found.items()},
                    "distfiles": sorted(fetch)}
    json.dump({"distdir": settings["DISTDIR"], "packages": out}, sys.stdout)


if __name__ == "__main__":
    main()
