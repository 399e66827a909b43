"""`swarmnode join` parsed without typer (`cli.launch`): the same options as the full CLI's
`join`, and anything else left to the full CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import cli.main
from cli.launch import _join_parser, parse_join
from swarmnode.options import NodeOptions


class Launched(Exception):
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts


def typer_options(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> NodeOptions:
    """What the full CLI hands to `launch_node` for `argv`."""
    def capture(opts: NodeOptions) -> None:
        raise Launched(opts)

    monkeypatch.setattr(cli.main, "launch_node", capture)
    res = CliRunner().invoke(cli.main.app, argv)
    assert isinstance(res.exception, Launched), res.output
    return res.exception.opts


@pytest.mark.parametrize("tail", [
    ["join"],
    ["join", "swn1.token"],
    ["join", "--name", "n2", "--listen", "127.0.0.2:7946", "--no-mdns", "--no-tailscale",
     "--fast"],
    ["join", "--seed", "a:1", "swn1.t", "--seed", "b@c:2", "--advertise", "10.0.0.1:7946",
     "--advertise=10.0.0.2:7946", "--name=x"],
])
@pytest.mark.parametrize("home", ["--home", "--home="])
def test_a_plain_join_is_parsed_here_exactly_as_the_full_cli_parses_it(
        tail: list[str], home: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    where = str(tmp_path / "home")
    argv = ([home, where] if home == "--home" else [home + where]) + tail
    fast = parse_join(argv)
    assert fast is not None
    assert fast == typer_options(argv, monkeypatch)


@pytest.mark.parametrize("argv", [
    ["status"],
    ["--home", "h", "nodes", "join"],  # `join` not the command
    ["join", "--help"],
    ["join", "-h"],
    ["join", "--home", "h"],  # the CLI takes --home before the command only
    ["join", "--bogus"],
    ["join", "--name"],  # a value missing
    ["join", "a", "b"],  # two tokens
    ["--json", "join"],
    ["--home", "h", "--home", "i", "join"],
    ["--name", "join"],  # (errors argparse would print and exit on)
    ["--home", "join"],
])
def test_anything_else_is_left_to_the_full_cli(argv: list[str]) -> None:
    assert parse_join(argv) is None


def test_the_options_are_the_full_clis_join_options() -> None:
    command = typer.main.get_command(cli.main.app).commands["join"]  # type: ignore[attr-defined]
    full = {opt for param in command.params for opt in param.opts if opt.startswith("--")}
    full.discard("--help")
    here = {opt for action in _join_parser()._actions for opt in action.option_strings}
    assert here - {"--home"} == full
