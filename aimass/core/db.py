"""`aimass db`: create or upgrade the ClickHouse schema (idempotent), print it as SQL.

``migrate`` runs every ``CREATE ... IF NOT EXISTS`` from ``aimass/core/tables.py``, then brings
existing tables up to date: columns added to the contract are added to the table, and a
changed TTL (``clickhouse.ttl_days`` / ``clickhouse.ttl_overrides``) is applied. Running it
twice changes nothing the second time.
"""
from __future__ import annotations

import argparse
import re

from aimass.core.clickhouse import Store, open_store
from aimass.core.config import Config, ConfigError
from aimass.core import tables
from aimass.core.tables import MODERN


def ttl_settings(cfg: Config) -> dict[str, int]:
    try:
        return tables.parse_ttl_overrides(cfg.clickhouse.ttl_overrides)
    except ValueError as exc:
        raise ConfigError(f"config key clickhouse.ttl_overrides: {exc}") from None


def migrate(store: Store, cfg: Config) -> list[str]:
    """Create or upgrade the schema; returns what changed (empty when it was up to date)."""
    db = store.database
    overrides = ttl_settings(cfg)
    existing = _existing_tables(store, db)
    changes = []
    for statement in tables.schema_ddl(db, store.dialect, cfg.clickhouse.ttl_days, overrides):
        store.execute(statement)
        m = re.match(r"CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS `[^`]+`\.`([^`]+)`", statement)
        if m and m.group(1) not in existing:
            changes.append(f"created {db}.{m.group(1)}")
    columns = _existing_columns(store, db)
    for spec in tables.TABLES:
        for col in spec.columns:
            for ddl in tables.column_ddl(col, store.dialect):
                name = ddl.split("`")[1]
                if name not in columns.get(spec.name, set()):
                    store.execute(f"ALTER TABLE `{db}`.`{spec.name}` ADD COLUMN {ddl}")
                    changes.append(f"added column {spec.name}.{name}")
    if store.dialect == MODERN:
        changes += _apply_ttls(store, db, cfg.clickhouse.ttl_days, overrides)
    return changes


def _existing_tables(store: Store, db: str) -> set[str]:
    t = store.query(f"SELECT name FROM system.tables WHERE database = '{db}'")
    return set(t.column("name").to_pylist()) if t.num_columns else set()


def _existing_columns(store: Store, db: str) -> dict[str, set[str]]:
    t = store.query(f"SELECT table, name FROM system.columns WHERE database = '{db}'")
    out: dict[str, set[str]] = {}
    if t.num_columns:
        for table, name in zip(t.column("table").to_pylist(), t.column("name").to_pylist()):
            out.setdefault(table, set()).add(name)
    return out


def _apply_ttls(store: Store, db: str, default_days: int, overrides: dict[str, int]) -> list[str]:
    """MODIFY TTL where a table's TTL differs from the configured days (REMOVE TTL for 0 days)."""
    t = store.query(f"SELECT name, engine_full FROM system.tables WHERE database = '{db}'")
    engines = dict(zip(t.column("name").to_pylist(), t.column("engine_full").to_pylist()))
    wanted = {spec.name: f"toDateTime({spec.time_column})" for spec in tables.TABLES}
    wanted.update({name: "bucket" for name in tables.rollup_table_names()})
    changes = []
    for name, expr in wanted.items():
        days = tables.ttl_for(name, default_days, overrides)
        if name not in engines:
            continue
        m = re.search(r"TTL .*?toIntervalDay\((\d+)\)", engines[name])
        current = int(m.group(1)) if m else 0
        if current != days:
            action = f"MODIFY TTL {expr} + INTERVAL {days} DAY" if days else "REMOVE TTL"
            store.execute(f"ALTER TABLE `{db}`.`{name}` {action}")
            changes.append(f"TTL of {name}: {current or 'none'} -> {days or 'none'} days")
    return changes


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("migrate", help="create or upgrade the schema in the configured store (idempotent)")
    sql = sub.add_parser("sql", help="print the schema as SQL (what deploy/clickhouse/schema*.sql holds)")
    sql.add_argument("--dialect", choices=[tables.MODERN, tables.LEGACY], default=tables.MODERN,
                     help="modern: chDB / ClickHouse >= 22.3; legacy: old servers such as 18.16")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "sql":
        print(tables.schema_sql(cfg.clickhouse.database, args.dialect, cfg.clickhouse.ttl_days), end="")
        return 0
    store = open_store(cfg)
    try:
        changes = migrate(store, cfg)
    finally:
        store.close()
    where = cfg.clickhouse.url.split("@")[-1] if cfg.clickhouse.url else f"chDB {cfg.run_dir / 'chdb'}"
    for change in changes:
        print(change)
    print(f"schema {store.database} ({store.dialect}) on {where}: "
          f"{'up to date' if not changes else f'{len(changes)} change(s)'}")
    return 0
