"""Tunables of the scheduler election, each default with the reason it was chosen.

The target is failover -- `kill -9` of the leader until a new leader schedules again -- with a
median under 2 s on a LAN or tailnet, while a healthy leader is never deposed by a few lost
packets. Failover costs about: the first follower's election timeout, counted from the last
heartbeat it heard (up to one heartbeat interval had already passed at the kill), + two round
trips (pre-vote, vote) + one heartbeat round trip to establish the lease: 0.3-0.8 s with the
defaults, comfortably inside the target (the simulator measures it).
All times are in seconds of the clock the shell passes as `now`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .messages import MAX_CHUNK


@dataclass(frozen=True, slots=True)
class Config:
    heartbeat_interval: float = 0.1
    """The leader heartbeats every voter (and every observer running a job) this often. Four
    heartbeats fit into the minimum election timeout, so a follower starts an election only
    after four consecutive losses (at 10% loss about 1 in 10,000 per window), and 100 ms of a
    few hundred bytes per peer is nothing for at most five voters and the busy workers."""
    election_timeout_min: float = 0.4
    """Silence from the leader after which a voter may campaign, and the leader stickiness
    window: a voter that heard a leader less than this long ago refuses pre-votes and votes, so
    a rejoining or flapping node cannot depose a working leader. Raft's rule of thumb is an
    order of magnitude above the round trip; LAN and tailnet round trips are 1-50 ms."""
    election_timeout_max: float = 0.8
    """Each wait is drawn uniformly from [min, max] (fresh for every wait): a 400 ms spread is
    many round trips wide, so one voter usually wins the pre-vote and vote before another times
    out, and split votes are rare and resolve in the next round."""
    check_quorum_timeout: float = 0.4
    """A leader that has not heard heartbeat replies from a majority of voters for this long
    steps down. Equal to the minimum election timeout: by then the majority may already be
    electing someone else, so the old leader stops believing in itself about when the others
    stop believing in it."""
    lease_ratio: float = 0.9
    """The leader's lease lasts this fraction of election_timeout_min from the send time of the
    latest heartbeat a majority acknowledged. Those voters refuse to vote for
    election_timeout_min after receiving it, so no other leader can exist while the lease holds;
    the 10% margin (40 ms) covers clock rate differences between machines with a wide margin
    (quartz drift is parts per million). Clock offsets do not matter: each side measures an
    interval on its own clock."""
    commit_notify_delay: float = 0.005
    """When the commit index advances, a follower holding every entry but not yet told of the
    new commit gets an AppendEntries with it after this long, unless one carrying it went
    meanwhile (under load the next batch does). Without it a follower would apply the last
    entries of a burst only at the next heartbeat, up to 100 ms later: the node a user asked
    would show a finished build that late. 5 ms lets the leader's next turn go first."""
    pre_vote: bool = True
    """Ask "would you vote for me?" before incrementing the term. Off only in tests that show
    what it prevents (a partitioned node inflating its term and deposing the leader on return)."""
    max_append_bytes: int = 128 * 1024
    """Entry data in one AppendEntries (at least one entry goes whatever its size). A follower
    catching up gets one batch per round trip, so 128 KiB moves a few MB per second on a LAN
    while every message stays far below the 1 MiB wire frame."""
    snapshot_chunk_bytes: int = 128 * 1024
    """Snapshot bytes per InstallSnapshot, sent one chunk per round trip, for the same reason."""
    retransmit_max: float = 8.0
    """Data (a batch of entries, a snapshot chunk) goes to a follower once per reply; if no reply
    covers it, heartbeats carry none and it is sent again after election_timeout_min, then after
    twice as long each time the follower stays silent, up to this. A follower that stopped
    reading (a frozen VM, a hung process) then has one batch queued for it every 8 s instead of
    one every heartbeat: 1.3 MB/s, which grew a leader by 400 MB during a ten-minute hang (the
    peer's connection stays open, so its queue fills). Its first reply resets the wait."""
    observer_keepalive: float = 30.0
    """An observer hears from the leader this often while nothing commits, instead of every
    heartbeat (one running jobs gets every entry and commit at once, still no empty
    heartbeats: at 10 a second to each of 37 observers running a build they were most of a
    busy leader's work): at 40 members the stream to 35 idle observers was most of the
    leader's idle work, and only voters need it (for the lease, the quorum check and
    elections). What commits reaches an observer at once (observer_batch_interval); the
    keepalive is the safety net: it tells an observer that missed a new leader's first message
    who leads, and retries what was lost. It is rare because each one costs a connection (the
    leader's to an idle observer closes after 2 s: at 5 s, 35 observers kept 28 open). An
    observer keeps its leader through any silence: a new leader tells every member at once,
    and the shell says when membership finds the leader gone (`Election.leader_gone`)."""
    observer_keepalives_per_s: float = 2.0
    """...or less often, so that the leader sends at most this many keepalives a second in all
    (as Nomad caps heartbeats cluster-wide): 35 idle observers get one each 30 s, 995 each
    500 s, and the leader's idle work stays that of a swarm of 5 plus this."""
    observer_batch_interval: float = 0.25
    """What an idle observer lacks (entries, a new commit index) goes to it at most this often,
    batched: a finished build shows on every node within a quarter second and a hop, and a
    busy leader sends each observer 4 messages a second, not 10 (more when the observer is
    catching up: a full batch is followed by the next at its reply)."""
    stall_grace: bool = True
    """A voter that was not run for over two heartbeat intervals (a CPU-starved machine, a
    paused VM) does not act at once on a liveness timer that expired meanwhile (campaign,
    step down on check-quorum): the heartbeats and replies it missed are usually queued in its
    socket, so it gives them two heartbeat intervals (a heartbeat and its reply at a loaded
    peer) to be read. At most once per
    election_timeout_min, so a node starved all the time still acts, an interval late. A
    stall also makes it more patient (max_patience). Only when this node campaigns or gives up
    changes: the lease and a vote's stickiness keep election_timeout_min, so safety does not
    depend on it."""
    stall_min: float = 0.2
    """...and a gap counts as a stall only from this long, on any config: `fast` timers
    (heartbeats every 10 ms) would otherwise take every scheduling hiccup of a loaded test
    machine for a stall, and keep their voters at 4x patience. Not scaled by `fast`."""
    max_patience: int = 2
    """Each stall doubles a voter's election timeout and a leader's check-quorum timeout, up
    to 2 ** max_patience times (as Lifeguard's local health stretches memberlist's probes): a
    node whose own lateness is the likely cause of a silence waits longer before acting on it."""
    patience_decay: float = 10.0
    """...and each this many seconds without a stall halve them again."""
    late_gap: float = 0.3
    """A voter running on time that hears its leader this long after the time before (three
    heartbeat intervals; three quarters of election_timeout_min) takes it as a stall too: a
    busy leader or a loaded path is late now, and at 40 nodes on two cores the next gap cost
    an election during a build (memberlist likewise stretches its timeouts on evidence of
    slowness). Fast configs keep it: it is not scaled with the timers."""
    compact_keep_entries: int = 1000
    """Entries a compaction keeps before the snapshot's index, as etcd keeps its
    SnapshotCatchUpEntries: a follower a few entries behind when the leader compacts still gets
    entries instead of the whole snapshot (a node that installed one grew 6 MiB in the soak).
    A thousand is about two minutes of a busy swarm's ledger (the soak's 20-job build every 5 s
    commits about 8 entries a second)."""
    compact_keep_bytes: int = 4 * 1024 * 1024
    """...and at most this much of their data, since one entry (a build's graph) may be up to
    896 KiB: the tail costs at most 4 MiB of memory and of ledger.db."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.election_timeout_min:
            raise ValueError("heartbeat_interval must be positive and below election_timeout_min")
        if self.election_timeout_max < self.election_timeout_min:
            raise ValueError("election_timeout_max must be >= election_timeout_min")
        if self.check_quorum_timeout <= self.heartbeat_interval:
            raise ValueError("check_quorum_timeout must exceed heartbeat_interval")
        if not 0 < self.lease_ratio < 1:
            raise ValueError("lease_ratio must be in (0, 1)")
        if not 0 < self.max_append_bytes <= MAX_CHUNK:
            raise ValueError(f"max_append_bytes must be in (0, {MAX_CHUNK}]")
        if not 0 < self.snapshot_chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"snapshot_chunk_bytes must be in (0, {MAX_CHUNK}]")
        if self.retransmit_max < self.election_timeout_min:
            raise ValueError("retransmit_max must be >= election_timeout_min")
        if self.observer_keepalives_per_s <= 0:
            raise ValueError("observer_keepalives_per_s must be positive")
        if not 0 < self.observer_batch_interval <= self.observer_keepalive:
            raise ValueError("observer_batch_interval must be in (0, observer_keepalive]")
        if self.compact_keep_entries < 0 or self.compact_keep_bytes < 0:
            raise ValueError("compact_keep_entries and compact_keep_bytes must be >= 0")

    @property
    def lease_duration(self) -> float:
        return self.election_timeout_min * self.lease_ratio

    @classmethod
    def fast(cls, **overrides: object) -> Config:
        """Every time divided by ten: for tests on real clocks (same ratios, same behaviour)."""
        base = cls()
        scaled = {
            f.name: getattr(base, f.name) / 10
            for f in fields(cls)
            if isinstance(getattr(base, f.name), float)
            and f.name not in ("lease_ratio", "stall_min", "late_gap")
        }
        return replace(base, **{**scaled, **overrides})
