"""Tests for swarmnode.facts: each machine kind built as a fake /proc, /sys, /etc tree."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

from swarmnode.facts import KINDS, describe_os, detect_facts, detect_kind, read_os_release

BARE_CGROUP = "0::/init.scope\n"
CPUINFO_BARE = "processor\t: 0\nflags\t\t: fpu vme de pse sse sse2\n\n"
CPUINFO_VM = "processor\t: 0\nflags\t\t: fpu vme de pse sse sse2 hypervisor\n\n"


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write files (paths relative to root) and return root."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def no_virt() -> None:
    return None


BASE = {"proc/1/cgroup": BARE_CGROUP, "proc/cpuinfo": CPUINFO_BARE}


@pytest.mark.parametrize(
    ("files", "kind"),
    [
        ({}, "bare"),
        (BASE, "bare"),
        ({**BASE, ".dockerenv": ""}, "docker"),
        ({**BASE, "proc/1/cgroup": "12:pids:/docker/0123abcd\n"}, "docker"),
        ({**BASE, "proc/1/cgroup": "0::/system.slice/containerd.service\n"}, "docker"),
        ({**BASE, "run/.containerenv": ""}, "docker"),
        ({**BASE, "proc/1/environ": b"PATH=/bin\0container=lxc\0TERM=linux\0"}, "lxc"),
        ({**BASE, "run/systemd/container": "lxc\n"}, "lxc"),
        ({**BASE, "proc/1/cgroup": "0::/lxc.payload.build1/init.scope\n"}, "lxc"),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "QEMU\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/product_name": "KVM\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/product_name": "VMware Virtual Platform\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "innotek GmbH\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/product_name": "VirtualBox\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "Xen\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "Bochs\n"}, "vm"),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "Parallels Software International Inc.\n"}, "vm"),
        (
            {
                **BASE,
                "sys/class/dmi/id/sys_vendor": "Microsoft Corporation\n",
                "sys/class/dmi/id/product_name": "Virtual Machine\n",
            },
            "vm",
        ),
        (
            {
                **BASE,
                "sys/class/dmi/id/sys_vendor": "Microsoft Corporation\n",
                "sys/class/dmi/id/product_name": "Surface Laptop 5\n",
            },
            "bare",
        ),
        ({**BASE, "sys/class/dmi/id/sys_vendor": "Dell Inc.\n"}, "bare"),
        ({**BASE, "proc/cpuinfo": CPUINFO_VM}, "vm"),
        # a container inside a VM is a container
        ({**BASE, ".dockerenv": "", "proc/cpuinfo": CPUINFO_VM}, "docker"),
        ({**BASE, "run/systemd/container": "lxc", "proc/cpuinfo": CPUINFO_VM}, "lxc"),
        # environ entries must match exactly, not as a substring of another variable
        ({**BASE, "proc/1/environ": b"X=container=lxcfoo\0"}, "bare"),
    ],
)
def test_detect_kind_from_fake_tree(
    tmp_path: Path, files: dict[str, str | bytes], kind: str
) -> None:
    assert detect_kind(tree(tmp_path, files), detect_virt=no_virt) == kind


def test_detect_virt_answer_is_trusted(tmp_path: Path) -> None:
    root = tree(tmp_path, {**BASE, "proc/cpuinfo": CPUINFO_VM})
    assert detect_kind(root, detect_virt=lambda: False) == "bare"
    assert detect_kind(tree(tmp_path / "b", BASE), detect_virt=lambda: True) == "vm"


def test_fake_root_never_runs_systemd_detect_virt(tmp_path: Path) -> None:
    # Without an injected probe, a non-"/" root relies on files only: an empty tree is bare
    # whatever the real machine is.
    assert detect_kind(tmp_path) == "bare"


def test_unreadable_environ_is_ignored(tmp_path: Path) -> None:
    root = tree(tmp_path, {**BASE})
    (root / "proc/1/environ").mkdir(parents=True)  # reading a directory fails with OSError
    assert detect_kind(root, detect_virt=no_virt) == "bare"


OS_RELEASES = [
    ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n', "debian 12"),
    ('NAME=Gentoo\nID=gentoo\nPRETTY_NAME="Gentoo Linux"\n', "gentoo"),
    ("# comment\nID='ubuntu'\nVERSION_ID='24.04'\nbroken line\n", "ubuntu 24.04"),
    ('ID="unterminated\n', "unterminated"),
]


@pytest.mark.parametrize(("text", "expected"), OS_RELEASES)
def test_describe_os(tmp_path: Path, text: str, expected: str) -> None:
    root = tree(tmp_path, {"etc/os-release": text})
    assert describe_os(root, system="Linux") == f"linux {expected}"


def test_os_release_fallback_and_missing(tmp_path: Path) -> None:
    root = tree(tmp_path, {"usr/lib/os-release": "ID=alpine\nVERSION_ID=3.20.1\n"})
    assert read_os_release(root)["ID"] == "alpine"
    assert describe_os(root, system="Linux") == "linux alpine 3.20.1"
    assert describe_os(tmp_path / "nothing", system="Linux") == "linux"


def test_detect_facts_fake_root(tmp_path: Path) -> None:
    root = tree(
        tmp_path, {**BASE, ".dockerenv": "", "etc/os-release": "ID=debian\nVERSION_ID=12\n"}
    )
    facts = detect_facts("0.1.0", root=root)
    assert facts == {
        "cores": facts["cores"],
        "arch": platform.machine(),
        "os": f"{platform.system().lower()} debian 12",
        "kind": "docker",
        "version": "0.1.0",
    }
    assert isinstance(facts["cores"], int)
    assert 1 <= facts["cores"] <= (os.cpu_count() or 1)


def test_kind_override(tmp_path: Path) -> None:
    root = tree(tmp_path, {**BASE, ".dockerenv": ""})
    assert detect_facts("1", root=root, kind_override="lxc")["kind"] == "lxc"
    with pytest.raises(ValueError, match="kind must be one of"):
        detect_facts("1", root=root, kind_override="chroot")


def test_env_variable_does_not_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWARMNODE_KIND", "vm")
    assert detect_facts("1", root=tmp_path, detect_virt=no_virt)["kind"] == "bare"


def test_detect_facts_real_host() -> None:
    facts = detect_facts("0.1.0")
    assert facts["kind"] in KINDS
    assert facts["arch"] == platform.machine()
    assert str(facts["os"]).startswith(platform.system().lower())
    assert facts["version"] == "0.1.0"
