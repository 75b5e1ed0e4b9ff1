"""Sink benchmark: readings through `aimass sink` (Kafka -> Arrow batches -> ClickHouse) vs row-by-row inserts.

Scenarios, same run, same schema (ReplacingMergeTree + the 1-minute and 1-hour rollup views):

- sink_chdb: N readings already in Kafka (records of 5,000 readings, like the clean stage
  writes them) are consumed, decoded and inserted by the sink into embedded chDB, offsets
  committed; timed from the first record consumed to the last row stored. Also reported per
  CPU second of this process (all its threads), which a busy shared machine does not skew.
- row_by_row_chdb (baseline): one INSERT ... VALUES statement per reading into chDB.
- paced (issue 7's sustained load): a separate process produces readings at ``--rate`` per
  second in records of 833 (the bridge's drain micro-batch) plus 1% as many rows on every
  other stored topic (windows, predictions, alerts, rejects ...) while the sink stores them with
  the configured flush policy (per table: readings every ``flush_ms``, the other tables every
  ``side_flush_factor`` x ``flush_ms``, ``flush_rows`` 200k, blocks pre-sorted by identity),
  against the previous sink in the same run (every table in every flush, ``flush_rows`` 50k, no
  pre-sort), interleaved ``--repeats`` times, the lowest of each counts. Reported as CPU
  microseconds per reading of this process (all threads: the sink, chDB's inserts and background
  merges), from the first record consumed until every reading is stored and chDB's merges are
  idle (at least 5 s, at most 30 s). Each run starts once the previous run's merges are idle.
- sink_server / row_by_row_server: the same into Debian's clickhouse-server (18.16, legacy
  schema, native protocol) when it is installed.

Floors (issue 6): sink into chDB >= 300k rows/s and >= 100x row-by-row. Issue 7's budget for
the sink: <= 3 us of CPU per reading at 100k readings/s (``paced``).

    python perf/bench_sink.py [--quick] [--rows N]

Starts its own Kafka-protocol broker (and clickhouse-server) on free ports. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from confluent_kafka import Consumer, Producer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aimass.agents.sink import Journal, Sink  # noqa: E402
from aimass.core.clickhouse import ChdbStore, ServerStore  # noqa: E402
from aimass.core.config import Config  # noqa: E402
from aimass.core.db import migrate  # noqa: E402
from aimass.core.procs import free_port, stop_pid  # noqa: E402
from aimass.core.stack import create_topics, start_kafka, stop_server  # noqa: E402
from aimass.core import contract  # noqa: E402
from aimass.streams.kafka import consumer_config, producer_config  # noqa: E402

RECORD_ROWS = 5_000
PACED_RECORD_ROWS = 833  # the bridge's mean micro-batch when draining (perf/RESULTS.md, bench_e2e)
SIDE_SHARE = 0.01        # rows on each other stored topic per reading
DEVICES = 1_000
MERGE_TAIL_S = (5.0, 30.0)  # after a paced run: wait at least / at most this long for merges to finish


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def readings_record(i: int, start_ms: int, n: int = RECORD_ROWS) -> pa.Table:
    """``n`` readings of many devices and three metrics, 1 s apart per series (record ``i`` of a stream)."""
    k = np.arange(i * n, (i + 1) * n)
    device = k % DEVICES
    metric = (k // DEVICES) % 3
    ts = start_ms + (k // (DEVICES * 3)) * 1000
    return pa.table({
        "tenant": pa.array(np.where(device % 2 == 0, "acme", "globex"), pa.string()),
        "device_id": pa.array(np.char.add("dev-", device.astype(str)), pa.string()),
        "metric": pa.array(np.array(["temp", "hum", "power"])[metric], pa.string()),
        "ts_ms": ts.astype(np.int64),
        "value": np.sin(k / 100.0) * 10 + 20,
        "unit": pa.array(np.array(["Cel", "%RH", "W"])[metric], pa.string()),
        "received_ms": (ts + 40).astype(np.int64),
    }, schema=contract.READINGS)


def produce_readings(cfg: Config, rows: int) -> int:
    """Produce ``rows`` readings onto the clean topic, spread over its partitions; returns the count."""
    producer = Producer(producer_config(cfg))
    topic = contract.CLEAN.name(cfg.kafka.topic_prefix)
    start_ms = int(time.time() * 1000) - 3_600_000
    records = rows // RECORD_ROWS
    for i in range(records):
        producer.produce(topic, contract.encode(readings_record(i, start_ms), contract.READINGS),
                         partition=i % cfg.kafka.partitions)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("producer could not deliver every record")
    return records * RECORD_ROWS


def produce_paced(cfg: Config, rate: int, seconds: float, ready: "multiprocessing.synchronize.Event") -> None:
    """Produce ``rate`` readings/s for ``seconds`` (records of PACED_RECORD_ROWS) plus SIDE_SHARE rows per
    reading on every other stored topic, once a second; runs in its own process so that its CPU is not
    counted as the sink's."""
    from tests.fixtures_store import sample_tables  # rows of every schema, identities distinct per seed

    producer = Producer(producer_config(cfg))
    prefix, start_ms = cfg.kafka.topic_prefix, int(time.time() * 1000) - 3_600_000
    records = paced_readings(rate, seconds) // PACED_RECORD_ROWS
    ready.wait()
    started, record, second = time.monotonic(), 0, -1
    while record < records:
        elapsed = time.monotonic() - started
        if int(elapsed) > second:
            second = int(elapsed)
            for topic, rows in sample_tables(second, int(rate * SIDE_SHARE)).items():
                if topic is not contract.CLEAN:
                    producer.produce(topic.name(prefix), contract.encode(rows, topic.schema), key=b"side")
        due = min(records, int(elapsed * rate) // PACED_RECORD_ROWS)
        while record < due:
            producer.produce(contract.CLEAN.name(prefix), contract.encode(
                readings_record(record, start_ms, PACED_RECORD_ROWS), contract.READINGS),
                partition=record % cfg.kafka.partitions)
            record += 1
        producer.poll(0)
        time.sleep(0.01)
    if producer.flush(60):
        raise RuntimeError("producer could not deliver every record")


def wait_merges_idle(store, min_s: float, max_s: float) -> None:
    """Sleep at least ``min_s`` and until chDB runs no merge (at most ``max_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        busy = store.query("SELECT count() AS n FROM system.merges").column("n")[0].as_py()
        if not busy and time.monotonic() - started >= min_s:
            return
        time.sleep(0.5)


def paced_readings(rate: int, seconds: float) -> int:
    """Readings the paced producer sends: whole records only."""
    return int(seconds * rate) // PACED_RECORD_ROWS * PACED_RECORD_ROWS


class TimedSink(Sink):
    """The sink, noting when the first record arrived (wall clock and this process's CPU time)."""

    first: float | None = None
    first_cpu = 0.0

    def __init__(self, *args):
        super().__init__(*args)
        self.stored_by_table: dict[str, int] = {}
        self.inserts = 0

    def _add(self, msg) -> None:
        if self.first is None:
            self.first, self.first_cpu = time.perf_counter(), time.process_time()
        super()._add(msg)

    def _insert(self, spec, records, token) -> None:
        super()._insert(spec, records, token)
        self.stored_by_table[spec.name] = self.stored_by_table.get(spec.name, 0) + sum(r.rows.num_rows for r in records)
        self.inserts += 1


def run_sink(cfg: Config, store, rows: int, label: str) -> tuple[float, float, int]:
    """Rows per second and per CPU second of the sink storing ``rows`` readings already in Kafka,
    and how many rows it stored. CPU time (all threads of this process, chDB's included) shows
    the cost independent of how busy the shared machine is."""
    migrate(store, cfg)
    consumer = Consumer(consumer_config(cfg, f"bench-{label}", **{"max.poll.interval.ms": 86_400_000}))
    sink = TimedSink(cfg, store, consumer, Producer(producer_config(cfg)),
                     Journal(cfg.run_dir / f"journal-{label}.json"))
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    last_report = time.monotonic()
    while sink.stored_rows < rows and thread.is_alive():
        time.sleep(0.02)
        if time.monotonic() - last_report > 2:
            say(f"  {label}: {sink.stored_rows:,}/{rows:,} rows stored")
            last_report = time.monotonic()
    elapsed = time.perf_counter() - (sink.first or time.perf_counter())
    cpu = time.process_time() - sink.first_cpu
    sink.stopping.set()
    thread.join(60)
    consumer.close()
    stored = store.query(f"SELECT count() AS n FROM `{store.database}`.readings FINAL").column("n")[0].as_py()
    return rows / elapsed, rows / cpu, stored


def run_paced(cfg: Config, store, rate: int, seconds: float, label: str, presort: bool) -> dict[str, float]:
    """CPU of the sink storing a paced stream (``produce_paced``) with ``cfg``'s flush policy."""
    migrate(store, cfg)
    create_topics(cfg)
    wait_merges_idle(store, 0, MERGE_TAIL_S[1])
    expected = paced_readings(rate, seconds)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    producer = ctx.Process(target=produce_paced, args=(cfg, rate, seconds, ready), daemon=True)
    producer.start()
    consumer = Consumer(consumer_config(cfg, f"bench-{label}", **{"max.poll.interval.ms": 86_400_000}))
    sink = TimedSink(cfg, store, consumer, Producer(producer_config(cfg)),
                     Journal(cfg.run_dir / f"journal-{label}.json"))
    sink.presort = presort
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    ready.set()
    last_report, deadline = time.monotonic(), time.monotonic() + seconds + 120
    readings_stored = 0
    while readings_stored < expected and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
        readings_stored = int(sink.stored_by_table.get("readings", 0))
        if time.monotonic() - last_report > 2:
            say(f"  {label}: {readings_stored:,}/{expected:,} readings stored")
            last_report = time.monotonic()
    wait_merges_idle(store, *MERGE_TAIL_S)
    cpu = time.process_time() - sink.first_cpu
    sink.stopping.set()
    thread.join(60)
    consumer.close()
    producer.join(60)
    stored = store.query(f"SELECT count() AS n FROM `{store.database}`.readings FINAL").column("n")[0].as_py()
    inserts = sink.inserts
    return {"cpu_us_per_reading": round(cpu / expected * 1e6, 2), "readings_per_cpu_s": round(expected / cpu),
            "inserts": inserts, "lost": expected - stored}


def row_by_row(store, rows: int, label: str) -> tuple[float, float]:
    """Rows per second and per CPU second of one INSERT per reading (the baseline), same table and views."""
    table = readings_record(0, int(time.time() * 1000)).slice(0, rows).to_pylist()
    ts_col = "ts_ms" if store.dialect == "legacy" else "ts"
    received_col = "received_ms" if store.dialect == "legacy" else "received_at"
    as_time = (lambda ms: str(ms)) if store.dialect == "legacy" else (lambda ms: f"fromUnixTimestamp64Milli({ms})")
    started, started_cpu = time.perf_counter(), time.process_time()
    for i, r in enumerate(table):
        store.execute(
            f"INSERT INTO `{store.database}`.readings (tenant, device_id, metric, {ts_col}, value, unit, {received_col}) "
            f"SELECT '{r['tenant']}', '{r['device_id']}', '{r['metric']}', {as_time(r['ts_ms'])}, {r['value']}, "
            f"'{r['unit']}', {as_time(r['received_ms'])}")
        if i and i % 500 == 0:
            say(f"  {label}: {i}/{rows} rows")
    return rows / (time.perf_counter() - started), rows / (time.process_time() - started_cpu)


def start_server(d: Path):
    """Debian's clickhouse-server on free ports, or None when it is not installed."""
    if not shutil.which("clickhouse-server") and not Path("/usr/sbin/clickhouse-server").exists():
        return None, ""
    from tests.fixtures_store import start_clickhouse_server

    password = secrets.token_hex(8)
    return start_clickhouse_server(d, free_port(), free_port(), password), password


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run: 1M readings, 200 row-by-row inserts")
    p.add_argument("--rows", type=int, help="readings through the sink into chDB (default 3,000,000)")
    p.add_argument("--baseline-rows", type=int, help="row-by-row inserts (default 500)")
    p.add_argument("--flush-rows", type=int, default=200_000, help="sink batch size (clickhouse.flush_rows)")
    p.add_argument("--no-server", action="store_true", help="skip clickhouse-server even when installed")
    p.add_argument("--rate", type=int, default=100_000, help="paced scenario: readings per second (default 100k)")
    p.add_argument("--seconds", type=float, help="paced scenario: seconds of production (default 20, --quick 10)")
    p.add_argument("--repeats", type=int, default=2, help="paced scenario: runs of each contender (lowest counts)")
    p.add_argument("--only-paced", action="store_true", help="run only the paced scenario")
    args = p.parse_args()
    rows = args.rows or (1_000_000 if args.quick else 3_000_000)
    base_rows = args.baseline_rows or (200 if args.quick else 500)
    server_rows = rows // 4
    seconds = args.seconds or (10 if args.quick else 20)

    run_dir = Path(tempfile.mkdtemp(prefix="aimass-bench-sink-"))
    kafka = start_kafka(run_dir, free_port())
    server = None
    result: dict[str, float | int | str] = {}
    try:
        cfg = Config()
        cfg.run.dir = str(run_dir)
        cfg.kafka.bootstrap = f"127.0.0.1:{kafka.ports['kafka']}"
        cfg.kafka.topic_prefix = "bench"
        cfg.clickhouse.flush_rows = args.flush_rows
        cfg.clickhouse.metrics_port = 0
        create_topics(cfg)
        say(f"paced: {args.rate:,} readings/s for {seconds:g} s, this sink vs the previous one, "
            f"{args.repeats} time(s) each ...")
        paced: dict[str, dict] = {}
        lost = 0
        defaults = Config().clickhouse
        contenders = (("paced", defaults.flush_rows, defaults.side_flush_factor, True),
                      ("paced_previous_sink", 50_000, 1, False))
        for repeat in range(args.repeats):
            for label, flush_rows, side_factor, presort in contenders:
                pcfg = copy.deepcopy(cfg)
                pcfg.kafka.topic_prefix = f"bench-{label.replace('_', '-')}-{repeat}"
                pcfg.clickhouse.database = f"bench_{label}_{repeat}"
                pcfg.clickhouse.flush_rows, pcfg.clickhouse.side_flush_factor = flush_rows, side_factor
                run = run_paced(pcfg, ChdbStore(run_dir / "chdb", pcfg.clickhouse.database), args.rate, seconds,
                                label, presort)
                say(f"  {label} (flush_rows {flush_rows:,}, side_flush_factor {side_factor}, presort {presort}): {run}")
                lost += run.pop("lost")
                if label not in paced or run["cpu_us_per_reading"] < paced[label]["cpu_us_per_reading"]:
                    paced[label] = run
        result.update({f"{k}_{m}": v for k, r in paced.items() for m, v in r.items()},
                      paced_readings_per_s=args.rate, lost=lost,
                      speedup_vs_previous_sink_per_cpu_s=round(
                          paced["paced"]["readings_per_cpu_s"] / paced["paced_previous_sink"]["readings_per_cpu_s"], 2))
        if args.only_paced:
            print(json.dumps(result))
            return 0
        say(f"producing {rows:,} readings in records of {RECORD_ROWS:,} ...")
        produced = produce_readings(cfg, rows)
        say("sink -> chDB ...")
        cfg.clickhouse.database = "bench_sink"
        sink_rate, sink_cpu, stored = run_sink(cfg, ChdbStore(run_dir / "chdb", "bench_sink"), produced, "sink_chdb")
        say(f"  {sink_rate:,.0f} rows/s ({sink_cpu:,.0f} per CPU second, {1e6 / sink_cpu:.2f} us per row), "
            f"{stored:,} stored")
        say(f"row-by-row -> chDB ({base_rows} rows) ...")
        cfg.clickhouse.database = "bench_rows"
        baseline = ChdbStore(run_dir / "chdb", "bench_rows")
        migrate(baseline, cfg)
        rbr_rate, rbr_cpu = row_by_row(baseline, base_rows, "row_by_row_chdb")
        say(f"  {rbr_rate:,.1f} rows/s ({rbr_cpu:,.1f} per CPU second)")
        result.update(sink_chdb_rows_per_s=round(sink_rate), row_by_row_chdb_rows_per_s=round(rbr_rate, 1),
                      speedup_vs_row_by_row=round(sink_rate / rbr_rate, 1),
                      sink_chdb_rows_per_cpu_s=round(sink_cpu), row_by_row_chdb_rows_per_cpu_s=round(rbr_cpu, 1),
                      sink_chdb_cpu_us_per_row=round(1e6 / sink_cpu, 2),
                      lost=int(result["lost"]) + produced - stored, rows=produced, flush_rows=args.flush_rows)

        server, password = (None, "") if args.no_server else start_server(run_dir / "clickhouse-server")
        if server:
            url = f"clickhouse://aimass:{password}@127.0.0.1:{server.ports['tcp']}/"
            cfg.kafka.topic_prefix = "bench2"
            create_topics(cfg)
            say(f"producing {server_rows:,} readings for the server run ...")
            produced_server = produce_readings(cfg, server_rows)
            say("sink -> clickhouse-server (native protocol, legacy schema) ...")
            store = ServerStore(url, "bench_sink")
            srv_rate, _, srv_stored = run_sink(cfg, store, produced_server, "sink_server")
            say(f"  {srv_rate:,.0f} rows/s, {srv_stored:,} stored")
            cfg.clickhouse.database = "bench_rows"
            srv_base = ServerStore(url, "bench_rows")
            migrate(srv_base, cfg)
            srv_rbr, _ = row_by_row(srv_base, base_rows, "row_by_row_server")
            say(f"  row-by-row: {srv_rbr:,.0f} rows/s")
            result.update(sink_server_rows_per_s=round(srv_rate), row_by_row_server_rows_per_s=round(srv_rbr, 1),
                          speedup_vs_row_by_row_server=round(srv_rate / srv_rbr, 1),
                          lost=int(result["lost"]) + produced_server - srv_stored,
                          server_version=store.query("SELECT version() AS v").column("v")[0].as_py())
    finally:
        if server:
            stop_pid(server.pid)
        stop_server(kafka)
        shutil.rmtree(run_dir, ignore_errors=True)
    floors_ok = result["sink_chdb_rows_per_s"] >= 300_000 and result["speedup_vs_row_by_row"] >= 100
    say(f"floors (>= 300k rows/s into chDB, >= 100x row-by-row): "
        f"{'met' if floors_ok else 'NOT met on the wall clock (a busy machine: compare the rows per CPU second)'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
