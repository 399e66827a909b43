"""Tunables of the membership protocol, each default with the reason it was chosen.

The defaults follow hashicorp/memberlist's LAN profile (SWIM + Lifeguard) but are tuned on purpose
for small build swarms of 3-10 machines on one LAN or tailnet: probing is a little more frequent
than memberlist's because a lost build worker costs more than a few extra pings, and the caps that
protect memory are sized for thousands of members so the same core also runs in the simulator.
All times are in seconds of the clock the shell passes as `now`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True, slots=True)
class Config:
    # --- failure detection (SWIM) ---
    probe_interval: float = 1.0
    """One member probed per interval: the time to first notice a failure is about one interval
    per live member in the worst case, so 1 s detects a dead worker in a 10-node swarm in seconds
    while costing a few hundred bytes per second per node."""
    probe_timeout: float = 0.5
    """Wait this long for a direct ack before asking helpers (indirect probe). Half the interval
    leaves the other half for the indirect round; LAN round trips are milliseconds."""
    indirect_checks: int = 3
    """Helpers asked to ping a silent target: three independent paths make a false suspicion from
    one bad link very unlikely, and small clusters rarely have more helpers anyway."""
    nack_fraction: float = 0.8
    """A helper whose ping got no ack sends a nack after this fraction of probe_timeout (Lifeguard),
    early enough to reach the requester before its indirect round ends."""
    awareness_max_multiplier: int = 8
    """Lifeguard local health: when our own probes keep failing without nacks we are probably the
    slow one, so every probe timeout is stretched up to 8x instead of accusing healthy peers."""

    # --- suspicion (Lifeguard) ---
    suspicion_mult: int = 3
    """Minimum suspicion timeout = suspicion_mult * max(1, log10(n)) * probe_interval: time for a
    suspected member to hear the accusation and refute it. Also sets the number of independent
    confirmations expected (suspicion_mult - 2) before the timeout is at its minimum.
    memberlist uses 4; for a swarm of 3-10 nodes we take 3 on purpose: measured in the 5-node
    lab, 4 put a killed node's death everywhere at 6.3 s (median), and a refutation needs only
    one round trip on a LAN, so 3 s of grace still leaves ample margin (no suspicion at all in
    10 minutes with both cores saturated, docs/benchmarks.md). An unconfirmed suspicion still
    waits up to 6x this, so one bad link cannot kill a healthy member quickly."""
    suspicion_max_timeout_mult: int = 6
    """A suspicion nobody else confirms waits up to 6x the minimum before declaring death, so a
    single prober with a bad link cannot quickly kill a healthy member."""

    # --- dissemination ---
    gossip_interval: float = 0.2
    """Gossip round period; 200 ms matches memberlist/Serf and bounds per-hop delay."""
    gossip_nodes: int = 3
    """Fanout per gossip round: 3 reaches thousands of nodes in a handful of rounds."""
    quiet_topics: frozenset[str] = frozenset()
    """Note topics that every member states now and then (the node names its power draw's):
    they ride pings, acks and push-pulls and start no gossip round, so they spread in a few
    probe intervals. Gossiping power notes kept every node of an idle swarm of 40 sending 6.6
    messages a second to random members, and a connection to each open; other notes (grants,
    releases) and news of members still go out at once."""
    gossip_to_the_dead_time: float = 30.0
    """Keep gossiping to members dead or left less than this long ago so a falsely declared node
    hears about it and refutes (memberlist's GossipToTheDeadTime)."""
    retransmit_mult: int = 4
    """Each broadcast is sent retransmit_mult * ceil(log10(n + 1)) times: with 3-10 nodes that is 8
    transmissions, enough for every member with high probability even with 10% loss."""
    eager_gossip: bool = True
    """Run a gossip round as soon as a new broadcast is queued instead of waiting for the next
    tick: removes up to one gossip interval of delay per hop (measured: see the simulator)."""
    piggyback_bytes: int = 1024
    """Byte budget for broadcasts carried on each ping and ack: keeps probe messages small so
    their timing reflects the network, not serialisation."""
    gossip_bytes: int = 4096
    """Byte budget per gossip message (ZeroMQ over TCP has no datagram limit, but bounded
    messages keep memory and per-message latency predictable)."""
    max_broadcasts: int = 4096
    """Queue cap; the most-transmitted items are dropped first when it overflows."""

    # --- anti-entropy and healing ---
    push_pull_interval: float = 30.0
    """Full state exchange with one random member; scaled up with cluster size above 32 members
    like memberlist's pushPullScale. Repairs anything gossip missed."""
    push_pull_timeout: float = 10.0
    """A join or push-pull not answered within this is given up (the shell may retry)."""
    reconnect_interval: float = 10.0
    """Every interval one dead (not left) member is sent a push-pull, so both sides of a healed
    partition learn each other is alive again (memberlist alone never re-contacts the dead)."""
    rejoin_contacts: int = 3
    """A node restored from a snapshot pushes its state to this many members it knew."""

    # --- housekeeping and memory caps ---
    dead_reap_after: float = 24 * 3600.0
    """Dead and left members are forgotten after a day: long enough to recognise a machine that
    was rebooted or moved, short enough that the table does not grow without bound."""
    pending_expire_after: float = 24 * 3600.0
    """Guests seen but never admitted are forgotten after a day."""
    max_pending: int = 1024
    """Cap on pending (unadmitted) records kept, so unknown hosts cannot fill memory. When it
    is full the guest listed (or heard from) longest ago is forgotten for the newest."""
    max_pending_per_source: int = 64
    """Guests listed from one source network (`pending_source_prefix_v4`/`_v6` of the hello's
    source address): a LAN's real newcomers are few, and a lab of containers behind one NAT
    fits, while one flooding network holds at most this many slots."""
    pending_source_prefix_v4: int = 24
    """IPv4 sources share a budget per /24: one machine rarely holds more than a few addresses
    of a /24, and a site's hosts are seldom in more than a few /24s."""
    pending_source_prefix_v6: int = 64
    """IPv6 sources share a budget per /64: one host (one SLAAC subnet) has 2^64 addresses of its
    own, so a per-address budget would be none. Loopback (127.0.0.0/8, ::1) stays per address:
    nobody outside can send from it, and tests run several hosts on it."""
    max_pending_per_member: int = 256
    """Guests listed on one member's word (its gossip and push-pulls relay what it heard): a
    quarter of the table, so a flooding member cannot crowd out what the others report."""
    max_orphans: int = 1024
    """Cap on records heard of before their admission statement arrived."""
    max_deferred: int = 4096
    """Cap on statements kept while waiting for their author's admission (or right) to arrive."""
    max_deferred_per_author: int = 64
    """Of those, the cap per author (or per unknown subject): an honest operator's burst of
    admissions fits, while one member flooding statements it may not make cannot crowd out
    those of an author whose grant is merely still on the way."""
    max_notes: int = 4096
    """Cap on notes (push grants, releases, power) kept: one per (topic, key, author), a few
    per member in practice, so this bounds memory without ever binding a real swarm. It grows
    with the swarm like the per-author caps (`notes_per_member`)."""
    max_notes_per_author: int = 128
    """Cap on the notes one member may have held, before `notes_per_member`: a node states its
    power and a few releases; 128 is ample for that."""
    max_note_bytes_per_author: int = 32 * 1024
    """Cap on the encoded size (topic, key, value, signature: empty notes count too) of one
    member's notes, before `note_bytes_per_member`: every push-pull carries all notes, so one
    member must not grow it past a frame (a release note is ~700 bytes encoded)."""
    max_note_bytes: int = 256 * 1024
    """Cap on all notes held, before `note_bytes_per_member`: a quarter of a frame (1 MiB),
    leaving room for members. When it is reached the author holding the most bytes loses its
    oldest note to an author holding fewer, so no author (nor a few) can crowd out another's
    grants."""
    notes_per_member: int = 6
    """Every admitted member (alive or gone) raises each author's note cap, and the table's, by
    this: a rights holder states a grant, and perhaps later a revoke, per right (push, operate,
    build) about each member, so a fixed cap would silently drop a founder's rights notes (its
    revokes included) once the swarm outgrew it. Both stay held: which one counts is read at
    the time of each statement (an admission by an operator before its revoke stays valid).
    Admissions are operator statements, so no member can raise the caps by inventing members."""
    note_bytes_per_member: int = 1536
    """The byte counterpart of `notes_per_member`: six rights notes (~225 bytes encoded each)
    about one member."""

    def note_caps(self, members: int) -> tuple[int, int, int, int]:
        """(per-author count, per-author bytes, total count, total bytes) with `members`
        admitted members."""
        n, b = self.notes_per_member * members, self.note_bytes_per_member * members
        return (self.max_notes_per_author + n, self.max_note_bytes_per_author + b,
                self.max_notes + n, self.max_note_bytes + b)

    @classmethod
    def fast(cls, **overrides: object) -> Config:
        """Every time divided by ten: for tests and simulations (same ratios, so same behaviour)."""
        base = cls()
        scaled = {
            f.name: getattr(base, f.name) / 10
            for f in fields(cls)
            if isinstance(getattr(base, f.name), float) and f.name != "nack_fraction"
        }
        return replace(base, **{**scaled, **overrides})

    def push_pull_scaled(self, n: int) -> float:
        """memberlist's pushPullScale: beyond 32 members the interval grows with log2(n/32)."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)
