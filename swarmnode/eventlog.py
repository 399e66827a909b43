"""The node's events as JSON lines, for log shippers (Vector, Fluent Bit, Promtail, ...).

`<home>/events.jsonl` gets one object per event, `{"seq", "ts", "kind", ...data}`, the same
record `swarmnode events --json` shows. Appended as they happen (no fsync, as the SQLite event
log), and rotated to `events.jsonl.1` past MAX_BYTES so it never grows
without bound; shippers that follow by inode (all the common ones) keep up across a rotation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "events.jsonl"
#: Size at which the file is rotated (one older file is kept).
MAX_BYTES = 16 * 1024 * 1024


class JsonLines:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.failed = False  # logged once, then quiet: events still go to SQLite

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        try:
            if self._size() + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)  # one write: a line is never interleaved with another
            finally:
                os.close(fd)
            self.failed = False
        except OSError as exc:
            if not self.failed:
                log.warning("cannot write %s: %s", self.path, exc)
            self.failed = True

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0
