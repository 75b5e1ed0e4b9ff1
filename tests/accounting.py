"""Accounting by identity for the drills: what was published against what the store holds.

Every check compares sets of identities, never counts alone (a lost pack plus a redelivered
pack balances a count exactly), and reads raw rows without ``FINAL`` (which would collapse the
duplicates a check exists to find). Background merges of a ReplacingMergeTree can still remove a
duplicate before the check runs, so readings are also checked against the ``readings_1m`` rollup:
its ``countMerge(n)`` counts every row ever inserted (insert deduplication tokens apply to it
too) and merges never shrink it.

The checks take ``query(sql) -> pa.Table`` with ``{db}`` standing for the database, so they run
against a whole pipeline (``TestPipeline.query``) or a sink alone (``store_query``). Each raises
``AssertionError`` naming up to five offending identities.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa

from aimass.core import contract

Identity = tuple[str, str, str, int]        # tenant, device_id, metric, ts_ms
WindowKey = tuple[str, str, int]            # device_id, metric, window_end_ms
Query = Callable[[str], pa.Table]
RAISES = ("raised", "reraised")


def store_query(store, database: str) -> Query:
    """``query`` for a store object (chDB, server or HTTP reader) and one database."""
    return lambda sql: store.query(sql.replace("{db}", f"`{database}`"))


def _sample(items: Iterable) -> list:
    return sorted(items)[:5]


@dataclass
class ReadingLedger:
    """Stored readings (raw rows per identity) and rejected ones (identity -> {"stage:reason"})."""

    stored: Counter = field(default_factory=Counter)
    rejected: dict[Identity, set[str]] = field(default_factory=lambda: defaultdict(set))
    inserted_rows: int = 0  # rows the rollup counted: every insert, before any merge

    def reasons(self) -> Counter:
        return Counter(r for reasons in self.rejected.values() for r in reasons)


def read_ledger(query: Query, tenant: str) -> ReadingLedger:
    """The tenant's raw readings, their rollup count, and the readings its dead letters name."""
    ledger = ReadingLedger()
    rows = query("SELECT device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, count() AS n "
                 f"FROM {{db}}.readings WHERE tenant = '{tenant}' GROUP BY device_id, metric, ts_ms").to_pydict()
    for d, m, ts, n in zip(rows["device_id"], rows["metric"], rows["ts_ms"], rows["n"]):
        ledger.stored[(tenant, d, m, ts)] = n
    roll = query(f"SELECT countMerge(n) AS n FROM {{db}}.readings_1m WHERE tenant = '{tenant}'")
    ledger.inserted_rows = int(roll.column("n")[0].as_py() or 0) if roll.num_rows else 0
    rejects = query("SELECT stage, reason, detail, hex(payload) AS payload, tenant, device_id, metric, "
                    "toUnixTimestamp64Milli(ts) AS ts_ms FROM {db}.rejects "
                    f"WHERE tenant = '{tenant}' OR (stage = 'sink' AND tenant = '')").to_pylist()
    for r in rejects:
        if r["stage"] == "sink" and r["detail"].startswith(f"{contract.CLEAN.suffix}["):
            # The sink dead-letters whole clean records: the identities are in the payload.
            for x in contract.decode(bytes.fromhex(r["payload"]), contract.READINGS).to_pylist():
                if x["tenant"] == tenant:
                    ledger.rejected[(tenant, x["device_id"], x["metric"], x["ts_ms"])].add(f"sink:{r['reason']}")
        elif r["tenant"] == tenant and r["stage"] != "bridge":
            ledger.rejected[(tenant, r["device_id"], r["metric"], r["ts_ms"])].add(f"{r['stage']}:{r['reason']}")
    return ledger


