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


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shell_gets_a_script_that_calls_back_into_swarmnode(shell: str) -> None:
    res = subprocess.run([*SCRIPT, "--show-completion", shell], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    # (once, in a run beside another full run, all three exited 1: what they said is kept)
    assert res.returncode == 0, res.stderr
    assert "_SWARMNODE_COMPLETE" in res.stdout and "swarmnode" in res.stdout


def test_bash_completes_commands_and_their_options() -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_SWARMNODE_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        return subprocess.run(SCRIPT, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60).stdout.split()

    assert complete("swarmnode jo") == ["join", "jobs"]
    assert "--no-mdns" in complete("swarmnode join --no")
