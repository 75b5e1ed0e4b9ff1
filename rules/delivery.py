"""Notification delivery: a durable outbox, grouping, rate limits, retries, dead letters, and the senders.

Flow (all state in the alerter's ``StateDB``, so it survives a restart):

1. ``Outbox.enqueue`` stores (event, receiver) pairs in the same transaction as the alarm change.
2. ``Dispatcher.tick`` groups a receiver's waiting events into one notification once the oldest
   has waited ``group_wait`` (or ``group_max`` are waiting) and the receiver's rate limit has a
   token. The notification id (the idempotency key receivers dedup on) is a hash of its events,
   fixed at grouping time, so retries and restarts resend the same key.
3. Sends run concurrently. Success marks it delivered; a failure schedules a retry with
   exponential backoff and jitter; after ``max_attempts`` (or a permanent error such as HTTP
   400) it goes to the dead-letter topic (stage="notify"). Every attempt's outcome is queued as
   ``contract.NOTIFICATIONS`` rows.

Senders: JSON webhooks signed with HMAC-SHA256 over ``"{timestamp}.{idempotency key}.{body}"``
(headers ``X-Aimass-Timestamp``, ``X-Aimass-Signature: v2=<hex>``, ``Idempotency-Key``; see
docs/webhooks.md), so neither the time nor the key a receiver deduplicates on can be changed
without the secret; SMS through an HTTP gateway with a configurable request template; and email
over SMTP (STARTTLS or implicit TLS, optional auth; a password is never sent over a plain
connection unless the receiver sets ``allow_plaintext_auth: true``). HTTP redirects are not
followed (a 3xx is a permanent error) unless the receiver sets ``follow_redirects: true``.
Secrets come from env vars named in the receiver's settings.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Callable, Iterable

import aiohttp

from aimass.core.config import Config
from aimass.rules.alarms import StateDB, now_ms
from aimass.rules.model import PLAINTEXT_AUTH, ReceiverSpec, render
from aimass.core import contract

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A send failed; ``permanent`` ones are not retried."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class Notification:
    """One message to one receiver, covering one or more alarm events."""

    notification_id: str
    receiver: str
    events: list[dict]
    attempts: int
    created_ms: int

    def text(self) -> str:
        """Human-readable body: the event message, or one line per event for a group."""
        if len(self.events) == 1:
            return self.events[0]["message"]
        lines = [f"[{e['severity'].upper()}] {e['transition']} {e['rule']} "
                 f"{e['tenant']}/{e['device_id']}/{e['metric']}: {e['message']}" for e in self.events]
        return f"{len(self.events)} alarm events:\n" + "\n".join(lines)

    def summary(self) -> str:
        e = self.events[0]
        if len(self.events) == 1:
            return f"{e['severity'].upper()} {e['transition']}: {e['rule']} {e['device_id']}/{e['metric']}"
        return f"{len(self.events)} alarm events ({', '.join(sorted({x['rule'] for x in self.events}))})"


def sign(secret: str, timestamp: str, key: str, body: bytes) -> str:
    """The X-Aimass-Signature value of a webhook request: HMAC-SHA256 of "{timestamp}.{key}.{body}"."""
    signed = timestamp.encode() + b"." + key.encode() + b"." + body
    return "v2=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def webhook_body(n: Notification) -> bytes:
    """The JSON a webhook receives (the same bytes on every retry; NaN becomes null)."""
    events = [{k: (None if isinstance(v, float) and v != v else v) for k, v in e.items()
               if k in contract.ALERTS.names or k == "alarm_id"} for e in n.events]
    return json.dumps({"notification_id": n.notification_id, "receiver": n.receiver, "created_ms": n.created_ms,
                       "text": n.text(), "events": events}, sort_keys=True, allow_nan=False).encode()


def _http_error(status: int, text: str, location: str = "") -> DeliveryError:
    if 300 <= status < 400:
        return DeliveryError(f"HTTP {status} redirect to {location or '?'} not followed: point the receiver's url "
                             f"at the final address, or set follow_redirects: true on it", permanent=True)
    permanent = 400 <= status < 500 and status not in (408, 409, 425, 429)
    return DeliveryError(f"HTTP {status}: {text[:200]}", permanent=permanent)


class Senders:
    """Sends a notification over its receiver's channel; one shared HTTP session."""

    def __init__(self, secret: Callable[[str], str] = Config.secret):
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, spec: ReceiverSpec, n: Notification) -> None:
        sender = {"webhook": self.webhook, "sms": self.sms, "email": self.email}[spec.kind]
        try:
            await sender(spec, n)
        except DeliveryError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None

    async def _post(self, spec: ReceiverSpec, url: str, headers: dict, **body: Any) -> None:
        session = await self.session()
        timeout = aiohttp.ClientTimeout(total=float(spec.options.get("timeout", 10)))
        method = str(spec.options.get("method", "POST")).upper()
        follow = spec.options.get("follow_redirects") is True
        async with session.request(method, url, headers=headers, timeout=timeout, allow_redirects=follow,
                                   **body) as resp:
            if resp.status >= 300:
                raise _http_error(resp.status, await resp.text(), resp.headers.get("Location", ""))

    async def webhook(self, spec: ReceiverSpec, n: Notification) -> None:
        secret = self.secret(spec.options["secret_env"])
        if not secret:
            raise DeliveryError(f"environment variable {spec.options['secret_env']} (the signing secret) is not set",
                                permanent=True)
        body = webhook_body(n)
        ts = str(int(time.time()))
        headers = {**{k: str(v) for k, v in (spec.options.get("headers") or {}).items()},
                   "Content-Type": "application/json", "X-Aimass-Timestamp": ts,
                   "X-Aimass-Signature": sign(secret, ts, n.notification_id, body),
                   "Idempotency-Key": n.notification_id}
        await self._post(spec, spec.options["url"], headers, data=body)

    async def sms(self, spec: ReceiverSpec, n: Notification) -> None:
        template = spec.options.get("body", {"to": "{to}", "text": "{text}"})
        headers = {k: str(v) for k, v in (spec.options.get("headers") or {}).items()}
        if spec.options.get("token_env"):
            headers["Authorization"] = f"Bearer {self.secret(spec.options['token_env'])}"
        for i, to in enumerate(spec.options["to"]):
            values = {"to": to, "text": n.text()[:480], "notification_id": n.notification_id,
                      "count": len(n.events), "summary": n.summary()}
            body = _render_tree(template, values)
            key = {"Idempotency-Key": f"{n.notification_id}-{i}"}
            if spec.options.get("content_type", "json") == "form":
                await self._post(spec, spec.options["url"], {**headers, **key}, data=body)
            else:
                await self._post(spec, spec.options["url"], {**headers, **key}, json=body)

    async def email(self, spec: ReceiverSpec, n: Notification) -> None:
        o = spec.options
        msg = EmailMessage()
        msg["From"], msg["To"] = o["from"], ", ".join(o["to"])
        msg["Subject"] = render(o.get("subject", "[aimass] {summary}"), {"summary": n.summary(),
                                                                        "count": len(n.events)})
        msg["Message-ID"] = f"<{n.notification_id}@aimass>"
        msg["X-Aimass-Notification-Id"] = n.notification_id
        msg.set_content(n.text())
        password = self.secret(o["password_env"]) if o.get("password_env") else ""
        await asyncio.to_thread(_smtp_send, o, password, msg)


