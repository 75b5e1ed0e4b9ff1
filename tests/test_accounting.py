"""The drills' accounting (tests/accounting.py) can fail: each check is run against a real sink
(chDB, the real Kafka broker) storing a consistent little pipeline output, passes on it, and
fails when the sink's test-only fault switch (``AIMASS_TEST_FAULT``) drops one reading,
duplicates one, or loses one alarm event. The pure cases (a lost pack balanced by a redelivered
one) need no servers.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from aimass.agents.sink import TEST_FAULT_ENV, TEST_FAULTS
from aimass.core import contract, tables
from aimass.core.clickhouse import ChdbStore
from tests.accounting import (ReadingLedger, alarm_events, check_alarm_events, check_anomalies_alerted,
                              check_predictions, check_readings, check_windows, eventually, read_ledger, store_query,
                              window_end)
from tests.fixtures_store import NOW_MS, Running, chdb_config, chdb_run_dir, produce, sink_on  # noqa: F401

TENANT = "acct"
WINDOW_S = 2
START_MS = (NOW_MS - 300_000) // 10_000 * 10_000
DEVICES = ("dev-a", "dev-b")


def outputs() -> tuple[set, dict[contract.Topic, pa.Table]]:
    """(published reading identities, one record per topic) of a consistent little run: 10 s of
    readings at 5 Hz on two series, their 2 s windows, one prediction per window, and alarm events."""
    ts = START_MS + np.arange(50, dtype=np.int64) * 200
    n = len(ts) * len(DEVICES)
    devices = np.repeat(DEVICES, len(ts)).tolist()
    times = np.tile(ts, len(DEVICES))
    readings = pa.table({"tenant": [TENANT] * n, "device_id": devices, "metric": ["temp"] * n, "ts_ms": times,
                         "value": np.linspace(20, 21, n), "unit": ["Cel"] * n, "received_ms": times + 5},
                        schema=contract.READINGS)
    ends = sorted({window_end(int(t), WINDOW_S) for t in ts})
    keys = [(d, e) for d in DEVICES for e in ends]
    k = len(keys)
    series = {"tenant": [TENANT] * k, "device_id": [d for d, _ in keys], "metric": ["temp"] * k,
              "window_s": pa.array([WINDOW_S] * k, pa.int32())}
    windows = table(contract.WINDOWS, {**series, "window_start_ms": [e - WINDOW_S * 1000 for _, e in keys],
                                       "window_end_ms": [e for _, e in keys], "count": [10] * k})
    predictions = table(contract.PREDICTIONS, {**series, "window_end_ms": [e for _, e in keys],
                                               "target_end_ms": [e + WINDOW_S * 1000 for _, e in keys]})
    transitions = [("raised", 1), ("cleared", 1), ("reraised", 2)]
    m = len(transitions)
    alerts = table(contract.ALERTS, {
        "event_id": [f"ev-{i}" for i in range(m)], "event_ms": [ends[i] + 100 for i in range(m)],
        "ts_ms": ends[:m], "rule": ["stuck"] * m, "severity": ["warning"] * m, "tenant": [TENANT] * m,
        "device_id": ["dev-a"] * m, "metric": ["temp"] * m, "transition": [t for t, _ in transitions],
        "state": ["active_unack", "cleared_unack", "active_unack"], "count": [c for _, c in transitions]})
    published = set(zip(readings["tenant"].to_pylist(), devices, readings["metric"].to_pylist(), times.tolist()))
    return published, {contract.CLEAN: readings, contract.WINDOW_ROWS: windows,
                       contract.PREDICTION_ROWS: predictions, contract.ALERT_EVENTS: alerts}


def table(schema: pa.Schema, columns: dict) -> pa.Table:
    """A ``schema`` table with ``columns``; the other fields zero, empty or false."""
    n = len(next(iter(columns.values())))
    default = {pa.string(): "", pa.bool_(): False, pa.binary(): b""}
    return pa.table({f.name: columns.get(f.name, [default.get(f.type, 0)] * n) for f in schema}, schema=schema)


def account(query, published: set) -> None:
    """Every check the drills run, on this test's output."""
    ledger = read_ledger(query, TENANT)
    check_readings(ledger, published)
    windows = check_windows(query, TENANT, ledger, WINDOW_S, lateness_ms=0)
    check_predictions(query, TENANT, windows, WINDOW_S)
    check_alarm_events(alarm_events(query, TENANT))


def stored_run(cfg, monkeypatch, fault: str = ""):
    """Store ``outputs()`` through a real sink (``fault`` switched on); returns (query, published, store)."""
    if fault:
        monkeypatch.setenv(TEST_FAULT_ENV, fault)
    published, records = outputs()
    produce(cfg, list(records.items()))
    sink = sink_on(cfg, store_of(cfg))
    query = store_query(sink.store, cfg.clickhouse.database)

    def stored() -> None:
        assert read_ledger(query, TENANT).stored and alarm_events(query, TENANT), "not stored yet"
        assert query("SELECT count() AS n FROM {db}.predictions").column("n")[0].as_py(), "not stored yet"

    with Running(sink):
        eventually(stored, 30, every_s=0.3)
    return query, published, sink.store


