"""What `swarmnode join` asks of a node, and its JSON form.

The CLI parses the command line and then execs a fresh interpreter that runs only the node
(`swarmnode.node.main`), handing it these options as JSON: the CLI's own imports (typer,
rich, and the pydantic typer parses with) were 9.5 MiB of every node's memory for life.
Stdlib only, so the CLI can build them without importing the node.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

#: One port for all node-to-node traffic (ZeroMQ over TCP, whois over UDP), as memberlist's
#: 7946, so a firewall or a Tailscale ACL needs one rule.
DEFAULT_PORT = 7946
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"


@dataclass
class NodeOptions:
    home: Path
    token: str | None = None
    name: str | None = None
    listen: str | None = None
    advertise: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ()
    mdns: bool = True
    tailscale: bool = True
    fast: bool = False
    mdns_interfaces: list[str] | None = None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "home": str(self.home)})

    @classmethod
    def from_json(cls, text: str) -> NodeOptions:
        """The options `to_json` gave. Raises ValueError (or TypeError) on anything else."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("node options: a JSON object is needed")
        return cls(**{**raw, "home": Path(raw["home"]), "advertise": tuple(raw["advertise"]),
                      "seeds": tuple(raw["seeds"])})
