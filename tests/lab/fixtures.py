"""Pytest fixtures for the namespace lab.

Import them into tests/conftest.py (`from tests.lab.fixtures import incident, lab`) or list
this module in `pytest_plugins`. Why fixtures: teardown then runs even when a test fails or
raises, so no namespace or process outlives its test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Lab, unavailable_reason
from .topology import IncidentTopology, incident_topology

__all__ = ["incident", "lab"]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A fresh, empty lab; skipped (with the reason) when not root or `ip` is missing.

    Process logs go to `<tmp_path>/lab/`; missing kernel features (netem) skip the test.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Lab("sn", log_dir=tmp_path / "lab", on_unsupported=pytest.skip) as the_lab:
        yield the_lab


@pytest.fixture
def incident(lab: Lab) -> IncidentTopology:
    """The full incident network (2 LAN hosts, tarn, far) in `lab`."""
    return incident_topology(lab)
