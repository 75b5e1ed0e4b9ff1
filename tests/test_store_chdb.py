"""The full schema on chDB: migrations, TTLs, dedup, the sink's read-only SQL endpoint, reports."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from aimass.core.clickhouse import ChdbStore, HttpReader, QueryServer, StoreError, check_read_only
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.procs import free_port
from aimass.query import REPORTS, format_table, run_report
from aimass.core import contract, tables
from tests.fixtures_store import chdb_config, chdb_run_dir, counts, insert, readings, seed_report_data  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path, chdb_run_dir) -> ChdbStore:  # noqa: F811
    cfg = chdb_config(Config(), chdb_run_dir)
    s = ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)
    migrate(s, cfg)
    s.cfg = cfg
    return s


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


def test_committed_schema_sql_is_what_the_specs_generate():
    for dialect, name in ((tables.MODERN, "schema.sql"), (tables.LEGACY, "schema-legacy.sql")):
        committed = (REPO_ROOT / "deploy" / "clickhouse" / name).read_text()
        assert committed == tables.schema_sql("aimass", dialect), f"regenerate with `aimass db sql > {name}`"


def test_a_second_process_on_the_same_chdb_dir_gets_a_clear_error(store):
    """This process holds the store open (as the sink does): another one is told what to do."""
    env = {**os.environ, "AIMASS_RUN_DIR": str(store.cfg.run_dir), "AIMASS_CLICKHOUSE_QUERY_PORT": "0"}
    out = subprocess.run([sys.executable, "-m", "aimass.cli", "db", "migrate"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 1
    assert "chDB allows one process per data dir" in out.stderr and "Traceback" not in out.stderr
