"""The full schema on chDB: migrations, TTLs, dedup, the sink's read-only SQL endpoint, reports."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from agents.sink import Record, to_store_table
from aimass.clickhouse import ChdbStore, HttpReader, QueryServer, StoreError, check_read_only
from aimass.config import Config
from aimass.db import migrate
from aimass.procs import free_port
from aimass.query import REPORTS, format_table, run_report
from streams import contract, tables
from tests.fixtures_store import NOW_MS, chdb_config, chdb_run_dir, counts, readings, sample_tables  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path, chdb_run_dir) -> ChdbStore:  # noqa: F811
    cfg = chdb_config(Config(), chdb_run_dir)
    s = ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)
    migrate(s, cfg)
    s.cfg = cfg
    return s


def insert(store: ChdbStore, topic: contract.Topic, table: pa.Table, offset: int = 0, token: str = "") -> None:
    spec = tables.table_for_topic()[topic.suffix]
    store.insert(spec.name, to_store_table(spec, [Record(topic.suffix, 0, offset, b"", table)], store.dialect), token)


def test_migrate_is_idempotent_and_upgrades_columns_and_ttls(store):
    cfg = store.cfg
    assert migrate(store, cfg) == []
    store.execute(f"ALTER TABLE `{store.database}`.windows DROP COLUMN zscore")
    cfg.clickhouse.ttl_overrides = "readings=7,readings_1h=400"
    assert sorted(migrate(store, cfg)) == ["TTL of readings: 30 -> 7 days", "TTL of readings_1h: 30 -> 400 days",
                                           "added column windows.zscore"]
    assert migrate(store, cfg) == []
    engine = store.query(f"SELECT engine_full FROM system.tables WHERE database = '{store.database}' "
                         f"AND name = 'readings'").column(0)[0].as_py()
    assert "ReplacingMergeTree" in engine and "toIntervalDay(7)" in engine and "PARTITION BY toDate(ts)" in engine


def test_schema_types_codecs_and_rollups_are_modern(store):
    cols = store.query(f"SELECT table, name, type, compression_codec FROM system.columns "
                       f"WHERE database = '{store.database}'").to_pylist()
    by_name = {(c["table"], c["name"]): c for c in cols}
    assert by_name[("readings", "ts")]["type"] == "DateTime64(3, 'UTC')"
    assert by_name[("readings", "device_id")]["type"] == "LowCardinality(String)"
    assert by_name[("readings", "value")]["compression_codec"] == "CODEC(Gorilla(8), ZSTD(1))"
    assert by_name[("alerts", "message")]["type"] == "String"
    assert by_name[("readings_1m", "n")]["type"] == "AggregateFunction(count)"
    t = store.query(f"SELECT name, engine FROM system.tables WHERE database = '{store.database}'")
    engines = dict(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    assert engines["readings_1h"] == "AggregatingMergeTree" and engines["readings_1h_mv"] == "MaterializedView"
    assert set(tables.rollup_table_names()) <= set(engines)


def test_same_token_is_stored_once_and_final_hides_identity_duplicates(store):
    rows = readings(1000, device="tok")
    insert(store, contract.CLEAN, rows, token="batch-a-readings")
    insert(store, contract.CLEAN, rows, token="batch-a-readings")  # a retry of the same batch
    db = store.database
    assert counts(store, db, final=False)["readings"] == 1000
    assert store.query(f"SELECT countMerge(n) AS n FROM `{db}`.readings_1m").column("n")[0].as_py() == 1000
    insert(store, contract.CLEAN, rows, token="batch-b-readings")  # the same rows under another batch id
    assert counts(store, db)["readings"] == 1000  # FINAL: the row identity collapses them


def test_query_endpoint_serves_read_only_sql_with_a_token(store):
    insert(store, contract.CLEAN, readings(50, device="http"))
    server = QueryServer(store, free_port(), token="s3cret").start()
    try:
        reader = HttpReader(server.port, store.database, token="s3cret")
        assert reader.alive()
        assert reader.query(f"SELECT count() AS n FROM `{store.database}`.readings").column("n")[0].as_py() == 50
        with pytest.raises(StoreError, match="only one read-only statement"):
            reader.query(f"DROP TABLE `{store.database}`.readings")
        with pytest.raises(StoreError, match="only one read-only statement"):
            reader.query("SELECT 1; DROP TABLE x")
        with pytest.raises(StoreError, match="UNKNOWN_TABLE"):
            reader.query(f"SELECT * FROM `{store.database}`.nope")
        with pytest.raises(StoreError, match="bearer token"):
            HttpReader(server.port, store.database, token="wrong").query("SELECT 1")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
    finally:
        server.stop()
    assert counts(store, store.database)["readings"] == 50
    with pytest.raises(ValueError):
        check_read_only("SELECT 1 INTO OUTFILE '/tmp/x'")


def seed_report_data(store: ChdbStore) -> None:
    """Readings, windows, predictions, outcomes, rejects and alerts of two devices in the last minutes."""
    for batch in (sample_tables(1), sample_tables(2)):
        for i, (topic, table) in enumerate(batch.items()):
            insert(store, topic, table, offset=i)
    start = (NOW_MS - 600_000) // 10_000 * 10_000
    for device, level in (("calm", 0.1), ("wild", 0.9)):
        insert(store, contract.CLEAN, readings(600, device=device, start_ms=start, step_ms=1000))
        n = 60
        ends = start + 10_000 * (np.arange(n) + 1)
        preds = pa.table({f.name: [] for f in contract.PREDICTIONS}, schema=contract.PREDICTIONS).to_pydict()
        preds.update(tenant=["acme"] * n, device_id=[device] * n, metric=["temp"] * n, window_s=[10] * n,
                     window_end_ms=ends - 10_000, target_end_ms=ends, observed_mean=[20.0] * n,
                     forecast_triton=[20.0] * n, forecast_river=[20.0] * n, forecast=[20.0] * n,
                     band_low=[18.0] * n, band_high=[22.0] * n, anomaly_triton=[level] * n,
                     anomaly_river=[level] * n, anomaly=np.linspace(0, level, n), forecaster_model=["zscore:1"] * n,
                     anomaly_model=["iforest:1"] * n, degraded=[False] * n, max_received_ms=ends,
                     predicted_ms=ends - 9_000)
        insert(store, contract.PREDICTION_ROWS, pa.table(preds, schema=contract.PREDICTIONS))


@pytest.mark.parametrize("name", list(REPORTS))
def test_every_report_runs_and_plots(store, name, tmp_path):
    seed_report_data(store)
    args = argparse.Namespace(report=name, device="wild", hours=1.0, minutes=30.0, limit=20, tenant=None,
                              metric=None, window_s=10)
    table = run_report(store, args)
    assert table.num_rows > 0, f"{name} returned no rows"
    assert "no rows" not in format_table(table)
    png = tmp_path / f"{name}.png"
    REPORTS[name].plot(table, str(png), args)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "top-anomalous":
        devices = table.column("device_id").to_pylist()
        assert devices.index("wild") < devices.index("calm")
    if name == "device":
        row = table.to_pylist()[5]
        assert row["readings"] == 10 and row["forecast"] == 20.0 and row["band_high"] == 22.0
    if name == "summary":
        assert dict(zip(table.column("table").to_pylist(), table.column("rows").to_pylist()))["readings"] == 1280


def test_aimass_query_cli_opens_chdb_directly_when_no_sink_runs(tmp_path):
    """`aimass query` in a fresh process: no sink, so it opens <run dir>/chdb itself."""
    env = {**os.environ, "AIMASS_RUN_DIR": str(tmp_path), "AIMASS_CLICKHOUSE_QUERY_PORT": "0"}
    aimass = [sys.executable, "-m", "aimass.cli"]
    migrate_out = subprocess.run([*aimass, "db", "migrate"], env=env, capture_output=True, text=True, timeout=120,
                                 cwd=REPO_ROOT)
    assert migrate_out.returncode == 0, migrate_out.stderr
    out = subprocess.run([*aimass, "query", "summary", "--format", "csv", "--plot", str(tmp_path / "s.png")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("table,rows") and len(lines) == 1 + len(tables.TABLES)
    assert (tmp_path / "s.png").exists()
    listing = subprocess.run([*aimass, "query", "--list"], env=env, capture_output=True, text=True, timeout=60,
                             cwd=REPO_ROOT)
    assert listing.returncode == 0 and all(name in listing.stdout for name in REPORTS)
