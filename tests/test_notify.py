"""Notifications: grouping and the hourly limit, what becomes a notice, and the channels on
real sockets (HTTP servers and an SMTP server on loopback)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from swarmnode import notify
from swarmnode.config import NotifySettings
from swarmnode.notify import Message, Notice, Notifier, NotifyService
from tests.ports import free_port


def test_notices_within_the_window_become_one_message() -> None:
    n = Notifier(group_s=10, per_hour=5)
    assert n.take(0) is None and n.due() is None
    n.offer(100, Notice("member_dead", "a is dead"))
    n.offer(105, Notice("member_dead", "b is dead", "id-b"))
    assert n.due() == 110 and n.take(109.9) is None
    m = n.take(110)
    assert m is not None and m.title == "2 events: a is dead, and more"
    assert m.text == "- a is dead\n- b is dead\nid-b" and m.dropped == 0
    assert n.take(200) is None


def test_the_hourly_limit_holds_notices_back_and_counts_those_dropped() -> None:
    n = Notifier(group_s=1, per_hour=2)
    for t in (0, 10):
        n.offer(t, Notice("pending", f"p{t}"))
        assert n.take(t + 1) is not None
    n.offer(20, Notice("pending", "third"))
    assert n.due() == 3601 and n.take(3000) is None  # the hour's two are used
    for i in range(notify.MAX_WAITING + 5):
        n.offer(30, Notice("pending", f"w{i}"))
    m = n.take(3601)
    assert m is not None and len(m.notices) == notify.MAX_WAITING and m.dropped == 6
    assert "6 more were not sent" in m.text


def test_a_member_back_before_its_death_was_sent_cancels_both_and_counts_a_flap() -> None:
    """Seen in a loaded test run: a node was declared dead and refuted it 16 ms later, and the
    webhook got "n3 is dead" and "n3 is back". Neither needs a person."""
    n = Notifier(group_s=10, per_hour=5)
    n.offer(100, Notice("member_dead", "a is dead", about="id-a"))
    n.offer(101, Notice("member_dead", "b is dead", about="id-b"))
    n.offer(102, Notice("member_back", "a is back", about="id-a"))
    n.offer(103, Notice("member_back", "c is back", about="id-c"))  # (c's death went before)
    assert n.due() == 111  # (the window of what is left: from b's death)
    m = n.take(111)
    assert m is not None and [x.title for x in m.notices] == ["b is dead", "c is back"]
    assert n.flaps == 1
    n.offer(200, Notice("member_back", "b is back", about="id-b"))  # after its death was sent
    m = n.take(210)
    assert m is not None and [x.title for x in m.notices] == ["b is back"] and n.flaps == 1


def service(leading: bool = True, **settings: Any) -> NotifyService:
    svc = NotifyService(NotifySettings(webhook="http://127.0.0.1:9/", **settings),
                        lambda: leading, lambda who: {"id-a": "tarn"}.get(who, who[:4]),
                        lambda: "homelab", now=lambda: 0.0)
    return svc


def waiting(svc: NotifyService) -> list[Notice]:
    m = svc.notifier.take(10**9)
    return list(m.notices) if m else []


def test_events_become_notices_only_while_leading_and_as_configured() -> None:
    svc = service()
    svc.on_event("pending", {"id": "id-guest-1234", "name": "x", "addresses": ["10.0.0.9:7946"]})
    svc.on_event("member_dead", {"id": "id-a"})
    svc.on_event("member_alive", {"id": "id-a", "previous": "suspect"})  # a refutation
    svc.on_event("job_done", {"id": "id-a"})
    got = waiting(svc)
    assert [n.kind for n in got] == ["pending", "member_dead"]
    assert got[0].title == "a node asks to join: id-g" and "10.0.0.9:7946" in got[0].text
    assert got[1].title == "tarn is dead" and got[1].urgent
    svc.on_event("member_alive", {"id": "id-a", "previous": "dead"})  # (its death was sent)
    assert [(n.kind, n.title) for n in waiting(svc)] == [("member_back", "tarn is back")]
    clock = [0.0]
    follower = NotifyService(NotifySettings(webhook="http://127.0.0.1:9/"), lambda: False, str,
                             lambda: "homelab", now=lambda: clock[0])
    follower.on_event("member_dead", {"id": "id-old"})
    clock[0] = 10.0
    follower.on_event("member_dead", {"id": "id-a"})
    follower.tick()
    assert waiting(follower) == []  # a follower sends nothing ...
    clock[0] = 20.0
    follower.leading = lambda: True  # ... until it leads: then what it saw in the grace
    follower.tick()
    assert [n.title for n in waiting(follower)] == ["id-a is dead"]
    narrow = service(events=("member_dead",))
    narrow.on_event("pending", {"id": "id-b"})
    assert waiting(narrow) == []


def test_a_build_is_announced_once_with_its_failing_job_and_tail() -> None:
    svc = service()
    progress = {"done": 3, "total": 5}
    svc.on_build_end("b1", "world", progress, [("gcc", "exit 1", "x" * 5000 + "error: boom")])
    svc.on_build_end("b1", "world", progress, [("gcc", "exit 1", "")])  # applied again
    svc.on_build_end("b2", "small\nSubject: hi", {"done": 1, "total": 1}, [])
    failed, ok = waiting(svc)
    assert failed.kind == "build_failed" and failed.title == "build world failed: gcc"
    assert failed.text.endswith("error: boom") and len(failed.text) < 2200
    assert ok.kind == "build_finished" and "\n" not in ok.title  # member text cleaned


def test_checks_announce_what_is_new_once_and_the_budget_once_a_day() -> None:
    svc = service(energy_budget_kwh=5.0)
    svc.check({"id-a"}, set(), 1.0, "2026-12-07")
    svc.check({"id-a"}, {("id-b", "site abc")}, 6.0, "2026-12-07")
    svc.check({"id-a"}, {("id-b", "site abc")}, 7.0, "2026-12-07")
    svc.check(set(), {("id-b", "site abc")}, 0.5, "2026-12-08")
    svc.check({"id-a"}, set(), 5.5, "2026-12-08")
    assert [n.kind for n in waiting(svc)] == ["disk_low", "push_rolled_back", "energy_budget",
                                               "disk_low", "energy_budget"]
    follower = service(leading=False)
    follower.check({"id-a"}, set(), 0, "d")  # seen while following ...
    follower.leading = lambda: True
    follower.check({"id-a"}, set(), 0, "d")  # ... is not news on becoming leader
    assert waiting(follower) == []


class Receiver:
    """An HTTP server on loopback that keeps what is POSTed (or, `hang`, never answers)."""

    def __init__(self, hang: bool = False) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.hang = threading.Event() if hang else None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append((dict(self.headers), body))
                if outer.hang is not None:
                    outer.hang.wait(30)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


MESSAGE = Message("tarn is dead", "- tarn is dead", (Notice("member_dead", "tarn is dead",
                                                            urgent=True),), 0)


def test_webhook_gets_json_and_ntfy_gets_title_and_priority(receiver: Receiver) -> None:
    svc = NotifyService(NotifySettings(webhook=receiver.url, ntfy=receiver.url + "/topic"),
                        lambda: True, str, lambda: "homelab")
    assert asyncio.run(svc.send(MESSAGE)) == {"webhook": "sent", "ntfy": "sent"}
    by_type = {h.get("Content-Type"): (h, body) for h, body in receiver.got}
    hook = json.loads(by_type["application/json"][1])
    assert hook["swarm"] == "homelab" and hook["notices"][0]["kind"] == "member_dead"
    ntfy_headers, ntfy_body = next(v for k, v in by_type.items() if k != "application/json")
    assert ntfy_headers["Title"] == "homelab: tarn is dead"
    assert ntfy_headers["Priority"] == "high" and ntfy_body == b"- tarn is dead"
    assert svc.sent == {"webhook": 1, "ntfy": 1}


def test_a_refused_or_hanging_channel_is_counted_and_holds_up_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "SEND_TIMEOUT_S", 0.5)
    closed = f"http://127.0.0.1:{free_port('127.0.0.1')}/"
    hanging = Receiver(hang=True)
    try:
        svc = NotifyService(NotifySettings(webhook=closed, ntfy=hanging.url), lambda: True, str,
                            lambda: "homelab")

        async def main() -> tuple[dict[str, str], float]:
            ticks = 0

            async def ticker() -> None:  # the loop stays free while both channels fail
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.ensure_future(ticker())
            t0 = time.monotonic()
            results = await svc.send(MESSAGE)
            task.cancel()
            return results, ticks / max(time.monotonic() - t0, 1e-9)

        results, ticks_per_s = asyncio.run(main())
    finally:
        hanging.close()
    assert results["webhook"].startswith("failed") and results["ntfy"].startswith("failed")
    assert svc.failed == {"webhook": 1, "ntfy": 1} and not svc.sent
    assert ticks_per_s > 20  # a tick every 10 ms asked: the loop was never held


class Inbox:
    def __init__(self) -> None:
        self.mails: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


def test_email_goes_over_smtp_with_a_clean_subject() -> None:
    inbox = Inbox()
    port = free_port("127.0.0.1")
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = NotifySettings(email_to=("ops@example.org",), email_from="swarm@example.org",
                                  smtp_host="127.0.0.1", smtp_port=port)
        svc = NotifyService(settings, lambda: True, str, lambda: "homelab")
        sneaky = Message("tarn\r\nBcc: evil@example.org is dead", "body text",
                         MESSAGE.notices, 0)
        assert asyncio.run(svc.send(sneaky)) == {"email": "sent"}
    finally:
        controller.stop()
    [(rcpt, mail)] = inbox.mails
    assert rcpt == ["ops@example.org"] and mail["Bcc"] is None
    assert mail["Subject"] == "[homelab] tarn  Bcc: evil@example.org is dead"
    assert mail.get_payload().strip() == "body text"

