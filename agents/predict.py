"""The predict stage (`aimass predict`): window rows in, prediction rows and drift events out.

Per poll: decode the window records, run River prequentially per partition (predict, then
learn; ``aimass.models.online``), send every new feature row to Triton in batched requests
(``aimass.models.triton_client``), and write the PREDICTIONS of each output partition plus the
DRIFT events (``aimass.streams.kafka.TableProducer``: records under ``kafka.max_record_bytes``).
Only windows of ``predict.window_s`` are predicted (other sizes are for other consumers); a
record that is not a WINDOWS batch, or a window with a non-finite mean, goes to the dead-letter
topic with its reason (a bounded prefix of the record). Rows Triton did not answer (breaker
open, timeout, error) carry River's forecast and anomaly score and ``degraded=True``: every request has
``triton.timeout_s``, and once the breaker is open no poll waits on Triton at all.

Commit protocol (at least once, restart-safe): every ``predict.checkpoint_every_s`` and on
partition revoke and shutdown, (1) flush the producer and check every delivery, (2) save each
partition's state with the input offset it covers in the state store
(``aimass.streams.statestore``: a compacted Kafka topic, so replicas need no shared volume, or
files on one host), (3) commit the input offsets. The partition's new owner (after a restart, a
rebalance or a replica's death) loads that checkpoint and resumes at its offset, so state and
position always match; a partition without one starts fresh from the committed offset.

Why confluent-kafka and not the Faust app (streams/app.py): Faust commits acked offsets on
its own timer (``broker_commit_interval``), independently of whether our outputs are
delivered and the River state is checkpointed, and it has no hook to save and load
per-partition state exactly at revoke/assign. confluent-kafka gives explicit commits and
synchronous rebalance callbacks, which this protocol needs.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import pickle
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, start_http_server

from aimass.core.config import Config
from aimass.models import online
from aimass.models.features import denormalize
from aimass.models.triton_client import TritonModels
from aimass.core import contract
from aimass.streams.kafka import ConsumerLag, TableProducer, consume_available, consumer_config
from aimass.streams.statestore import Checkpoint, open_store

log = logging.getLogger(__name__)

ROWS = Counter("aimass_predict_rows_total", "prediction rows produced")
DEGRADED_ROWS = Counter("aimass_predict_degraded_rows_total", "prediction rows from River alone (Triton unavailable)")
DRIFT_EVENTS = Counter("aimass_predict_drift_events_total", "ADWIN drift events on forecast residuals")
POLL_MESSAGES = 500


# --- the prediction core (no Kafka) -----------------------------------------------------

class Predictor:
    """River state per input partition plus the Triton client; turns window rows into predictions."""

    def __init__(self, cfg: Config, triton: TritonModels | None):
        self.cfg, self.triton = cfg, triton
        self.k = cfg.predict.history_windows
        self.partitions: dict[int, online.OnlinePartition] = {}

    def state(self, partition: int) -> online.OnlinePartition:
        if partition not in self.partitions:
            self.partitions[partition] = online.OnlinePartition(self.k, self.cfg.predict.band_k)
        return self.partitions[partition]

    def usable(self, windows: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(rows of the configured window size with a finite mean, rows with a non-finite mean)."""
        w = windows.filter(pc.equal(windows["window_s"], self.cfg.predict.window_s))
        finite = pc.is_finite(w["mean"]).fill_null(False)
        return w.filter(finite), w.filter(pc.invert(finite))

    async def predict(self, batches: list[tuple[int, pa.Table]], now_ms: int | None = None
                      ) -> tuple[pa.Table, pa.Table]:
        """(predictions, drift events) for usable window rows of several partitions; ONE Triton call."""
        steps = []
        for partition, w in batches:
            keys = list(zip(w["tenant"].to_pylist(), w["device_id"].to_pylist(), w["metric"].to_pylist(),
                            w["window_s"].to_pylist()))
            res = self.state(partition).step(keys, w["window_end_ms"].to_pylist(), w["mean"].to_pylist())
            steps.append((w, res))
        x = np.concatenate([r.x for _, r in steps]) if steps else np.empty((0, self.k), np.float32)
        served = None
        if self.triton is not None and len(x):
            served = await self.triton.infer(x)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        preds, drifts, offset = [], [], 0
        for w, res in steps:
            n = len(res.rows)
            part = None if served is None else _slice(served, offset, n)
            offset += n
            preds.append(self._rows(w.take(res.rows), res, part, now_ms))
            drifts.append(_drift_rows(w, res, now_ms))
        predictions = pa.concat_tables(preds) if preds else contract.empty(contract.PREDICTIONS)
        drift = pa.concat_tables(drifts) if drifts else contract.empty(contract.DRIFT)
        ROWS.inc(predictions.num_rows)
        DEGRADED_ROWS.inc(pc.sum(predictions["degraded"]).as_py() or 0)
        DRIFT_EVENTS.inc(drift.num_rows)
        return predictions, drift

    def _rows(self, w: pa.Table, res: online.OnlineResult, triton: dict | None, now_ms: int) -> pa.Table:
        n = len(res.rows)
        nan = np.full(n, np.nan)
        served = triton["served"] if triton else np.zeros(n, dtype=bool)
        f_triton = denormalize(triton["forecast"], res.mu, res.sigma) if triton else nan
        a_triton = triton["score"] if triton else nan
        forecast = np.where(served, f_triton, res.forecast)
        anomaly = np.where(served, a_triton, res.anomaly)
        f_model = np.where(served, triton["forecaster_model"] if triton else "", online.FORECASTER_NAME)
        a_model = np.where(served, triton["anomaly_model"] if triton else "", online.ANOMALY_NAME)
        end = w["window_end_ms"].to_numpy()
        return pa.table({
            "tenant": w["tenant"], "device_id": w["device_id"], "metric": w["metric"], "window_s": w["window_s"],
            "window_end_ms": end, "target_end_ms": end + w["window_s"].to_numpy().astype(np.int64) * 1000,
            "observed_mean": w["mean"], "forecast_triton": f_triton, "forecast_river": res.forecast,
            "forecast": forecast, "band_low": forecast - res.band_scale, "band_high": forecast + res.band_scale,
            "anomaly_triton": a_triton, "anomaly_river": res.anomaly, "anomaly": anomaly,
            "forecaster_model": f_model, "anomaly_model": a_model,
            # Degraded = Triton was wanted and did not answer; with --no-triton River is the design.
            "degraded": ~served if self.triton is not None else np.zeros(n, dtype=bool),
            "max_received_ms": w["max_received_ms"], "predicted_ms": np.full(n, now_ms, dtype=np.int64),
        }, schema=contract.PREDICTIONS)


