"""The Membership state machine with real Ed25519, driven by a tiny synchronous network."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmnode.identity import Identity
from swarmnode.membership import (
    Ack,
    Admit,
    Alive,
    Ban,
    Config,
    Dead,
    Entry,
    Event,
    Gossip,
    Membership,
    Note,
    Pending,
    Ping,
    PushPull,
    PushPullReply,
    Rename,
    Send,
    SharedMembers,
    Suspect,
    make_record,
)
from swarmnode.membership.messages import admit_body, ban_body, note_body, rename_body
from swarmnode.sim import NullCrypto, fake_id

CFG = Config.fast()


def ident(i: int) -> Identity:
    return Identity(nacl.signing.SigningKey(bytes([i + 1]) * 32))


class Net:
    """Delivers every Send at once (FIFO) at the current time; `drop` filters links."""

    def __init__(self, cfg: Config = CFG) -> None:
        self.cfg = cfg
        self.nodes: dict[str, Membership] = {}
        self.idents: dict[str, Identity] = {}
        self.events: list[tuple[str, Event]] = []
        self.sent: list[tuple[str, str, object]] = []
        self.drop: Callable[[str, str, object], bool] = lambda s, d, m: False
        self.now = 0.0
        self.is_founder: Callable[[str], bool] | None = None

    def add(self, i: int, founder: bool = False) -> Membership:
        idn = ident(i)
        rec = make_record(idn, idn.id, 0, f"n{i}", [f"10.0.0.{i}:7946"], {"cores": 4})
        m = Membership(rec, idn, self.cfg, random.Random(i), self.now, founder=founder,
                       is_founder=self.is_founder)
        self.nodes[idn.id] = m
        self.idents[idn.id] = idn
        return m

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for src, m in list(self.nodes.items()):
                for out in m.drain():
                    if isinstance(out, Event):
                        self.events.append((src, out))
                        continue
                    self.sent.append((src, out.to, out.msg))
                    if self.drop(src, out.to, out.msg):
                        continue
                    dst = self.nodes.get(out.to)
                    if dst is not None:
                        dst.handle(self.now, src, out.msg)
                        moved = True

    def run(self, seconds: float, step: float = 0.005) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for m in list(self.nodes.values()):
                if m.next_deadline() <= self.now:
                    m.tick(self.now)
            self.pump()

    def join(self, contact: Membership, m: Membership) -> None:
        contact.hello(self.now, m.id, m.record, "token")
        contact.admit(self.now, m.id, "token")
        m.join(self.now, [contact.id])
        self.pump()

    def kinds(self, node: str | None = None) -> list[str]:
        return [e.kind for n, e in self.events if node is None or n == node]


def cluster(k: int, cfg: Config = CFG) -> tuple[Net, list[Membership]]:
    net = Net(cfg)
    ms = [net.add(0, founder=True)]
    for i in range(1, k):
        m = net.add(i)
        net.join(ms[0], m)
        ms.append(m)
    net.run(0.5)
    for a in ms:
        for b in ms:
            assert a.state_of(b.id) == "alive", (a.record.name, b.record.name)
    return net, ms


def test_cluster_forms_with_admissions() -> None:
    net, ms = cluster(4)
    f = ms[0]
    for m in ms:
        v = m.member(ms[2].id)
        assert v.admitted_by == f.id and v.how == "token" and v.name == "n2"
        assert m.member(f.id).how == "founder"
    assert "member_join" in net.kinds(ms[1].id)


def test_one_node_cluster_has_nothing_to_probe() -> None:
    net = Net()
    m = net.add(0, founder=True)
    net.run(1.0)
    assert not [s for s in net.sent if s[0] == m.id]
    assert m.next_deadline() < float("inf")
    assert [v.id for v in m.members()] == [m.id]


def test_refutes_suspicion_and_death_with_new_incarnation() -> None:
    net, (a, b, c) = cluster(3)
    b.handle(net.now, a.id, Gossip((Suspect(b.id, 0, a.id),)))
    assert b.incarnation == 1
    kinds = [e.kind for e in b.drain() if isinstance(e, Event)]
    assert "refuted" in kinds and "incarnation" in kinds
    b.handle(net.now, a.id, Gossip((Dead(b.id, 1, a.id),)))
    assert b.incarnation == 2
    b.handle(net.now, a.id, Gossip((Suspect(b.id, 1, a.id),)))  # stale: no refutation
    assert b.incarnation == 2
    a.handle(net.now, c.id, Gossip((Suspect(b.id, 0, c.id),)))
    assert a.state_of(b.id) == "suspect"
    net.pump()
    net.run(0.2)
    assert a.state_of(b.id) == "alive" and a.member(b.id).incarnation == 2
    assert b.health > 0  # refuting is a sign our own links may be bad


def test_alive_must_be_signed_by_its_node() -> None:
    net, (a, b, c) = cluster(3)
    forged = make_record(net.idents[a.id], b.id, 5, "evil", ["6.6.6.6:1"], {})
    c.handle(net.now, a.id, Gossip((Alive(forged),)))
    assert c.member(b.id).incarnation == 0 and c.member(b.id).record.name == "n1"
    assert c.counters["drop_bad_signature"] == 1
    # nobody can make b refute on its behalf either
    b.handle(net.now, a.id, Gossip((Alive(forged),)))
    assert b.incarnation == 0


def test_update_record_reaches_everyone_as_member_update() -> None:
    net, (_a, b, c) = cluster(3)
    b.update_record(net.now, addresses=["192.168.1.2:7946"], facts={"cores": 16})
    net.pump()
    net.run(0.2)
    assert c.member(b.id).record.addresses == ("192.168.1.2:7946",)
    assert c.member(b.id).record.facts_dict() == {"cores": 16}
    assert "member_update" in net.kinds(c.id)


def test_quiet_notes_ride_pings_and_start_no_gossip_round() -> None:
    """A note of a quiet topic (members' periodic statements) is sent only on pings, acks and
    push-pulls: no `Gossip` carries it, and it still reaches every member. A note of another
    topic, like news of a member, is gossiped at once."""
    cfg = replace(CFG, quiet_topics=frozenset({"power"}))
    net, ms = cluster(5, cfg)
    a = ms[0]
    net.run(3.0)  # the join news has been sent its count
    net.sent.clear()
    a.note(net.now, "power", "", b"42")
    net.run(2 * cfg.probe_interval * len(ms))
    assert not [m for src, _to, m in net.sent if isinstance(m, Gossip)]
    assert all([n.value for n in m.notes("power")] == [b"42"] for m in ms)
    net.sent.clear()
    a.note(net.now, "release", "app", b"v1")
    net.run(0.5)
    assert [m for src, _to, m in net.sent if src == a.id and isinstance(m, Gossip)]
    assert all([n.value for n in m.notes("release")] == [b"v1"] for m in ms)


def _start_probe(net: Net, prober: Membership, target: Membership) -> Ping:
    """Run the network until `prober` pings `target`; that ping is captured, not delivered."""
    caught: list[Ping] = []
    before = net.drop

    def capture(s: str, dst: str, m: object) -> bool:
        own = prober._probe is not None and prober._probe.target == target.id
        if not caught and s == prober.id and dst == target.id and isinstance(m, Ping) and own:
            caught.append(m)
            return True
        return before(s, dst, m)

    net.drop = capture
    for _ in range(2000):
        net.run(0.005)
        if caught:
            net.drop = before
            return caught[0]
    raise AssertionError("no probe")


def test_ping_naming_another_target_is_not_answered() -> None:
    net, (a, b, c) = cluster(3)
    a.handle(net.now, c.id, Ping(7, b.id, b"n" * 16))
    assert not [o for o in a.drain() if isinstance(o, Send)]
    assert a.counters["drop_ping_wrong_target"] == 1


def test_ack_from_wrong_identity_is_not_a_reply() -> None:
    net, (a, b, c, _d) = cluster(4)
    ping = _start_probe(net, a, b)
    # c answers in b's name with a bogus proof, then with its own (valid) proof for itself
    a.handle(net.now, c.id, Ack(ping.seq, b.id, b"\x00" * 64))
    assert a.counters["drop_ack_bad_proof"] == 1
    c_proof = net.idents[c.id].sign(b"whatever")
    a.handle(net.now, c.id, Ack(ping.seq, c.id, c_proof))
    assert a.counters["drop_ack_unexpected"] == 1
    net.drop = lambda s, dst, m: b.id in (s, dst)  # b is really unreachable
    net.run(2 * CFG.probe_interval)
    assert a.state_of(b.id) in ("suspect", "dead")


def test_relayed_ack_proves_the_target_answered() -> None:
    net, (a, b, _c, _d) = cluster(4)
    net.drop = lambda s, dst, m: {s, dst} == {a.id, b.id}  # only the a-b link is broken
    net.run(40 * CFG.probe_interval)
    assert a.state_of(b.id) == "alive"
    assert ("member_suspect" not in net.kinds(a.id)) or a.incarnation >= 0
    assert not [e for n, e in net.events if e.kind == "member_dead"]
    # the proof a helper forwards is b's own signature
    relayed = [
        m for s, dst, m in net.sent if dst == a.id and isinstance(m, Ack) and m.target_id != s
    ]
    assert relayed and all(m.target_id == b.id for m in relayed)


def test_nacks_keep_our_health_when_the_target_is_dead() -> None:
    net, (a, b, _c, _d) = cluster(4)
    del net.nodes[b.id]  # b crashed; helpers c and d will nack
    _start_probe(net, a, b)
    net.run(CFG.probe_interval * 1.2)
    assert a.health == 0
    assert a.state_of(b.id) == "suspect"


def test_missing_nacks_lower_our_health() -> None:
    net, (a, b, _c, _d) = cluster(4)
    net.drop = lambda s, dst, m: a.id in (s, dst)  # a itself is cut off
    _start_probe(net, a, b)
    net.run(CFG.probe_interval * 1.2)
    assert a.health >= 1


def test_buddy_system_ping_carries_the_suspicion() -> None:
    net, (a, b, c) = cluster(3)
    net.drop = lambda s, dst, m: dst == b.id  # b cannot hear (and refute) in the meantime
    a.handle(net.now, c.id, Gossip((Suspect(b.id, 0, c.id),)))
    ping = _start_probe(net, a, b)
    assert Suspect(b.id, 0, a.id) in ping.piggyback


def test_suspicion_expires_to_dead_and_confirmations_shorten_it() -> None:
    net, ms = cluster(6)
    a, b = ms[0], ms[1]
    a.handle(net.now, ms[2].id, Gossip((Suspect(b.id, 0, ms[2].id),)))
    lonely = a._suspicions[b.id].deadline()
    a.handle(net.now, ms[3].id, Gossip((Suspect(b.id, 0, ms[3].id),)))
    a.handle(net.now, ms[4].id, Gossip((Suspect(b.id, 0, ms[4].id),)))
    confirmed = a._suspicions[b.id].deadline()
    assert confirmed < lonely
    a.tick(confirmed)
    assert a.state_of(b.id) == "dead"


def test_leave_is_left_not_dead_and_is_not_refuted() -> None:
    net, (a, b, c, d) = cluster(4)
    b.leave(net.now)
    net.pump()
    net.run(0.3)
    assert a.state_of(b.id) == "left" and c.state_of(b.id) == "left"
    assert b.incarnation == 1 and b.record.is_goodbye  # the leave is its signed goodbye
    b.handle(net.now, a.id, Gossip((Dead(b.id, 1, a.id),)))
    assert b.incarnation == 1  # no refutation after leaving
    del net.nodes[c.id]  # c crashes without a word
    net.run(60 * CFG.probe_interval)
    assert a.state_of(c.id) == "dead" and d.state_of(c.id) == "dead"
    assert a.state_of(b.id) == "left"


def test_ban_overrides_everything_and_is_permanent() -> None:
    net, (a, b, c, d) = cluster(4)
    a.ban(net.now, d.id)
    net.pump()
    net.run(0.2)
    for m in (a, b, c):
        assert m.state_of(d.id) == "banned"
    # d refutes with a higher incarnation: still banned
    d.update_record(net.now, name="back")
    b.handle(net.now, c.id, Gossip((Alive(d.record),)))
    assert b.state_of(d.id) == "banned"
    assert b.counters["drop_alive_banned"] >= 1
    b.admit(net.now, d.id, "manual")
    assert b.counters["admit_banned"] == 1 and b.state_of(d.id) == "banned"
    dropped = b.counters["drop_from_banned"]
    b.handle(net.now, d.id, Gossip(()))
    assert b.counters["drop_from_banned"] == dropped + 1
    # a push-pull from d is not answered either
    d.drain()
    b.handle(net.now, d.id, PushPull(False, (), ()))
    assert not [o for o in b.drain() if isinstance(o, Send) and o.to == d.id]


def test_statements_need_a_member_author_and_a_valid_signature() -> None:
    net, (a, b, c) = cluster(3)
    outsider = ident(50)
    guest = ident(51)
    ts = 1
    by_outsider = Admit(
        guest.id, outsider.id, "x", ts, outsider.sign(admit_body(guest.id, outsider.id, "x", ts))
    )
    b.handle(net.now, a.id, Gossip((by_outsider,)))
    assert b.member(guest.id) is None and b.counters["statement_deferred"] == 1
    bad_sig = Admit(guest.id, a.id, "x", ts, b"\x00" * 64)
    b.handle(net.now, a.id, Gossip((bad_sig,)))
    assert b.counters["drop_bad_signature"] == 1 and b.member(guest.id) is None
    ban = Ban(c.id, outsider.id, ts, outsider.sign(ban_body(c.id, outsider.id, ts)))
    b.handle(net.now, a.id, Gossip((ban,)))
    assert b.state_of(c.id) == "alive"
    rn = Rename(c.id, "x", outsider.id, ts, outsider.sign(rename_body(c.id, "x", outsider.id, ts)))
    b.handle(net.now, a.id, Gossip((rn,)))
    assert b.member(c.id).name == "n2"
    # a valid admission by a member admits; the record may arrive before or after
    good = Admit(
        guest.id, a.id, "x", ts, net.idents[a.id].sign(admit_body(guest.id, a.id, "x", ts))
    )
    grec = make_record(guest, guest.id, 0, "g", ["1.2.3.4:5"], {})
    b.handle(net.now, a.id, Gossip((Alive(grec), good)))
    assert b.state_of(guest.id) == "alive" and b.member(guest.id).admitted_by == a.id


def test_rename_is_last_writer_wins() -> None:
    net, (a, b, c) = cluster(3)
    a.rename(net.now, c.id, "first")
    net.run(0.2)  # b hears it, so its rename gets a later timestamp
    b.rename(net.now, c.id, "second")
    net.pump()
    net.run(0.2)
    assert {m.member(c.id).name for m in (a, b, c)} == {"second"}
    old = Rename(c.id, "old", a.id, 0, net.idents[a.id].sign(rename_body(c.id, "old", a.id, 0)))
    b.handle(net.now, a.id, Gossip((old,)))
    assert b.member(c.id).name == "second"


def test_notes_spread_newest_per_author_and_survive_restart() -> None:
    net, (a, b, c) = cluster(3)
    a.note(net.now, "release", "app", b"v1")
    net.run(0.3)
    b.note(net.now, "release", "app", b"b's")
    net.run(0.3)
    a.note(net.now, "release", "app", b"v2")
    net.run(0.3)
    for m in (a, b, c):
        held = {(n.by, n.value) for n in m.notes("release")}
        assert held == {(a.id, b"v2"), (b.id, b"b's")}  # one slot per author: b cannot overwrite a
        assert m.notes("grant") == []
    # an older note, a forged one and one from a non-member change nothing
    old = Note("release", "app", b"v0", a.id, 1, net.idents[a.id].sign(
        note_body("release", "app", b"v0", a.id, 1)))
    forged = Note("release", "app", b"evil", a.id, 10**12, b"x" * 64)
    g = net.add(9)
    stranger = Note("release", "app", b"g", g.id, 5, net.idents[g.id].sign(
        note_body("release", "app", b"g", g.id, 5)))
    c.handle(net.now, a.id, Gossip((old, forged, stranger)))
    assert {n.value for n in c.notes("release")} == {b"v2", b"b's"}
    assert c.counters["drop_bad_signature"] == 1
    # a node that restarts from its snapshot still holds them; a newcomer gets them by push-pull
    r = Membership.restore(c.snapshot(), c.record, net.idents[c.id], CFG, random.Random(5), net.now)
    assert {n.value for n in r.notes("release")} == {b"v2", b"b's"}
    d = net.add(4)
    net.join(a, d)
    net.run(0.5)
    assert {n.value for n in d.notes("release")} == {b"v2", b"b's"}


def test_notes_are_bounded_per_author_and_in_size() -> None:
    net, (a, b, c) = cluster(3, Config.fast(max_note_bytes_per_author=10_000,
                                            note_bytes_per_member=0))
    for i in range(4):
        b.note(net.now, "junk", f"k{i}", b"x" * 4000)  # the third and fourth do not fit
    assert len(b.notes("junk")) == 2 and b.counters["drop_note_author_full"] == 2
    c.note(net.now, "release", "web", b"v" * 300)  # another author still has room
    net.run(0.3)
    assert len(a.notes("release")) == 1
    with pytest.raises(ValueError, match="too large"):
        c.note(net.now, "release", "web", b"v" * 4097)


def test_only_the_cluster_founder_may_admit_itself() -> None:
    net = Net()
    net.is_founder = lambda i: i == ident(0).id  # the node: its cluster id names the founder
    f = net.add(0, founder=True)
    a, b = net.add(1), net.add(2)
    net.join(f, a)
    net.join(f, b)
    net.run(0.5)
    # a member signs itself a founder's admission, older than its real one (earliest wins)
    fake = Admit(b.id, b.id, "founder", 0, net.idents[b.id].sign(
        admit_body(b.id, b.id, "founder", 0)))
    a.handle(net.now, b.id, Gossip((fake,)))
    assert a.member(b.id).admitted_by == f.id and a.member(b.id).how == "token"
    assert a.counters["drop_false_founder"] == 1
    # a stranger doing the same with its first message is not let in
    g = net.add(9)
    own = Admit(g.id, g.id, "founder", 0, net.idents[g.id].sign(
        admit_body(g.id, g.id, "founder", 0)))
    a.handle(net.now, g.id, Gossip((own, Alive(g.record))))
    assert a.member(g.id) is None or a.member(g.id).admitted_by is None
    assert a.counters["drop_false_founder"] == 2


def test_pending_guest_is_listed_everywhere_but_gets_nothing() -> None:
    net, (a, b, c) = cluster(3)
    g = net.add(9)
    a.hello(net.now, g.id, g.record, "no token")
    net.pump()
    net.run(0.5)
    for m in (a, b, c):
        v = m.member(g.id)
        assert v is not None and v.state == "pending" and v.how == "no token"
    # the guest talks: nobody answers, nobody probes or gossips to it
    for m in (a, b, c):
        m.handle(net.now, g.id, Ping(1, m.id, b"n" * 16))
        m.handle(net.now, g.id, PushPull(True, (), ()))
    net.pump()
    net.run(2.0)
    assert not [x for x in net.sent if x[1] == g.id and x[0] != g.id]
    assert a.counters["drop_from_pending"] == 2
    assert all(m.live_count == 3 for m in (a, b, c))  # not counted
    # a hello claiming another identity is refused
    c.hello(net.now, a.id, g.record, "x")
    assert c.counters["drop_hello_id_mismatch"] == 1
    # admission turns pending into alive
    b.admit(net.now, g.id, "manual")
    g.join(net.now, [b.id])
    net.pump()
    net.run(0.5)
    for m in (a, b, c, g):
        assert m.state_of(g.id) == "alive"
    assert g.state_of(a.id) == "alive"
    assert ("admitted" in net.kinds(a.id)) and ("pending" in net.kinds(a.id))


def test_snapshot_restore_rejoins_with_higher_incarnation() -> None:
    net, (a, b, c) = cluster(3)
    a.rename(net.now, b.id, "bee")
    net.run(0.2)
    snap = b.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap)) == snap  # plain data
    del net.nodes[b.id]
    net.run(60 * CFG.probe_interval)
    assert a.state_of(b.id) == "dead"
    b2 = Membership.restore(snap, b.record, net.idents[b.id], CFG, random.Random(7), net.now)
    assert b2.incarnation == 1
    assert b2.state_of(a.id) == "alive" and b2.member(b.id).name == "bee"
    assert b2.member(b.id).admitted_by == a.id
    out = b2.drain()
    assert any(isinstance(o, Event) and o.kind == "incarnation" for o in out)
    # Reloading what it knew is not news: the only event is the new incarnation.
    assert [o.kind for o in out if isinstance(o, Event)] == ["incarnation"]
    joins = [o for o in out if isinstance(o, Send) and isinstance(o.msg, PushPull)]
    assert joins and all(o.msg.join for o in joins)
    net.nodes[b.id] = b2
    for o in joins:
        net.nodes[o.to].handle(net.now, b.id, o.msg)
    net.pump()
    net.run(0.5)
    assert a.state_of(b.id) == "alive" and c.state_of(b.id) == "alive"
    with pytest.raises(ValueError):
        Membership.restore(snap, a.record, net.idents[a.id], CFG, random.Random(1), 0.0)


def test_founder_restored_from_a_snapshot_older_than_its_members_accepts_them() -> None:
    """The founder crashed before its snapshot listed the members it had admitted since; on
    restart it knows nobody, and they believe it dead. Their push-pull carries the admission
    the founder itself signed, which is proof enough."""
    net = Net()
    a = net.add(0, founder=True)
    early = a.snapshot()  # before anyone joined
    b = net.add(1)
    c = net.add(2)
    net.join(a, b)
    net.join(a, c)
    net.run(0.5)
    del net.nodes[a.id]
    net.run(60 * CFG.probe_interval)
    assert b.state_of(a.id) == "dead" and c.state_of(a.id) == "dead"
    a2 = Membership.restore(early, a.record, net.idents[a.id], CFG, random.Random(3), net.now)
    assert [v.id for v in a2.members()] == [a.id]
    net.nodes[a.id] = a2
    net.run(3 * CFG.reconnect_interval)
    for m in (a2, b, c):
        assert {v.id: v.state for v in m.members()} == {
            a.id: "alive", b.id: "alive", c.id: "alive"}, m.record.name


def test_probe_order_visits_every_member_once_per_pass() -> None:
    rng = random.Random(3)
    ids = [fake_id(rng) for _ in range(12)]
    crypto = NullCrypto()
    recs = [make_record(crypto, i, 0, "x", ["h:1"], {}) for i in ids]
    adm = Admit(ids[0], ids[0], "founder", 0, b"")
    base = SharedMembers(Entry(r.id, "alive", 0, r, 0.0, admit=adm) for r in recs)
    m = Membership(recs[0], crypto, CFG, random.Random(1), 0.0, base=base)
    for _ in range(3):
        seen = [m._next_probe_target() for _ in range(11)]
        assert sorted(seen) == sorted(ids[1:])
    assert m._table.local_size() == 0  # nothing copied from the shared base


# --- merge is order-insensitive (hypothesis)

N_PEERS = 4
PEERS = [ident(20 + i) for i in range(N_PEERS)]
OBSERVER = ident(30)
RECS = {
    (p.id, inc): make_record(p, p.id, inc, f"p{inc}", [f"10.1.0.{inc}:7"], {"i": inc})
    for p in PEERS
    for inc in range(4)
}


def _base() -> SharedMembers:
    f = PEERS[0]
    entries = []
    for p in [*PEERS, OBSERVER]:
        how = "founder" if p is f else "t"
        adm = Admit(p.id, f.id, how, 0, f.sign(admit_body(p.id, f.id, how, 0)))
        rec = RECS.get((p.id, 0)) or make_record(p, p.id, 0, "obs", ["1.1.1.1:1"], {})
        entries.append(Entry(p.id, "alive", 0, rec, 0.0, admit=adm))
    return SharedMembers(entries)


BASE = _base()
OBS_REC = BASE.entries[OBSERVER.id].record


def _rename(target: int, author: int, ts: int, name: str) -> Rename:
    t, a = PEERS[target].id, PEERS[author]
    return Rename(t, name, a.id, ts, a.sign(rename_body(t, name, a.id, ts)))


RENAMES = [
    _rename(t, a, ts, f"r{ts}{a}") for t in range(N_PEERS) for a in range(2) for ts in range(2)
]
BANS = [
    Ban(PEERS[t].id, PEERS[0].id, 9, PEERS[0].sign(ban_body(PEERS[t].id, PEERS[0].id, 9)))
    for t in range(1, N_PEERS)
]

update = st.one_of(
    st.builds(
        lambda p, i: Alive(RECS[(PEERS[p].id, i)]), st.integers(0, N_PEERS - 1), st.integers(0, 3)
    ),
    st.builds(
        lambda p, i, f: Suspect(PEERS[p].id, i, PEERS[f].id),
        st.integers(0, N_PEERS - 1),
        st.integers(0, 3),
        st.integers(0, N_PEERS - 1),
    ),
    st.builds(
        lambda p, i, f: Dead(PEERS[p].id, i, PEERS[f].id),
        st.integers(0, N_PEERS - 1),
        st.integers(0, 3),
        st.integers(0, N_PEERS - 1),
    ),
    st.sampled_from(RENAMES),
    st.sampled_from(BANS),
)


def _final(updates: list) -> dict:
    m = Membership(OBS_REC, OBSERVER, CFG, random.Random(0), 0.0, base=BASE)
    m.handle(1.0, PEERS[0].id, Gossip(tuple(updates)))
    out = {}
    for p in PEERS:
        e = m._table.get(p.id)
        key = (e.state, e.ban)
        if e.state != "banned":
            key += (e.incarnation, e.record)
        out[p.id] = (*key, e.rename)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(update, max_size=12), st.randoms(use_true_random=False))
def test_merge_is_order_insensitive(updates: list, rnd: random.Random) -> None:
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    assert _final(updates) == _final(shuffled)


def test_pending_statement_is_gossiped_and_admit_before_record_works() -> None:
    net, (a, b, c) = cluster(3)
    g = ident(40)
    grec = make_record(g, g.id, 0, "guest", ["9.9.9.9:9"], {})
    b.handle(net.now, a.id, Gossip((Pending(grec, "no token"),)))
    assert b.state_of(g.id) == "pending"
    a.admit(net.now, g.id, "manual")  # a never saw the record: admission first
    assert a.member(g.id) is None  # admitted, but no record yet: not listed
    net.pump()
    net.run(0.05)
    for m in (b, c):  # g is not running, so only check it became a member everywhere
        assert m.state_of(g.id) in ("alive", "suspect") and m.member(g.id).admitted_by == a.id


def test_dead_members_are_recontacted_then_reaped() -> None:
    cfg = Config.fast(dead_reap_after=3.0)
    net, (a, _b, c) = cluster(3, cfg)
    gone = net.nodes.pop(c.id)
    net.run(15 * cfg.probe_interval)
    assert a.state_of(c.id) == "dead"
    net.run(3.0)
    pushes = [m for s, d, m in net.sent if s == a.id and d == c.id and isinstance(m, PushPull)]
    assert pushes  # reconnect attempts so that a partition could heal
    assert a.member(c.id) is None and "member_reaped" in net.kinds(a.id)
    assert gone.state_of(a.id) == "alive"  # (c never heard anything: it was down)


def test_lone_node_timers_always_move_forward():
    """A node alone (nothing to probe, news but nobody to gossip to) must not spin: every
    deadline after a tick lies in the future, whatever the float rounding of its phase."""
    import random as _random

    from swarmnode.membership import Config, Membership, make_record
    from swarmnode.sim import NullCrypto

    crypto = NullCrypto()
    for seed in range(50):
        rec = make_record(crypto, "a" * 52, 1, "x", ("127.0.0.1:1",), {})
        m = Membership(rec, crypto, Config.fast(), _random.Random(seed), 100.0, founder=True)
        now = 100.0
        for _ in range(200):
            m.tick(now)
            deadline = m.next_deadline()
            assert deadline > now
            now = deadline


# -- a newcomer's admission and record, whatever order they arrive in (lab regression)


def _newcomer(net: Net, a: Membership) -> tuple[Membership, Admit, Alive]:
    """A node x admitted by `a` (signed as a) that has joined through `a`, but that nobody else
    has heard of yet (a's broadcasts are not delivered)."""
    x = net.add(10)
    ts = int(net.now * 1000)
    sig = net.idents[a.id].sign(admit_body(x.id, a.id, "token", ts))
    adm = Admit(x.id, a.id, "token", ts, sig)
    x.join(net.now, [a.id])
    x.handle(net.now, a.id, PushPullReply(a._member_states(), (*a._statements(), adm)))
    x.drain()
    return x, adm, Alive(x.record)


def _events(m: Membership) -> list[str]:
    return [o.kind for o in m.drain() if isinstance(o, Event)]


@pytest.mark.parametrize(
    "batches",
    [
        [("a", "alive"), ("a", "admit")],  # record first: kept as an orphan, then promoted
        [("a", "admit"), ("a", "alive")],  # admission first: listed when the record comes
        [("a", "alive admit")],
        [("a", "admit alive")],
        [("x", "admit alive")],  # from the newcomer itself, its credentials in hand
        [("x", "alive admit")],
        [("x", "alive"), ("a", "admit alive")],  # x unknown yet: its Alive alone is dropped
        [("x", "alive"), ("a", "admit"), ("x", "")],  # ... and must be fetched from x
        [("x", "admit"), ("x", "")],  # credentials without the record: fetched from x
        [("a", "admit"), ("x", "alive")],
    ],
)
def test_newcomer_is_listed_whatever_the_arrival_order(batches: list) -> None:
    net, (a, b, _c) = cluster(3)
    x, adm, alive = _newcomer(net, a)
    items = {"admit": adm, "alive": alive}
    b.drain()
    for src, what in batches:
        sender = a if src == "a" else x
        msg = Gossip(tuple(items[w] for w in what.split())) if what else Ping(1, b.id, b"n" * 16)
        b.handle(net.now, sender.id, msg)
        net.pump()  # a pull of x's state (if any) is answered at once
    assert b.state_of(x.id) == "alive"
    kinds = [e.kind for n, e in net.events if n == b.id and e.data.get("id") == x.id]
    assert kinds.count("admitted") == 1 and kinds.count("member_join") == 1


def test_newcomer_gossips_its_record_with_its_admission() -> None:
    """A joiner's own admission travels with it (its credentials); its record must too, or a
    member that hears of the joiner from the joiner alone knows it is admitted but cannot list
    it."""
    net, (a, _b, _c) = cluster(3)
    x = net.add(10)
    net.join(a, x)
    net.run(0.3)
    carried = [
        {type(i) for i in (m.items if isinstance(m, Gossip) else m.piggyback)}
        for s, _d, m in net.sent
        if s == x.id and isinstance(m, Gossip | Ping | Ack)
    ]
    with_admit = [k for k in carried if Admit in k]
    assert with_admit and all(Alive in k for k in with_admit)


def test_left_member_relearnt_by_push_pull_is_not_admitted_again() -> None:
    """A member reaped after leaving and taught again by a peer that still holds it (each
    exchange) is no new admission: no `admitted` event."""
    cfg = Config.fast(dead_reap_after=3.0)
    net, (a, b, c, _d) = cluster(4, cfg)
    b.leave(net.now)
    net.pump()
    net.run(0.5)
    assert a.state_of(b.id) == "left" and c.state_of(b.id) == "left"
    held = PushPull(False, c._member_states(), c._statements())  # c has not reaped b yet
    net.run(4.0)
    assert a.member(b.id) is None and "member_reaped" in net.kinds(a.id)
    a.drain()
    for _ in range(3):
        a.handle(net.now, c.id, held)
        assert "admitted" not in _events(a)
    assert a.state_of(b.id) == "left"
    net.events.clear()
    net.run(3 * cfg.push_pull_interval)
    assert "admitted" not in net.kinds()


def test_stale_probe_does_not_accuse_a_member_that_restarted_meanwhile() -> None:
    """A probe sent to a member's old life fails; meanwhile the member restarted and announced
    a newer incarnation. The failure must not suspect the new life (memberlist's rule)."""
    rng = random.Random(5)
    crypto = NullCrypto()
    a_id, b_id = fake_id(rng), fake_id(rng)
    adm = Admit(a_id, a_id, "founder", 0, b"")
    rec_a = make_record(crypto, a_id, 1, "a", ["h:1"], {})
    rec_b = make_record(crypto, b_id, 1, "b", ["h:2"], {})
    base = SharedMembers(Entry(r.id, "alive", 1, r, 0.0, admit=adm) for r in (rec_a, rec_b))
    m = Membership(rec_a, crypto, CFG, random.Random(1), 0.0, base=base)
    now = 0.0
    while m._probe is None:  # the probe to b goes out, and nobody answers it
        now = m.next_deadline()
        m.tick(now)
    assert m._probe.target == b_id
    reborn = make_record(crypto, b_id, 2, "b", ["h:2"], {})
    m.handle(now, b_id, Gossip((Alive(reborn),)))
    m.drain()
    stale = m._probe
    while m._probe is stale:  # until that probe has failed (the next one may start at once)
        now = m.next_deadline()
        m.tick(now)
    kinds = [o.kind for o in m.drain() if isinstance(o, Event)]
    assert "member_suspect" not in kinds
    assert m.state_of(b_id) == "alive"