def _render_tree(template: Any, values: dict) -> Any:
    if isinstance(template, dict):
        return {k: _render_tree(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_render_tree(v, values) for v in template]
    return render(template, values) if isinstance(template, str) else template


def _smtp_send(o: dict, password: str, msg: EmailMessage) -> None:
    """Blocking SMTP send (run in a thread): implicit TLS, STARTTLS or plain, then optional login."""
    mode = o.get("tls", "starttls")
    if mode == "none" and o.get("username") and o.get("allow_plaintext_auth") is not True:
        raise DeliveryError(PLAINTEXT_AUTH, permanent=True)
    context = ssl.create_default_context(cafile=o.get("ca_file") or None)
    port = int(o.get("port", {"ssl": 465, "starttls": 587, "none": 25}[mode]))
    timeout = float(o.get("timeout", 10))
    if mode == "ssl":
        client: smtplib.SMTP = smtplib.SMTP_SSL(o["host"], port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(o["host"], port, timeout=timeout)
    with client:
        if mode == "starttls":
            client.starttls(context=context)
        if o.get("username"):
            client.login(o["username"], password)
        try:
            client.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"recipients refused: {exc.recipients}", permanent=True) from None


class TokenBucket:
    """A rate limit (a receiver's, an API token's): ``rate`` per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self.tokens, self.at = float(self.burst), time.monotonic()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after_s(self) -> float:
        """Seconds until ``take`` succeeds again (after it failed)."""
        return max(0.0, 1 - self.tokens) / self.rate if self.rate > 0 else 0.0


def backoff_s(attempts: int, initial_s: float, max_s: float, rng: random.Random = random.Random()) -> float:
    """Delay before retry number ``attempts``: exponential, capped, with jitter in [d/2, d]."""
    delay = min(max_s, initial_s * 2 ** max(0, attempts - 1))
    return delay * rng.uniform(0.5, 1.0)


class Outbox:
    """The durable queue of events to notify and of composed notifications (tables in StateDB).

    Each row carries the input partition of its alarm (``part``), so a partition's share moves with it
    (``export`` / ``adopt`` / ``forget``). With ``hold`` a composed notification is sent only once
    ``release`` says a checkpoint holding it is durable: a new owner then resends the same
    notification id, which receivers deduplicate, never a regrouping of events already sent.
    """

    def __init__(self, db: StateDB, hold: bool = False):
        self.db, self.hold = db, hold
        db.conn.executescript("""
            CREATE TABLE IF NOT EXISTS notify_waiting (
                event_id TEXT NOT NULL, receiver TEXT NOT NULL, event TEXT NOT NULL, created_ms INTEGER NOT NULL,
                PRIMARY KEY (event_id, receiver));
            CREATE TABLE IF NOT EXISTS notifications (
                notification_id TEXT PRIMARY KEY, receiver TEXT NOT NULL, events TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, next_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending', error TEXT NOT NULL DEFAULT '');
        """)
        for table, column, decl in (("notify_waiting", "part", "INTEGER NOT NULL DEFAULT 0"),
                                    ("notifications", "part", "INTEGER NOT NULL DEFAULT 0"),
                                    ("notifications", "released", "INTEGER NOT NULL DEFAULT 1")):
            if column not in {row[1] for row in db.conn.execute(f"PRAGMA table_info({table})")}:
                db.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def enqueue(self, event: dict, receivers: tuple[str, ...], created_ms: int | None = None, part: int = 0) -> None:
        """Remember that ``event`` must reach ``receivers`` (idempotent; call inside a transaction)."""
        created_ms = created_ms or now_ms()
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO notify_waiting (event_id, receiver, event, created_ms, part) VALUES (?, ?, ?, ?, ?)",
            [(event["event_id"], r, json.dumps(event), created_ms, part) for r in receivers])

    def waiting(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(receiver, partition) -> (waiting events, oldest created_ms)."""
        return {(r, part): (n, oldest) for r, part, n, oldest in self.db.conn.execute(
            "SELECT receiver, part, COUNT(*), MIN(created_ms) FROM notify_waiting GROUP BY receiver, part")}

    def compose(self, receiver: str, limit: int, at_ms: int, part: int = 0) -> Notification:
        """Group up to ``limit`` waiting events of a receiver and partition into one pending notification."""
        rows = self.db.conn.execute(
            "SELECT event_id, event, created_ms FROM notify_waiting WHERE receiver = ? AND part = ? "
            "ORDER BY created_ms, event_id LIMIT ?", (receiver, part, limit)).fetchall()
        events = [json.loads(e) for _, e, _ in rows]
        nid = hashlib.sha256("\x1f".join([receiver, *sorted(r[0] for r in rows)]).encode()).hexdigest()[:32]
        with self.db:
            self.db.conn.executemany("DELETE FROM notify_waiting WHERE event_id = ? AND receiver = ?",
                                     [(r[0], receiver) for r in rows])
            self.db.conn.execute(
                "INSERT OR IGNORE INTO notifications (notification_id, receiver, events, next_ms, created_ms, part, "
                "released) VALUES (?, ?, ?, ?, ?, ?, ?)", (nid, receiver, json.dumps(events), at_ms, at_ms, part,
                                                          int(not self.hold)))
        return Notification(nid, receiver, events, 0, at_ms)

    def export(self, part: int) -> dict[str, list[list]]:
        """The partition's events waiting to be grouped and notifications still to send, JSON-able."""
        return {"waiting": [list(row) for row in self.db.conn.execute(
                    "SELECT event_id, receiver, event, created_ms FROM notify_waiting WHERE part = ?", (part,))],
                "notifications": [list(row) for row in self.db.conn.execute(
                    "SELECT notification_id, receiver, events, attempts, next_ms, created_ms FROM notifications "
                    "WHERE part = ? AND status = 'pending'", (part,))]}

    def adopt(self, part: int, exported: dict[str, list[list]]) -> None:
        """Take over a partition's outbox from its checkpoint (ids kept; call inside a transaction)."""
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO notify_waiting (event_id, receiver, event, created_ms, part) VALUES (?, ?, ?, ?, ?)",
            [(*row, part) for row in exported["waiting"]])
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO notifications (notification_id, receiver, events, attempts, next_ms, created_ms, "
            "part) VALUES (?, ?, ?, ?, ?, ?, ?)", [(*row, part) for row in exported["notifications"]])

    def held(self, parts: Iterable[int]) -> list[str]:
        """Ids of the partitions' composed notifications not released yet (what their next checkpoint holds)."""
        parts = list(parts)
        return [nid for (nid,) in self.db.conn.execute(
            f"SELECT notification_id FROM notifications WHERE released = 0 AND part IN ({','.join('?' * len(parts))})",
            parts)]

    def release(self, ids: list[str]) -> None:
        """A durable checkpoint holds these notifications: they may be sent."""
        with self.db:
            self.db.conn.executemany("UPDATE notifications SET released = 1 WHERE notification_id = ?",
                                     [(nid,) for nid in ids])

    def forget(self, part: int | None = None) -> None:
        """Drop what a partition (default: every one) still had to send; its checkpoint carries it on."""
        where, args = ("WHERE part = ?", (part,)) if part is not None else ("", ())
        self.db.conn.execute(f"DELETE FROM notify_waiting {where}", args)
        self.db.conn.execute(f"DELETE FROM notifications {where or 'WHERE 1'} AND status = 'pending'", args)

    def due(self, at_ms: int, limit: int = 100) -> list[Notification]:
        return [Notification(nid, r, json.loads(ev), attempts, created) for nid, r, ev, attempts, created in
                self.db.conn.execute(
                    "SELECT notification_id, receiver, events, attempts, created_ms FROM notifications "
                    "WHERE status = 'pending' AND released = 1 AND next_ms <= ? ORDER BY next_ms LIMIT ?",
                    (at_ms, limit))]

    def unsent_receivers(self) -> set[str]:
        """Receivers with a composed notification not yet attempted (held back by the rate limit)."""
        return {r for (r,) in self.db.conn.execute(
            "SELECT DISTINCT receiver FROM notifications WHERE status = 'pending' AND attempts = 0")}

    def retrying(self) -> dict[str, int]:
        """receiver -> notifications that failed at least once and wait for a retry."""
        return dict(self.db.conn.execute("SELECT receiver, COUNT(*) FROM notifications "
                                         "WHERE status = 'pending' AND attempts > 0 GROUP BY receiver"))

    def pending_count(self) -> int:
        return self.db.conn.execute("SELECT (SELECT COUNT(*) FROM notifications WHERE status = 'pending') + "
                                    "(SELECT COUNT(*) FROM notify_waiting)").fetchone()[0]

    def finish(self, n: Notification, status: str, attempts: int, next_ms: int, error: str) -> None:
        self.db.conn.execute("UPDATE notifications SET status = ?, attempts = ?, next_ms = ?, error = ? "
                             "WHERE notification_id = ?", (status, attempts, next_ms, error, n.notification_id))

    def purge(self, older_than_ms: int) -> None:
        with self.db:
            self.db.conn.execute("DELETE FROM notifications WHERE status != 'pending' AND next_ms < ?",
                                 (older_than_ms,))


class Dispatcher:
    """Composes, sends, retries and dead-letters notifications; one ``tick`` per loop turn."""

    def __init__(self, cfg: Config, db: StateDB, outbox: Outbox, senders: Senders,
                 receivers: Callable[[], dict[str, ReceiverSpec]], rng: random.Random | None = None):
        self.cfg, self.db, self.outbox, self.senders = cfg, db, outbox, senders
        self.receivers = receivers
        self.buckets: dict[str, TokenBucket] = {}
        self.rng = rng or random.Random()
        self.in_flight: dict[str, asyncio.Task] = {}  # notification id -> its send
        self.results: list[tuple[str, str]] = []
        prefix = cfg.kafka.topic_prefix
        self.notifications_topic = contract.NOTIFICATION_ROWS.name(prefix)
        self.dead_letter_topic = contract.DEAD_LETTER.name(prefix)

    def bucket(self, spec: ReceiverSpec) -> TokenBucket:
        b = self.buckets.get(spec.name)
        if b is None or (b.rate, b.burst) != (spec.rate_per_s, max(1, spec.burst)):
            b = self.buckets[spec.name] = TokenBucket(spec.rate_per_s, spec.burst)
        return b

    async def tick(self) -> list[tuple[str, str]]:
        """One round: compose due groups, start sending due ones; (receiver, status) of sends finished since."""
        at = now_ms()
        specs = self.receivers()
        unsent = self.outbox.unsent_receivers()
        for (receiver, part), (count, oldest) in self.outbox.waiting().items():
            spec = specs.get(receiver)
            if spec is None:
                self.outbox.compose(receiver, 1000, at, part)  # dead-lettered below: nowhere to send
            elif receiver in unsent and count < spec.group_max:
                continue  # the last message is still held by the rate limit: keep grouping into the next
            elif count >= spec.group_max or at - oldest >= spec.group_wait_s * 1000:
                self.outbox.compose(receiver, spec.group_max, at, part)
        for n in self.outbox.due(at):
            if n.notification_id in self.in_flight:
                continue
            spec = specs.get(n.receiver)
            if spec is not None and not self.bucket(spec).take():
                continue  # rate limited: stays due, waiting events keep grouping meanwhile
            self.in_flight[n.notification_id] = asyncio.create_task(self._attempt(spec, n))
        await asyncio.sleep(0)
        results, self.results = self.results, []
        return results

    async def drain(self) -> None:
        """Wait for every send in flight (at shutdown)."""
        await asyncio.gather(*self.in_flight.values())

    async def _attempt(self, spec: ReceiverSpec | None, n: Notification) -> None:
        attempts = n.attempts + 1
        try:
            if spec is None:
                raise DeliveryError(f"receiver {n.receiver!r} is no longer configured", permanent=True)
            await self.senders.send(spec, n)
            status, error = "delivered", ""
        except Exception as exc:  # noqa: BLE001 - whatever failed, retry then dead-letter; never lose it
            error = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
            last = getattr(exc, "permanent", False) or attempts >= self.cfg.alert.max_attempts
            status = "dead_letter" if last else "failed"
            log.warning("notification %s to %s: attempt %d failed: %s%s", n.notification_id, n.receiver,
                        attempts, error, " (dead letter)" if last else "")
        self._record(spec, n, status, attempts, error)
        self.in_flight.pop(n.notification_id, None)
        self.results.append((n.receiver, status))

    def _record(self, spec: ReceiverSpec | None, n: Notification, status: str, attempts: int, error: str) -> None:
        at = now_ms()
        a = self.cfg.alert
        next_ms = at + int(1000 * backoff_s(attempts, a.backoff_initial_s, a.backoff_max_s, self.rng))
        kind = spec.kind if spec else ""
        rows = [{"notification_id": n.notification_id, "event_id": e["event_id"], "receiver": n.receiver,
                 "kind": kind, "status": status, "attempts": attempts, "error": error,
                 "created_ms": n.created_ms, "finished_ms": at} for e in n.events]
        with self.db:
            self.outbox.finish(n, "pending" if status == "failed" else status, attempts,
                               next_ms if status == "failed" else at, error)
            self.db.queue(self.notifications_topic, rows)
            if status == "dead_letter":
                self.db.queue(self.dead_letter_topic, [{
                    "stage": "notify", "reason": "delivery_failed",
                    "detail": f"notification {n.notification_id} to {n.receiver} after {attempts} attempts: {error}",
                    "mqtt_topic": "", "payload": None, "tenant": e["tenant"], "device_id": e["device_id"],
                    "metric": e["metric"], "ts_ms": e.get("ts_ms"), "value": e.get("value"), "unit": "",
                    "received_ms": e.get("source_received_ms"), "rejected_ms": at,
                } for e in n.events])
