"""What importing a module drags in, asked of a fresh interpreter (this one has imported
everything the tests use)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

from tests.swarm import REPO


def loaded_by(module: str, candidates: Iterable[str]) -> list[str]:
    """Which of `candidates` are in sys.modules after `import module` in a new interpreter."""
    names = list(candidates)
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}\n"
         f"print(' '.join(m for m in {names!r} if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()
