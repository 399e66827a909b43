"""Shell completion: the scripts bash, zsh and fish source, and the completions they ask for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.swarm import REPO

#: The CLI as its console script runs it (the program's name is what completion keys on).
SCRIPT = (sys.executable, "-c",
          "import sys; from cli.main import main; sys.argv[0] = 'swarmnode'; main()")


@pytest.mark.parametrize(("shell", "mark"), [
    ("bash", "complete -o default -F _swarmnode_completion swarmnode"),
    ("zsh", "#compdef swarmnode"),
    ("fish", "complete --command swarmnode"),
])
def test_each_shell_gets_a_script_that_calls_back_into_swarmnode(shell: str, mark: str) -> None:
    """The script of the shell asked for. Typer takes the shell named after
    `--show-completion` only with its detection off (its own test switch); otherwise it prints
    the script of the shell it finds among the process's ancestors -- none under a CI runner
    started without one ("Shell  not supported"), and bash's for all three here before."""
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    res = subprocess.run([*SCRIPT, "--show-completion", shell], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert mark in res.stdout and "_SWARMNODE_COMPLETE" in res.stdout


def test_bash_completes_commands_and_their_options() -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_SWARMNODE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        return subprocess.run(SCRIPT, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60).stdout.split()

    assert complete("swarmnode jo") == ["join", "jobs"]
    assert "--no-mdns" in complete("swarmnode join --no")
