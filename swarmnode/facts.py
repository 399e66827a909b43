"""Facts a node states about its host: cores, architecture, OS, and what kind of machine it is.

The scheduler uses these to place work (cores) and to decide what may be built where (arch,
os), and operators read them in the member table. `kind` says whether the node runs on bare
metal, in a VM, or in an LXC or Docker container, which matters for what the node may do to
the system (a container cannot, for instance, manage the host's package cache).

Every probe reads files below an injectable `root`, so tests can build a fake /proc, /sys and
/etc for each kind in a temporary directory; the one external command (`systemd-detect-virt`)
is only run when looking at the real root, and is injectable too.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

KINDS = ("bare", "vm", "lxc", "docker")

# Substrings of /sys/class/dmi/id/{sys_vendor,product_name} that only hypervisors report.
VM_VENDOR_MARKERS = (
    "qemu",
    "kvm",
    "vmware",
    "virtualbox",
    "innotek",
    "xen",
    "microsoft corporation",
    "hyper-v",
    "bochs",
    "parallels",
)
# "Microsoft Corporation" is also the vendor of Surface laptops; it counts as a VM only together
# with a "Virtual Machine" product name.
_MICROSOFT = "microsoft corporation"

DetectVirt = Callable[[], bool | None]


def _read(root: Path, rel: str) -> str | None:
    """Text of root/rel, or None when it is missing or unreadable (e.g. /proc/1 as non-root)."""
    try:
        return (root / rel.lstrip("/")).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def systemd_detect_virt(timeout: float = 2.0) -> bool | None:
    """Ask `systemd-detect-virt --vm`: True for a VM, False for none, None when it cannot say."""
    exe = shutil.which("systemd-detect-virt")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, "--vm"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    answer = done.stdout.strip()
    if done.returncode == 0 and answer and answer != "none":
        return True
    if answer == "none":
        return False
    return None


def _is_docker(root: Path) -> bool:
    if (root / ".dockerenv").exists():
        return True
    # Podman and other OCI runtimes write this instead; for placement they are the same kind.
    if (root / "run/.containerenv").exists():
        return True
    cgroup = _read(root, "proc/1/cgroup") or ""
    return "docker" in cgroup or "containerd" in cgroup


def _is_lxc(root: Path) -> bool:
    environ = _read(root, "proc/1/environ") or ""
    if "container=lxc" in environ.split("\0"):
        return True
    if (_read(root, "run/systemd/container") or "").strip() == "lxc":
        return True
    return "lxc" in (_read(root, "proc/1/cgroup") or "")


def _dmi_says_vm(root: Path) -> bool:
    vendor = (_read(root, "sys/class/dmi/id/sys_vendor") or "").strip().lower()
    product = (_read(root, "sys/class/dmi/id/product_name") or "").strip().lower()
    if vendor == _MICROSOFT:
        return "virtual machine" in product
    text = f"{vendor}\n{product}"
    return any(marker in text for marker in VM_VENDOR_MARKERS if marker != _MICROSOFT)


def _cpuinfo_says_vm(root: Path) -> bool:
    for line in (_read(root, "proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and "hypervisor" in value.split():
            return True
    return False


def detect_kind(root: Path = Path("/"), detect_virt: DetectVirt | None = None) -> str:
    """One of KINDS, checking the most specific first: docker, lxc, vm, else bare.

    Containers are checked before VMs because a container inside a VM is still a container
    to the node. `detect_virt` (default: `systemd-detect-virt --vm`, only when `root` is the
    real "/") is trusted when it gives an answer; otherwise DMI strings and the CPU's
    hypervisor flag decide.
    """
    if _is_docker(root):
        return "docker"
    if _is_lxc(root):
        return "lxc"
    if detect_virt is None:
        detect_virt = systemd_detect_virt if Path(root) == Path("/") else (lambda: None)
    verdict = detect_virt()
    if verdict is None:
        verdict = _dmi_says_vm(root) or _cpuinfo_says_vm(root)
    return "vm" if verdict else "bare"


def read_os_release(root: Path = Path("/")) -> dict[str, str]:
    """KEY=value pairs of /etc/os-release (or /usr/lib/os-release), shell quoting undone."""
    text = _read(root, "etc/os-release")
    if text is None:
        text = _read(root, "usr/lib/os-release") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            parts = shlex.split(value)
        except ValueError:
            parts = [value.strip("\"'")]
        fields[key.strip()] = " ".join(parts)
    return fields


def describe_os(root: Path = Path("/"), system: str | None = None) -> str:
    """E.g. "linux debian 12", "linux gentoo": the kernel family, then distro id and version."""
    release = read_os_release(root)
    parts = [(system or platform.system() or "unknown").lower()]
    parts += [release[key] for key in ("ID", "VERSION_ID") if release.get(key)]
    return " ".join(parts)


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity mask, which taskset and cpusets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def detect_facts(
    version: str,
    *,
    root: Path = Path("/"),
    kind_override: str | None = None,
    detect_virt: DetectVirt | None = None,
) -> dict[str, object]:
    """The host facts a node advertises: cores, arch, os, kind and the swarmnode version.

    `kind_override` comes from the config file (`kind = ...`) for hosts the probes get wrong;
    it must be one of KINDS.
    """
    if kind_override is not None and kind_override not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind_override!r}")
    return {
        "cores": cpu_cores(),
        "arch": platform.machine() or "unknown",
        "os": describe_os(root),
        "kind": kind_override or detect_kind(root, detect_virt),
        "version": version,
    }
