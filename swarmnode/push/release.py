"""What a push announces: a release (app, bundle digest, commands), and who may announce one.

A release travels as a membership `Note` (topic "release", key = the app) signed by the pusher,
so gossip spreads it, push-pull hands it to a node that was offline, and the snapshot keeps it.
The same signed note goes directly to the canaries first; it is published to everyone only
once they are healthy. Membership keeps one note per author, so an author without the push
right can never displace a valid release: whose notes count is decided here.

Push rights are notes too (topic "grant", key "push:<id>"): the cluster's founders may push,
and so may anyone a pusher granted the right to. A banned member loses it.
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


def pushers(members: Iterable[MemberView], grants: Iterable[Note],
            is_founder: Callable[[str], bool]) -> frozenset[str]:
    """Ids allowed to push: the cluster's founder (the id its cluster id names: never a member
    that merely signs itself one), then whoever a pusher granted the right, to a fixed point
    (a grant counts once its author's right is known; it keeps counting after its author is
    gone, so retiring the founder does not end pushing). Bans remove the right."""
    members = list(members)
    grants = [g for g in grants if g.key.startswith("push:")]
    banned = {m.id for m in members if m.state == "banned"}
    known = {m.id for m in members} | {g.by for g in grants}
    allowed = {i for i in known if is_founder(i)}
    edges = [(g.by, g.key.removeprefix("push:")) for g in grants]
    grew = True
    while grew:
        grew = False
        for by, to in edges:
            if by in allowed and to not in allowed and to not in banned:
                allowed.add(to)
                grew = True
    return frozenset(allowed - banned)


def grant_key(node_id: str) -> str:
    return f"push:{node_id}"


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
