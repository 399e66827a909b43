"""Proof of leadership: a leader's word counts only with the signed votes that elected it.

Every granted vote is also a signature by the voter over (term, candidate) (`vote_payload`).
The winner collects a majority of them into a `LeaderProof` and shows it to every follower and
observer before they accept anything it says in that term: AppendEntries, snapshots, and (in
the shell) job assignments and cancellations. A member that is not a voter cannot collect one,
because a voter grants only candidates in its own voter set; a forged proof needs the voters'
keys. So an admitted member cannot make itself leader, whatever term it claims.

Which voter set the votes are counted against (`proof_valid`): the proof names the set `C` the
leader was elected by; a verifier holding voter set `V` accepts it when the signers are a
majority of `C`, the leader is in `C`, and either

- `C` and `V` differ by at most one member (voter changes move one member at a time and are
  committed before the next, so any two configurations in use differ by at most one); `V`
  is the configuration the verifier applied, or the newer one its log already holds (Raft
  proper counts a configuration in force from its append: a voter dropped from the set
  typically receives the entry that drops it, but not its commit), or
- at least two distinct voters signed and one of them is in `V` (a node whose configuration is
  several changes behind, back after a long absence), or at least two signed and the verifier
  has no configuration yet (a node that just joined).

Signatures count only from admitted members (the shell's `Signatures.verify` says so: a
pending guest's key costs nothing to make, and only operators admit). With one member's key the
attacker has one signature at most, on a vote for nobody but a voter: it can satisfy none of
the three, except for a node whose set is the key's owner and one other (a set of two exists
only between two steps of a change). Its limits are written down in docs/security.md (two
stolen member keys can mislead a node that has just joined, until it learns the voters). A
proof is checked at most once per heartbeat interval per sender unless asked for, and costs at
most a majority's checks.
A node without a configuration of its own counts the cluster's founder (known to every member
from the cluster id) as `V` for the first rule, so the founder leading alone is accepted.

Signing is an input (`Signatures`): the node signs with its identity key, the simulators with a
`KeyRing` of real Ed25519 keys; nothing here touches a key file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

VOTE_DOMAIN = b"swarmnode.election.vote.v1\0"
MAX_PROOF_VOTERS = 9
"""Voter sets hold at most five members (`DEFAULT_MAX_VOTERS`); a proof naming more is refused
without checking a signature (each costs about 50 us)."""
SIGNATURE_BYTES = 64


def vote_payload(term: int, candidate: str) -> bytes:
    """What a voter signs when it grants `candidate` its vote in `term`."""
    return VOTE_DOMAIN + msgpack.packb([term, candidate], use_bin_type=True)


class Signatures(Protocol):
    """This node's signature and a check of anyone's (the shell decides who counts: a banned
    or unknown id verifies as False)."""

    def sign(self, data: bytes) -> bytes: ...

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool: ...


def proof_signers(term: int, leader: str, voters: frozenset[str],
                  votes: Iterable[tuple[str, bytes]], sigs: Signatures,
                  need: int = 0) -> frozenset[str]:
    """The members of `voters` whose vote for `leader` in `term` is among `votes` and verifies
    (each voter checked once, whatever the list repeats); empty as soon as fewer than `need`
    could still verify, so a hostile list costs at most a majority's checks."""
    data = vote_payload(term, leader)
    first: dict[str, bytes] = {}
    for voter, sig in votes:
        if voter in voters:
            first.setdefault(voter, sig)
    signers: set[str] = set()
    for left, (voter, sig) in enumerate(first.items()):
        if len(signers) + len(first) - left < need:
            return frozenset()
        if sigs.verify(voter, data, sig):
            signers.add(voter)
    return frozenset(signers) if len(signers) >= need else frozenset()


def proof_valid(term: int, leader: str, claimed: frozenset[str],
                votes: Iterable[tuple[str, bytes]], mine: frozenset[str], root: str | None,
                sigs: Signatures, newest: frozenset[str] = frozenset()) -> bool:
    """May a node whose voter set is `mine` (empty: none known yet; then `root`, the founder,
    stands in for the first rule), and whose log holds the newer set `newest` not yet applied
    (if any), believe that `leader` was elected in `term`? See the module docstring for the
    rule and why it is enough."""
    if leader not in claimed or not 1 <= len(claimed) <= MAX_PROOF_VOTERS:
        return False
    signers = proof_signers(term, leader, claimed, votes, sigs, len(claimed) // 2 + 1)
    if not signers:
        return False
    reference = mine or (frozenset({root}) if root else frozenset())
    if any(ref and len(claimed ^ ref) <= 1 for ref in (reference, newest)):
        return True
    return len(signers) >= 2 and (not mine or bool(signers & mine))


@dataclass(slots=True)
class KeyRing:
    """Real Ed25519 keys for named simulated nodes (derived from the name, so every run of a
    seed signs the same bytes). `for_node(id)` is that node's `Signatures`."""

    _keys: dict[str, SigningKey] = field(default_factory=dict)

    def key(self, node_id: str) -> SigningKey:
        key = self._keys.get(node_id)
        if key is None:
            key = SigningKey(hashlib.sha256(b"swarmnode.sim\0" + node_id.encode()).digest())
            self._keys[node_id] = key
        return key

    def for_node(self, node_id: str) -> _RingSignatures:
        return _RingSignatures(self, node_id)


@dataclass(frozen=True, slots=True)
class _RingSignatures:
    ring: KeyRing
    node_id: str

    def sign(self, data: bytes) -> bytes:
        return self.ring.key(self.node_id).sign(data).signature

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
        try:
            self.ring.key(signer).verify_key.verify(data, sig)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True
