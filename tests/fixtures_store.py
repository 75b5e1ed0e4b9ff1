"""Fixtures and helpers for the store tests: a real ClickHouse server, hand-made contract tables.

Import the fixtures into a test module with ``from tests.fixtures_store import *``.
"""
from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from aimass.agents.sink import Journal, Record, Sink, to_store_table
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.procs import Server, free_port, port_in_use, spawn, stop_pid, wait_until
from aimass.core.supervisor import aimass_argv
from aimass.core import contract, tables
from aimass.streams.kafka import consumer_config, producer_config

SERVER_USER = "aimass"


def clickhouse_server_config(d: Path, tcp_port: int, http_port: int, password: str, tls_port: int = 0) -> Path:
    """Config + users files for clickhouse-server under ``d`` (only 127.0.0.1, one password user);
    with ``tls_port`` also the native protocol over TLS with a self-signed certificate ``d/server.crt``."""
    for sub in ("data", "tmp", "user_files", "format_schemas"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "users.xml").write_text(f"""<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
  <users><{SERVER_USER}>
    <password_sha256_hex>{hashlib.sha256(password.encode()).hexdigest()}</password_sha256_hex>
    <networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota>
  </{SERVER_USER}></users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
""")
    tls = ""
    if tls_port:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(d / "server.key"),
                        "-out", str(d / "server.crt")], check=True, capture_output=True)
        (d / "server.key").chmod(0o644)
        tls = (f"<tcp_port_secure>{tls_port}</tcp_port_secure><openSSL><server>"
               f"<certificateFile>{d}/server.crt</certificateFile><privateKeyFile>{d}/server.key</privateKeyFile>"
               f"<verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>"
               f"</server></openSSL>")
    conf = d / "config.xml"
    conf.write_text(f"""<?xml version="1.0"?>
<yandex>{tls}
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog>
    <size>10M</size><count>1</count></logger>
  <tcp_port>{tcp_port}</tcp_port><http_port>{http_port}</http_port><listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size><max_concurrent_queries>20</max_concurrent_queries>
  <users_config>{d}/users.xml</users_config><default_profile>default</default_profile>
  <default_database>default</default_database><timezone>UTC</timezone>
</yandex>
""")
    return conf


def start_clickhouse_server(d: Path, tcp_port: int, http_port: int, password: str, tls_port: int = 0) -> Server:
    """Start Debian's clickhouse-server on 127.0.0.1 with its data under ``d``."""
    binary = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
    conf = clickhouse_server_config(d, tcp_port, http_port, password, tls_port)
    log = d / "stdout.log"
    proc = spawn("clickhouse-server", [binary, f"--config-file={conf}"], log)
    wait_until(lambda: port_in_use(tls_port or tcp_port), 20, "clickhouse-server", proc, d / "server.err.log")
    return Server("clickhouse", proc.pid, {"tcp": tcp_port, "http": http_port, "tls": tls_port}, str(log), proc.args)


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory):
    """A real clickhouse-server (Debian 18.16 here) on free ports; ``.password`` is the user's password."""
    if not (shutil.which("clickhouse-server") or Path("/usr/sbin/clickhouse-server").exists()):
        pytest.fail("clickhouse-server is not installed: `sudo apt-get install -y clickhouse-server`")
    d = tmp_path_factory.mktemp("clickhouse-server")
    password = secrets.token_hex(8)
    server = start_clickhouse_server(d, free_port(), free_port(), password)
    server.password = password
    server.dir = d
    yield server
    stop_pid(server.pid)


@pytest.fixture(scope="session")
def chdb_run_dir(tmp_path_factory) -> Path:
    """One run dir for every in-process chDB test (chDB holds one data dir per process)."""
    return tmp_path_factory.mktemp("chdb-run")