def check_readings(ledger: ReadingLedger, published: Iterable[Identity]) -> None:
    """Every published reading stored exactly once, or not stored and rejected for a reason other
    than ``duplicate``; nothing stored that was not published."""
    published = set(published)
    stored = set(ledger.stored)
    twice = {i: n for i, n in ledger.stored.items() if n > 1}
    assert not twice, f"{len(twice)} readings stored more than once (raw rows): {_sample(twice.items())}"
    assert ledger.inserted_rows == sum(ledger.stored.values()), (
        f"{ledger.inserted_rows} reading rows were inserted (readings_1m rollup) but "
        f"{sum(ledger.stored.values())} are stored: a duplicate was inserted and merged away")
    invented = stored - published
    assert not invented, f"{len(invented)} stored readings were never published: {_sample(invented)}"
    lost = {i: sorted(ledger.rejected.get(i, ())) for i in published - stored
            if not any(not r.endswith(":duplicate") for r in ledger.rejected.get(i, ()))}
    assert not lost, (f"{len(lost)} of {len(published)} published readings are neither stored nor rejected "
                      f"(a 'duplicate' reject of a reading whose original is missing is a loss): {_sample(lost.items())}")


def eventually(check: Callable[[], object], timeout_s: float, every_s: float = 2.0):
    """``check()``'s result once it stops raising AssertionError; its last error after ``timeout_s``
    (outputs trail the readings: windows close, predictions and alarms follow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(every_s)


def window_end(ts_ms: int, window_s: int) -> int:
    size = window_s * 1000
    return (ts_ms // size + 1) * size


def check_windows(query: Query, tenant: str, ledger: ReadingLedger, window_s: int, lateness_ms: int
                  ) -> set[WindowKey]:
    """Every window the stored readings imply stored exactly once, counting exactly its stored
    readings, once its series' newest reading is ``lateness_ms`` and one more window past its end
    (closed); no window without readings. Returns the stored windows."""
    newest: dict[tuple[str, str], int] = {}
    for (_, d, m, ts) in ledger.stored:
        newest[(d, m)] = max(ts, newest.get((d, m), ts))
    implied: Counter = Counter()
    for (_, d, m, ts) in ledger.stored:
        if not any(r.startswith("window:") for r in ledger.rejected.get((tenant, d, m, ts), ())):
            implied[(d, m, window_end(ts, window_s))] += 1
    rows = query("SELECT device_id, metric, toUnixTimestamp64Milli(window_end_at) AS e, `count` AS c "
                 f"FROM {{db}}.windows WHERE tenant = '{tenant}' AND window_s = {window_s}").to_pydict()
    stored = Counter(zip(rows["device_id"], rows["metric"], rows["e"]))
    counted = dict(zip(zip(rows["device_id"], rows["metric"], rows["e"]), rows["c"]))
    twice = {k: n for k, n in stored.items() if n > 1}
    assert not twice, f"{len(twice)} {window_s}s windows stored more than once (raw rows): {_sample(twice.items())}"
    empty = set(stored) - set(implied)
    assert not empty, f"{len(empty)} {window_s}s windows stored without a stored reading in them: {_sample(empty)}"
    missing = {k for k in implied if k[2] <= newest[k[:2]] - lateness_ms - window_s * 1000} - set(stored)
    assert not missing, (f"{len(missing)} closed {window_s}s windows implied by stored readings are not stored "
                         f"(of {len(implied)} implied): {_sample(missing)}")
    wrong = {k: (counted[k], implied[k]) for k in stored if counted[k] != implied[k]}
    assert not wrong, f"{len(wrong)} windows count other than their stored readings (count, stored): {_sample(wrong.items())}"
    return set(stored)


def check_predictions(query: Query, tenant: str, windows: set[WindowKey], window_s: int) -> None:
    """Exactly one prediction per stored window of the predicted size in query results, none for
    another window. Predict is at least once (after a restart it predicts again from its checkpoint
    and emits those rows again), so raw rows may hold a copy until a merge; FINAL shows one."""
    rows = query("SELECT device_id, metric, toUnixTimestamp64Milli(window_end_at) AS e FROM {db}.predictions FINAL "
                 f"WHERE tenant = '{tenant}' AND window_s = {window_s}").to_pydict()
    stored = Counter(zip(rows["device_id"], rows["metric"], rows["e"]))
    twice = {k: n for k, n in stored.items() if n > 1}
    assert not twice, f"{len(twice)} windows predicted more than once (FINAL): {_sample(twice.items())}"
    missing = windows - set(stored)
    assert not missing, f"{len(missing)} of {len(windows)} stored windows have no prediction: {_sample(missing)}"
    stray = set(stored) - windows
    assert not stray, f"{len(stray)} predictions for windows that are not stored: {_sample(stray)}"


def alarm_events(query: Query, tenant: str) -> list[dict]:
    """The tenant's stored alarm events, raw rows (no FINAL)."""
    return query("SELECT event_id, rule, device_id, metric, toUnixTimestamp64Milli(ts) AS ts_ms, transition, "
                 f"`count`, flapping FROM {{db}}.alerts WHERE tenant = '{tenant}'").to_pylist()


