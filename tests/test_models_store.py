"""`aimass train --from-store`: windows and labels read back from chDB and from a ClickHouse server."""
from __future__ import annotations

import time

import pyarrow as pa
import pytest

from aimass.agents.sink import Record, to_store_table
from aimass.core.clickhouse import open_store
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.models.cli import store_history
from aimass.core import contract, tables
from tests.fixtures_predict import synthetic_windows
from tests.fixtures_store import chdb_config, chdb_run_dir, clickhouse_server  # noqa: F401

pytestmark = pytest.mark.integration


def _history() -> tuple[pa.Table, pa.Table]:
    start = int(time.time() * 1000) // 1000 * 1000 - 3 * 3600 * 1000
    return synthetic_windows(4, 60, spike_every=17, t0_ms=start)


def _store_round_trip(cfg: Config) -> None:
    windows, labels = _history()
    other_size = windows.slice(0, 5).set_column(3, "window_s", pa.array([60] * 5, pa.int32()))
    old = windows.slice(0, 3).set_column(5, "window_end_ms", pa.array([1_000_000] * 3, pa.int64()))
    store = open_store(cfg)
    migrate(store, cfg)
    specs = {s.name: s for s in tables.TABLES}
    for name, rows in (("windows", pa.concat_tables([windows, other_size, old])), ("labels", labels)):
        store.insert(name, to_store_table(specs[name], [Record(name, 0, 0, b"", rows)], store.dialect))
    got_windows, got_labels = store_history(cfg, 10, hours=24)
    key = [("device_id", "ascending"), ("window_end_ms", "ascending")]
    assert got_windows.schema == contract.WINDOWS and got_labels.schema == contract.LABELS
    assert got_windows.sort_by(key).equals(windows.sort_by(key))  # only 10 s windows of the last 24 h
    assert got_labels.sort_by([("device_id", "ascending"), ("start_ms", "ascending")]).equals(
        labels.sort_by([("device_id", "ascending"), ("start_ms", "ascending")]))


def test_training_history_from_chdb(chdb_run_dir):  # noqa: F811
    _store_round_trip(chdb_config(Config(), chdb_run_dir))


def test_training_history_from_a_clickhouse_server(clickhouse_server, tmp_path, monkeypatch):  # noqa: F811
    cfg = Config()
    cfg.run.dir = str(tmp_path)
    cfg.clickhouse.url = f"clickhouse://aimass@127.0.0.1:{clickhouse_server.ports['tcp']}/"
    cfg.clickhouse.password_env = "AIMASS_TEST_CLICKHOUSE_PASSWORD"
    monkeypatch.setenv("AIMASS_TEST_CLICKHOUSE_PASSWORD", clickhouse_server.password)
    cfg.clickhouse.database = f"db_models_{int(time.time() * 1000)}"
    _store_round_trip(cfg)
