"""The full schema on chDB: migrations, TTLs, dedup, the sink's read-only SQL endpoint, reports."""
from __future__ import annotations

import argparse
import json
import re
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aimass.core.clickhouse import ChdbStore, HttpReader, QueryServer, StoreError
from aimass.core.config import MAX_TTL_DAYS, Config, ConfigError, load_config
from aimass.core.db import migrate
from aimass.core.procs import free_port
from aimass.demo import json_safe, summarize
from aimass.query import REPORTS, configure, format_table, readable_times, run_report, top_anomalous_sql
from aimass.core import contract, tables
from tests.fixtures_store import (NOW_MS, _fill, chdb_config, chdb_run_dir, counts, insert,  # noqa: F401
                                  readings, seed_report_data)

REPO_ROOT = Path(__file__).resolve().parent.parent
ISO_UTC = r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


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


def test_no_ttl_and_the_longest_ttl_keep_history_of_any_age(store):
    """TTL expiry is a DateTime (it ends in 2106): the longest TTL allowed must not wrap around and
    expire rows at once (36,500 days did: 2013 + 100 years read as 1977); 0 means no TTL at all."""
    cfg = store.cfg
    for days in (MAX_TTL_DAYS, 0):
        s = ChdbStore(cfg.run_dir / "chdb", f"{store.database}_{days}")
        cfg.clickhouse.database, cfg.clickhouse.ttl_days = s.database, days
        migrate(s, cfg)
        for t0 in (631_152_000_000, 1_367_366_400_000, NOW_MS - 60_000):     # 1990, 2013, now
            insert(s, contract.CLEAN, readings(3, device=f"d{t0}", start_ms=t0))
        s.execute(f"OPTIMIZE TABLE `{s.database}`.readings FINAL")             # applies the TTL
        assert counts(s, s.database)["readings"] == 9, days
    with pytest.raises(ConfigError, match="ttl_days"):
        load_config(env={"AIMASS_CLICKHOUSE_TTL_DAYS": str(MAX_TTL_DAYS + 1)})


def test_migrate_removes_and_restores_a_ttl(store):
    cfg = store.cfg

    def readings_ttl() -> str:
        engine = store.query(f"SELECT engine_full FROM system.tables WHERE database = '{store.database}' "
                             f"AND name = 'readings'").column(0)[0].as_py()
        return engine.split(" TTL ")[1].split(" SETTINGS")[0] if " TTL " in engine else ""

    assert "toIntervalDay(30)" in readings_ttl()
    cfg.clickhouse.ttl_days = 0
    assert "TTL of readings: 30 -> none days" in migrate(store, cfg) and readings_ttl() == ""
    cfg.clickhouse.ttl_days = 30
    assert "TTL of readings: none -> 30 days" in migrate(store, cfg) and "toIntervalDay(30)" in readings_ttl()


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
        with pytest.raises(StoreError, match="only SELECT, SHOW, DESCRIBE and EXPLAIN are accepted"):
            reader.query(f"DROP TABLE `{store.database}`.readings")
        with pytest.raises(StoreError, match="Multi-statements are not allowed"):
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


@pytest.mark.parametrize("name", list(REPORTS))
def test_every_report_runs_and_plots(store, name, tmp_path):
    """Through the sink's query port, as `aimass query` reads while the stack runs (read-only, no SETTINGS)."""
    seed_report_data(store)
    args = argparse.Namespace(report=name, device="wild", hours=1.0, minutes=30.0, limit=20, tenant=None,
                              metric=None, window_s=10)
    server = QueryServer(store, free_port(), token="t").start()
    try:
        table = run_report(HttpReader(server.port, store.database, token="t"), args)
    finally:
        server.stop()
    assert table.num_rows > 0, f"{name} returned no rows"
    assert "no rows" not in format_table(table)
    png = tmp_path / f"{name}.png"
    ticks = REPORTS[name].plot(table, str(png), args)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Times a person reads are UTC times: typed as such, ISO in the table, dates on a time axis.
    time_columns = [c for c in table.column_names if c in ("latest", "last_insert", "bucket", "last_seen",
                                                           "first_event", "last_event", "minute")]
    assert all(pa.types.is_timestamp(table.schema.field(c).type) for c in time_columns), table.schema
    text = format_table(table)
    iso = readable_times(table)
    for c in time_columns:
        shown = [v for v in iso.column(c).to_pylist() if v is not None]
        assert shown and all(re.fullmatch(ISO_UTC, v) and v in text for v in shown), (c, shown)
    assert not re.search(r"\b1[6-9]\d{8}\b", text), text  # no epoch seconds or milliseconds
    if name in ("device", "ingest"):
        assert ticks and all(re.fullmatch(r"[\d:\-A-Za-z ]+", t) for t in ticks) and any(":" in t for t in ticks), ticks
    if name == "top-anomalous":
        devices = table.column("device_id").to_pylist()
        assert devices.index("wild") < devices.index("calm")
    if name == "device":
        row = table.to_pylist()[5]
        assert row["readings"] == 10 and row["forecast"] == 20.0 and row["band_high"] == 22.0
    if name == "summary":
        assert dict(zip(table.column("table").to_pylist(), table.column("rows").to_pylist()))["readings"] == 1280


