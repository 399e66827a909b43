"""Where a node keeps its state: `--home`, else `$SWARMNODE_HOME`, else the platform state dir.

Many nodes can run on one machine with different homes; everything a node owns (identity key,
SQLite state, control socket) lives below its home.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The home of a node run by root (the service), and where `bootstrap` installs swarmnode.
SYSTEM_HOME = Path("/var/lib/swarmnode")
INSTALL_PREFIX = Path("/opt/swarmnode")


def default_home() -> Path:
    env = os.environ.get("SWARMNODE_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_HOME
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "swarmnode"


def resolve(home: Path | None) -> Path:
    path = (home or default_home()).expanduser().absolute()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
