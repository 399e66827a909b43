"""Tests for swarmnode.build.emerge on recorded `emerge --pretend` output."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from swarmnode.build.emerge import (
    EmergeError,
    Package,
    binpkg_outputs,
    emerge_command,
    job_name,
    parse_pretend,
    plan_from_pretend,
)
from swarmnode.build.plan import NAME_RE, Requires, topological_order

# Recorded `emerge --pretend` output (copied from the shared real-format samples).
FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / f"emerge-pretend-{name}.txt").read_text()


def by_atom(packages: list[Package]) -> dict[str, Package]:
    return {package.atom: package for package in packages}


# --- emerge --pretend (merge order) ---------------------------------------------------------


def test_update_reads_every_package_line() -> None:
    packages = parse_pretend(fixture("update"))
    assert len(packages) == 16  # as its "Total: 16 packages" line says
    assert packages[0].cpv == "sys-libs/glibc-2.17"
    assert packages[-1].cpv == "dev-cpp/fast_float-8.0.2"
    flags = [package.flags for package in packages]
    assert flags.count("U") == 7
    assert flags.count("UD") == 1
    assert flags.count("N") == 2
    assert flags.count("NS") == 1
    assert flags.count("R") + flags.count("R~") == 5
    assert all(package.depth == 0 and not package.nomerge for package in packages)


def test_update_fields() -> None:
    got = by_atom(parse_pretend(fixture("update")))
    glibc = got["sys-libs/glibc"]
    assert (glibc.version, glibc.flags, glibc.old_version) == ("2.17", "U", "2.15-r3")
    assert glibc.use == "-nscd% -suid% -systemtap%"
    assert (glibc.slot, glibc.repo, glibc.binary) == (None, None, False)
    python = got["dev-lang/python"]
    assert python.cpv == "dev-lang/python-3.3.2-r2"
    assert (python.flags, python.slot, python.repo) == ("NS", "3.3", "gentoo")
    assert python.old_version == "2.7.5-r2"
    aacs = got["media-libs/libaacs"]
    assert (aacs.flags, aacs.version, aacs.old_version) == ("UD", "0.4.0", "0.6.0")
    steam = got["games-util/steam-games-meta"]
    assert (steam.flags, steam.version) == ("R~", "0-r20131107")
    assert got["net-misc/openssh"].version == "7.1_p2-r1"
    assert got["virtual/libiconv"].old_version is None
    libxslt = got["dev-libs/libxslt"]
    assert libxslt.use == "crypt -debug -python -static-libs"
    assert libxslt.use_expand == (("PYTHON_TARGETS", "python2_7"),)
    emul = got["app-emulation/emul-linux-x86-baselibs"]
    assert (emul.version, emul.use, emul.use_expand) == (
        "20131008-r6",
        None,
        (("ABI_X86", "(-32)"),),
    )
    assert got["x11-libs/vte"].slot == "2.91"


def test_update_binary_lines_carry_build_ids() -> None:
    got = by_atom(parse_pretend(fixture("update")))
    simdutf = got["dev-cpp/simdutf"]
    assert simdutf.binary
    assert (simdutf.version, simdutf.build_id) == ("9.2.1", 1)  # "9.2.1-1": build id 1
    assert (simdutf.slot, simdutf.repo, simdutf.old_version) == ("0/34", "bentoo", "9.0.0")
    fast_float = got["dev-cpp/fast_float"]
    assert (fast_float.binary, fast_float.flags, fast_float.build_id) == (True, "N", 1)
    assert sum(package.binary for package in got.values()) == 2


def test_update_plan_is_a_chain_in_merge_order_without_binaries() -> None:
    plan = plan_from_pretend(fixture("update"), name="world")
    assert plan.name == "world"
    assert len(plan.jobs) == 14
    assert "dev-cpp_simdutf-9.2.1" not in plan.jobs
    names = list(plan.jobs)
    assert names[0] == "sys-libs_glibc-2.17"
    assert plan.jobs["sys-libs_glibc-2.17"].deps == ()
    assert plan.jobs["sys-devel_gnuconfig-20130516"].deps == ("sys-libs_glibc-2.17",)
    # simdutf (a binary) sits between openssh and vte: the chain goes around it.
    assert plan.jobs["x11-libs_vte-0.84.1"].deps == ("net-misc_openssh-7.1_p2-r1",)
    assert all(len(job.deps) == 1 for job in list(plan.jobs.values())[1:])
    assert topological_order(plan) == names


def test_update_plan_can_rebuild_binaries_too() -> None:
    plan = plan_from_pretend(fixture("update"), include_binary=True)
    assert len(plan.jobs) == 16
    assert plan.jobs["dev-cpp_simdutf-9.2.1"].deps == ("net-misc_openssh-7.1_p2-r1",)
    assert plan.jobs["dev-cpp_fast_float-8.0.2"].deps == ("x11-libs_vte-0.84.1",)


# --- emerge --pretend --tree ----------------------------------------------------------------


def test_tree_depths_and_nomerge_parents() -> None:
    packages = parse_pretend(fixture("tree"))
    assert [(p.atom, p.depth, p.nomerge) for p in packages] == [
        ("x11-wm/i3", 0, True),
        ("x11-libs/xcb-util-cursor", 1, False),
        ("x11-libs/xcb-util-image", 2, False),
        ("x11-libs/xcb-util", 3, False),
        ("x11-libs/xcb-util-renderutil", 2, False),
        ("app-emulation/wine-vanilla", 0, True),
        ("app-emulation/vkd3d", 1, False),
        ("dev-util/spirv-headers", 2, False),
        ("media-libs/vulkan-loader", 1, False),
    ]
    got = by_atom(packages)
    wine = got["app-emulation/wine-vanilla"]
    assert (wine.version, wine.slot, wine.repo, wine.flags) == ("3.11", "3.11", "nokit", "")
    loader = got["media-libs/vulkan-loader"]
    assert (loader.flags, loader.old_version, loader.repo) == ("U", "1.1.85", "gentoo")
    cursor = got["x11-libs/xcb-util-cursor"]
    assert cursor.use_expand == (("ABI_X86", "32* (64) (-x32)"),)
    assert cursor.use == "-doc -static-libs {-test}"


def test_tree_plan_dependency_edges() -> None:
    plan = plan_from_pretend(fixture("tree"))
    assert {name: set(job.deps) for name, job in plan.jobs.items()} == {
        "x11-libs_xcb-util-cursor-0.1.3-r1": {
            "x11-libs_xcb-util-image-0.4.0",
            "x11-libs_xcb-util-renderutil-0.3.9-r2",
        },
        "x11-libs_xcb-util-image-0.4.0": {"x11-libs_xcb-util-0.4.0"},
        "x11-libs_xcb-util-0.4.0": set(),
        "x11-libs_xcb-util-renderutil-0.3.9-r2": set(),
        "app-emulation_vkd3d-1.0": {"dev-util_spirv-headers-1.3.216"},
        "dev-util_spirv-headers-1.3.216": set(),
        "media-libs_vulkan-loader-1.1.92.1": set(),
    }
    order = topological_order(plan)
    assert order.index("x11-libs_xcb-util-0.4.0") < order.index("x11-libs_xcb-util-image-0.4.0")


def test_tree_edges_pass_through_nomerge_lines() -> None:
    text = (
        "[ebuild   R    ] app-misc/top-1\n"
        "[nomerge       ]  app-misc/middle-2\n"
        "[ebuild  N     ]   app-misc/bottom-3\n"
        "[ebuild  N     ]  app-misc/sibling-4\n"
    )
    plan = plan_from_pretend(text)
    assert set(plan.jobs["app-misc_top-1"].deps) == {"app-misc_bottom-3", "app-misc_sibling-4"}


def test_a_package_listed_twice_in_a_tree_waits_for_both_sets_of_deps() -> None:
    text = (
        "These are the packages that would be merged, in reverse order:\n"
        "[nomerge       ] app-misc/a-1\n"
        "[ebuild   R    ]  app-misc/shared-1\n"
        "[ebuild   R    ]   app-misc/x-1\n"
        "[nomerge       ] app-misc/b-1\n"
        "[ebuild   R    ]  app-misc/shared-1\n"
        "[ebuild   R    ]   app-misc/y-1\n"
    )
    plan = plan_from_pretend(text)
    assert plan.jobs["app-misc_shared-1"].deps == ("app-misc_x-1", "app-misc_y-1")


# --- blockers and bad input -----------------------------------------------------------------


def test_blocker_is_an_error_naming_both_packages() -> None:
    with pytest.raises(EmergeError) as caught:
        parse_pretend(fixture("blocker"))
    message = str(caught.value)
    assert message.startswith("emerge reports 1 blocker(s)")
    assert (
        'line 8: "sys-kernel/linux-headers" is soft blocking virtual/os-headers:0-0-r2' in message
    )
    (blocker,) = caught.value.blockers
    assert blocker.atom == "sys-kernel/linux-headers"
    assert blocker.by == ("virtual/os-headers:0-0-r2",)
    assert (blocker.how, blocker.resolved, blocker.line) == ("soft blocking", False, 8)
    with pytest.raises(EmergeError, match="blocker"):
        plan_from_pretend(fixture("blocker"))


def test_blocker_without_quoted_atom_and_resolved_blockers() -> None:
    text = (
        "[ebuild  N     ] app-misc/new-1\n"
        "[blocks b      ] app-misc/old (is hard blocking app-misc/new-1, app-misc/other-2)\n"
    )
    with pytest.raises(EmergeError) as caught:
        parse_pretend(text)
    (blocker,) = caught.value.blockers
    assert blocker.atom == "app-misc/old"
    assert blocker.by == ("app-misc/new-1", "app-misc/other-2")
    assert (blocker.how, blocker.resolved) == ("hard blocking", True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ebuild  N     ] not-a-package\n", "line 1: cannot read the package name and version"),
        ("\n[ebuild  N     ] app-misc/foo-1 ???\n", "line 2: unexpected text '???'"),
        ("[ebuild  N     ] app-misc/foo\n", "line 1: cannot read the package name"),
        ("[ebuild  N     ]\n", "line 1: no package after the status field"),
        ("[ebuild  N     ] app-misc/foo-1.0-1\n", "line 1: a build id is only shown for binary"),
        ("[frobnicate    ] app-misc/foo-1\n", "line 1: unknown line kind 'frobnicate'"),
        ("[uninstall     ] app-misc/foo-1\n", "line 1: emerge would uninstall a package"),
        ("Calculating dependencies... done!\n", "no package lines found"),
        ("", "no package lines found"),
        (
            "[ebuild  N     ] app-misc/foo-1\nTotal: 2 packages (2 new)\n",
            "emerge's Total says 2 packages, but 1 lines were read",
        ),
    ],
)
def test_unreadable_output_is_an_error(text: str, message: str) -> None:
    with pytest.raises(EmergeError) as caught:
        parse_pretend(text)
    assert str(caught.value).startswith(message)


def test_nothing_to_merge() -> None:
    assert parse_pretend("Total: 0 packages, Size of downloads: 0 KiB\n") == []
    with pytest.raises(EmergeError, match="nothing to build"):
        plan_from_pretend("Total: 0 packages, Size of downloads: 0 KiB\n")
    only_binary = "[binary  N     ] app-misc/foo-1-1::gentoo 0 KiB\nTotal: 1 package (1 new)\n"
    with pytest.raises(EmergeError, match="nothing to build"):
        plan_from_pretend(only_binary)


def test_notes_around_the_list_are_ignored() -> None:
    text = (
        " * IMPORTANT: 2 news items need reading for repository 'gentoo'.\n"
        "[ebuild  N     ] app-misc/foo-1.0_rc2:2/2.1::my-overlay to /mnt/root/ "
        'USE="a -b" L10N="de" 1,024 KiB\n'
        "Would you like to merge these packages? [Yes/No]\n"
    )
    (foo,) = parse_pretend(text)
    assert (foo.cpv, foo.slot, foo.repo) == ("app-misc/foo-1.0_rc2", "2/2.1", "my-overlay")
    assert (foo.use, foo.use_expand) == ("a -b", (("L10N", "de"),))


# --- jobs -----------------------------------------------------------------------------------


def test_jobs_are_safe_names_with_argv_commands() -> None:
    plan = plan_from_pretend(fixture("update"), requires=Requires(arch="amd64", cores=4))
    assert all(NAME_RE.fullmatch(name) for name in plan.jobs)
    job = plan.jobs["dev-libs_libxslt-1.1.28-r1"]
    assert job.cmd[-3:] == ("--buildpkgonly", "--oneshot", "=dev-libs/libxslt-1.1.28-r1")
    assert job.requires == Requires(arch="amd64", cores=4)
    assert all(not output.startswith("/") and ".." not in output for output in job.outputs)


def test_job_name_from_cpv() -> None:
    assert job_name(Package("dev-libs/openssl", "3.0.13")) == "dev-libs_openssl-3.0.13"


def test_estimates_by_cpv_or_atom() -> None:
    estimates = {"dev-lang/python": 600.0, "dev-lang/python-3.3.2-r2": 900.0, "x11-libs/vte": 60}
    plan = plan_from_pretend(fixture("update"), estimates=estimates)
    assert plan.jobs["dev-lang_python-3.3.2-r2"].estimate == 900.0
    assert plan.jobs["x11-libs_vte-0.84.1"].estimate == 60
    assert plan.jobs["sys-libs_glibc-2.17"].estimate == 1.0


def test_absolute_pkgdir_is_refused() -> None:
    with pytest.raises(EmergeError, match=r"outputs\[0\]: must be a relative path"):
        plan_from_pretend(fixture("update"), pkgdir="/var/cache/binpkgs")


def _fake_emerge(bin_dir: Path, relative: str) -> None:
    """An `emerge` that writes one binary package below $PKGDIR, as the real one would."""
    script = bin_dir / "emerge"
    script.write_text(
        "#!/bin/sh\n"
        'case "$PKGDIR" in /*) ;; *) echo "PKGDIR not absolute: $PKGDIR" >&2; exit 1;; esac\n'
        f'mkdir -p "$(dirname "$PKGDIR/{relative}")" && : > "$PKGDIR/{relative}"\n'
        'printf "%s\\n" "$@" > "$PKGDIR/args"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize(
    "written",
    [
        "dev-libs/libxslt-1.1.28-r1.tbz2",
        "dev-libs/libxslt-1.1.28-r1.gpkg.tar",
        "dev-libs/libxslt/libxslt-1.1.28-r1-1.xpak",
        "dev-libs/libxslt/libxslt-1.1.28-r1-12.gpkg.tar",
    ],
)
def test_job_runs_emerge_with_pkgdir_in_the_job_dir(tmp_path: Path, written: str) -> None:
    plan = plan_from_pretend(fixture("update"))
    job = plan.jobs["dev-libs_libxslt-1.1.28-r1"]
    bin_dir, job_dir = tmp_path / "bin", tmp_path / "job"
    bin_dir.mkdir()
    job_dir.mkdir()
    # A dependency's package staged into the same directory must not count as an output.
    staged = job_dir / "binpkgs" / "dev-libs" / "libxslt" / "libxslt-1.1.28-r1-r1-1.gpkg.tar"
    staged.parent.mkdir(parents=True)
    staged.touch()
    _fake_emerge(bin_dir, written)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(list(job.cmd), cwd=job_dir, env=env, check=True, timeout=10)
    args = (job_dir / "binpkgs" / "args").read_text().split()
    assert args == ["--buildpkgonly", "--oneshot", "=dev-libs/libxslt-1.1.28-r1"]
    found = sorted(str(p.relative_to(job_dir)) for o in job.outputs for p in job_dir.glob(o))
    assert found == [f"binpkgs/{written}"]


def test_binpkg_outputs_name_only_this_package() -> None:
    outputs = binpkg_outputs(Package("x11-libs/gtk+", "3.24.41"), "out")
    assert outputs == (
        "out/x11-libs/gtk+-3.24.41.tbz2",
        "out/x11-libs/gtk+-3.24.41.gpkg.tar",
        "out/x11-libs/gtk+/gtk+-3.24.41-[0-9]*.xpak",
        "out/x11-libs/gtk+/gtk+-3.24.41-[0-9]*.gpkg.tar",
    )
    assert emerge_command(Package("a/b", "1"), "my dir")[2] == (
        'export PKGDIR="$PWD"/\'my dir\'; exec "$@"'
    )