@pytest.mark.parametrize("name, time_column", [("device", "bucket"), ("ingest", "minute")])
def test_time_series_reports_show_their_newest_limit_rows_in_time_order(store, name, time_column):
    seed_report_data(store)
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args([name, "wild"])   # no --limit: every row of the time range
    everything = run_report(store, args).column(time_column).to_pylist()
    newest = run_report(store, parser.parse_args([name, "wild", "--limit", "3"])).column(time_column).to_pylist()
    assert len(everything) > 3 and newest == everything[-3:]
    assert "LIMIT 20" in top_anomalous_sql(parser.parse_args(["top-anomalous"]), "db")   # ranked reports: 20


def test_csv_and_json_show_iso_utc_times_and_epoch_milliseconds_only_when_asked():
    table = pa.table({"minute": pa.array([1_796_312_880_123, None], pa.timestamp("ms", "UTC")), "readings": [5, 6]})
    assert readable_times(table).to_pylist() == [{"minute": "2026-12-03T15:48:00.123Z", "readings": 5},
                                                 {"minute": None, "readings": 6}]
    assert readable_times(table, epoch=True).column("minute").to_pylist() == [1_796_312_880_123, None]
    chdb_seconds = pa.table({"t": pa.array([1_796_312_880], pa.timestamp("s"))})   # no zone: read as UTC
    assert readable_times(chdb_seconds).column("t").to_pylist() == ["2026-12-03T15:48:00.000Z"]


def test_alerts_report_keeps_the_raising_message_next_to_the_latest(store):
    """A cleared alarm still says why it was raised (the clear event's own text says all is well)."""
    events = {"tenant": ["acme"] * 2, "device_id": ["pump-1"] * 2, "metric": ["temp"] * 2, "rule": ["high"] * 2,
              "severity": ["warning"] * 2, "event_id": ["e-raised", "e-cleared"],
              "event_ms": [NOW_MS - 60_000, NOW_MS - 30_000], "transition": ["raised", "cleared"],
              "state": ["active_unack", "cleared_unack"], "message": ["anomaly score 0.93", "anomaly score 0.01"]}
    insert(store, contract.ALERT_EVENTS, _fill(contract.ALERTS, 2, 60, events))
    args = argparse.Namespace(report="alerts", device=None, hours=1.0, minutes=30.0, limit=20, tenant="acme",
                              metric=None, window_s=10)
    row, = run_report(store, args).to_pylist()
    assert (row["raised_message"], row["latest_message"], row["transitions"]) == \
        ("anomaly score 0.93", "anomaly score 0.01", 2)


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


def test_aimass_query_into_a_closed_pipe_exits_quietly_as_sigpipe_would():
    """`aimass query ... | head`: the reader is gone before anything is written (as head after its lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "aimass.cli", "query", "--list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    proc.stdout.close()   # before the child has started Python: every write it makes hits a closed pipe
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (141, "")   # 128 + SIGPIPE, as `cat big | head` leaves cat; no traceback


def test_a_broken_pipe_other_than_stdout_is_not_hidden(monkeypatch):
    import aimass.query
    from aimass.cli import main

    def lost_peer(args, cfg):
        raise BrokenPipeError("a socket's peer went away")
    monkeypatch.setattr(aimass.query, "run", lost_peer)
    with pytest.raises(BrokenPipeError, match="socket"):
        main(["query", "summary"])


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


def test_demo_summary_reads_the_run_back_and_writes_it_as_json(store, tmp_path):
    """The demo's summary from the store: the detection table has a row per rule and per model,
    and the same figures land in <run dir>/demo-summary.json."""
    seed_report_data(store)
    labels = tmp_path / "labels.parquet"   # device wild's anomaly score rises over 0.8 in the last minutes
    now_ms = int(time.time() * 1000)
    pq.write_table(pa.table({"tenant": ["acme"], "device_id": ["wild"], "metric": ["temp"],
                             "start_ms": [now_ms - 1_200_000], "end_ms": [now_ms], "kind": ["drift"]}), labels)
    receiver = SimpleNamespace(events=[], notifications=[], bad_signatures=0)
    lines = []
    summary = summarize(store.cfg, "acme", {"readings": 1200, "messages": 1200}, labels, receiver, lines.append)
    path = store.cfg.run_dir / "demo-summary.json"
    try:
        assert json.loads(path.read_text()) == json.loads(json.dumps(json_safe(summary)))
    finally:
        path.unlink()
    rows = {(r["rule"], r["model"]): r for r in summary["detection"]}
    assert rows[("", "iforest:1")]["true_positives"] == 1 and rows[("band", "")]["true_positives"] == 1
    assert summary["stored"] == 1280 and summary["predictions"] >= 120   # the seeded readings and predictions
    assert not any("nan" in line for line in lines), lines      # nothing measured shows "-", never "nans"
    table = lines[lines.index("") + 1:]
    assert table[0].split()[:3] == ["detection", "precision", "recall"]
    assert {line.split("  ")[0] for line in table[1:4]} == {"model iforest:1", "rule band", "rule (any rule)"}