def _slice(out, start: int, n: int) -> dict:
    """One partition's share of a batched Triton answer."""
    return {"served": out.served[start:start + n], "forecast": out.forecast[start:start + n],
            "score": out.score[start:start + n], "forecaster_model": out.forecaster_model,
            "anomaly_model": out.anomaly_model}


def _drift_rows(w: pa.Table, res: online.OnlineResult, now_ms: int) -> pa.Table:
    if not res.drift:
        return contract.empty(contract.DRIFT)
    idx = [i for i, _, _ in res.drift]
    rows = w.take(idx)
    return pa.table({
        "tenant": rows["tenant"], "device_id": rows["device_id"], "metric": rows["metric"],
        "window_s": rows["window_s"], "detected_ms": np.full(len(idx), now_ms, dtype=np.int64),
        "window_end_ms": rows["window_end_ms"], "detector": ["ADWIN"] * len(idx),
        "model": [online.FORECASTER_NAME] * len(idx),
        "residual_mean_before": [b for _, b, _ in res.drift], "residual_mean_after": [a for _, _, a in res.drift],
    }, schema=contract.DRIFT)


def rejects(rows: pa.Table, reason: str, detail: str, now_ms: int) -> pa.Table:
    """REJECTS rows for window rows the stage cannot use (or one row for an undecodable record)."""
    n = rows.num_rows
    return pa.table({
        "stage": ["predict"] * n, "reason": [reason] * n, "detail": [detail] * n, "mqtt_topic": [""] * n,
        "payload": pa.nulls(n, pa.binary()), "tenant": rows["tenant"], "device_id": rows["device_id"],
        "metric": rows["metric"], "ts_ms": rows["window_end_ms"], "value": rows["mean"], "unit": [""] * n,
        "received_ms": rows["max_received_ms"], "rejected_ms": np.full(n, now_ms, dtype=np.int64),
    }, schema=contract.REJECTS)


