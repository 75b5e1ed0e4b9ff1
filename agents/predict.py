"""The predict stage (`aimass predict`): window rows in, prediction rows and drift events out.

Per poll: decode the window records, run the online detectors of each partition over them
(``aimass.models.detect``: numba kernels over arrays of series and devices; every window is
judged before it is learned), send every new feature row to Triton in batched requests
(``aimass.models.triton_client``), and write the PREDICTIONS of each output partition plus the
DRIFT events (``aimass.streams.kafka.TableProducer``: records under ``kafka.max_record_bytes``).
Only windows of ``predict.window_s`` are predicted (other sizes are for other consumers); a
record that is not a WINDOWS batch, or a window with a non-finite mean, goes to the dead-letter
topic with its reason (a bounded prefix of the record); so do the windows of a batch whose
prediction failed (``predict_failed``: a defect never stops the stage). Rows Triton did not answer (breaker
open, timeout, error) carry the online forecast and ``degraded=True``: every request has
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
delivered and the detector state is checkpointed, and it has no hook to save and load
per-partition state exactly at revoke/assign. confluent-kafka gives explicit commits and
synchronous rebalance callbacks, which this protocol needs.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter, start_http_server

from aimass.core.config import Config
from aimass.models import detect, features
from aimass.models import series_model as sm
from aimass.models.features import denormalize
from aimass.models.triton_client import TritonModels
from aimass.core import contract
from aimass.streams.kafka import ConsumerLag, TableProducer, consume_available, consumer_config
from aimass.streams.statestore import Checkpoint, open_store

log = logging.getLogger(__name__)

ROWS = Counter("aimass_predict_rows_total", "prediction rows produced")
DEGRADED_ROWS = Counter("aimass_predict_degraded_rows_total", "prediction rows without Triton (Triton unavailable)")
DRIFT_EVENTS = Counter("aimass_predict_drift_events_total", "series that accepted a new normal (drift events)")
POLL_MESSAGES = 500
FORECASTER_NAME = "holt_seasonal:online"
SERIES_MODEL_NAME = "series:online"
DEVICE_MODEL_NAME = "device_mahalanobis:online"


# --- the prediction core (no Kafka) -----------------------------------------------------

class Predictor:
    """Online detector state per input partition plus the Triton client; window rows in, predictions out."""

    def __init__(self, cfg: Config, triton: TritonModels | None):
        self.cfg, self.triton = cfg, triton
        self.k = cfg.predict.history_windows
        self.partitions: dict[int, detect.PartitionDetectors] = {}

    def state(self, partition: int) -> detect.PartitionDetectors:
        if partition not in self.partitions:
            self.partitions[partition] = detect.PartitionDetectors(self.cfg.detect, self.k)
        return self.partitions[partition]

    def usable(self, windows: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(rows of the configured window size with a finite mean, rows with a non-finite mean)."""
        w = windows.filter(pc.equal(windows["window_s"], self.cfg.predict.window_s))
        finite = pc.is_finite(w["mean"]).fill_null(False)
        return w.filter(finite), w.filter(pc.invert(finite))

    async def predict(self, batches: list[tuple[int, pa.Table]], now_ms: int | None = None
                      ) -> tuple[pa.Table, pa.Table]:
        """(predictions, drift events) for usable window rows of several partitions; ONE Triton call."""
        steps = [(w, self.state(partition).step(w)) for partition, w in batches]
        norm = [features.normalize(res.history) for _, res in steps]
        x = np.concatenate([z for z, _, _ in norm]) if norm else np.empty((0, self.k), np.float32)
        served = None
        if self.triton is not None and len(x):
            served = await self.triton.infer(x)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        preds, drifts, offset = [], [], 0
        for (w, res), (_, mu, sigma) in zip(steps, norm):
            n = len(res.rows)
            part = None if served is None else _slice(served, offset, n)
            offset += n
            rows = w.take(res.rows)
            preds.append(self._rows(rows, res, part, mu, sigma, now_ms))
            preds.append(_device_rows(w, res, now_ms))
            drifts.append(_drift_rows(rows, res, now_ms))
        predictions = pa.concat_tables(preds) if preds else contract.empty(contract.PREDICTIONS)
        drift = pa.concat_tables(drifts) if drifts else contract.empty(contract.DRIFT)
        ROWS.inc(predictions.num_rows)
        DEGRADED_ROWS.inc(pc.sum(predictions["degraded"]).as_py() or 0)
        DRIFT_EVENTS.inc(drift.num_rows)
        return predictions, drift

    def _rows(self, w: pa.Table, res: detect.DetectResult, triton: dict | None, mu: np.ndarray,
              sigma: np.ndarray, now_ms: int) -> pa.Table:
        n = len(res.rows)
        out = res.series
        nan = np.full(n, np.nan)
        served = triton["served"] if triton else np.zeros(n, dtype=bool)
        f_triton = denormalize(triton["forecast"], mu, sigma) if triton else nan
        online_forecast = out[:, sm.OUT_NEXT]
        forecast = np.where(served, f_triton, online_forecast)
        band = self.cfg.predict.band_k * out[:, sm.OUT_SCALE]
        end = w["window_end_ms"].to_numpy()
        return pa.table({
            "tenant": w["tenant"], "device_id": w["device_id"], "metric": w["metric"], "window_s": w["window_s"],
            "window_end_ms": end, "target_end_ms": end + w["window_s"].to_numpy().astype(np.int64) * 1000,
            "observed_mean": w["mean"], "forecast_triton": f_triton, "forecast_online": online_forecast,
            "forecast": forecast, "band_low": forecast - band, "band_high": forecast + band,
            "anomaly_triton": triton["score"] if triton else nan, "anomaly_level": out[:, sm.OUT_LEVEL],
            "anomaly_spread": out[:, sm.OUT_SPREAD], "anomaly_change": out[:, sm.OUT_CHANGE], "anomaly_device": nan,
            "anomaly": out[:, sm.OUT_ANOMALY], "regime_change": np.zeros(n, dtype=bool),
            "forecaster_model": np.where(served, triton["forecaster_model"] if triton else "", FORECASTER_NAME),
            "anomaly_model": np.full(n, SERIES_MODEL_NAME),
            # Degraded = Triton was wanted and did not answer; with --no-triton the online models are the design.
            "degraded": ~served if self.triton is not None else np.zeros(n, dtype=bool),
            "max_received_ms": w["max_received_ms"], "predicted_ms": np.full(n, now_ms, dtype=np.int64),
        }, schema=contract.PREDICTIONS)


