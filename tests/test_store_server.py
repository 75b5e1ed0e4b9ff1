"""A real ClickHouse server (Debian's 18.16, legacy dialect) over the native protocol:
migrations, sink inserts, a server killed and restarted under a running sink, error classes."""
from __future__ import annotations

import pyarrow as pa
import pytest

from aimass.agents.sink import RETRIES, Record, to_store_table
from aimass.core.clickhouse import ServerStore, StoreError, open_store
from aimass.core.db import migrate
from aimass.core.procs import free_port, stop_pid
from aimass.core import contract, tables
from tests.fixtures_store import (Running, clickhouse_server, committed, counts, expected_counts,  # noqa: F401
                                  produce, readings, sample_tables, sink_on, start_clickhouse_server, wait_for)

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
