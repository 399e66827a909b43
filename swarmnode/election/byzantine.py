"""A Byzantine member for the simulators: admitted, holding its own key, lying about the rest.

It stands for a compromised ordinary member (issue 13): the honest nodes count it as an
observer and know its key, but it runs no core. It learns what an observer learns (terms, the
leader's `LeaderProof` and its votes, the log's length) and, when the simulator asks, sends
forgeries built from that: leader proofs signed by itself alone or padded with real votes for
somebody else (or garbage), leader messages at the current term, the next one and the codec's
maximum with made-up entries and a huge commit index, voter-only messages and replies at huge
terms, and proof-request floods. The simulator's checker then proves none of it took hold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .messages import (
    MAX_U63,
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    LeaderProof,
    Message,
    PreVote,
    PreVoteReply,
    ProofRequest,
    RequestVote,
    SnapshotReply,
    VoteProof,
    VoteReply,
)
from .proof import SIGNATURE_BYTES, Signatures, vote_payload

PROOF_FLOOD = 8
"""ProofRequests in one flood: the leader answers one per heartbeat interval per peer."""


@dataclass(slots=True)
class Byzantine:
    """One lying member. `receive` is everything sent to it; `forgeries` one volley of lies
    for a victim (a random kind each time, from the simulator's seeded `rng`)."""

    id: str
    signatures: Signatures
    rng: random.Random
    term: int = 0
    """The highest term it has heard from anyone."""
    last_index: int = 0
    """Where the log it has been sent ends (so forged entries follow it)."""
    proof: LeaderProof | None = None
    """The latest real leader proof it was shown (votes for somebody else, to replay)."""
    heard: dict[str, int] = field(default_factory=dict)
    """Messages received, by class name."""

    def receive(self, src: str, msg: Any) -> None:
        name = type(msg).__name__
        self.heard[name] = self.heard.get(name, 0) + 1
        term = getattr(msg, "term", None)
        if type(term) is int and type(msg) is not ProofRequest:  # that one echoes its own lie
            self.term = max(self.term, term)
        if type(msg) is LeaderProof and (self.proof is None or msg.term >= self.proof.term):
            self.proof = msg
        elif type(msg) is AppendEntries:
            self.last_index = max(self.last_index, msg.prev_index + len(msg.entries))

    def forgeries(self, victim: str) -> list[Message]:
        """One volley for `victim`: every lie of one randomly chosen kind."""
        kinds = (self._proofs, self._leader_messages, self._counters, self._proof_flood)
        return self.rng.choice(kinds)(victim)

    def terms(self) -> tuple[int, ...]:
        """The terms it lies about: the current one, the next, a jump and the codec's limit."""
        return tuple(min(t, MAX_U63) for t in (self.term, self.term + 1, self.term + 1000,
                                                 MAX_U63))

    def _sign(self, term: int, candidate: str | None = None) -> bytes:
        """Its own real vote (for itself unless `candidate` is given)."""
        return self.signatures.sign(vote_payload(term, candidate or self.id))

    def _garbage(self) -> bytes:
        return self.rng.randbytes(SIGNATURE_BYTES)

    def _proofs(self, victim: str) -> list[Message]:
        """Self-elected; elected by the real voters plus itself with their votes for the real
        leader replayed (or garbage); a real proof re-addressed as its own."""
        out: list[Message] = []
        real = self.proof
        for t in self.terms():
            mine = (self.id, self._sign(t))
            out.append(LeaderProof(t, self.id, (self.id,), (mine,)))
            if real is not None:
                voters = tuple(sorted({*real.voters, self.id}))[:9]
                replayed = tuple(sorted({*real.votes, mine}))[:9]
                garbage = tuple(sorted((v, self._garbage()) for v in voters if v != self.id))
                out.append(LeaderProof(t, self.id, voters, replayed))
                out.append(LeaderProof(t, self.id, voters, (mine, *garbage)[:9]))
        if real is not None:
            out.append(LeaderProof(real.term, self.id, real.voters, real.votes))
            out.append(real)  # the truth, replayed: harmless, and it must stay so
        return out

    def _leader_messages(self, victim: str) -> list[Message]:
        """AppendEntries and InstallSnapshot as if it led: forged entries after the end of the
        log and over its start, a huge commit index; also one naming the real leader."""
        out: list[Message] = []
        nxt = self.last_index + 1
        for t in self.terms():
            forged = ((t, b"forged by " + self.id.encode()),)
            out.append(AppendEntries(t, self.id, 1, self.last_index, t, MAX_U63, forged))
            out.append(AppendEntries(t, self.id, 1, 0, 0, MAX_U63, forged * 2))
            out.append(InstallSnapshot(t, self.id, 1, nxt, t, 0, b"\0" * 16 + b"forged", True))
        if self.proof is not None:  # claims to be the real leader: the transport says who sent
            out.append(AppendEntries(self.proof.term, self.proof.leader, 1, 0, 0, MAX_U63))
        return out

    def _counters(self, victim: str) -> list[Message]:
        """Voter-only messages and replies whose terms would move the victim's term."""
        out: list[Message] = []
        for t in self.terms():
            out += [
                PreVote(t, self.id, MAX_U63, MAX_U63),
                PreVoteReply(t, True, t),
                RequestVote(t, self.id, MAX_U63, MAX_U63),
                VoteReply(t, True),
                VoteProof(t, victim, self._sign(t, victim)),
                AppendReply(t, 1, True, MAX_U63),
                SnapshotReply(t, 1, MAX_U63, MAX_U63),
            ]
        return out

    def _proof_flood(self, victim: str) -> list[Message]:
        return [ProofRequest(self.term)] * PROOF_FLOOD
