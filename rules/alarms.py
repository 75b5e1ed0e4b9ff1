"""Alarms: one per (rule, series), their lifecycle, flapping, and the durable state file.

Lifecycle (``state``)::

    (fire) -> active_unack --ack--> active_ack
    active_unack --clear--> cleared_unack --ack--> cleared
    active_ack   --clear--> cleared
    cleared / cleared_unack --fire--> active_unack   (the same alarm, "reraised", count + 1)

An operator can silence an alarm's notifications until a time (``silence``); its events are
still emitted and stored. Acknowledgements and silences are events too, carrying the ``actor``
(the name of the API token used), so the store keeps who did what, when.

A fire for an alarm that is already active changes nothing, so replayed input never duplicates
an alarm. An alarm that changes state ``flapping.changes`` times within ``flapping.within`` is
marked flapping (one "flapping" event); while it flaps its raise/clear events are still
emitted but not notified.

Everything lives in one SQLite file (``StateDB``, WAL, synchronous=FULL): alarms, the
notification outbox (``aimass.rules.delivery``), checkpoints of the engine and the ground-truth join,
and an ``outgoing`` queue of Kafka records written in the same transaction as the state change
that produced them, deleted only once Kafka has them. A restart therefore loses nothing.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from aimass.core.files import create_private
from aimass.rules.engine import Signal

ACTIVE = ("active_unack", "active_ack")
# Transitions that notify receivers (unless the alarm is flapping; "flapping" itself always does).
NOTIFY = ("raised", "reraised", "repeated", "cleared", "flapping")


def now_ms() -> int:
    return int(time.time() * 1000)


class StateDB:
    """The alerter's durable state: one SQLite file; callers group writes in one transaction with ``with db:``."""

    def __init__(self, path: str | Path):
        self.path = create_private(path)  # SQLite gives its -wal / -shm files the same mode
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS alarms (alarm_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS outgoing (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                                                 topic TEXT NOT NULL, row TEXT NOT NULL);
        """)
        self._depth = 0

    def __enter__(self) -> "StateDB":
        if self._depth == 0:
            self.conn.execute("BEGIN IMMEDIATE")
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")

    def put(self, key: str, value: bytes | str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def get(self, key: str) -> bytes | str | None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def queue(self, topic: str, rows: Iterable[dict]) -> None:
        """Queue records for Kafka (JSON rows of the topic's schema), in the caller's transaction."""
        self.conn.executemany("INSERT INTO outgoing (topic, row) VALUES (?, ?)",
                              [(topic, json.dumps(r)) for r in rows])

    def queued(self, limit: int = 10000) -> list[tuple[int, str, dict]]:
        return [(seq, topic, json.loads(row)) for seq, topic, row in self.conn.execute(
            "SELECT seq, topic, row FROM outgoing ORDER BY seq LIMIT ?", (limit,))]

    def queue_depth(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM outgoing").fetchone()[0]

    def unqueue(self, upto_seq: int) -> None:
        with self:
            self.conn.execute("DELETE FROM outgoing WHERE seq <= ?", (upto_seq,))

    def close(self) -> None:
        self.conn.close()


@dataclass
class Alarm:
    """The current state of one (rule, series) alarm."""

    alarm_id: str
    rule: str
    severity: str
    tenant: str
    device_id: str
    metric: str
    window_s: int
    state: str = "active_unack"
    value: float = float("nan")
    message: str = ""            # rendered for the latest event
    raised_message: str = ""     # rendered for the event that (last) raised it
    labels: dict = field(default_factory=dict)
    first_ms: int = 0            # event time the alarm last became active
    last_ms: int = 0             # event time of the last change
    count: int = 0               # times raised
    flapping: bool = False
    changes_ms: list = field(default_factory=list)  # event times of recent raise/clear
    acked_by: str = ""
    acked_ms: int = 0
    silenced_until_ms: int = 0   # wall-clock time until which its notifications are held back

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def alarm_id(rule: str, series: tuple[str, str, str, int]) -> str:
    """Stable short id of the (rule, series) alarm (used in URLs and the CLI)."""
    return hashlib.sha1("\x1f".join([rule, *map(str, series)]).encode()).hexdigest()[:16]


class AlarmStore:
    """Alarms in memory, persisted to ``StateDB``; turns engine signals into alarm events."""

    def __init__(self, db: StateDB):
        self.db = db
        self.alarms: dict[str, Alarm] = {
            aid: Alarm(**json.loads(doc)) for aid, doc in db.conn.execute("SELECT alarm_id, doc FROM alarms")}
        self._dirty: set[str] = set()

    def apply(self, signals: Iterable[Signal], wall_ms: int | None = None) -> list[dict]:
        """Events (rows of contract.ALERTS) for a batch of engine signals."""
        wall_ms = wall_ms or now_ms()
        events: list[dict] = []
        for s in signals:
            aid = alarm_id(s.rule.name, s.series)
            alarm = self.alarms.get(aid)
            if s.kind == "fire":
                if alarm is not None and alarm.active:
                    continue  # replayed input: the alarm is already up
                if alarm is None:
                    alarm = self.alarms[aid] = Alarm(aid, s.rule.name, s.rule.severity, *s.series)
                transition = "reraised" if alarm.count else "raised"
                alarm.state, alarm.first_ms, alarm.count = "active_unack", s.ts_ms, alarm.count + 1
                alarm.acked_by, alarm.acked_ms = "", 0
            elif alarm is None or not alarm.active:
                continue
            elif s.kind == "clear":
                transition = "cleared"
                alarm.state = "cleared" if alarm.state == "active_ack" else "cleared_unack"
            else:
                transition = "repeated"
            alarm.severity, alarm.labels = s.rule.severity, dict(s.rule.labels)
            alarm.value, alarm.message, alarm.last_ms = s.value, s.message, s.ts_ms
            if s.kind == "fire":
                alarm.raised_message = s.message
            self._dirty.add(aid)
            started_flapping = transition != "repeated" and self._track_flapping(alarm, s)
            events.append(self._event(alarm, transition, wall_ms, s.ts_ms, s.received_ms))
            if started_flapping:
                events.append(self._event(alarm, "flapping", wall_ms, s.ts_ms, s.received_ms))
        return events

    @staticmethod
    def _track_flapping(alarm: Alarm, s: Signal) -> bool:
        """Record a raise/clear; True when this change makes the alarm start flapping."""
        horizon = s.ts_ms - s.rule.flapping.within_s * 1000
        alarm.changes_ms = [t for t in alarm.changes_ms if t > horizon] + [s.ts_ms]
        flapping = len(alarm.changes_ms) >= s.rule.flapping.changes
        started = flapping and not alarm.flapping
        alarm.flapping = flapping
        return started

    def acknowledge(self, aid: str, by: str, actor: str = "", wall_ms: int | None = None) -> dict | None:
        """Acknowledge an alarm; its event, or None when it does not exist or needs no ack."""
        alarm = self.alarms.get(aid)
        if alarm is None or alarm.state not in ("active_unack", "cleared_unack"):
            return None
        wall_ms = wall_ms or now_ms()
        alarm.state = "active_ack" if alarm.state == "active_unack" else "cleared"
        alarm.acked_by, alarm.acked_ms = by, wall_ms
        self._dirty.add(aid)
        return self._event(alarm, "acknowledged", wall_ms, wall_ms, 0, actor)

    def silence(self, aid: str, for_s: float, actor: str = "", wall_ms: int | None = None) -> dict | None:
        """Hold back an alarm's notifications for ``for_s`` seconds (0 lifts a silence); its event, or None if unknown."""
        alarm = self.alarms.get(aid)
        if alarm is None:
            return None
        wall_ms = wall_ms or now_ms()
        alarm.silenced_until_ms = wall_ms + int(for_s * 1000) if for_s > 0 else 0
        self._dirty.add(aid)
        return self._event(alarm, "silenced" if for_s > 0 else "unsilenced", wall_ms, wall_ms, 0, actor)

    def silenced(self, aid: str, at_ms: int) -> bool:
        alarm = self.alarms.get(aid)
        return alarm is not None and alarm.silenced_until_ms > at_ms

    def listing(self, include_cleared: bool = False) -> list[Alarm]:
        """Alarms needing attention (active or cleared-unacknowledged), or all, newest first."""
        alarms = [a for a in self.alarms.values() if include_cleared or a.state != "cleared"]
        return sorted(alarms, key=lambda a: a.last_ms, reverse=True)

    def active_count(self) -> int:
        return sum(a.active for a in self.alarms.values())

    def export(self, keep: Callable[[Alarm], bool]) -> list[dict]:
        """The alarms ``keep`` selects, JSON-able (a partition's share of a checkpoint)."""
        return [asdict(a) for a in self.alarms.values() if keep(a)]

    def adopt(self, docs: Iterable[dict]) -> None:
        """Take over alarms from a checkpoint (their partition came to this alerter)."""
        for doc in docs:
            self.alarms[doc["alarm_id"]] = Alarm(**doc)
            self._dirty.add(doc["alarm_id"])

    def forget(self, drop: Callable[[Alarm], bool]) -> None:
        """Drop the alarms ``drop`` selects, here and in the file (their partition went to another alerter)."""
        gone = [aid for aid, a in self.alarms.items() if drop(a)]
        for aid in gone:
            del self.alarms[aid]
            self._dirty.discard(aid)
        self.db.conn.executemany("DELETE FROM alarms WHERE alarm_id = ?", [(aid,) for aid in gone])

    def save(self) -> None:
        """Write changed alarms (inside the caller's ``StateDB`` transaction)."""
        self.db.conn.executemany("INSERT OR REPLACE INTO alarms (alarm_id, doc) VALUES (?, ?)",
                                 [(aid, json.dumps(asdict(self.alarms[aid]))) for aid in self._dirty])
        self._dirty.clear()

    @staticmethod
    def _event(alarm: Alarm, transition: str, wall_ms: int, ts_ms: int, received_ms: int, actor: str = "") -> dict:
        event_id = hashlib.sha1(f"{alarm.alarm_id}|{transition}|{ts_ms}|{alarm.count}".encode()).hexdigest()[:20]
        return {
            "event_id": event_id, "event_ms": wall_ms, "rule": alarm.rule, "severity": alarm.severity,
            "tenant": alarm.tenant, "device_id": alarm.device_id, "metric": alarm.metric,
            "state": alarm.state, "transition": transition, "value": alarm.value, "message": alarm.message,
            "labels_json": json.dumps(alarm.labels, sort_keys=True), "first_ms": alarm.first_ms,
            "count": alarm.count, "flapping": alarm.flapping, "source_received_ms": received_ms,
            "alarm_id": alarm.alarm_id, "ts_ms": ts_ms, "actor": actor,
        }


def should_notify(event: dict) -> bool:
    """Whether an alarm event goes to the rule's receivers."""
    if event["transition"] == "flapping":
        return True
    return event["transition"] in NOTIFY and not event["flapping"]
