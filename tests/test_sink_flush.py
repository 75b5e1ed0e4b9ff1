"""Per-table flushing: readings every flush_ms, the other tables side_flush_factor times later."""
from __future__ import annotations

import pyarrow as pa
import pytest

from agents.sink import Batch, Record, Sink
from aimass.clickhouse import ChdbStore
from streams import contract
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
