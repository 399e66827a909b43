"""`swarmnode bootstrap`: the command line of swarmnode.bootstrap.

Kept apart from cli/main.py so that every other command starts without importing paramiko;
the work itself is imported when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.console import LazyConsole
from swarmnode import home as homes
from swarmnode.options import DEFAULT_LISTEN

# Paths and fingerprints stay on one line, so they can be copied.
err = LazyConsole(stderr=True, soft_wrap=True)
out = LazyConsole(soft_wrap=True)

DEFAULT_PREFIX = str(homes.INSTALL_PREFIX)
DEFAULT_REMOTE_HOME = str(homes.SYSTEM_HOME)


def _local_home(ctx: typer.Context) -> Path:
    """The local node's home: the global `--home`, resolved as for every command.

    Read from the root context, not cli.main's module state: under `python -m cli.main` that
    module is `__main__`, and importing `cli.main` here would give a second, unset copy.
    """
    given = ctx.find_root().params.get("home")
    return homes.resolve(Path(given) if given is not None else None)


def bootstrap(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="USER@HOST[:PORT]", help="machine to set up")],
    jump: Annotated[list[str] | None, typer.Option(
        "--jump", "-J", help="jump host USER@HOST[:PORT], in order (repeatable)")] = None,
    user: Annotated[str | None, typer.Option(
        help="SSH user for hops that name none (default: current user)")] = None,
    host_key: Annotated[list[str] | None, typer.Option(
        "--host-key", help="the target's SSH host key, SHA256:... (checked out of band)")] = None,
    known_hosts: Annotated[list[Path] | None, typer.Option(
        "--known-hosts", help="known_hosts file, repeatable (default: ~/.ssh/known_hosts)",
    )] = None,
    identity_file: Annotated[str | None, typer.Option(
        "--identity-file", "-i", help="SSH private key (default: agent, ~/.ssh/id_*)")] = None,
    name: Annotated[str | None, typer.Option(
        help="the new node's name (default: its host name)")] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT the new node listens on")] = DEFAULT_LISTEN,
    prefix: Annotated[str, typer.Option(help="install directory on the target")] = DEFAULT_PREFIX,
    remote_home: Annotated[str, typer.Option(
        "--remote-home", help="the new node's home on the target")] = DEFAULT_REMOTE_HOME,
    service: Annotated[str, typer.Option(
        help="auto, systemd, openrc or none (start detached)")] = "auto",
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="wait until the new node is alive and admitted")] = True,
) -> None:
    """Install this node's swarmnode on USER@HOST over SSH and start it joined to the swarm.

    Every hop's host key is verified; the target's must be in known_hosts or given with
    --host-key, else nothing is installed. The target needs the same architecture and Python
    version as this node.
    """
    from swarmnode.bootstrap import BootstrapError, Request
    from swarmnode.bootstrap import bootstrap as run

    request = Request(
        target=target,
        jumps=tuple(jump or ()),
        user=user,
        host_keys=tuple(host_key or ()),
        known_hosts=tuple(p.expanduser() for p in known_hosts or ()),
        identity_file=identity_file,
        name=name,
        listen=listen,
        prefix=prefix,
        remote_home=remote_home,
        service=service,
        wait=wait,
    )
    try:
        done = run(_local_home(ctx), request, say=_say)
    except BootstrapError as exc:
        from rich.text import Text

        err.print(Text.assemble(("error:", "red"), f" {exc}"), highlight=False)
        raise typer.Exit(1) from None
    label = done.name or "(name not known yet)"
    state = "alive and admitted" if done.admitted else "started"
    _say(f"{label} is {state} (service: {done.service})")
    out.print(f"{label} {done.node_id}", highlight=False, markup=False)


def _say(text: str) -> None:
    """Progress, on stderr; never markup (`[fd00::1]:22` is an address, not a style)."""
    err.print(text, highlight=False, markup=False)
