"""A real ClickHouse server (Debian's 18.16, legacy dialect) over the native protocol:
migrations, sink inserts, a server killed and restarted under a running sink, error classes, and
`aimass query` as the read-only user that deploy/clickhouse ships."""
from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from aimass.agents.sink import RETRIES, Record, to_store_table
from aimass.core.clickhouse import ServerStore, StoreError, open_reader, open_store
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.procs import free_port, stop_pid
from aimass.core import contract, tables
from tests.fixtures_store import (Running, clickhouse_server, committed, counts, expected_counts,  # noqa: F401
                                  insert, produce, readings, sample_tables, sink_on, start_clickhouse_server,
                                  wait_for)
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def server_url(server, with_password: bool = False) -> str:
    auth = f"aimass:{server.password}" if with_password else "aimass"
    return f"clickhouse://{auth}@127.0.0.1:{server.ports['tcp']}/"


@pytest.fixture
def server_cfg(cfg, clickhouse_server, monkeypatch):  # noqa: F811
    """cfg storing into the server, password from the environment, a database of its own."""
    cfg.clickhouse.url = server_url(clickhouse_server)
    cfg.clickhouse.password_env = "AIMASS_TEST_CLICKHOUSE_PASSWORD"
    monkeypatch.setenv("AIMASS_TEST_CLICKHOUSE_PASSWORD", clickhouse_server.password)
    cfg.clickhouse.database = f"db_{cfg.kafka.topic_prefix}"
    cfg.clickhouse.flush_ms = 200
    cfg.clickhouse.retry_initial_s = 0.1
    cfg.clickhouse.retry_max_s = 0.5
    return cfg


def open_server(cfg) -> ServerStore:
    ch = cfg.clickhouse
    return ServerStore(ch.url, ch.database, cfg.secret(ch.password_env), connect_timeout_s=2)


def test_migrate_on_an_old_server_uses_the_legacy_dialect_and_is_idempotent(server_cfg):
    store = open_server(server_cfg)
    assert store.dialect == tables.LEGACY
    first = migrate(store, server_cfg)
    assert f"created {store.database}.readings" in first and f"created {store.database}.readings_1m_mv" in first
    assert migrate(store, server_cfg) == []
    store.execute(f"ALTER TABLE `{store.database}`.alerts DROP COLUMN flapping")  # an older schema version
    assert migrate(store, server_cfg) == ["added column alerts.flapping"]
    cols = store.query(f"SELECT name, type FROM system.columns WHERE database = '{store.database}' "
                       "AND table = 'readings'")
    assert dict(zip(*cols.to_pydict().values()))["ts_ms"] == "Int64"


def test_sink_stores_every_topic_over_the_native_protocol_with_ms_precision(server_cfg):
    batches = [sample_tables(seed) for seed in range(2)]
    produce(server_cfg, [item for b in batches for item in b.items()])
    want = expected_counts(batches)
    sink = sink_on(server_cfg, open_server(server_cfg))
    db = server_cfg.clickhouse.database
    with Running(sink):
        wait_for(lambda: counts(sink.store, db) == want or None, 60, f"counts {want}")
    produced = pa.concat_tables([b[contract.CLEAN] for b in batches])
    r = sink.store.query(f"SELECT min(ts_ms) AS lo, max(ts_ms) AS hi, sum(value) AS s, min(ts) AS t FROM {db}.readings")
    assert r.column("lo")[0].as_py() == min(produced.column("ts_ms").to_pylist())
    assert r.column("hi")[0].as_py() == max(produced.column("ts_ms").to_pylist())
    assert r.column("s")[0].as_py() == pytest.approx(sum(produced.column("value").to_pylist()))
    payload = sink.store.query(f"SELECT hex(payload) AS p FROM {db}.rejects WHERE topic = 'deadletter' LIMIT 1")
    assert payload.column("p")[0].as_py()[2:] == "FF"  # binary payloads arrive unchanged
    roll = sink.store.query(f"SELECT countMerge(n) AS n FROM {db}.readings_1h")
    assert roll.column("n")[0].as_py() == produced.num_rows