def check_alarm_events(events: list[dict]) -> None:
    """Each event stored once; per alarm the raises are numbered 1..n with no gap (``count`` is the
    alarm's raise number) and every clear follows its raise: a lost raise or clear shows."""
    twice = {e: n for e, n in Counter(e["event_id"] for e in events).items() if n > 1}
    assert not twice, f"{len(twice)} alarm events stored more than once: {_sample(twice.items())}"
    by_alarm: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        by_alarm[(e["rule"], e["device_id"], e["metric"])].append(e)
    for alarm, evs in by_alarm.items():
        raises = sorted(e["count"] for e in evs if e["transition"] in RAISES)
        assert raises == list(range(1, len(raises) + 1)), f"alarm {alarm}: raise numbers {raises} have a gap"
        cleared = Counter(e["count"] for e in evs if e["transition"] == "cleared")
        orphans = [n for n, k in cleared.items() if k > 1 or n not in raises]
        assert not orphans, f"alarm {alarm}: clears of raises {orphans} that are not stored once"


def qualifying_anomalies(labels: list[dict], after_ms: int, history_ms: int, min_size: Callable[[str], float],
                         stuck_min_ms: int) -> list[dict]:
    """Labelled anomalies a detector is held to: after ``after_ms``, sized at least ``min_size(metric)``
    (or stuck for ``stuck_min_ms``), and not masked by an earlier anomaly of the series."""
    return [lab for lab in labels if lab["kind"] in ("spike", "level_shift", "stuck")
            and lab["start_ms"] >= after_ms and not masked(lab, labels, history_ms)
            and (abs(lab["magnitude"]) >= min_size(lab["metric"])
                 or lab["kind"] == "stuck" and lab["end_ms"] - lab["start_ms"] >= stuck_min_ms)]


def masked(label: dict, labels: list[dict], history_ms: int) -> bool:
    """True when another anomaly of the same series lies in the z-score's history before this one.

    The window z-score compares a window mean with the series' recent window means; an anomaly
    in that history inflates their spread, which hides the next one from a z-score rule.
    """
    return any(other is not label and (other["device_id"], other["metric"]) == (label["device_id"], label["metric"])
               and label["start_ms"] - history_ms <= other["end_ms"] <= label["start_ms"] for other in labels)


def check_anomalies_alerted(qualifying: list[dict], events: list[dict], max_delay_ms: int) -> None:
    """Each qualifying anomaly raised on its own series within ``max_delay_ms``; fails on an empty list."""
    assert qualifying, "no labelled anomaly qualifies: this check would pass on nothing (pick another seed)"
    raised = [e for e in events if e["transition"] in RAISES]
    for lab in qualifying:
        hits = [e for e in raised if (e["device_id"], e["metric"]) == (lab["device_id"], lab["metric"])
                and lab["start_ms"] <= e["ts_ms"] <= lab["start_ms"] + max_delay_ms]
        series = [(e["rule"], e["transition"], e["ts_ms"] - lab["start_ms"]) for e in events
                  if (e["device_id"], e["metric"]) == (lab["device_id"], lab["metric"])]
        assert hits, f"anomaly {lab} not alerted within {max_delay_ms} ms; its series' events: {series}"
