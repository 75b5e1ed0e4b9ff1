"""Per-table flushing (readings every flush_ms, the other tables side_flush_factor times later), and
blocks pre-sorted by the table identity."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from aimass.agents.sink import Batch, Record, Sink, identity_order, to_store_table
from aimass.core.clickhouse import ChdbStore
from aimass.core import contract, tables
from tests.fixtures_store import (Running, chdb_config, chdb_run_dir, committed, counts,  # noqa: F401
                                  produce, readings, sample_tables, sink_on, wait_for)

AGES = {"readings": 1.0, "windows": 5.0, "rejects": 5.0}


def record(topic: contract.Topic, offset: int, rows: pa.Table, partition: int = 0) -> Record:
    return Record(topic.suffix, partition, offset, b"", rows)


def batch_of_readings_and_windows() -> Batch:
    batch = Batch()
    windows = sample_tables(0, n=3)[contract.WINDOW_ROWS]
    batch.add(record(contract.CLEAN, 4, readings(10)))
    batch.add(record(contract.WINDOW_ROWS, 7, windows))
    batch.add(record(contract.CLEAN, 5, readings(20)))
    batch.add_undecodable(record(contract.DEAD_LETTER, 2, contract.empty(contract.REJECTS)), "not arrow")
    return batch


def test_each_table_is_due_by_its_own_age_or_by_rows():
    batch = batch_of_readings_and_windows()
    t0 = max(batch.started.values())
    assert batch.table_rows == {"readings": 30, "windows": 3, "rejects": 0} and batch.rows == 33
    assert batch.due(t0 + 0.5, 1000, AGES) == set()
    assert batch.due(t0 + 1.0, 1000, AGES) == {"readings"}
    assert batch.due(t0 + 4.9, 1000, AGES) == {"readings"}
    assert batch.due(t0 + 5.0, 1000, AGES) == {"readings", "windows", "rejects"}
    assert batch.due(t0 - 0.5, 30, AGES) == {"readings"}  # full before its time  # full before its time


def test_split_takes_whole_tables_and_keeps_the_rest_with_its_age():
    batch = batch_of_readings_and_windows()
    ready, rest = batch.split({"readings"})
    assert [r.offset for r in ready.records] == [4, 5] and not ready.undecodable and ready.rows == 30
    assert ready.manifest("b").ranges == {("telemetry.clean", 0): (4, 5)}  # commits only what it stores
    assert [r.offset for r in rest.records] == [7] and [r.offset for r, _ in rest.undecodable] == [2]
    assert rest.rows == 3 and rest.started == {t: batch.started[t] for t in ("windows", "rejects")}
    assert set(rest.manifest("c").ranges) == {("windows", 0), ("deadletter", 0)}


@pytest.mark.integration
def test_readings_are_stored_and_committed_while_side_tables_wait_their_longer_age(cfg, chdb_run_dir):  # noqa: F811
    sink_cfg = chdb_config(cfg, chdb_run_dir)
    sink_cfg.clickhouse.side_flush_factor = 300  # 60 s at flush_ms 200: only the stop flushes the windows
    windows = sample_tables(1, n=25)[contract.WINDOW_ROWS]
    produce(sink_cfg, [(contract.CLEAN, readings(50, device="dev-a")), (contract.WINDOW_ROWS, windows),
                      (contract.CLEAN, readings(70, device="dev-b"))])
    sink: Sink = sink_on(sink_cfg, ChdbStore(sink_cfg.run_dir / "chdb", sink_cfg.clickhouse.database))
    db = sink_cfg.clickhouse.database
    with Running(sink):
        wait_for(lambda: committed(sink_cfg, contract.CLEAN) == 2 or None, 30, "readings committed")
        stored = counts(sink.store, db)
        assert stored["readings"] == 120 and stored["windows"] == 0
        assert committed(sink_cfg, contract.WINDOW_ROWS) == 0 and sink.batch.table_rows == {"windows": 25}
    assert counts(sink.store, db)["windows"] == 25  # stopping flushes and commits what is buffered
    assert committed(sink_cfg, contract.WINDOW_ROWS) == 1


def test_identity_order_sorts_like_arrow_and_gives_up_on_other_keys():
    rng = np.random.default_rng(3)
    n = 2000
    data = pa.table({
        "tenant": rng.choice(["globex", "acme", "Ümlaut"], n), "device_id": rng.choice([f"d-{i}" for i in range(90)], n),
        "metric": rng.choice(["temp", "hum", "power", ""], n), "ts_ms": rng.integers(0, 10**9, n) + 1_700_000_000_000,
        "value": rng.normal(size=n), "unit": ["x"] * n, "received_ms": np.zeros(n, np.int64),
    }, schema=contract.READINGS)
    order = identity_order(data, ("tenant", "device_id", "metric", "ts_ms"))
    keys = [(k, "ascending") for k in ("tenant", "device_id", "metric", "ts_ms")]
    assert data.take(order).select([k for k, _ in keys]).equals(data.sort_by(keys).select([k for k, _ in keys]))
    assert identity_order(data, ("tenant", "value")) is None          # last key not int64
    assert identity_order(data, ("stage", "row_id")) is None          # fields not in the rows
    wide = data.set_column(3, "ts_ms", pa.array(np.arange(n, dtype=np.int64) * 2**22))
    assert identity_order(wide, ("tenant", "ts_ms")) is None          # time span beyond 32 bits


def test_store_table_sorted_by_identity_holds_the_same_rows():
    spec = tables.TABLE_BY_NAME["readings"]
    records = [Record("telemetry.clean", 0, i, b"", readings(30, device=f"dev-{9 - i}")) for i in range(3)]
    plain = to_store_table(spec, records, tables.MODERN)
    ordered = to_store_table(spec, records, tables.MODERN, sort=True)
    assert ordered.column("device_id").to_pylist() == ["dev-7"] * 30 + ["dev-8"] * 30 + ["dev-9"] * 30
    assert ordered.sort_by([("device_id", "ascending"), ("ts", "ascending")]).equals(
        plain.sort_by([("device_id", "ascending"), ("ts", "ascending")]))
