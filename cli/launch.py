"""The `swarmnode` entry point, and `join` without the command-line framework.

`swarmnode join` only parses eight options and execs the node (`launch_node`), yet typer and
the pydantic it builds each option's converter with cost 0.19 s of CPU before that: more than a
third of a node's start. Forty nodes started over 12 s on two cores queue behind each other's
starts, so that third is seconds of a swarm's join. A well-formed `[--home H] join ...` is
parsed here with argparse (0.002 s to import); anything else -- another command, `--help`, an
unknown or malformed option -- goes to the full CLI (`cli.main`), which owns the messages.
The options here are `cli.main.join`'s, checked against it by a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from swarmnode import home as homes
from swarmnode.options import NodeOptions


def main() -> None:
    """`swarmnode`: a plain `join` starts the node from here, all else is the full CLI's."""
    opts = parse_join(sys.argv[1:])
    if opts is not None:
        launch_node(opts)
    from cli.main import main as full

    full()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Never print and exit (argparse does for some errors whatever `exit_on_error`
        says): the full CLI parses the command line again and tells what is wrong."""
        raise ValueError(message)


def _join_parser() -> argparse.ArgumentParser:
    ap = _Parser(add_help=False, allow_abbrev=False, exit_on_error=False)
    ap.add_argument("--home", type=Path)
    ap.add_argument("command", choices=["join"])
    ap.add_argument("join_token", nargs="?")
    ap.add_argument("--name")
    ap.add_argument("--listen")
    ap.add_argument("--advertise", action="append", default=[])
    ap.add_argument("--seed", action="append", default=[])
    ap.add_argument("--no-mdns", action="store_true")
    ap.add_argument("--no-tailscale", action="store_true")
    ap.add_argument("--fast", action="store_true")
    return ap


def parse_join(argv: Sequence[str]) -> NodeOptions | None:
    """The node's options for a well-formed `[--home H] join ...`, else None (the full CLI
    then parses `argv`, and says what is wrong with it)."""
    if "join" not in argv or any(a in ("--help", "-h") for a in argv):
        return None
    try:
        args, rest = _join_parser().parse_known_intermixed_args(list(argv))
    except (argparse.ArgumentError, ValueError):
        return None
    at = list(argv).index("join")
    if rest or not _only_home(argv[:at]) or any(_is_home(a) for a in argv[at + 1:]):
        return None  # (`join` not the command, or `--home` after it: the CLI refuses that)
    return NodeOptions(
        home=homes.resolve(args.home), token=args.join_token, name=args.name,
        listen=args.listen, advertise=tuple(args.advertise), seeds=tuple(args.seed),
        mdns=not args.no_mdns, tailscale=not args.no_tailscale, fast=args.fast,
    )


def _is_home(arg: str) -> bool:
    return arg == "--home" or arg.startswith("--home=")


def _only_home(before: Sequence[str]) -> bool:
    """Is what comes before `join` nothing, or the one option the CLI takes there?"""
    return not before or (len(before) == 2 and before[0] == "--home") or (
        len(before) == 1 and before[0].startswith("--home="))


def launch_node(opts: NodeOptions) -> NoReturn:
    """Exec the node alone (no CLI imports) from the code this process runs when that is the
    release `<home>/current` points at (a pushed self-update) or there is none; else exec that
    release's (or the installed code's) CLI, which decides how it runs its node."""
    from swarmnode.push import bundle, releases

    running = bundle.code_root().resolve()
    launcher = Path(os.environ.setdefault(releases.LAUNCHER_ENV, str(running)))
    try:
        root = releases.launch_root(opts.home, running, time.time())
    except (OSError, ValueError) as exc:
        print(f"warning: releases in {opts.home}: {exc}; running the installed code",
              file=sys.stderr)
        root = None
    if root is None and not (opts.home / releases.CURRENT_LINK).exists():
        root = launcher  # no release (or it was rolled back to the installed code)
    target = (root or running).resolve()
    # (a release's directory is named by its digest: a failure to start there falls back)
    digest = target.name if target != launcher.resolve() and releases.is_digest(
        target.name) else ""
    node = opts.to_json() if target == running else ""
    argv = releases.exec_argv(target, launcher, digest, sys.argv[1:], node=node)
    os.execv(argv[0], argv)