def undecodable(value: bytes, detail: str, now_ms: int) -> pa.Table:
    """One REJECTS row keeping (a bounded prefix of) the bytes of a record that is not a WINDOWS batch."""
    payload, note = contract.payload_excerpt(value)
    row = {name: [None] for name in contract.REJECTS.names}
    row.update(stage=["predict"], reason=["bad_record"], detail=[detail + (f"; {note}" if note else "")],
               payload=[payload], rejected_ms=[now_ms])
    return pa.table(row, schema=contract.REJECTS)


# --- a partition's state <-> checkpoint bytes: the one place that knows the state class ----

def state_bytes(state: online.OnlinePartition) -> bytes:
    """A partition's state as checkpoint bytes (pickled: the store seals them and checks the seal before loading)."""
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def state_from(checkpoint: Checkpoint | None, k: int, band_k: float) -> online.OnlinePartition:
    """The state in an authenticated checkpoint, or a fresh one if there is none (or it is for another K);
    either way with the configured ``band_k``."""
    state = pickle.loads(checkpoint.data) if checkpoint is not None else None
    if isinstance(state, online.OnlinePartition) and state.k == k:
        state.band_k = band_k
        return state
    return online.OnlinePartition(k, band_k)


# --- the Kafka shell --------------------------------------------------------------------

