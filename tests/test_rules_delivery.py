"""Delivery to real local receivers: an aiohttp webhook receiver (signed, down for a while, acting on each
idempotency key once), an SMS gateway, a real SMTP server (aiosmtpd, STARTTLS + AUTH); retries, dead
letters, grouping and rate limits through the durable outbox; replays refused by the receiver example,
redirects not followed, no SMTP password over a plain connection."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
from email import message_from_bytes
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from aimass.core.config import Config
from aimass.core.procs import free_port
from aimass.rules.alarms import StateDB
from aimass.receiver import WebhookReceiver
from aimass.rules.delivery import Dispatcher, Outbox, Senders, backoff_s, sign
from aimass.rules.model import ReceiverSpec, RulesInvalid, load_rules
from aimass.core import contract
from tests.fixtures_rules import tls_files  # noqa: F401

SECRET = "webhook-test-secret"


def event(i: int, **extra) -> dict:
    return {"event_id": f"ev{i:04d}", "event_ms": 1, "rule": "hot", "severity": "warning", "tenant": "acme",
            "device_id": f"pump-{i}", "metric": "temperature", "state": "active_unack", "transition": "raised",
            "value": float(i), "message": f"pump-{i} is hot", "labels_json": "{}", "first_ms": 1, "count": 1,
            "flapping": False, "source_received_ms": 0, "alarm_id": f"a{i}", "ts_ms": 1000 * i, **extra}


def make_cfg() -> Config:
    cfg = Config()
    cfg.kafka.topic_prefix = "tdeliv"
    cfg.alert.backoff_initial_s = 0.05
    cfg.alert.backoff_max_s = 0.2
    cfg.alert.max_attempts = 200
    return cfg


def verify(secret: str, headers, body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does (docs/webhooks.md): recompute the HMAC over "{timestamp}.{key}.{body}"."""
    ts, key = headers.get("X-Aimass-Timestamp", ""), headers.get("Idempotency-Key", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance_s:
        return False
    signed = ts.encode() + b"." + key.encode() + b"." + body
    expected = "v2=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("X-Aimass-Signature", ""))


async def serve(port: int, path: str, handler) -> web.AppRunner:
    """A real aiohttp server answering POST ``path`` on 127.0.0.1:``port``; ``cleanup()`` stops it."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class HookReceiver:
    """A real webhook receiver: verifies signatures, acts once per idempotency key, can crash after acting."""

    def __init__(self, port: int, lose_responses: int = 0):
        self.port = port
        self.acted: dict[str, list[str]] = {}   # idempotency key -> event ids acted on
        self.requests = 0
        self.bad_signatures = 0
        self.lose_responses = lose_responses    # act on the message, then answer 500 (a lost response)
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if not verify(SECRET, request.headers, body):
            self.bad_signatures += 1
            return web.Response(status=401)
        key = request.headers["Idempotency-Key"]
        doc = json.loads(body)
        assert doc["notification_id"] == key
        if key not in self.acted:
            self.acted[key] = [e["event_id"] for e in doc["events"]]
        if self.lose_responses:
            self.lose_responses -= 1
            return web.Response(status=500, text="crashed after acting")
        return web.json_response({"ok": True})

    async def start(self) -> None:
        self.runner = await serve(self.port, "/hook", self.handle)

    async def stop(self) -> None:
        await self.runner.cleanup()


def webhook(port: int, **kw) -> ReceiverSpec:
    return ReceiverSpec("hook", "webhook", {"url": f"http://127.0.0.1:{port}/hook", "secret_env": "HOOK_SECRET",
                                            "timeout": 2}, **kw)


def dispatcher(tmp_path: Path, specs: dict[str, ReceiverSpec], cfg: Config | None = None):
    db = StateDB(tmp_path / "state.sqlite")
    outbox = Outbox(db)
    senders = Senders(secret=lambda name: {"HOOK_SECRET": SECRET, "SMTP_PW": "pw", "SMS_TOKEN": "tok"}.get(name, ""))
    return db, outbox, Dispatcher(cfg or make_cfg(), db, outbox, senders, lambda: specs), senders


async def pump(d: Dispatcher, outbox: Outbox, until: float, done=lambda: False) -> None:
    """Tick until nothing is pending (or ``done``), at most until the monotonic deadline."""
    while time.monotonic() < until:
        await d.tick()
        if done() or (outbox.pending_count() == 0 and not d.in_flight):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still pending after the deadline: {outbox.pending_count()}")


async def deliver_to(port: int, path: str, handler, db: StateDB, outbox: Outbox, d: Dispatcher, senders: Senders,
                     items: list[tuple[dict, str]]) -> None:
    """Serve ``handler`` at ``path``, enqueue (event, receiver) ``items`` and deliver them all."""
    runner = await serve(port, path, handler)
    with db:
        for e, receiver in items:
            outbox.enqueue(e, (receiver,))
    try:
        await pump(d, outbox, time.monotonic() + 10)
    finally:
        await runner.cleanup()
        await senders.close()


def queued(db: StateDB, topic: contract.Topic) -> list[dict]:
    return [row for _, t, row in db.queued() if t == topic.name("tdeliv")]


def test_backoff_is_exponential_capped_and_jittered():
    import random
    rng = random.Random(1)
    delays = [backoff_s(a, 0.5, 4.0, rng) for a in range(1, 8)]
    for a, d in zip(range(1, 8), delays):
        cap = min(4.0, 0.5 * 2 ** (a - 1))
        assert cap / 2 <= d <= cap
    assert len(set(delays)) == len(delays)


def test_webhook_down_then_back_every_notification_once_with_valid_signature(tmp_path):
    port = free_port()
    db, outbox, d, senders = dispatcher(tmp_path, {"hook": webhook(port, group_wait_s=0, group_max=1)})
    receiver = HookReceiver(port, lose_responses=3)

    async def scenario() -> None:
        with db:
            for i in range(20):
                outbox.enqueue(event(i), ("hook",))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # receiver down: connection refused, retries pile up
            await d.tick()
            await asyncio.sleep(0.02)
        assert receiver.requests == 0
        await receiver.start()
        try:
            await pump(d, outbox, time.monotonic() + 30)
        finally:
            await receiver.stop()
            await senders.close()

    asyncio.run(scenario())
    assert receiver.bad_signatures == 0
    acted = sorted(e for ids in receiver.acted.values() for e in ids)
    assert acted == [f"ev{i:04d}" for i in range(20)]            # every event, each acted on once
    assert receiver.requests > len(receiver.acted)               # lost responses were retried with the same key
    rows = queued(db, contract.NOTIFICATION_ROWS)
    delivered = [r for r in rows if r["status"] == "delivered"]
    assert sorted(r["event_id"] for r in delivered) == acted
    assert {r["status"] for r in rows} == {"failed", "delivered"}
    assert max(r["attempts"] for r in delivered) >= 2
    assert queued(db, contract.DEAD_LETTER) == []


def test_outbox_survives_a_restart_and_resends_the_same_key(tmp_path):
    port = free_port()
    specs = {"hook": webhook(port, group_wait_s=0)}
    db, outbox, d, senders = dispatcher(tmp_path, specs)

    async def first_run() -> None:
        with db:
            outbox.enqueue(event(1), ("hook",))
        for _ in range(5):                       # receiver down
            await d.tick()
            await asyncio.sleep(0.05)
        await d.drain()
        await senders.close()

    asyncio.run(first_run())
    [nid] = [n for (n,) in db.conn.execute("SELECT notification_id FROM notifications")]
    db.close()

    db, outbox, d, senders = dispatcher(tmp_path, specs)
    receiver = HookReceiver(port)

    async def second_run() -> None:
        await receiver.start()
        try:
            await pump(d, outbox, time.monotonic() + 20)
        finally:
            await receiver.stop()
            await senders.close()

    asyncio.run(second_run())
    assert list(receiver.acted) == [nid] and receiver.acted[nid] == ["ev0001"]


def test_dead_letter_after_last_attempt_and_on_permanent_errors(tmp_path):
    cfg = make_cfg()
    cfg.alert.max_attempts = 3
    closed = free_port()
    gone_port = free_port()
    specs = {"hook": webhook(closed, group_wait_s=0),
             "gone": ReceiverSpec("gone", "webhook", {"url": f"http://127.0.0.1:{gone_port}/hook",
                                                      "secret_env": "HOOK_SECRET"}, group_wait_s=0)}
    db, outbox, d, senders = dispatcher(tmp_path, specs, cfg)

    async def gone_handler(request: web.Request) -> web.Response:
        return web.Response(status=410, text="this endpoint was removed")

    async def scenario() -> None:
        runner = await serve(gone_port, "/hook", gone_handler)
        with db:
            outbox.enqueue(event(1), ("hook",))
            outbox.enqueue(event(2), ("gone",))
        try:
            await pump(d, outbox, time.monotonic() + 20)
        finally:
            await runner.cleanup()
            await senders.close()

    asyncio.run(scenario())
    rows = queued(db, contract.NOTIFICATION_ROWS)
    assert [(r["receiver"], r["status"], r["attempts"]) for r in rows if r["receiver"] == "hook"] == [
        ("hook", "failed", 1), ("hook", "failed", 2), ("hook", "dead_letter", 3)]
    assert [(r["status"], r["attempts"]) for r in rows if r["receiver"] == "gone"] == [("dead_letter", 1)]
    dead = queued(db, contract.DEAD_LETTER)
    assert sorted((r["stage"], r["reason"], r["device_id"]) for r in dead) == [
        ("notify", "delivery_failed", "pump-1"), ("notify", "delivery_failed", "pump-2")]
    assert "HTTP 410" in [r for r in dead if r["device_id"] == "pump-2"][0]["detail"]


def test_bursts_are_grouped_and_rate_limited(tmp_path):
    port = free_port()
    spec = webhook(port, group_wait_s=0.3, group_max=50, rate_per_s=1.0, burst=1)
    db, outbox, d, senders = dispatcher(tmp_path, {"hook": spec})
    receiver = HookReceiver(port)

    async def scenario() -> None:
        await receiver.start()
        try:
            with db:
                for i in range(10):                      # a burst: one message after group_wait
                    outbox.enqueue(event(i), ("hook",))
            await pump(d, outbox, time.monotonic() + 10)
            assert [len(ids) for ids in receiver.acted.values()] == [10]
            started = time.monotonic()
            for i in range(10, 13):                      # three bursts inside one rate-limit second
                with db:
                    outbox.enqueue(event(i), ("hook",))
                await pump(d, outbox, time.monotonic() + 0.4, done=lambda: True)
                await asyncio.sleep(0.35)
            await pump(d, outbox, time.monotonic() + 10)
            assert time.monotonic() - started >= 0.9     # the token bucket held the second message back
        finally:
            await receiver.stop()
            await senders.close()

    asyncio.run(scenario())
    sizes = [len(ids) for ids in receiver.acted.values()]
    assert sum(sizes) == 13 and sizes[0] == 10 and len(sizes) <= 3   # later events grouped while rate limited


def test_sms_gateway_request_template(tmp_path):
    port = free_port()
    got: list[tuple[dict, dict]] = []

    async def gateway(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.json()))
        return web.json_response({"queued": True})

    spec = ReceiverSpec("sms", "sms", {"url": f"http://127.0.0.1:{port}/send", "token_env": "SMS_TOKEN",
                                       "to": ["+15550100", "+15550101"],
                                       "body": {"recipient": "{to}", "msg": "{summary}", "ref": "{notification_id}"}},
                        group_wait_s=0)
    db, outbox, d, senders = dispatcher(tmp_path, {"sms": spec})

    asyncio.run(deliver_to(port, "/send", gateway, db, outbox, d, senders, [(event(7), "sms")]))
    assert [body["recipient"] for _, body in got] == ["+15550100", "+15550101"]
    headers, body = got[0]
    assert headers["Authorization"] == "Bearer tok"
    assert body["msg"] == "WARNING raised: hot pump-7/temperature"
    assert headers["Idempotency-Key"] == f"{body['ref']}-0"


class Inbox:
    """aiosmtpd handler keeping every accepted message."""

    def __init__(self):
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


def test_email_over_starttls_with_auth_to_a_real_smtp_server(tmp_path, tls_files):
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"aimass", b"pw")
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=ok)

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
                            authenticator=authenticator, auth_required=True)
    controller.start()
    spec = ReceiverSpec("mail", "email", {"host": "127.0.0.1", "port": port, "tls": "starttls", "ca_file": cert,
                                          "username": "aimass", "password_env": "SMTP_PW", "from": "aimass@example.com",
                                          "to": ["ops@example.com"]}, group_wait_s=0)
    db, outbox, d, senders = dispatcher(tmp_path, {"mail": spec})

    async def scenario() -> None:
        with db:
            outbox.enqueue(event(1), ("mail",))
            outbox.enqueue(event(2, severity="critical"), ("mail",))
        await pump(d, outbox, time.monotonic() + 20)
        await senders.close()

    try:
        asyncio.run(scenario())
    finally:
        controller.stop()
    assert logins == [(b"aimass", b"pw")]
    [(rcpt, msg)] = inbox.messages
    assert rcpt == ["ops@example.com"]
    assert msg["Subject"] == "[aimass] 2 alarm events (hot)"
    [nid] = [r["notification_id"] for r in queued(db, contract.NOTIFICATION_ROWS)][:1]
    assert msg["Message-ID"] == f"<{nid}@aimass>"
    text = msg.get_payload()
    assert "[WARNING] raised hot acme/pump-1/temperature: pump-1 is hot" in text
    assert "[CRITICAL] raised hot acme/pump-2/temperature: pump-2 is hot" in text


def test_receiver_example_refuses_replays_with_a_new_key_a_changed_body_or_a_stale_timestamp(tmp_path):
    """A request captured on the wire, replayed at aimass.receiver: the signature covers the
    timestamp, the idempotency key and the body, and keys are remembered past the tolerance window."""
    capture_port, receiver_port = free_port(), free_port()
    captured: list[tuple[dict, bytes]] = []

    async def capture(request: web.Request) -> web.Response:
        captured.append((dict(request.headers), await request.read()))
        return web.json_response({"ok": True})

    db, outbox, d, senders = dispatcher(tmp_path, {"hook": webhook(capture_port, group_wait_s=0)})
    receiver = WebhookReceiver(SECRET, receiver_port, path="/hook").start()
    statuses: dict[str, int] = {}

    async def scenario() -> None:
        await deliver_to(capture_port, "/hook", capture, db, outbox, d, senders, [(event(1), "hook")])
        [(headers, body)] = captured
        keep = {k: headers[k] for k in ("Content-Type", "X-Aimass-Timestamp", "X-Aimass-Signature", "Idempotency-Key")}
        stale_ts = str(int(time.time()) - 301)
        attempts = {
            "original": (keep, body),
            "same again": (keep, body),
            "new key": ({**keep, "Idempotency-Key": "f" * 32}, body),
            "no key": ({k: v for k, v in keep.items() if k != "Idempotency-Key"}, body),
            "changed body": (keep, body.replace(b"pump-1", b"pump-9")),
            "stale, re-signed": ({**keep, "X-Aimass-Timestamp": stale_ts,
                                  "X-Aimass-Signature": sign(SECRET, stale_ts, keep["Idempotency-Key"], body)}, body),
            "old v1 signature": ({**keep, "X-Aimass-Signature": "v1=" + hmac.new(
                SECRET.encode(), keep["X-Aimass-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()}, body),
        }
        async with aiohttp.ClientSession() as s:
            for name, (headers, data) in attempts.items():
                async with s.post(receiver.url, headers=headers, data=data) as r:
                    statuses[name] = r.status

    try:
        asyncio.run(scenario())
    finally:
        receiver.stop()
    assert statuses == {"original": 200, "same again": 200, "new key": 401, "no key": 401, "changed body": 401,
                        "stale, re-signed": 401, "old v1 signature": 401}
    assert [e["event_id"] for e in receiver.events] == ["ev0001"]  # acted on once
    assert (receiver.duplicates, receiver.bad_signatures) == (1, 5)
    # keys are never forgotten while a captured request could still be replayed
    receiver.keep_s = 0
    receiver.forget(time.time() + 2 * receiver.tolerance_s - 1)
    assert len(receiver.notifications) == 1
    receiver.forget(time.time() + 2 * receiver.tolerance_s + 1)
    assert receiver.notifications == {}


def test_redirects_are_not_followed_unless_the_receiver_allows_them(tmp_path):
    redirect_port, target_port = free_port(), free_port()
    target_hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        status = 307 if request.path.endswith("307") else 302
        return web.Response(status=status, headers={"Location": f"http://127.0.0.1:{target_port}/elsewhere"})

    async def target(request: web.Request) -> web.Response:
        target_hits.append(request.method)
        return web.json_response({"ok": True})

    specs = {name: ReceiverSpec(name, "webhook", {"url": f"http://127.0.0.1:{redirect_port}/{path}",
                                                  "secret_env": "HOOK_SECRET", **extra}, group_wait_s=0)
             for name, path, extra in (("h302", "hook302", {}), ("h307", "hook307", {}),
                                       ("allowed", "hook307", {"follow_redirects": True}))}
    db, outbox, d, senders = dispatcher(tmp_path, specs)

    async def scenario() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        redirector = web.AppRunner(app)
        await redirector.setup()
        await web.TCPSite(redirector, "127.0.0.1", redirect_port).start()
        app2 = web.Application()
        app2.router.add_route("*", "/elsewhere", target)
        elsewhere = web.AppRunner(app2)
        await elsewhere.setup()
        await web.TCPSite(elsewhere, "127.0.0.1", target_port).start()
        with db:
            for i, name in enumerate(specs):
                outbox.enqueue(event(i), (name,))
        try:
            await pump(d, outbox, time.monotonic() + 10)
        finally:
            await redirector.cleanup()
            await elsewhere.cleanup()
            await senders.close()

    asyncio.run(scenario())
    rows = queued(db, contract.NOTIFICATION_ROWS)
    assert {r["receiver"]: (r["status"], r["attempts"]) for r in rows} == {
        "h302": ("dead_letter", 1), "h307": ("dead_letter", 1), "allowed": ("delivered", 1)}
    assert target_hits == ["POST"]  # only the receiver that allows redirects reached the target
    error = next(r["error"] for r in rows if r["receiver"] == "h302")
    assert "302 redirect" in error and "follow_redirects: true" in error


PLAIN_MAIL = """
receivers:
  mail: {{kind: email, host: 127.0.0.1, port: {port}, tls: none, username: aimass, password_env: SMTP_PW,
         from: aimass@example.com, to: ops@example.com, group_wait: 0s{extra}}}
"""


def test_smtp_refuses_to_send_a_password_without_tls_unless_allowed(tmp_path):
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=True)

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    (tmp_path / "plain.yaml").write_text(PLAIN_MAIL.format(port=port, extra=""))
    with pytest.raises(RulesInvalid) as refused:
        load_rules(tmp_path / "plain.yaml")
    [error] = refused.value.errors
    assert "plain.yaml:3:" in str(error) and "clear text" in str(error) and "allow_plaintext_auth" in str(error)
    (tmp_path / "allowed.yaml").write_text(PLAIN_MAIL.format(port=port, extra=", allow_plaintext_auth: true"))
    allowed = load_rules(tmp_path / "allowed.yaml").receivers["mail"]
    # the loader is not the only guard: a receiver built another way is refused when sending
    unsafe = ReceiverSpec("unsafe", "email", {k: v for k, v in allowed.options.items() if k != "allow_plaintext_auth"},
                          group_wait_s=0)
    db, outbox, d, senders = dispatcher(tmp_path, {"unsafe": unsafe, "mail": allowed})

    async def scenario() -> None:
        with db:
            outbox.enqueue(event(1), ("unsafe",))
        await pump(d, outbox, time.monotonic() + 10)
        assert logins == []  # the password never left
        with db:
            outbox.enqueue(event(2), ("mail",))
        await pump(d, outbox, time.monotonic() + 10)
        await senders.close()

    try:
        asyncio.run(scenario())
    finally:
        controller.stop()
    rows = queued(db, contract.NOTIFICATION_ROWS)
    assert {r["receiver"]: r["status"] for r in rows} == {"unsafe": "dead_letter", "mail": "delivered"}
    assert "clear text" in next(r["error"] for r in rows if r["receiver"] == "unsafe")
    assert logins == [(b"aimass", b"pw")] and len(inbox.messages) == 1  # explicitly allowed: sent


def test_a_held_outbox_sends_only_what_a_checkpoint_holds_and_moves_per_partition(tmp_path):
    """With ``hold`` a composed notification waits for ``release``; a partition's share moves with its id."""
    old = Outbox(StateDB(tmp_path / "old.sqlite"), hold=True)
    with old.db:
        old.enqueue({"event_id": "e1", "tenant": "acme"}, ("hook",), created_ms=1, part=3)
        old.enqueue({"event_id": "e2", "tenant": "acme"}, ("hook",), created_ms=1, part=3)
        old.enqueue({"event_id": "e3", "tenant": "acme"}, ("hook",), created_ms=1, part=4)
    assert old.waiting() == {("hook", 3): (2, 1), ("hook", 4): (1, 1)}  # grouped per partition
    sent = old.compose("hook", 50, at_ms=10, part=3)
    assert old.due(at_ms=100) == [] and old.held([3]) == [sent.notification_id]  # not in a checkpoint yet
    share = json.loads(json.dumps(old.export(3)))  # what partition 3's checkpoint carries
    old.release(old.held([3]))
    assert [n.notification_id for n in old.due(at_ms=100)] == [sent.notification_id]

    new = Outbox(StateDB(tmp_path / "new.sqlite"), hold=True)  # partition 3's next owner
    with new.db:
        new.adopt(3, share)
        old.forget(3)
    assert [(n.notification_id, [e["event_id"] for e in n.events]) for n in new.due(at_ms=100)] == [
        (sent.notification_id, ["e1", "e2"])]  # the same id: the receiver deduplicates a resend
    assert old.due(at_ms=100) == [] and old.waiting() == {("hook", 4): (1, 1)}
