"""Durable file-system steps shared by the stores that rename files into place."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """Make everything written below `path` durable with one syncfs(2) of its file system.

    One call instead of an fsync per file: extracting a 150-file release took 89 ms with
    per-file fsyncs and 35 ms without, and twenty extractions at once were disk-bound on the
    fsyncs. Where libc has no syncfs, os.sync() gives the same guarantee for all file systems.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()