class PredictStage:
    """Consumes WINDOW_ROWS, produces PREDICTION_ROWS / DRIFT_EVENTS / DEAD_LETTER, commits safely."""

    def __init__(self, cfg: Config, use_triton: bool = True):
        self.cfg = cfg
        prefix = cfg.kafka.topic_prefix
        self.group = f"{prefix}-predict"
        self.topics = {t: t.name(prefix) for t in (contract.WINDOW_ROWS, contract.PREDICTION_ROWS,
                                                    contract.DRIFT_EVENTS, contract.DEAD_LETTER)}
        self.store = open_store(cfg)
        self.lag = ConsumerLag("predict", self.group)
        self.triton = None
        if use_triton:
            t = cfg.triton
            self.triton = TritonModels(t.url, t.timeout_s, t.max_rows_per_request, t.max_in_flight,
                                       t.breaker_failures, t.breaker_reset_s)
        self.predictor = Predictor(cfg, self.triton)
        self.out = TableProducer(cfg, "predict")
        self.consumer = Consumer(consumer_config(cfg, self.group))
        self.next_offsets: dict[int, int] = {}   # partition -> next offset to commit
        self.stats = {"records": 0, "rows": 0, "degraded": 0, "drift": 0, "rejected": 0}

    # Rebalance callbacks run inside the consumer's poll, i.e. between two batches.
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        src, resumed = self.topics[contract.WINDOW_ROWS], {}
        for tp in partitions:
            checkpoint = self.store.load(self.group, tp.partition)
            self.predictor.partitions[tp.partition] = state_from(checkpoint, self.predictor.k, self.cfg.predict.band_k)
            if checkpoint is not None and src in checkpoint.offsets:
                tp.offset = resumed[tp.partition] = checkpoint.offsets[src]
        consumer.assign(partitions)
        log.info("assigned partitions %s; resuming from checkpoints at %s", [tp.partition for tp in partitions], resumed)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.commit()
        self.lag.revoked(partitions)
        for tp in partitions:
            self.predictor.partitions.pop(tp.partition, None)
            self.next_offsets.pop(tp.partition, None)

    def commit(self) -> None:
        """Flush outputs, checkpoint each partition's state with its offset, then commit the offsets."""
        if not self.next_offsets:
            return
        try:
            self.out.flush(60)
        except KafkaException as exc:
            raise RuntimeError(f"outputs not delivered ({exc}); not committing, the input will be replayed "
                               "after a restart") from None
        src = self.topics[contract.WINDOW_ROWS]
        for partition, offset in self.next_offsets.items():
            if partition in self.predictor.partitions:
                self.store.save(self.group, partition, state_bytes(self.predictor.partitions[partition]),
                                {src: offset})
        offsets = [TopicPartition(src, p, o) for p, o in self.next_offsets.items()]
        self.consumer.commit(offsets=offsets, asynchronous=False)
        self.lag.committed(offsets)
        self.next_offsets.clear()

    async def handle(self, messages: list) -> None:
        """Decode, predict and produce one poll's worth of records."""
        now_ms = int(time.time() * 1000)
        by_partition: dict[int, list[pa.Table]] = {}
        for msg in messages:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", msg.error())
                continue
            self.next_offsets[msg.partition()] = msg.offset() + 1
            self.stats["records"] += 1
            try:
                table = contract.decode(msg.value() or b"", contract.WINDOWS)
            except ValueError as exc:
                self.out.produce(contract.DEAD_LETTER, undecodable(msg.value() or b"", str(exc), now_ms))
                self.stats["rejected"] += 1
                continue
            good, bad = self.predictor.usable(table)
            if bad.num_rows:
                self.out.produce(contract.DEAD_LETTER,
                                 rejects(bad, "non_finite_mean", "window mean is NaN/inf", now_ms))
                self.stats["rejected"] += bad.num_rows
            by_partition.setdefault(msg.partition(), []).append(good)
        batches = [(p, pa.concat_tables(ts)) for p, ts in by_partition.items()]
        predictions, drift = await self.predictor.predict(batches, now_ms)
        self.out.produce(contract.PREDICTION_ROWS, predictions)
        self.out.produce(contract.DRIFT_EVENTS, drift)
        self.stats["rows"] += predictions.num_rows
        self.stats["degraded"] += pc.sum(predictions["degraded"]).as_py() or 0
        self.stats["drift"] += drift.num_rows

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; commit on the checkpoint interval, on revoke and at the end."""
        self.consumer.subscribe([self.topics[contract.WINDOW_ROWS]], on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        last_commit = last_log = time.monotonic()
        failed = False
        try:
            while not stop.is_set():
                messages = await asyncio.to_thread(consume_available, self.consumer, POLL_MESSAGES, 0.2)
                if messages:
                    await self.handle(messages)
                if time.monotonic() - last_commit >= self.cfg.predict.checkpoint_every_s:
                    self.commit()
                    self.lag.update(self.consumer)
                    last_commit = time.monotonic()
                if time.monotonic() - last_log >= 10:
                    log.info("predict: %s, breaker %s", self.stats,
                             self.triton.breaker.state if self.triton else "off (--no-triton)")
                    last_log = time.monotonic()
            self.commit()
        except BaseException:
            failed = True
            raise
        finally:
            if failed:  # the revoke in close() must not commit offsets whose outputs may be missing
                self.next_offsets.clear()
            self.consumer.close()
            self.store.close()
            self.out.producer.flush(30)
            if self.triton is not None:
                await self.triton.close()


# --- CLI --------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.description = (f"Consume window rows ({contract.WINDOW_ROWS.suffix}), predict with Triton + River, produce "
                     f"{contract.PREDICTION_ROWS.suffix} and {contract.DRIFT_EVENTS.suffix}. Config: [predict], [triton].")
    p.add_argument("--no-triton", action="store_true", help="River only (predictions not marked degraded)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.predict.metrics_port:
        start_http_server(cfg.predict.metrics_port, addr=cfg.run.metrics_host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stage = PredictStage(cfg, use_triton=not args.no_triton)
        log.info("predict: %s -> %s, Triton %s, checkpoints in the %s state store", stage.topics[contract.WINDOW_ROWS],
                 stage.topics[contract.PREDICTION_ROWS], "off" if args.no_triton else cfg.triton.url, cfg.state.store)
        await stage.run(stop)

    asyncio.run(main())
    return 0