def _slice(out, start: int, n: int) -> dict:
    """One partition's share of a batched Triton answer."""
    return {"served": out.served[start:start + n], "forecast": out.forecast[start:start + n],
            "score": out.score[start:start + n], "forecaster_model": out.forecaster_model,
            "anomaly_model": out.anomaly_model}


def _device_rows(w: pa.Table, res: detect.DetectResult, now_ms: int) -> pa.Table:
    """One prediction row (metric ``DEVICE_METRIC``) per device window the device model judged."""
    judged = np.flatnonzero((res.device_end > 0) & np.isfinite(res.device_score))
    rows = w.take(res.rows[judged])
    n = len(judged)
    end = res.device_end[judged]
    nan = np.full(n, np.nan)
    score = res.device_score[judged]
    return pa.table({
        "tenant": rows["tenant"], "device_id": rows["device_id"], "metric": [contract.DEVICE_METRIC] * n,
        "window_s": rows["window_s"], "window_end_ms": end,
        "target_end_ms": end + rows["window_s"].to_numpy().astype(np.int64) * 1000,
        "observed_mean": nan, "forecast_triton": nan, "forecast_online": nan, "forecast": nan, "band_low": nan,
        "band_high": nan, "anomaly_triton": nan, "anomaly_level": nan, "anomaly_spread": nan, "anomaly_change": nan,
        "anomaly_device": score, "anomaly": score, "regime_change": res.device_changed[judged],
        "forecaster_model": [""] * n, "anomaly_model": [DEVICE_MODEL_NAME] * n, "degraded": np.zeros(n, dtype=bool),
        "max_received_ms": rows["max_received_ms"], "predicted_ms": np.full(n, now_ms, dtype=np.int64),
    }, schema=contract.PREDICTIONS)


def _drift_rows(w: pa.Table, res: detect.DetectResult, now_ms: int) -> pa.Table:
    """A drift event per series that accepted a new normal (``regime_windows`` outliers in a row)."""
    idx = np.flatnonzero(res.series[:, sm.OUT_REGIME] > 0)
    if not len(idx):
        return contract.empty(contract.DRIFT)
    rows = w.take(idx)
    forecast = res.series[idx, sm.OUT_FORECAST]
    return pa.table({
        "tenant": rows["tenant"], "device_id": rows["device_id"], "metric": rows["metric"],
        "window_s": rows["window_s"], "detected_ms": np.full(len(idx), now_ms, dtype=np.int64),
        "window_end_ms": rows["window_end_ms"], "detector": ["new_regime"] * len(idx),
        "model": [SERIES_MODEL_NAME] * len(idx),
        "residual_mean_before": forecast, "residual_mean_after": rows["mean"].to_numpy(zero_copy_only=False),
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

def state_bytes(state: detect.PartitionDetectors) -> bytes:
    """A partition's state as checkpoint bytes (a NumPy archive: data, never code; the store seals it too)."""
    return state.to_bytes()


def state_from(checkpoint: Checkpoint | None, cfg: Config) -> detect.PartitionDetectors:
    """The state in an authenticated checkpoint, or a fresh one if there is none (or it is of another layout)."""
    if checkpoint is None:
        return detect.PartitionDetectors(cfg.detect, cfg.predict.history_windows)
    return detect.PartitionDetectors.from_bytes(checkpoint.data, cfg.detect, cfg.predict.history_windows)


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
            self.triton = TritonModels(t.grpc_address(), t.timeout_s, t.max_rows_per_request, t.max_in_flight,
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
            self.predictor.partitions[tp.partition] = state_from(checkpoint, self.cfg)
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
        try:
            predictions, drift = await self.predictor.predict(batches, now_ms)
        except Exception as exc:  # a defect on some input must not stop the stage: its windows are dead letters
            log.exception("predicting a batch failed; its %d windows go to the dead-letter topic",
                          sum(t.num_rows for _, t in batches))
            detail = f"{type(exc).__name__}: {exc}"[:300]
            for _, table in batches:
                self.out.produce(contract.DEAD_LETTER, rejects(table, "predict_failed", detail, now_ms))
                self.stats["rejected"] += table.num_rows
            return
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
    p.description = (f"Consume window rows ({contract.WINDOW_ROWS.suffix}), predict with the online detectors + Triton, produce "
                     f"{contract.PREDICTION_ROWS.suffix} and {contract.DRIFT_EVENTS.suffix}. Config: [predict], [triton].")
    p.add_argument("--no-triton", action="store_true", help="online detectors only (predictions not marked degraded)")


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
                 stage.topics[contract.PREDICTION_ROWS], "off" if args.no_triton else cfg.triton.grpc_address(), cfg.state.store)
        await stage.run(stop)

    asyncio.run(main())
    return 0