def store_of(cfg) -> ChdbStore:
    return ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)


@pytest.fixture
def sink_cfg(cfg, chdb_run_dir):  # noqa: F811
    return chdb_config(cfg, chdb_run_dir)


@pytest.mark.integration
def test_every_check_passes_on_a_consistent_run(sink_cfg, monkeypatch):
    query, published, _ = stored_run(sink_cfg, monkeypatch)
    account(query, published)


@pytest.mark.integration
@pytest.mark.parametrize("fault, check, message", [
    ("drop_one_reading", "readings", "neither stored nor rejected"),
    ("duplicate_one_reading", "readings", "stored more than once"),
    ("drop_one_alarm", "alarms", "have a gap"),
])
def test_each_check_fails_under_its_injected_defect(sink_cfg, monkeypatch, fault, check, message):
    query, published, _ = stored_run(sink_cfg, monkeypatch, fault)
    with pytest.raises(AssertionError, match=message):
        if check == "readings":
            check_readings(read_ledger(query, TENANT), published)
        else:
            check_alarm_events(alarm_events(query, TENANT))


@pytest.mark.integration
def test_a_lost_reading_also_breaks_its_window_and_a_merged_duplicate_still_shows(sink_cfg, monkeypatch):
    query, published, store = stored_run(sink_cfg, monkeypatch, "duplicate_one_reading")
    store.query(f"OPTIMIZE TABLE `{sink_cfg.clickhouse.database}`.readings FINAL")  # the merge removes the twin
    ledger = read_ledger(query, TENANT)
    assert max(ledger.stored.values()) == 1
    with pytest.raises(AssertionError, match="merged away"):
        check_readings(ledger, published)
    # Without the twin a reading is missing from the windows' point of view: one window counts it.
    ledger.stored.pop(next(iter(sorted(ledger.stored))))
    with pytest.raises(AssertionError, match="count other than their stored readings"):
        check_windows(query, TENANT, ledger, WINDOW_S, lateness_ms=0)


def test_fault_switch_names_only_known_tables():
    assert set(TEST_FAULTS.values()) <= set(tables.TABLE_BY_NAME)


# --- pure: the ledger rules without servers ---------------------------------------------

IDS = [("t", "d", "m", ts) for ts in range(10)]


def test_a_lost_pack_balanced_by_a_redelivered_pack_is_a_loss():
    """Counts balance (8 stored + 2 rejected == 10 published); identities do not."""
    ledger = ReadingLedger()
    ledger.stored.update(IDS[:8])
    ledger.inserted_rows = 8
    for i in IDS[:2]:  # the redelivered copies of readings that are stored: fine
        ledger.rejected[i].add("clean:duplicate")
    check_readings(ledger, IDS[:8])
    with pytest.raises(AssertionError, match="neither stored nor rejected"):
        check_readings(ledger, IDS)
    for i in IDS[8:]:  # a "duplicate" reject of a reading whose original is missing is still a loss
        ledger.rejected[i].add("clean:duplicate")
    with pytest.raises(AssertionError, match="neither stored nor rejected"):
        check_readings(ledger, IDS)
    for i in IDS[8:]:  # rejected for a reason of its own: accounted
        ledger.rejected[i].add("clean:late")
    check_readings(ledger, IDS)


def test_stored_but_never_published_and_duplicates_fail():
    ledger = ReadingLedger()
    ledger.stored.update(IDS + [("t", "d", "m", 99)])
    ledger.inserted_rows = 11
    with pytest.raises(AssertionError, match="never published"):
        check_readings(ledger, IDS)
    ledger.stored[IDS[0]] += 1
    ledger.inserted_rows += 1
    with pytest.raises(AssertionError, match="stored more than once"):
        check_readings(ledger, IDS)


def test_alarm_checks_fail_on_a_lost_clear_and_on_nothing_to_check():
    events = [{"event_id": "a", "rule": "r", "device_id": "d", "metric": "m", "transition": "raised", "count": 1,
               "ts_ms": 10},
              {"event_id": "b", "rule": "r", "device_id": "d", "metric": "m", "transition": "cleared", "count": 1,
               "ts_ms": 20}]
    check_alarm_events(events)
    with pytest.raises(AssertionError, match="stored more than once"):
        check_alarm_events(events + events[:1])
    with pytest.raises(AssertionError, match="have a gap"):
        check_alarm_events(events + [{**events[0], "event_id": "c", "transition": "reraised", "count": 3}])
    with pytest.raises(AssertionError, match="no labelled anomaly qualifies"):
        check_anomalies_alerted([], events, 10_000)
    label = {"device_id": "d", "metric": "m", "start_ms": 5, "kind": "stuck"}
    check_anomalies_alerted([label], events, 10)
    with pytest.raises(AssertionError, match="not alerted"):
        check_anomalies_alerted([{**label, "metric": "other"}], events, 10)