def test_server_killed_under_a_running_sink_then_restarted_loses_nothing(server_cfg, tmp_path):
    server = start_clickhouse_server(tmp_path / "ch", free_port(), free_port(), "pw-restart")
    try:
        server_cfg.clickhouse.url = f"clickhouse://aimass:pw-restart@127.0.0.1:{server.ports['tcp']}/"
        sink = sink_on(server_cfg, open_server(server_cfg))
        db = server_cfg.clickhouse.database
        produce(server_cfg, [(contract.CLEAN, readings(500, device="before"))])
        retries_before = RETRIES._value.get()
        with Running(sink):
            wait_for(lambda: counts(sink.store, db)["readings"] == 500 or None, 60, "the first rows")
            stop_pid(server.pid, sig=9)
            produce(server_cfg, [(contract.CLEAN, readings(700, device="during"))])
            wait_for(lambda: RETRIES._value.get() >= retries_before + 2, 30, "the sink to retry")
            assert committed(server_cfg, contract.CLEAN) == 1  # the batch that failed is not committed
            server = start_clickhouse_server(tmp_path / "ch", server.ports["tcp"], server.ports["http"], "pw-restart")
            wait_for(lambda: committed(server_cfg, contract.CLEAN) == 2, 60, "the retried batch to be committed")
        assert counts(sink.store, db)["readings"] == 1200
        assert counts(sink.store, db, final=False)["readings"] == 1200
    finally:
        stop_pid(server.pid)


def test_errors_are_classified_retryable_or_permanent(server_cfg, clickhouse_server):  # noqa: F811
    store = open_server(server_cfg)
    migrate(store, server_cfg)
    with pytest.raises(StoreError) as bad_rows:  # a string where a number goes: the data is wrong
        store.insert("quality", pa.table({"computed_ms": ["not a number"]}))
    assert not bad_rows.value.retryable
    with pytest.raises(StoreError) as syntax:
        store.query("SELEKT 1")
    assert not syntax.value.retryable and syntax.value.code == 62
    with pytest.raises(StoreError) as refused:
        ServerStore(f"clickhouse://aimass@127.0.0.1:{free_port()}/", "x", "pw", connect_timeout_s=1)
    assert refused.value.retryable
    with pytest.raises(StoreError) as wrong_password:
        ServerStore(server_url(clickhouse_server), "x", "wrong", connect_timeout_s=2)
    assert wrong_password.value.retryable and wrong_password.value.code in (192, 193, 516)
    assert store.query("SELECT 1 AS one").column("one").to_pylist() == [1]  # the client reconnects after errors


def test_native_protocol_over_tls_verifies_the_server_certificate(server_cfg, tmp_path):
    d = tmp_path / "tls"
    d.mkdir()
    server = start_clickhouse_server(d, free_port(), free_port(), "pw-tls", tls_port=free_port())
    try:
        server_cfg.clickhouse.url = f"clickhouse://aimass:pw-tls@127.0.0.1:{server.ports['tls']}/"
        server_cfg.clickhouse.secure = True
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED") as untrusted:
            open_store(server_cfg)  # self-signed and no CA configured: refused
        assert untrusted.value.retryable
        server_cfg.clickhouse.tls_ca_file = str(d / "server.crt")
        store = open_store(server_cfg)
        assert migrate(store, server_cfg)  # created over TLS
        store.insert("readings", to_store_table(tables.TABLE_BY_NAME["readings"],
                                                [Record("telemetry.clean", 0, 0, b"", readings(100))], store.dialect))
        assert counts(store, store.database)["readings"] == 100
    finally:
        stop_pid(server.pid)


# Settings of the shipped profiles that Debian's 18.16 does not know yet (it refuses a login whose
# profile names one); everything else of deploy/clickhouse/users.d/aimass.xml is installed as shipped.
NEWER_SETTINGS = ("deduplicate_blocks_in_dependent_materialized_views", "allow_introspection_functions")


