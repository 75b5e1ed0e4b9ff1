"""The two baseline pipelines of `perf/bench_e2e.py`, each stage its own process.

Both read the same SenML packs from the same Mosquitto broker and compute the same 10 s tumbling
windows (count, mean, min, max, std per device and metric) into chDB as AI Mass does:

- per_message ("the usual way"): a paho forwarder that produces ONE JSON Kafka message per
  reading, a Faust agent that handles one message at a time (windows in a dict, one
  `INSERT ... VALUES` into chDB per reading and per closed window);
- quix: a paho forwarder that produces one Kafka message per MQTT message (the pack, as JSON),
  a Quix Streams 3.28 application that expands packs into readings, sinks them into chDB in
  Quix's checkpoint batches, and computes the windows with `tumbling_window(...).reduce(...)`.

Run as `python perf/_pipeline.py {forwarder,faust,quix,stats} ...` (the benchmark does it). The
processes write their stored-row count to ``<store>/stored.txt`` so the benchmark can follow them
without opening the chDB directory (one process per directory).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aimass.core.config import Config, load_config  # noqa: E402
from aimass.streams.kafka import producer_config  # noqa: E402
from aimass.streams.mqtt import connect, make_client  # noqa: E402
from aimass.streams.payloads import TopicPattern  # noqa: E402

WINDOW_MS = 10_000
SCHEMA = ("CREATE TABLE IF NOT EXISTS bench.readings (device_id String, metric LowCardinality(String), "
          "ts DateTime64(3, 'UTC'), value Float64, inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
          "ENGINE = MergeTree ORDER BY (device_id, metric, ts)",
          "CREATE TABLE IF NOT EXISTS bench.windows (device_id String, metric LowCardinality(String), "
          "window_start DateTime64(3, 'UTC'), count UInt32, mean Float64, min Float64, max Float64, std Float64, "
          "inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
          "ENGINE = MergeTree ORDER BY (device_id, metric, window_start)")


def senml_readings(pack: list[dict]) -> list[tuple[str, int, float]]:
    """(metric, ts_ms, value) of a SenML pack as `aimass.streams.payloads.encode_senml` writes it."""
    base_s = pack[0].get("bt", 0.0)
    return [(r["n"], int(round((base_s + r.get("t", 0.0)) * 1000)), float(r["v"])) for r in pack]


def open_store(path: str):
    """A chDB session on ``path`` with the baseline tables."""
    from chdb import session
    store = session.Session(path)
    store.query("CREATE DATABASE IF NOT EXISTS bench")
    for ddl in SCHEMA:
        store.query(ddl)
    return store


class StoredCounter:
    """Counts stored readings and writes the count to ``<store>/stored.txt`` at most every 0.5 s."""

    def __init__(self, store_dir: str):
        self.path = Path(store_dir) / "stored.txt"
        self.count, self._written = 0, 0.0

    def add(self, n: int) -> None:
        self.count += n
        if time.monotonic() - self._written > 0.5:
            self.flush()

    def flush(self) -> None:
        self.path.write_text(str(self.count))
        self._written = time.monotonic()


class Window:
    """Running count / sum / sum of squares / min / max of one series' current window."""

    __slots__ = ("start_ms", "n", "s", "ss", "lo", "hi")

    def __init__(self, start_ms: int):
        self.start_ms, self.n, self.s, self.ss, self.lo, self.hi = start_ms, 0, 0.0, 0.0, math.inf, -math.inf

    def add(self, v: float) -> None:
        self.n += 1
        self.s += v
        self.ss += v * v
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def row(self) -> tuple[int, float, float, float, float]:
        mean = self.s / self.n
        return self.n, mean, self.lo, self.hi, math.sqrt(max(0.0, self.ss / self.n - mean * mean))


# --- MQTT -> Kafka forwarder (both baselines) ---------------------------------------------------

