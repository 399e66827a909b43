"""The text exposition format the node writes, read back by a second implementation
(prometheus_client's parser, the one Prometheus' Python tooling uses)."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from swarmnode.promtext import Counter, Histogram, counter, gauge, render
from tests.imports import loaded_by


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def test_families_counters_and_histograms_read_back_as_written() -> None:
    members = gauge("swarmnode_members", "Members, by state", ["state"])
    members.add(["alive"], 3)
    members.add(["dead"], 1)
    joules = Counter("swarmnode_job_energy_joules", "Energy", ["status"])
    joules.labels("done").inc(2.5)
    joules.labels("done").inc(1)
    joules.labels("failed").inc(0.25)
    lag = Histogram("swarmnode_loop_lag_seconds", "Lag", buckets=(0.01, 0.1, 1.0))
    for x in (0.005, 0.01, 0.05, 0.5, 7.0):
        lag.observe(x)
    text = render([members, counter("swarmnode_energy_joules", "Drawn", value=12.0),
                   joules.collect(), lag.collect(),
                   gauge("swarmnode_members_paused", "Paused", value=0)])
    got = parsed(text)
    assert got[("swarmnode_members", (("state", "alive"),))] == 3
    assert got[("swarmnode_members", (("state", "dead"),))] == 1
    assert got[("swarmnode_energy_joules_total", ())] == 12.0
    assert got[("swarmnode_job_energy_joules_total", (("status", "done"),))] == 3.5
    assert got[("swarmnode_job_energy_joules_total", (("status", "failed"),))] == 0.25
    assert got[("swarmnode_members_paused", ())] == 0
    # cumulative buckets, the boundary value in its own bucket (le is "less or equal")
    buckets = {dict(k)["le"]: v for (name, k), v in got.items()
               if name == "swarmnode_loop_lag_seconds_bucket"}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}
    assert got[("swarmnode_loop_lag_seconds_count", ())] == 5
    assert got[("swarmnode_loop_lag_seconds_sum", ())] == pytest.approx(7.565)


def test_an_unobserved_histogram_shows_zeros_and_labelled_ones_show_per_label() -> None:
    empty = parsed(render([Histogram("h", "empty", buckets=(1.0,)).collect()]))
    assert empty[("h_count", ())] == 0 and empty[("h_bucket", (("le", "+Inf"),))] == 0
    jobs = Histogram("swarmnode_job_seconds", "Run time", ["status"], (1, 60))
    jobs.labels("done").observe(30)
    jobs.labels("failed").observe(90)
    got = parsed(render([jobs.collect()]))
    assert got[("swarmnode_job_seconds_bucket", (("le", "60.0"), ("status", "done")))] == 1
    assert got[("swarmnode_job_seconds_bucket", (("le", "60.0"), ("status", "failed")))] == 0
    assert got[("swarmnode_job_seconds_count", (("status", "failed"),))] == 1
    assert got[("swarmnode_job_seconds_sum", (("status", "done"),))] == 30


def test_label_values_and_help_are_escaped() -> None:
    """Names a member chose (a node's name is a label of swarmnode_member_watts) cannot break
    out of their quotes or start a line of their own."""
    fam = gauge("swarmnode_member_watts", 'Draw "as stated"\nby each \\ member', ["node"])
    hostile = 'a"} 1\nswarmnode_fake 9 \\'
    fam.add([hostile], 42)
    fam.add(["b"], math.inf)
    text = render([fam])
    got = parsed(text)
    assert got[("swarmnode_member_watts", (("node", hostile),))] == 42
    assert got[("swarmnode_member_watts", (("node", "b"),))] == math.inf
    assert not any(name == "swarmnode_fake" for name, _ in got)
    assert len(text.decode().splitlines()) == 4


def test_wrong_label_counts_and_a_falling_counter_are_refused() -> None:
    with pytest.raises(ValueError):
        gauge("g", "g", ["a", "b"]).add(["x"], 1)
    with pytest.raises(ValueError):
        Counter("c", "c", ["status"]).labels("done", "extra")
    with pytest.raises(ValueError):
        Counter("c", "c", ["status"]).labels("done").inc(-1)
    with pytest.raises(ValueError):
        Histogram("h", "h", ["status"], (1,)).labels()


def test_the_node_does_not_import_prometheus_client_or_what_it_brings() -> None:
    """A node starts without prometheus_client (and its http.server, wsgiref, email): 60 ms of
    CPU at every start."""
    assert loaded_by("swarmnode.node", ("prometheus_client", "http.server", "wsgiref",
                                        "email.message")) == []
