"""The Portage a node builds with: its `emerge`, the directory it lives in and its Python.

A node uses the `emerge` named by `emerge` in config.toml, else the one on its own PATH when it
starts, so a plain Gentoo host needs no setting and a Gentoo Prefix needs one line. Jobs and
helper commands get that directory first on PATH: a Prefix keeps `emaint`, `ebuild` and the
`gtar` its helpers call beside `emerge`, and the executor's fixed PATH would not find them.

Code that must read Portage's own data (dependency metadata, the binary package tree) runs as a
small script under the interpreter that runs `emerge` (its `#!` line), because that is the
Python that can import this Portage; the node's own Python usually cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from swarmnode.build.executor import DEFAULT_PATH

#: How long a helper command may take: `emerge --pretend` of a large @world takes a minute or
#: more on a slow machine; anything beyond this is hung.
COMMAND_TIMEOUT_S = 600.0


_PYTHON = re.compile(r"python[0-9.]*")  # (not python-exec2, Gentoo's wrapper)


class PortageError(RuntimeError):
    """Portage is missing here, or one of its commands failed; the message says which."""


@dataclass(frozen=True)
class PortageHost:
    """Where this node's Portage is."""

    emerge: Path

    @property
    def bin_dir(self) -> Path:
        return self.emerge.parent

    @property
    def path(self) -> str:
        """PATH for jobs and helper commands: Portage's directory first."""
        return f"{self.bin_dir}:{DEFAULT_PATH}"

    def tool(self, name: str) -> str:
        """A Portage command beside `emerge` (`emaint`, `ebuild`, `gpkg-sign`), else by PATH."""
        beside = self.bin_dir / name
        return str(beside) if beside.exists() else name

    def python(self) -> str:
        """The interpreter in emerge's `#!` line (python-exec wrappers: `python3` on PATH)."""
        try:
            with self.emerge.open("rb") as f:
                first = f.readline(4096).decode("utf-8", "replace")
        except OSError as exc:
            raise PortageError(f"cannot read {self.emerge}: {exc.strerror or exc}") from None
        words = first[2:].split() if first.startswith("#!") else []
        if words and _PYTHON.fullmatch(Path(words[0]).name) and Path(words[0]).is_absolute():
            return words[0]
        if len(words) > 1 and Path(words[0]).name == "env" and _PYTHON.fullmatch(words[1]):
            return shutil.which(words[1], path=self.path) or words[1]
        return shutil.which("python3", path=self.path) or "python3"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a helper command: this node's, with Portage first on PATH."""
        return {**os.environ, "PATH": self.path, **extra}

    async def run(self, argv: list[str], *, stdin: bytes | None = None,
                  env: dict[str, str] | None = None,
                  timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, bytes, bytes]:
        """Run a Portage command to its end: (exit status, stdout, stderr). Killed at
        `timeout`; raises PortageError when it cannot start."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else
                asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env or self.env(), start_new_session=True)
        except OSError as exc:
            raise PortageError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            raise PortageError(f"{Path(argv[0]).name} did not finish in {timeout:.0f} s") from None
        finally:  # (timed out, or the caller was cancelled: the command must not outlive it)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.shield(proc.wait())
        return proc.returncode or 0, out, err


def find(configured: str | None, path: str | None = None) -> PortageHost | None:
    """This node's Portage: the configured `emerge` (which must exist), else `emerge` on
    `path` (default: the process's PATH), else None (not a Gentoo host)."""
    if configured:
        emerge = Path(configured).expanduser()
        if not (emerge.is_file() and os.access(emerge, os.X_OK)):
            raise PortageError(f"emerge = {configured!r} in config.toml is not an executable")
        return PortageHost(emerge.absolute())
    found = shutil.which("emerge", path=path)
    return PortageHost(Path(found).absolute()) if found else None