def forwarder(cfg: Config, client_id: str, topic: str, per_reading: bool) -> None:
    """Plain paho client on the bridge's persistent shared subscription: every MQTT message becomes one
    Kafka message (``per_reading``: every reading of it becomes one JSON Kafka message)."""
    from confluent_kafka import Producer
    producer = Producer(producer_config(cfg, **{"partitioner": "murmur2_random"}))
    client = make_client(cfg, client_id)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))

    def on_message(_c, _u, msg) -> None:
        device = msg.topic.split("/")[-2].encode()
        if per_reading:
            for metric, ts, value in senml_readings(orjson.loads(msg.payload)):
                doc = {"device_id": device.decode(), "metric": metric, "ts": ts, "value": value}
                produce(device, orjson.dumps(doc))
        else:
            produce(device, msg.payload)

    def produce(key: bytes, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)

    client.on_message = on_message
    connect(client, cfg, clean_start=False, session_expiry_s=3600)
    client.subscribe(f"$share/{cfg.bridge.share_group}/{TopicPattern(cfg.mqtt.topic_pattern).subscription()}", qos=1)
    while not stopping:
        client.loop(timeout=0.05)
    producer.flush(30)
    client.disconnect()


# --- baseline 1: per-message Faust agent, per-row inserts ----------------------------------------

def faust_worker(cfg: Config, topic_name: str, store_dir: str) -> int:
    """One Faust agent handling one reading per message, one chDB INSERT per row."""
    from aimass.streams.app import make_app, run_worker
    app = make_app(cfg, "bench-per-message")
    topic = app.topic(topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                      partitions=cfg.kafka.partitions)
    store = open_store(store_dir)
    counter = StoredCounter(store_dir)
    windows: dict[tuple[str, str], Window] = {}

    @app.agent(topic)
    async def per_message(stream):
        async for value in stream:
            r = orjson.loads(value)
            device, metric, ts, v = r["device_id"], r["metric"], r["ts"], r["value"]
            store.query(f"INSERT INTO bench.readings (device_id, metric, ts, value) VALUES "
                        f"('{device}', '{metric}', fromUnixTimestamp64Milli({ts}), {v!r})")
            start = ts - ts % WINDOW_MS
            w = windows.get((device, metric))
            if w is not None and start > w.start_ms:  # the event time moved past the window: emit it
                store.query("INSERT INTO bench.windows (device_id, metric, window_start, count, mean, min, max, std) "
                            f"VALUES ('{device}', '{metric}', fromUnixTimestamp64Milli({w.start_ms}), "
                            + ", ".join(repr(x) for x in w.row()) + ")")
                w = None
            if w is None:
                w = windows[(device, metric)] = Window(start)
            w.add(v)
            counter.add(1)

    @app.timer(0.5)
    async def write_count():
        counter.flush()

    return run_worker(app, cfg)


# --- baseline 2: Quix Streams -------------------------------------------------------------------