class Trap(BaseHTTPRequestHandler):
    """Records any request (none may arrive)."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server API
        Trap.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_aimass_query_as_the_shipped_read_only_user_reads_and_nothing_else(tmp_path, monkeypatch):
    d = tmp_path / "ch"
    (d / "users.d").mkdir(parents=True)
    password = "pw-" + os.urandom(6).hex()
    users = (REPO / "deploy" / "clickhouse" / "users.d" / "aimass.xml").read_text()
    users = users.replace("REPLACE_WITH_SHA256", hashlib.sha256(password.encode()).hexdigest())
    for name in NEWER_SETTINGS:
        users = re.sub(rf"\s*<{name}>[^<]*</{name}>", "", users)
    (d / "users.d" / "aimass.xml").write_text(users)  # its user aimass (the writer) replaces the fixture's
    server = start_clickhouse_server(d, free_port(), free_port(), password)
    trap = ThreadingHTTPServer(("127.0.0.1", free_port()), Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    Trap.hits = []
    canary = d / "user_files" / "canary.txt"
    canary.write_text("CANARY\n")
    try:
        cfg = Config()
        cfg.clickhouse.url = f"clickhouse://aimass@127.0.0.1:{server.ports['tcp']}/"
        writer = ServerStore(cfg.clickhouse.url, cfg.clickhouse.database, password, connect_timeout_s=2)
        migrate(writer, cfg)
        insert(writer, contract.CLEAN, readings(50))
        writer.execute(f"CREATE TABLE {cfg.clickhouse.database}.big ENGINE = MergeTree ORDER BY n "
                       "AS SELECT number AS n FROM system.numbers LIMIT 5000001")
        # what `aimass query` opens with AIMASS_CLICKHOUSE_URL=clickhouse://aimass_query@host/ (its reports
        # need a server of 22.3 or later; this one is 18.16, so plain SQL here)
        cfg.clickhouse.url = f"clickhouse://aimass_query@127.0.0.1:{server.ports['tcp']}/"
        cfg.clickhouse.password_env = "TEST_READER_PASSWORD"
        monkeypatch.setenv("TEST_READER_PASSWORD", password)
        reader = open_reader(cfg)
        db = cfg.clickhouse.database
        assert reader.query(f"SELECT count() AS n FROM {db}.readings").column("n").to_pylist() == [50]
        limits = {r["name"]: r["value"] for r in reader.query(
            "SELECT name, value FROM system.settings WHERE name IN ('readonly', 'max_execution_time', "
            "'max_result_rows', 'max_threads')").to_pylist()}
        assert limits == {"readonly": "1", "max_execution_time": "30", "max_result_rows": "5000000", "max_threads": "4"}
        refused = {  # statement -> what the server says (code 164: READONLY, 291: access denied, 396: too many rows)
            f"INSERT INTO {db}.readings (tenant) SELECT 'evil'": "readonly",
            f"CREATE TABLE {db}.evil (x Int8) ENGINE = Memory": "readonly",
            f"DROP TABLE {db}.readings": "readonly",
            "SET readonly = 0": "readonly",
            "SELECT 1 SETTINGS max_execution_time = 1000": "readonly",
            "SELECT 1 SETTINGS join_use_nulls = 1": "readonly",  # why reports and panels carry no SETTINGS
            "SELECT * FROM file('canary.txt', 'TSV', 'a String')": "Table functions are forbidden",
            f"SELECT * FROM url('http://127.0.0.1:{trap.server_address[1]}/x', 'TSV', 'a String')":
                "Table functions are forbidden",
            f"SELECT * FROM remote('127.0.0.1:{server.ports['tcp']}', {db}.readings)": "Table functions are forbidden",
            "SELECT * FROM default.anything": "Access denied to database default",
            f"SELECT n FROM {db}.big": "Limit for result exceeded",
        }
        for sql, why in refused.items():
            with pytest.raises(StoreError, match=why):
                reader.query(sql)
        assert counts(writer, db, final=False)["readings"] == 50
    finally:
        trap.shutdown()
        trap.server_close()
        stop_pid(server.pid)
    assert Trap.hits == []
