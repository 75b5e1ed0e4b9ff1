"""Pure logic of the store: schema derivation, TTL parsing, URL parsing, error classes, journal, row ids."""
from __future__ import annotations

import pyarrow as pa
import pytest

from aimass.agents.sink import Batch, Manifest, Record, dead_letter_rows, row_ids, to_store_table
from aimass.core.clickhouse import StoreError, classify, fill_nulls, parse_url
from aimass.core.config import MAX_TTL_DAYS, Config, ConfigError
from aimass.core.db import ttl_settings
from aimass.core.procs import StackError
from aimass.core import contract, tables


def test_every_stored_topic_maps_to_one_table_and_every_contract_field_to_a_column():
    mapping = tables.table_for_topic()
    assert mapping[contract.CLEAN.suffix].name == "readings"
    assert mapping[contract.LATE.suffix].name == mapping[contract.DEAD_LETTER.suffix].name == "rejects"
    assert contract.RAW.suffix not in mapping  # raw readings are stored after cleaning only
    for spec in tables.TABLES:
        sources = [c.source for c in spec.columns if c.source]
        assert sources == spec.schema.names
        for name in spec.order_by:
            assert tables.column_for_name(spec, name)  # the identity is made of real columns


def test_time_fields_become_datetime64_and_strings_low_cardinality():
    cols = {c.name: c for c in tables.TABLE_BY_NAME["alerts"].columns}
    assert cols["event_at"].type == "DateTime64(3, 'UTC')" and cols["event_at"].source == "event_ms"
    assert cols["first_at"].type == "DateTime64(3, 'UTC')"
    assert cols["rule"].type == "LowCardinality(String)" and cols["message"].type == "String"
    assert cols["flapping"].type == "Bool" and cols["count"].type == "Int64"
    assert tables.column_name("ts_ms") == "ts"


def test_ttl_overrides_are_parsed_and_bad_ones_name_the_key():
    assert tables.parse_ttl_overrides(" readings=7, readings_1h=365 ") == {"readings": 7, "readings_1h": 365}
    assert tables.parse_ttl_overrides("alerts=0") == {"alerts": 0}                      # 0: keep forever
    for bad in ("readings", "nope=3", "readings=x", f"readings={MAX_TTL_DAYS + 1}"):
        with pytest.raises(ValueError):
            tables.parse_ttl_overrides(bad)
    cfg = Config()
    cfg.clickhouse.ttl_overrides = "windows=-1"
    with pytest.raises(ConfigError, match="clickhouse.ttl_overrides"):
        ttl_settings(cfg)


def test_url_parsing_takes_the_password_from_the_environment_value_when_absent():
    p = parse_url("clickhouse://writer@ch.example:9440/prod", "from-env")
    assert p == {"host": "ch.example", "port": 9440, "user": "writer", "password": "from-env", "database": "prod",
                 "secure": False}
    assert parse_url("clickhouses://u:p%40ss@h/", "env")["password"] == "p@ss"
    assert parse_url("clickhouses://u:p@h/")["secure"] is True
    with pytest.raises(StackError, match="clickhouse://user:password@host:9000/db"):
        parse_url("http://h:8123")


def test_errors_are_retryable_for_the_server_and_permanent_for_the_data():
    assert classify(ConnectionRefusedError("refused")).retryable
    assert classify(RuntimeError("Code: 252. DB::Exception: Too many parts (TOO_MANY_PARTS)")).retryable
    bad = classify(RuntimeError("Code: 53. DB::Exception: Type mismatch\nStack trace: ..."))
    assert not bad.retryable and bad.code == 53 and "Stack trace" not in str(bad)
    assert classify(StoreError("x", retryable=True)).retryable


def test_journal_manifest_round_trips_and_covers_each_partition_range():
    batch = Batch()
    for partition, offset in ((0, 5), (0, 9), (2, 3)):
        batch.add(Record("telemetry.clean", partition, offset, b"", contract.empty(contract.READINGS)))
    m = batch.manifest("b1")
    assert m.ranges == {("telemetry.clean", 0): (5, 9), ("telemetry.clean", 2): (3, 3)}
    assert Manifest.from_json(m.to_json()) == m


def test_row_ids_are_stable_per_record_and_distinct_across_records():
    a = row_ids("deadletter", 1, 42, 3)
    assert list(a) == list(row_ids("deadletter", 1, 42, 3))
    assert not set(a) & set(row_ids("deadletter", 1, 43, 3)) and len(set(a)) == 3


def test_store_table_converts_times_nulls_and_adds_row_ids():
    rejects = pa.table({f.name: pa.nulls(2, f.type) for f in contract.REJECTS}, schema=contract.REJECTS)
    rejects = rejects.set_column(rejects.schema.get_field_index("rejected_ms"), "rejected_ms",
                                 pa.array([1_700_000_000_123, 1_700_000_000_456], pa.int64()))
    spec = tables.TABLE_BY_NAME["rejects"]
    modern = to_store_table(spec, [Record("telemetry.late", 0, 7, b"", rejects)], tables.MODERN)
    assert modern.column_names == [n for n, _ in tables.stored_columns(spec, tables.MODERN)]
    assert modern.column("rejected_at").type == pa.timestamp("ms", tz="UTC")
    assert modern.column("reason").to_pylist() == ["", ""] and modern.column("topic").to_pylist() == ["telemetry.late"] * 2
    legacy = to_store_table(spec, [Record("telemetry.late", 0, 7, b"", rejects)], tables.LEGACY)
    assert legacy.column_names == [n for n, _ in tables.stored_columns(spec, tables.LEGACY)]
    assert legacy.column("rejected_ms").to_pylist() == [1_700_000_000_123, 1_700_000_000_456]
    assert fill_nulls(pa.table({"v": pa.array([None, 1.0])})).column("v").to_pylist()[1] == 1.0


def test_dead_letter_rows_keep_the_original_record_bytes():
    rec = Record("windows", 3, 11, b"\x00raw", contract.empty(contract.WINDOWS))
    rows = dead_letter_rows([rec], "insert_failed", ["boom"], 123)
    assert rows.schema.equals(contract.REJECTS)
    row = rows.to_pylist()[0]
    assert row["stage"] == "sink" and row["payload"] == b"\x00raw" and row["detail"] == "windows[3]@11: boom"