def chdb_config(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` storing into the shared in-process chDB, in a database of its own."""
    cfg.run.dir = str(run_dir)
    cfg.clickhouse.database = f"db_{uuid.uuid4().hex[:10]}"
    cfg.clickhouse.query_port = 0
    cfg.clickhouse.flush_ms = 200
    cfg.clickhouse.retry_initial_s = 0.1
    cfg.clickhouse.retry_max_s = 0.5
    return cfg


# --- hand-made contract tables --------------------------------------------------------

NOW_MS = int(time.time() * 1000) // 1000 * 1000


def readings(n: int, device: str = "dev-1", tenant: str = "acme", start_ms: int = NOW_MS - 600_000,
             step_ms: int = 10) -> pa.Table:
    ts = start_ms + np.arange(n, dtype=np.int64) * step_ms
    return pa.table({
        "tenant": [tenant] * n, "device_id": [device] * n, "metric": ["temp"] * n, "ts_ms": ts,
        "value": np.sin(np.arange(n) / 50.0) * 10 + 20, "unit": ["Cel"] * n, "received_ms": ts + 5,
    }, schema=contract.READINGS)


def _fill(schema: pa.Schema, n: int, seed: int, overrides: dict, now_ms: int = NOW_MS) -> pa.Table:
    """Rows of ``schema`` with distinct identities (row i differs in every string and time field),
    times in the five minutes before ``now_ms``."""
    rng = np.random.default_rng(seed)
    cols = {}
    for f in schema:
        if f.name in overrides:
            cols[f.name] = overrides[f.name]
        elif pa.types.is_string(f.type):
            cols[f.name] = [f"{f.name}-{seed}-{i % 7}" for i in range(n)]
        elif pa.types.is_binary(f.type):
            cols[f.name] = [bytes([i % 256, 0xFF]) for i in range(n)]
        elif f.name.endswith("_ms"):
            cols[f.name] = now_ms - 300_000 + seed * 1000 + np.arange(n, dtype=np.int64) * 1000
        elif pa.types.is_floating(f.type):
            cols[f.name] = rng.normal(size=n)
        elif pa.types.is_boolean(f.type):
            cols[f.name] = rng.random(n) < 0.3
        else:
            cols[f.name] = np.arange(n) + 1
    return pa.table(cols, schema=schema)


def sample_tables(seed: int, n: int = 40) -> dict[contract.Topic, pa.Table]:
    """One table of ``n`` rows per stored topic, distinct across seeds."""
    out = {}
    for spec in tables.TABLES:
        for topic in spec.topics:
            overrides = {}
            if spec is tables.TABLE_BY_NAME["readings"]:
                out[topic] = readings(n, device=f"dev-{seed}")
                continue
            if "event_id" in spec.schema.names:
                overrides["event_id"] = [f"ev-{seed}-{i}" for i in range(n)]
            if "notification_id" in spec.schema.names:
                overrides["notification_id"] = [f"n-{seed}-{i}" for i in range(n)]
            if topic is contract.LATE:
                overrides["reason"] = ["late"] * n
            out[topic] = _fill(spec.schema, n, seed * 10 + len(out), overrides)
    return out


def produce(cfg: Config, records: list[tuple[contract.Topic, pa.Table]], partition: int | None = None) -> None:
    """Produce each table as one Kafka record of its topic and wait for the broker's acks."""
    producer = Producer(producer_config(cfg))
    errors = []
    for topic, table in records:
        kwargs = {"partition": partition} if partition is not None else {}
        producer.produce(topic.name(cfg.kafka.topic_prefix), contract.encode(table, topic.schema), key=b"k",
                         on_delivery=lambda err, _m: err and errors.append(err), **kwargs)
        producer.poll(0)
    assert producer.flush(30) == 0 and not errors, errors


def wait_for(check, timeout: float, what: str):
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")


def counts(store, database: str, final: bool = True) -> dict[str, int]:
    """Rows per stored table (``FINAL``: duplicates by identity collapsed)."""
    sql = " UNION ALL ".join(f"SELECT '{t.name}' AS t, count() AS n FROM `{database}`.`{t.name}`"
                             f"{' FINAL' if final else ''}" for t in tables.TABLES)
    result = store.query(sql)
    return dict(zip(result.column("t").to_pylist(), result.column("n").to_pylist()))


def expected_counts(batches: list[dict[contract.Topic, pa.Table]]) -> dict[str, int]:
    topic_table = tables.table_for_topic()
    out = {t.name: 0 for t in tables.TABLES}
    for batch in batches:
        for topic, table in batch.items():
            out[topic_table[topic.suffix].name] += table.num_rows
    return out


def run_sink_process(cfg_file: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`aimass sink` as a child process (its own session, so it can be killed alone)."""
    return spawn("aimass sink", aimass_argv("--config", str(cfg_file), "sink", *extra), log)


# --- an in-process sink ---------------------------------------------------------------

def sink_on(cfg: Config, store) -> Sink:
    """A migrated store and a Sink on it with real Kafka clients."""
    migrate(store, cfg)
    consumer = Consumer(consumer_config(cfg, cfg.clickhouse.group_id, **{"max.poll.interval.ms": 86_400_000}))
    return Sink(cfg, store, consumer, Producer(producer_config(cfg)),
                Journal(cfg.run_dir / "sink" / f"{cfg.clickhouse.database}.journal.json"))


class Running:
    """A sink consuming in a background thread of this process."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.sink.run()
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> Sink:
        self.thread.start()
        return self.sink

    def __exit__(self, *exc) -> None:
        self.sink.stopping.set()
        self.thread.join(30)
        self.sink.consumer.close()
        assert not self.thread.is_alive(), "sink did not stop within 30 s"
        assert self.error is None, self.error


def committed(cfg, topic: contract.Topic) -> int:
    c = Consumer(consumer_config(cfg, cfg.clickhouse.group_id))
    try:
        parts = [TopicPartition(topic.name(cfg.kafka.topic_prefix), p)
                 for p in range(contract.topic_partitions(topic, cfg.kafka.partitions))]
        return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()




# --- data for reports and dashboards --------------------------------------------------

def insert(store, topic: contract.Topic, table: pa.Table, offset: int = 0, token: str = "") -> None:
    """Store a contract table directly (as the sink would, without Kafka)."""
    spec = tables.table_for_topic()[topic.suffix]
    store.insert(spec.name, to_store_table(spec, [Record(topic.suffix, 0, offset, b"", table)], store.dialect), token)


def seed_report_data(store) -> None:
    """Every table filled for the last minutes; devices "calm" and "wild" (tenant acme, metric temp) are consistent."""
    for batch in (sample_tables(1), sample_tables(2)):
        for i, (topic, table) in enumerate(batch.items()):
            insert(store, topic, table, offset=i)
    # the reports look back from now: a suite that runs long must not age the data out of their window
    now_ms = int(time.time() * 1000)
    start = (now_ms - 600_000) // 10_000 * 10_000
    for device, level in (("calm", 0.1), ("wild", 0.9)):
        insert(store, contract.CLEAN, readings(600, device=device, start_ms=start, step_ms=1000))
        n = 60
        ends = start + 10_000 * (np.arange(n) + 1)
        preds = pa.table({f.name: [] for f in contract.PREDICTIONS}, schema=contract.PREDICTIONS).to_pydict()
        preds.update(tenant=["acme"] * n, device_id=[device] * n, metric=["temp"] * n, window_s=[10] * n,
                     window_end_ms=ends - 10_000, target_end_ms=ends, observed_mean=[20.0] * n,
                     forecast_triton=[20.0] * n, forecast_online=[20.0] * n, forecast=[20.0] * n,
                     band_low=[18.0] * n, band_high=[22.0] * n, anomaly_triton=[level] * n,
                     anomaly_level=[level] * n, anomaly_spread=[0.0] * n, anomaly_change=[0.0] * n,
                     anomaly_device=[float("nan")] * n, regime_change=[False] * n, anomaly=np.linspace(0, level, n),
                     forecaster_model=["zscore:1"] * n,
                     anomaly_model=["iforest:1"] * n, degraded=[False] * n, max_received_ms=ends,
                     predicted_ms=ends - 9_000)
        insert(store, contract.PREDICTION_ROWS, pa.table(preds, schema=contract.PREDICTIONS))
        series = {"tenant": ["acme"] * n, "device_id": [device] * n, "metric": ["temp"] * n}
        insert(store, contract.WINDOW_ROWS, _fill(contract.WINDOWS, n, 50, now_ms=now_ms, overrides={
            **series, "window_s": np.full(n, 10, np.int32), "window_start_ms": ends - 20_000,
            "window_end_ms": ends - 10_000}))
        insert(store, contract.OUTCOME_ROWS, _fill(contract.OUTCOMES, n, 51, now_ms=now_ms, overrides={
            **series, "window_s": np.full(n, 10, np.int32), "target_end_ms": ends, "forecaster_model": ["zscore:1"] * n}))
        events = {**series, "event_id": [f"{device}-{i}" for i in range(n)], "state": ["active_unack"] * n,
                  "transition": ["raised"] * n, "rule": ["band"] * n, "severity": ["warning"] * n}
        insert(store, contract.ALERT_EVENTS, _fill(contract.ALERTS, n, 52, now_ms=now_ms, overrides=events))
        insert(store, contract.DRIFT_EVENTS, _fill(contract.DRIFT, n, 53, now_ms=now_ms, overrides={
            **series, "window_s": np.full(n, 10, np.int32)}))
    insert(store, contract.NOTIFICATION_ROWS, _fill(contract.NOTIFICATIONS, 20, 54, now_ms=now_ms, overrides={
        "status": ["delivered"] * 20, "kind": ["webhook"] * 20}))


