"""Prometheus metrics of one node, read from its live state at each scrape.

A collector rather than counters updated along the way: members, cores, jobs and releases are
state the node holds anyway (the membership view, the replicated ledger, the release notes),
so a scrape reads them and nothing can drift. Job durations are the exception: a histogram
the worker feeds as its jobs end (each node reports the jobs it ran).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from swarmnode import looplag
from swarmnode.ledger import STATES
from swarmnode.promtext import Counter, Family, Histogram, counter, gauge, render
from swarmnode.views import cores_online_total

if TYPE_CHECKING:
    from swarmnode.node import Node

#: Job durations from seconds to a day: compiles take seconds, whole packages hours.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


def node_families(node: Node) -> Iterator[Family]:
    """What the node holds, read now: members, cores, jobs, messages, releases, power, disk."""
    members = [m for m in node.core.members() if m.admitted_by or m.state == "pending"]
    states = gauge("swarmnode_members", "Members this node knows, by state",
                               labels=["state"])
    counts: dict[str, int] = {}
    for m in members:
        counts[m.state] = counts.get(m.state, 0) + 1
    for state, n in sorted(counts.items()):
        states.add([state], n)
    yield states
    cores = gauge("swarmnode_cores", "Cores of admitted members, by state",
                              labels=["state"])
    online, total = cores_online_total(members)
    cores.add(["online"], online)
    cores.add(["total"], total)
    yield cores
    jobs = gauge("swarmnode_jobs", "Jobs in the replicated ledger, by state",
                             labels=["state"])
    ledger = node.leadership.ledger
    totals = dict.fromkeys(STATES, 0)
    for build in ledger.builds():
        for state, n in ledger.progress(build.build_id).items():
            if state in totals:
                totals[state] += n
    for state, n in totals.items():
        jobs.add([state], n)
    yield jobs
    yield gauge("swarmnode_members_paused",
                            "Members an operator paused (no new work)",
                            value=len(ledger.paused))
    sent = counter("swarmnode_messages_sent", "Messages sent, by type",
                               labels=["type"])
    for kind, n in sorted(node.transport.sent.items()):
        sent.add([kind], n)
    yield sent
    received = counter("swarmnode_messages_received",
                                   "Messages received of a known type, by type",
                                   labels=["type"])
    for kind, n in sorted(node.received.items()):
        received.add([kind], n)
    yield received
    wire = counter("swarmnode_wire_bytes", "Bytes of messages, by direction",
                               labels=["direction"])
    wire.add(["in"], node.transport.bytes_in)
    wire.add(["out"], node.transport.bytes_out)
    yield wire
    drops = counter("swarmnode_dropped_messages",
                                "Messages dropped, by reason", labels=["reason"])
    for reason, n in sorted(node.drop_counts().items()):
        drops.add([reason], n)
    yield drops
    releases = gauge("swarmnode_release_nodes",
                                 "Members per pushed app: on its newest release or not, "
                                 "and those whose latest rollback was of that app",
                                 labels=["app", "state"])
    per_app: dict[tuple[str, str], int] = {}
    for member in node.push.versions()["nodes"]:
        for app, info in member["apps"].items():
            key = (app, "behind" if info["drift"] else "current")
            per_app[key] = per_app.get(key, 0) + 1
        for app in member["rolled_back"]:
            per_app[(app, "rolled_back")] = per_app.get((app, "rolled_back"), 0) + 1
    for (app, state), n in sorted(per_app.items()):
        releases.add([app, state], n)
    yield releases
    reading = node.power.last
    watts = gauge("swarmnode_watts", "This machine's draw (RAPL or estimate)",
                              labels=["source"])
    if reading is not None:
        watts.add([reading.source], reading.watts)
    yield watts
    members_watts = gauge("swarmnode_member_watts",
                                      "Each member's draw as it last stated it",
                                      labels=["node", "source"])
    for member, view in sorted(node.power_view().items()):
        members_watts.add([node.member_name(member), view["source"]], view["watts"])
    yield members_watts
    yield counter("swarmnode_energy_joules",
                              "Energy this machine drew since the node started",
                              value=node.power.joules)
    yield from node.disk.metrics()


class Metrics:
    """A node's registry: the collector, the job-duration histogram, the jobs' energy and the
    event loop's lag."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.job_seconds = Histogram("swarmnode_job_seconds",
                                     "Run time of the jobs this node ran, by outcome",
                                     ["status"], DURATION_BUCKETS)
        self.job_joules = Counter("swarmnode_job_energy_joules",
                                  "Energy shares of the jobs this node ran, by outcome",
                                  ["status"])
        self.loop_lag = Histogram("swarmnode_loop_lag_seconds",
                                  "How late the event loop woke a timer (a step held it)",
                                  buckets=looplag.BUCKETS)
        self.loop_held = Histogram("swarmnode_loop_held_seconds",
                                   "The loop's lag less its wait for a CPU (its own steps)",
                                   buckets=looplag.BUCKETS)

    def exposition(self) -> bytes:
        return render([*node_families(self.node), self.job_seconds.collect(),
                       self.job_joules.collect(), self.loop_lag.collect(),
                       self.loop_held.collect()])
