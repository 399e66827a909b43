"""The CLI's output through rich, imported on first use.

`swarmnode join` parses its command line and execs the node without printing anything: with
rich, the control socket's client and the cluster's modules imported up front, that parse cost
0.2 s of CPU at every node start instead of 0.1 (a swarm's joins on a loaded machine wait on
it). So the consoles and tables are made when a command first prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class LazyConsole:
    """A rich Console made, with these arguments, when first used."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return getattr(self._console, name)


def new_table(*args: Any, **kwargs: Any) -> Table:
    from rich.table import Table

    return Table(*args, **kwargs)


def escape(text: str) -> str:
    """`text` with rich's markup characters escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)
