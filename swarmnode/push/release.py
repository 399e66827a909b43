"""What a push announces: a release (app, bundle digest, commands), and who may announce one.

A release travels as a membership `Note` (topic "release", key = the app) signed by the pusher,
so gossip spreads it, push-pull hands it to a node that was offline, and the snapshot keeps it.
The same signed note goes directly to the canaries first; it is published to everyone only
once they are healthy. Membership keeps one note per author, so an author without the push
right can never displace a valid release: whose notes count is decided here.

Rights are notes too. Three rights exist, each on its own (none implies another): `push`
(announce releases), `operate` (ask a node to `exec`, `restart` or `reboot`; pause and resume
nodes, set the voters, cancel anyone's build) and `build` (submit builds: their jobs run on the
workers). A grant is a note (topic "grant", key "<right>:<id>"), a
revoke one (topic "revoke", same key); see `levels` for who holds a right and who may revoke
whom. A banned member loses every right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack

from swarmnode.artifacts import is_digest
from swarmnode.identity import verify
from swarmnode.membership import MemberView, Note
from swarmnode.push.bundle import SELF_APP, PushSpec

RELEASE_TOPIC = "release"
GRANT_TOPIC = "grant"
REVOKE_TOPIC = "revoke"
PUSH = "push"
OPERATE = "operate"
BUILD = "build"
RIGHTS = (PUSH, OPERATE, BUILD)
SELF_HEALTH_TIMEOUT = 20.0
"""A self-updated node must have restarted and rejoined within this: Python starts in well
under a second and a rejoin takes one push-pull, so 20 s means it is broken, not slow."""


class ReleaseError(ValueError):
    """A release announcement that does not decode or does not count (the message says why)."""


@dataclass(frozen=True, slots=True)
class Release:
    """A bundle (by digest) and how to run it: the payload's spec, or swarmnode's own."""

    spec: PushSpec
    digest: str
    size: int

    @classmethod
    def of_self(cls, digest: str, size: int) -> Release:
        return cls(PushSpec(SELF_APP, health_timeout=SELF_HEALTH_TIMEOUT), digest, size)

    @property
    def app(self) -> str:
        return self.spec.name

    @property
    def is_self(self) -> bool:
        return self.spec.name == SELF_APP

    def pack(self) -> bytes:
        return msgpack.packb([1, self.spec.plain(), self.digest, self.size])

    @classmethod
    def unpack(cls, data: bytes) -> Release:
        try:
            v = msgpack.unpackb(data, max_bin_len=0, max_str_len=8192, max_array_len=16,
                                max_map_len=8)
        except Exception as exc:  # msgpack raises several types; all mean "not a release"
            raise ReleaseError(f"undecodable release: {type(exc).__name__}") from None
        if type(v) is not list or len(v) != 4 or v[0] != 1:
            raise ReleaseError("release: wrong shape or version")
        _, spec, digest, size = v
        if not is_digest(digest):
            raise ReleaseError("release: bad digest")
        if type(size) is not int or size < 0:
            raise ReleaseError("release: bad size")
        try:
            return cls(PushSpec.from_plain(spec), digest, size)
        except ValueError as exc:
            raise ReleaseError(f"release: {exc}") from None


def levels(right: str, members: Iterable[MemberView], notes: Iterable[Note],
           is_founder: Callable[[str], bool]) -> dict[str, int]:
    """Who holds `right`, each with its distance from the founder (0 = the founder).

    The founder (the id its cluster id names: never a member that merely signs itself one)
    holds every right. Level by level, a member granted the right by a holder of the level
    before holds it one level further, unless a holder *closer to the founder* (a lower level)
    revoked it: so nobody can revoke the founder, its own granter or its peers, and the founder
    can revoke anyone. Revoking a holder also ends the rights that came only through it. Each
    author's newest statement about a member counts (grant or revoke; a tie counts as the
    revoke), so granting again withdraws one's own revoke. A grant keeps counting after its
    author is gone (retiring the founder does not end pushing). Bans remove the right."""
    members = list(members)
    banned = {m.id for m in members if m.state == "banned"}
    prefix = f"{right}:"
    newest: dict[tuple[str, str], Note] = {}  # (author, subject) -> its newest statement
    for n in notes:
        if n.topic not in (GRANT_TOPIC, REVOKE_TOPIC) or not n.key.startswith(prefix):
            continue
        slot = (n.by, n.key.removeprefix(prefix))
        old = newest.get(slot)
        if old is None or (n.ts, n.topic == REVOKE_TOPIC) > (old.ts, old.topic == REVOKE_TOPIC):
            newest[slot] = n
    grants = [slot for slot, n in newest.items() if n.topic == GRANT_TOPIC]
    revoked_by: dict[str, set[str]] = {}
    for (by, to), n in newest.items():
        if n.topic == REVOKE_TOPIC:
            revoked_by.setdefault(to, set()).add(by)
    known = {m.id for m in members} | {by for by, _ in newest}
    level = {i: 0 for i in known if is_founder(i) and i not in banned}
    depth = 0
    while True:
        frontier = {i for i, d in level.items() if d == depth}
        depth += 1
        reached = {to for by, to in grants
                   if by in frontier and to not in level and to not in banned
                   and not revoked_by.get(to, set()) & level.keys()}
        if not reached:
            return level
        level.update(dict.fromkeys(reached, depth))


def holders(right: str, members: Iterable[MemberView], notes: Iterable[Note],
            is_founder: Callable[[str], bool]) -> frozenset[str]:
    """Ids holding `right` (see `levels`)."""
    return frozenset(levels(right, members, notes, is_founder))


def operators(members: Iterable[MemberView], notes: Iterable[Note],
              is_founder: Callable[[str], bool], before: int | None = None) -> dict[str, int]:
    """Who may admit, ban and rename (the `operate` levels), counting only revokes signed
    before `before` (None: every revoke): the holders when a statement signed at `before` was
    made (membership/core.py `Operators`)."""
    if before is not None:
        notes = [n for n in notes if n.topic != REVOKE_TOPIC or n.ts < before]
    return levels(OPERATE, members, notes, is_founder)


def right_key(right: str, node_id: str) -> str:
    """The note key of a grant or revoke of `right` to `node_id`."""
    return f"{right}:{node_id}"


def check(note: Note, allowed: frozenset[str]) -> Release:
    """The release a note announces, if its author may push (raises ReleaseError why not)."""
    if note.topic != RELEASE_TOPIC:
        raise ReleaseError(f"not a release note ({note.topic})")
    if note.by not in allowed:
        raise ReleaseError(f"{note.by[:12]} is not allowed to push")
    release = Release.unpack(note.value)
    if release.app != note.key:
        raise ReleaseError("release: app does not match the note's key")
    return release


def verify_stage(sender: str, note: Note, allowed: frozenset[str]) -> Release:
    """The release a `push.stage` message carries, checked before anything is fetched: sent by
    its pusher, signed by it, and the pusher may push (ReleaseError says which failed)."""
    if note.by != sender:
        raise ReleaseError("a release must come from its pusher")
    if not verify(note.by, note.body(), note.sig):
        raise ReleaseError("bad signature on the release")
    return check(note, allowed)


def newest(notes: Iterable[Note], allowed: frozenset[str]) -> dict[str, tuple[Note, Release]]:
    """Per app, the newest release announced by someone allowed to push (ties: the author id,
    the same everywhere). Notes that do not count are skipped."""
    best: dict[str, tuple[Note, Release]] = {}
    for n in notes:
        try:
            r = check(n, allowed)
        except ReleaseError:
            continue
        cur = best.get(r.app)
        if cur is None or (n.ts, n.by) > (cur[0].ts, cur[0].by):
            best[r.app] = (n, r)
    return best