def quix_app(cfg: Config, topic_name: str, store_dir: str) -> int:
    """Quix Streams: packs expanded to readings, readings sunk in batches, 10 s tumbling windows."""
    import pyarrow as pa
    from quixstreams import Application
    from quixstreams.sinks import BatchingSink, SinkBatch

    store = open_store(store_dir)
    counter = StoredCounter(store_dir)

    class ChdbSink(BatchingSink):
        """Quix's batching sink: one chDB insert per checkpoint batch."""

        def __init__(self, table: str, columns: tuple[str, ...]):
            super().__init__()
            self.table, self.columns = table, columns

        def write(self, batch: SinkBatch) -> None:
            rows = [item.value for item in batch]
            data = pa.table({c: [r[c] for r in rows] for c in self.columns})  # noqa: F841 (read by chDB)
            cols = ", ".join(self.columns)
            store.query(f"INSERT INTO bench.{self.table} ({cols}) SELECT {cols} FROM Python(data)")
            if self.table == "readings":
                counter.add(len(rows))
                counter.flush()

    app = Application(broker_address=cfg.kafka.bootstrap, consumer_group=f"{topic_name}-quix",
                      auto_offset_reset="earliest", state_dir=str(Path(store_dir) / "state"), loglevel="WARNING",
                      consumer_extra_config={"session.timeout.ms": cfg.kafka.session_timeout_ms})
    sdf = app.dataframe(app.topic(topic_name, value_deserializer="json"))
    readings = sdf.apply(lambda pack: [{"metric": m, "ts": ts, "value": v} for m, ts, v in senml_readings(pack)],
                         expand=True)
    readings = readings.apply(lambda r, key, ts, headers: {**r, "device_id": key.decode()}, metadata=True)
    readings = readings.set_timestamp(lambda r, ts, key, headers: r["ts"])
    readings.apply(lambda r: {**r, "ts": pa.scalar(r["ts"], pa.timestamp("ms", "UTC"))}).sink(
        ChdbSink("readings", ("device_id", "metric", "ts", "value")))

    def init(r: dict) -> dict:
        return {r["metric"]: [1, r["value"], r["value"] ** 2, r["value"], r["value"]]}

    def reduce(acc: dict, r: dict) -> dict:
        v, a = r["value"], acc.get(r["metric"])
        if a is None:
            acc[r["metric"]] = [1, v, v * v, v, v]
        else:
            a[0] += 1
            a[1] += v
            a[2] += v * v
            a[3], a[4] = min(a[3], v), max(a[4], v)
        return acc

    def window_rows(w: dict, key: bytes, ts, headers) -> list[dict]:
        rows = []
        for metric, (n, s, ss, lo, hi) in w["value"].items():
            mean = s / n
            rows.append({"device_id": key.decode(), "metric": metric,
                         "window_start": pa.scalar(w["start"], pa.timestamp("ms", "UTC")), "count": n,
                         "mean": mean, "min": lo, "max": hi, "std": math.sqrt(max(0.0, ss / n - mean * mean))})
        return rows

    windows = readings.tumbling_window(WINDOW_MS).reduce(reduce, init).final()
    windows.apply(window_rows, expand=True, metadata=True).sink(
        ChdbSink("windows", ("device_id", "metric", "window_start", "count", "mean", "min", "max", "std")))
    app.run()
    return 0


# --- reading a baseline's store back (after its process stopped) --------------------------------

def stats(store_dir: str) -> dict:
    """Rows, windows, and the inserted_at quantiles the benchmark derives rates and latency from."""
    store = open_store(store_dir)

    def one(sql: str) -> list:
        return json.loads(store.query(sql, "JSONCompact").bytes())["data"][0]

    n, distinct, t10, t90, first, last = one(
        "SELECT count(), uniqExact(device_id, metric, ts), toUnixTimestamp64Milli(quantileExact(0.1)(inserted_at)), "
        "toUnixTimestamp64Milli(quantileExact(0.9)(inserted_at)), toUnixTimestamp64Milli(min(inserted_at)), "
        "toUnixTimestamp64Milli(max(inserted_at)) FROM bench.readings")
    (windows,) = one("SELECT count() FROM bench.windows")
    return {"stored": int(n), "distinct": int(distinct), "t10_ms": int(t10 or 0), "t90_ms": int(t90 or 0),
            "first_ms": int(first or 0), "last_ms": int(last or 0), "windows": int(windows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    fwd = sub.add_parser("forwarder", help="MQTT -> Kafka, one message per MQTT message or per reading")
    fwd.add_argument("client_id")
    fwd.add_argument("topic")
    fwd.add_argument("--per-reading", action="store_true")
    for name in ("faust", "quix"):
        s = sub.add_parser(name, help=f"the {name} baseline's processing stage")
        s.add_argument("topic")
        s.add_argument("store")
    sub.add_parser("stats", help="print the stored counts of a stopped baseline as JSON").add_argument("store")
    args = p.parse_args()
    if args.what == "stats":
        print(json.dumps(stats(args.store)))
        return 0
    cfg = load_config()
    if args.what == "forwarder":
        forwarder(cfg, args.client_id, args.topic, args.per_reading)
        return 0
    if args.what == "faust":
        sys.argv = [sys.argv[0], "worker"]  # Faust's worker reads its own command line
        return faust_worker(cfg, args.topic, args.store)
    return quix_app(cfg, args.topic, args.store)


if __name__ == "__main__":
    sys.exit(main())
