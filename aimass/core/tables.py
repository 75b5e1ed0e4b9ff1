"""The ClickHouse schema, defined once: one table per stored contract topic, plus rollups.

Columns are derived from the contract's Arrow schemas (``aimass/core/contract.py``):
int64 ``X_ms`` fields become ``DateTime64(3, 'UTC')`` columns named ``X_at`` (``ts_ms`` -> ``ts``),
strings become ``LowCardinality(String)`` unless free text, and every column gets a codec.
Tables are ``ReplacingMergeTree`` ordered by the row identity (so a row the sink stores
twice is one row in ``FINAL`` queries), partitioned by day, with a TTL per table.
Materialized views keep 1-minute and 1-hour rollups in ``AggregatingMergeTree`` tables.

Two dialects render the same specs: ``modern`` (chDB and ClickHouse >= 22.3) and
``legacy`` (old servers such as Debian's 18.16: no DateTime64, codecs, TTL or
LowCardinality, so time columns are stored as Int64 milliseconds with a DateTime ALIAS).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from aimass.core import contract
from aimass.core.config import MAX_TTL_DAYS

MODERN = "modern"
LEGACY = "legacy"

# Free-text or near-unique strings: plain String, LowCardinality would only cost memory.
FREE_TEXT = frozenset({"detail", "message", "labels_json", "event_id", "notification_id", "error", "mqtt_topic"})


def column_name(field_name: str) -> str:
    """ClickHouse name of a contract field: ``ts_ms`` -> ``ts``, ``X_ms`` -> ``X_at``."""
    if field_name == "ts_ms":
        return "ts"
    if field_name.endswith("_ms"):
        return field_name[:-3] + "_at"
    return field_name


def is_time_field(f: pa.Field) -> bool:
    return f.name.endswith("_ms") and pa.types.is_int64(f.type)


@dataclass(frozen=True)
class Column:
    """One ClickHouse column: name, modern type, codec, and the contract field it comes from."""

    name: str
    type: str
    codec: str = ""
    source: str = ""      # contract field name; "" for columns the sink or the server fills
    default: str = ""     # DEFAULT expression (modern dialect)
    legacy_default: str = ""

    @property
    def is_time(self) -> bool:
        return self.type.startswith("DateTime64")


def column_for(f: pa.Field) -> Column:
    """The ClickHouse column for one contract field."""
    t = f.type
    if is_time_field(f):
        return Column(column_name(f.name), "DateTime64(3, 'UTC')", "CODEC(Delta, ZSTD(1))", f.name)
    if pa.types.is_string(t):
        typ = "String" if f.name in FREE_TEXT else "LowCardinality(String)"
        return Column(f.name, typ, "CODEC(ZSTD(1))", f.name)
    if pa.types.is_binary(t):
        return Column(f.name, "String", "CODEC(ZSTD(3))", f.name)
    if pa.types.is_float64(t):
        return Column(f.name, "Float64", "CODEC(Gorilla, ZSTD(1))", f.name)
    if pa.types.is_boolean(t):
        return Column(f.name, "Bool", "", f.name)
    if pa.types.is_integer(t):
        return Column(f.name, {8: "Int8", 16: "Int16", 32: "Int32", 64: "Int64"}[t.bit_width],
                      "CODEC(T64, ZSTD(1))", f.name)
    raise TypeError(f"no ClickHouse column type for contract field {f.name}: {t}")


INSERTED_AT = Column("inserted_at", "DateTime64(3, 'UTC')", "CODEC(Delta, ZSTD(1))",
                     default="now64(3)", legacy_default="now()")
# Added to tables without a natural row identity: which topic a row came from, and a hash
# of its Kafka coordinates (topic, partition, offset, row) that is the same on every re-read.
SOURCE_TOPIC = Column("topic", "LowCardinality(String)", "CODEC(ZSTD(1))")
ROW_ID = Column("row_id", "UInt64", "")


@dataclass(frozen=True)
class TableSpec:
    """A stored table: its contract schema, source topics, time column and identity."""

    name: str
    schema: pa.Schema
    topics: tuple[contract.Topic, ...]
    time_field: str                 # contract field used for partitions, TTL and Grafana time filters
    identity: tuple[str, ...]       # contract fields (or row_id) identifying a row: the ORDER BY key
    with_row_id: bool = False

    @property
    def columns(self) -> list[Column]:
        cols = [column_for(f) for f in self.schema]
        if self.with_row_id:
            cols += [SOURCE_TOPIC, ROW_ID]
        return cols + [INSERTED_AT]

    @property
    def time_column(self) -> str:
        return column_name(self.time_field)

    @property
    def order_by(self) -> list[str]:
        return [column_name(f) for f in self.identity]


@dataclass(frozen=True)
class Aggregate:
    """One rollup column: ``func(expr)`` kept as an aggregate state of ``arg_type``."""

    name: str
    func: str               # count | sum | min | max
    expr: str = ""          # over the source table's columns
    arg_type: str = ""

    @property
    def type(self) -> str:
        return f"AggregateFunction({self.func}, {self.arg_type})" if self.expr else f"AggregateFunction({self.func})"


@dataclass(frozen=True)
class Rollup:
    """1-minute and 1-hour aggregates of a table, grouped by ``keys``, in ``<name>_1m``/``<name>_1h``."""

    name: str
    source: str
    keys: tuple[str, ...]
    aggregates: tuple[Aggregate, ...]
    intervals: tuple[tuple[str, str], ...] = field(default=(("1m", "toStartOfMinute"), ("1h", "toStartOfHour")))

    def tables(self) -> list[tuple[str, str]]:
        """(table name, bucket function) per interval."""
        return [(f"{self.name}_{suffix}", fn) for suffix, fn in self.intervals]


TABLES: tuple[TableSpec, ...] = (
    TableSpec("readings", contract.READINGS, (contract.CLEAN,), "ts_ms", ("tenant", "device_id", "metric", "ts_ms")),
    TableSpec("rejects", contract.REJECTS, (contract.DEAD_LETTER, contract.LATE), "rejected_ms",
              ("stage", "reason", "rejected_ms", "row_id"), with_row_id=True),
    TableSpec("windows", contract.WINDOWS, (contract.WINDOW_ROWS,), "window_end_ms",
              ("tenant", "device_id", "metric", "window_s", "window_end_ms")),
    TableSpec("predictions", contract.PREDICTIONS, (contract.PREDICTION_ROWS,), "target_end_ms",
              ("tenant", "device_id", "metric", "window_s", "target_end_ms")),
    TableSpec("outcomes", contract.OUTCOMES, (contract.OUTCOME_ROWS,), "target_end_ms",
              ("tenant", "device_id", "metric", "window_s", "target_end_ms")),
    TableSpec("labels", contract.LABELS, (contract.LABEL_ROWS,), "start_ms",
              ("tenant", "device_id", "metric", "start_ms", "kind")),
    TableSpec("alerts", contract.ALERTS, (contract.ALERT_EVENTS,), "event_ms", ("rule", "event_ms", "event_id")),
    TableSpec("drift", contract.DRIFT, (contract.DRIFT_EVENTS,), "detected_ms",
              ("tenant", "device_id", "metric", "window_s", "detector", "window_end_ms")),
    TableSpec("quality", contract.QUALITY, (contract.QUALITY_ROWS,), "computed_ms", ("rule", "model", "computed_ms")),
    TableSpec("notifications", contract.NOTIFICATIONS, (contract.NOTIFICATION_ROWS,), "created_ms",
              ("notification_id", "status", "finished_ms")),
)

ROLLUPS: tuple[Rollup, ...] = (
    Rollup("readings", "readings", ("tenant", "device_id", "metric"), (
        Aggregate("n", "count"),
        Aggregate("value_sum", "sum", "value", "Float64"),
        Aggregate("value_min", "min", "value", "Float64"),
        Aggregate("value_max", "max", "value", "Float64"),
    )),
    Rollup("rejects", "rejects", ("stage", "reason"), (Aggregate("n", "count"),)),
    Rollup("predictions", "predictions", ("forecaster_model", "metric"), (
        Aggregate("n", "count"),
        Aggregate("degraded_n", "sum", "toUInt64(degraded)", "UInt64"),
        Aggregate("anomaly_max", "max", "anomaly", "Float64"),
    )),
    Rollup("outcomes", "outcomes", ("forecaster_model", "metric"), (
        Aggregate("n", "count"),
        Aggregate("in_band_n", "sum", "toUInt64(in_band)", "UInt64"),
        Aggregate("abs_residual_sum", "sum", "abs(residual)", "Float64"),
        Aggregate("sq_residual_sum", "sum", "residual * residual", "Float64"),
    )),
)

TABLE_BY_NAME: dict[str, TableSpec] = {t.name: t for t in TABLES}


def table_for_topic() -> dict[str, TableSpec]:
    """Contract topic suffix -> the table its records are stored in."""
    return {topic.suffix: spec for spec in TABLES for topic in spec.topics}


def stored_topics() -> list[contract.Topic]:
    """Every topic the sink consumes."""
    return [topic for spec in TABLES for topic in spec.topics]


def rollup_table_names() -> list[str]:
    return [name for r in ROLLUPS for name, _ in r.tables()]


# --- rendering ------------------------------------------------------------------------

def parse_ttl_overrides(text: str) -> dict[str, int]:
    """``"readings=7,readings_1h=365"`` -> {"readings": 7, "readings_1h": 365}; ValueError names the bad item."""
    known = {t.name for t in TABLES} | set(rollup_table_names())
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, days = item.partition("=")
        if (not sep or name.strip() not in known or not days.strip().isdigit()
                or not 0 <= int(days) <= MAX_TTL_DAYS):
            raise ValueError(f"{item!r}: expected TABLE=DAYS with TABLE one of {', '.join(sorted(known))} "
                             f"and DAYS 0..{MAX_TTL_DAYS} (0 = keep forever)")
        out[name.strip()] = int(days)
    return out


def _legacy_type(col: Column) -> str:
    t = col.type.replace("LowCardinality(String)", "String")
    return {"Bool": "UInt8"}.get(t, t)


def time_expr(column: str, dialect: str) -> str:
    """SQL for a time column as a DateTime value in ``dialect`` (legacy stores Int64 ms)."""
    return column if dialect == MODERN else f"toDateTime(intDiv({legacy_ms_name(column)}, 1000), 'UTC')"


def legacy_ms_name(column: str) -> str:
    """The Int64 millisecond column that stands for time column ``column`` in the legacy dialect."""
    return "ts_ms" if column == "ts" else column[:-3] + "_ms" if column.endswith("_at") else column + "_ms"


def column_ddl(col: Column, dialect: str) -> list[str]:
    """Column definitions (legacy: a time column is an Int64 ms column plus a DateTime ALIAS)."""
    if dialect == MODERN:
        default = f" DEFAULT {col.default}" if col.default else ""
        return [f"`{col.name}` {col.type}{default} {col.codec}".rstrip()]
    if col.is_time and not col.default:
        ms = legacy_ms_name(col.name)
        return [f"`{ms}` Int64", f"`{col.name}` DateTime('UTC') ALIAS {time_expr(col.name, LEGACY)}"]
    if col.is_time:
        return [f"`{col.name}` DateTime('UTC') DEFAULT {col.legacy_default}"]
    return [f"`{col.name}` {_legacy_type(col)}"]


def stored_columns(spec: TableSpec, dialect: str) -> list[tuple[str, str]]:
    """(name, type) of the columns a row carries on insert, in order (no DEFAULT/ALIAS columns)."""
    out = []
    for col in spec.columns:
        if col.default:
            continue
        if dialect == LEGACY and col.is_time:
            out.append((legacy_ms_name(col.name), "Int64"))
        else:
            out.append((col.name, col.type if dialect == MODERN else _legacy_type(col)))
    return out


def _key(spec: TableSpec, dialect: str) -> str:
    cols = [legacy_ms_name(name) if dialect == LEGACY and column_for_name(spec, name).is_time else name
            for name in spec.order_by]
    return ", ".join(f"`{c}`" for c in cols)


def column_for_name(spec: TableSpec, name: str) -> Column:
    return next(c for c in spec.columns if c.name == name)


def _settings(dialect: str) -> str:
    if dialect == LEGACY:
        return ""
    # Dedup window: a batch re-inserted with the same insert_deduplication_token is skipped.
    return "\nSETTINGS non_replicated_deduplication_window = 1000, old_parts_lifetime = 60"


def table_ddl(spec: TableSpec, database: str, dialect: str, ttl_days: int) -> str:
    """CREATE TABLE IF NOT EXISTS for one stored table."""
    cols = ",\n  ".join(d for c in spec.columns for d in column_ddl(c, dialect))
    t = time_expr(spec.time_column, dialect)
    ttl = f"\nTTL toDateTime({t}) + INTERVAL {ttl_days} DAY" if dialect == MODERN and ttl_days else ""
    return (f"CREATE TABLE IF NOT EXISTS `{database}`.`{spec.name}` (\n  {cols}\n)\n"
            f"ENGINE = ReplacingMergeTree()\nPARTITION BY toDate({t})\nORDER BY ({_key(spec, dialect)}){ttl}"
            f"{_settings(dialect)}")


def rollup_ddl(rollup: Rollup, database: str, dialect: str, ttl_days: dict[str, int]) -> list[str]:
    """CREATE TABLE + CREATE MATERIALIZED VIEW for each interval of a rollup."""
    source = TABLE_BY_NAME[rollup.source]
    key_cols = [column_for_name(source, k) for k in rollup.keys]
    statements = []
    for table, bucket_fn in rollup.tables():
        cols = [f"`{c.name}` {c.type if dialect == MODERN else _legacy_type(c)}" for c in key_cols]
        cols.append("`bucket` DateTime('UTC')")
        cols += [f"`{a.name}` {a.type}" for a in rollup.aggregates]
        keys = ", ".join(f"`{k}`" for k in rollup.keys)
        ttl = f"\nTTL bucket + INTERVAL {ttl_days[table]} DAY" if dialect == MODERN and ttl_days[table] else ""
        statements.append(
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{table}` (\n  " + ",\n  ".join(cols) + "\n)\n"
            f"ENGINE = AggregatingMergeTree()\nPARTITION BY toDate(bucket)\nORDER BY ({keys}, bucket){ttl}"
            f"{_settings(dialect)}")
        states = ", ".join(f"{a.func}State({a.expr}) AS `{a.name}`" for a in rollup.aggregates)
        statements.append(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{database}`.`{table}_mv` TO `{database}`.`{table}` AS\n"
            f"SELECT {keys}, {bucket_fn}({time_expr(source.time_column, dialect)}) AS bucket, {states}\n"
            f"FROM `{database}`.`{source.name}` GROUP BY {keys}, bucket")
    return statements


def ttl_for(name: str, default_days: int, overrides: dict[str, int]) -> int:
    return overrides.get(name, default_days)


def schema_ddl(database: str, dialect: str = MODERN, ttl_days: int = 30, overrides: dict[str, int] | None = None
               ) -> list[str]:
    """Every statement that creates the schema, in order (idempotent: IF NOT EXISTS)."""
    overrides = overrides or {}
    statements = [f"CREATE DATABASE IF NOT EXISTS `{database}`"]
    statements += [table_ddl(t, database, dialect, ttl_for(t.name, ttl_days, overrides)) for t in TABLES]
    ttls = {name: ttl_for(name, ttl_days, overrides) for name in rollup_table_names()}
    for r in ROLLUPS:
        statements += rollup_ddl(r, database, dialect, ttls)
    return statements


def schema_sql(database: str = "aimass", dialect: str = MODERN, ttl_days: int = 30) -> str:
    """The whole schema as one SQL script (committed under deploy/clickhouse/)."""
    header = (f"-- AI Mass ClickHouse schema ({dialect} dialect), generated from aimass/core/tables.py by "
              f"`aimass db sql`; do not edit.\n")
    return header + "".join(f"\n{s};\n" for s in schema_ddl(database, dialect, ttl_days))
