"""Device simulator (`aimass simulate`): realistic telemetry with injected, labelled anomalies.

Each series (device x metric) is a daily sine around a base level plus a slow drift and
Gaussian noise; devices go silent for a while (sensor dropouts); anomalies (spike,
level_shift, stuck, drift) are injected and recorded as ground-truth labels.

Two ways to use it:

- offline: ``generate(...) -> (readings, labels)`` Arrow tables in the contract's READINGS and
  LABELS schemas (training sets, tests), deterministic for a seed;
- live: ``publish(cfg, spec)`` sends readings through MQTT at a target rate, stamping each
  tick with the wall clock so latency can be measured downstream, and returns a summary.

Chaos (``Chaos``, live or offline through ``chaos_messages``): devices whose clocks are off
(fixed and drifting), messages reordered within and beyond the allowed lateness, re-sent
duplicates, a backlog sent in a burst after an outage, oversized and malformed messages. Every
message carries the effects applied to it, so a test knows which readings to expect stored,
rejected as duplicate or late, or rejected by the bridge.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from aimass.core.config import Config
from aimass.core import contract
from aimass.streams.mqtt import Publisher
from aimass.streams.payloads import TopicPattern, encode_label, encode_reading, encode_senml

ANOMALY_KINDS = ("spike", "level_shift", "stuck", "drift")
FORMATS = ("json", "multi", "senml")


class MetricModel(NamedTuple):
    """Typical behaviour of one kind of sensor: unit, level, daily swing, noise, anomaly scale."""

    unit: str
    base: float
    daily_amp: float
    noise_sd: float
    scale: float  # typical anomaly size


METRICS: dict[str, MetricModel] = {
    "temp": MetricModel("Cel", 21.0, 3.0, 0.15, 3.0),
    "humidity": MetricModel("%RH", 45.0, 8.0, 0.8, 10.0),
    "power": MetricModel("W", 500.0, 150.0, 10.0, 150.0),
    "pressure": MetricModel("hPa", 1013.0, 2.0, 0.2, 4.0),
    "vibration": MetricModel("m/s2", 0.5, 0.1, 0.02, 0.3),
    "voltage": MetricModel("V", 230.0, 2.0, 0.5, 8.0),
    "current": MetricModel("A", 2.2, 0.6, 0.05, 1.0),
    "co2": MetricModel("ppm", 600.0, 150.0, 15.0, 300.0),
    "flow": MetricModel("l/s", 3.0, 1.0, 0.1, 1.5),
    "rpm": MetricModel("1/min", 1500.0, 100.0, 10.0, 300.0),
}


@dataclass
class SimSpec:
    """What to simulate: devices x metrics at ``rate_hz`` readings per series per second."""

    devices: int | Sequence[str] = 10
    metrics: int | Sequence[str] = 3
    rate_hz: float = 1.0
    duration_s: float = 60.0
    seed: int = 0
    tenant: str = "demo"
    anomalies: int = 0
    dropout: float = 0.0          # fraction of time a device is silent
    format: str = "json"          # json (one reading a message) | multi (one object a device-tick) | senml
    pack_size: int = 10           # SenML records per pack
    qos: int | None = None        # default: mqtt.qos
    publish_labels: bool = False  # also publish each label on mqtt.labels_pattern when its anomaly ends
    chaos: "Chaos | None" = None  # live: send ``chaos_messages`` instead of clean ticks

    def device_ids(self) -> list[str]:
        return [f"dev-{i:04d}" for i in range(self.devices)] if isinstance(self.devices, int) else list(self.devices)

    def metric_names(self) -> list[str]:
        names = list(METRICS)[:self.metrics] if isinstance(self.metrics, int) else list(self.metrics)
        unknown = [m for m in names if m not in METRICS]
        if unknown or not names:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        return names


@dataclass
class Anomaly:
    series: int
    start_ms: int
    end_ms: int  # exclusive
    kind: str
    magnitude: float


@dataclass
class Signals:
    """The deterministic signal model of every series (row = device-major, metric-minor)."""

    spec: SimSpec
    start_ms: int
    devices: list[str] = field(init=False)
    metrics: list[str] = field(init=False)
    anomalies: list[Anomaly] = field(init=False)

    def __post_init__(self) -> None:
        self.devices = self.spec.device_ids()
        self.metrics = self.spec.metric_names()
        self.rng = np.random.default_rng(self.spec.seed)
        models = [METRICS[m] for _ in self.devices for m in self.metrics]
        n = len(models)
        rng = self.rng
        self.unit = [m.unit for m in models]
        self.noise_sd = np.array([m.noise_sd for m in models])
        self.scale = np.array([m.scale for m in models])
        self.base = np.array([m.base for m in models]) + rng.normal(0, 0.1, n) * self.scale
        self.amp = np.array([m.daily_amp for m in models]) * rng.uniform(0.7, 1.3, n)
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.drift_per_day = rng.normal(0, 0.05, n) * self.scale
        self.anomalies = self._plan_anomalies()
        self.dropouts = self._plan_dropouts()

    @property
    def n_series(self) -> int:
        return len(self.devices) * len(self.metrics)

    def series_name(self, s: int) -> tuple[str, str]:
        return self.devices[s // len(self.metrics)], self.metrics[s % len(self.metrics)]

    def _plan_anomalies(self) -> list[Anomaly]:
        spec, rng = self.spec, self.rng
        dur_ms = int(spec.duration_s * 1000)
        tick_ms = max(1, int(1000 / spec.rate_hz))
        planned: list[Anomaly] = []
        for i in range(spec.anomalies):
            kind = ANOMALY_KINDS[i % len(ANOMALY_KINDS)]
            for _ in range(50):  # find a slot that does not overlap another anomaly of the series
                s = int(rng.integers(self.n_series))
                length = max(tick_ms, 2000) if kind == "spike" else max(10 * tick_ms, int(dur_ms * rng.uniform(0.05, 0.12)))
                start = self.start_ms + int(rng.uniform(0.1, 0.9) * max(dur_ms - length, 1))
                if all(a.series != s or start >= a.end_ms or start + length <= a.start_ms for a in planned):
                    break
            sign = rng.choice([-1.0, 1.0])
            size = {"spike": 3.0, "level_shift": 1.5, "stuck": 0.0, "drift": 2.0}[kind]
            magnitude = float(sign * size * rng.uniform(1.0, 1.5) * self.scale[s]) if size else 0.0
            planned.append(Anomaly(s, start, start + length, kind, magnitude))
        return sorted(planned, key=lambda a: a.start_ms)

    def _plan_dropouts(self) -> list[tuple[int, int, int]]:
        """(device index, start_ms, end_ms) silences, about ``dropout`` of each device's time."""
        spec, rng = self.spec, self.rng
        if spec.dropout <= 0:
            return []
        out = []
        mean_len_s = min(30.0, spec.duration_s / 10)
        for d in range(len(self.devices)):
            for _ in range(rng.poisson(spec.dropout * spec.duration_s / mean_len_s)):
                start = self.start_ms + int(rng.uniform(0, spec.duration_s) * 1000)
                out.append((d, start, start + int(rng.exponential(mean_len_s) * 1000)))
        return out

    def clean(self, ts_ms: np.ndarray) -> np.ndarray:
        """Noise-free signal, shape (series, len(ts_ms))."""
        t = ts_ms[None, :].astype(np.float64)
        day = 2 * np.pi * (t % 86_400_000) / 86_400_000
        return (self.base[:, None] + self.amp[:, None] * np.sin(day + self.phase[:, None])
                + self.drift_per_day[:, None] * (t - self.start_ms) / 86_400_000)

    def values(self, ts_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) of every series at ``ts_ms``: signal + noise + anomalies, minus dropouts."""
        v = self.clean(ts_ms) + self.rng.normal(0, 1, (self.n_series, len(ts_ms))) * self.noise_sd[:, None]
        lo, hi = ts_ms[0], ts_ms[-1]
        present = np.ones(v.shape, dtype=bool)
        for d, start, end in self.dropouts:
            if start <= hi and end > lo:
                rows = slice(d * len(self.metrics), (d + 1) * len(self.metrics))
                present[rows] &= ~((ts_ms >= start) & (ts_ms < end))
        for a in self.anomalies:
            if a.start_ms > hi or a.end_ms <= lo:
                continue
            inside = (ts_ms >= a.start_ms) & (ts_ms < a.end_ms)
            row = v[a.series]
            if a.kind in ("spike", "level_shift"):
                row[inside] += a.magnitude
            elif a.kind == "drift":
                row[inside] += a.magnitude * (ts_ms[inside] - a.start_ms) / (a.end_ms - a.start_ms)
            elif a.kind == "stuck":
                row[inside] = self.clean(np.array([a.start_ms]))[a.series, 0]
            present[a.series, inside] = True  # an anomaly is never hidden by a dropout
        return v, present

    def labels(self, until_ms: int | None = None) -> pa.Table:
        """Ground truth of the anomalies that ended by ``until_ms`` (all when None)."""
        rows = [a for a in self.anomalies if until_ms is None or a.end_ms <= until_ms]
        names = [self.series_name(a.series) for a in rows]
        return pa.table({
            "tenant": [self.spec.tenant] * len(rows), "device_id": [n[0] for n in names],
            "metric": [n[1] for n in names], "start_ms": [a.start_ms for a in rows],
            "end_ms": [a.end_ms for a in rows], "kind": [a.kind for a in rows],
            "magnitude": [a.magnitude for a in rows], "source": ["simulator"] * len(rows),
        }, schema=contract.LABELS)


def tick_times(start_ms: int, duration_s: float, rate_hz: float) -> np.ndarray:
    n = max(1, int(round(duration_s * rate_hz)))
    return start_ms + np.round(np.arange(n) * (1000.0 / rate_hz)).astype(np.int64)


# --- chaos ----------------------------------------------------------------------------

CHAOS_EFFECTS = ("skewed", "reordered", "late", "resent", "burst", "oversized", "malformed")
MALFORMED_PAYLOADS = (b"not json", b"{", b"null", b'{"ts": "x", "metric": "temp", "value": 1}',
                      b'{"metric": "temp", "value": Infinity}', b"\xff\xfe" * 16, b"[" * 2000)


@dataclass
class Chaos:
    """What goes wrong on the way (fractions are of device messages; each effect is labelled)."""

    skewed_devices: int = 0       # this many devices have a clock that is off:
    skew_s: float = 0.0           # by a fixed amount (+: fast, -: slow)
    drift_s_per_min: float = 0.0  # and drifting by this much per minute of run
    reorder: float = 0.0          # held back by less than the allowed lateness (still accepted)
    late: float = 0.0             # held back by more than the allowed lateness (rejected as late)
    resend: float = 0.0           # sent a second time within the lateness (the copy: a duplicate)
    outages: int = 0              # this many devices go silent for outage_s, then send their backlog at once
    outage_s: float = 10.0
    oversized: int = 0            # messages just over the size limit (rejected by the bridge: too_large)
    malformed: int = 0            # messages that are not telemetry (rejected by the bridge)
    lateness_s: float = 1.0       # the pipeline's clean.allowed_lateness_s
    max_payload_bytes: int = 65536  # the pipeline's bridge.max_payload_bytes
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.skewed_devices or self.reorder or self.late or self.resend or self.outages
                    or self.oversized or self.malformed)


@dataclass
class Message:
    """One MQTT message of a chaos run: when to send it (ms after start), what, and what was done to it."""

    send_ms: int
    device: str
    payload: bytes
    readings: list[tuple[str, int, float, str]]  # (metric, ts_ms as the device stamped it, value, unit)
    effects: tuple[str, ...] = ()


def device_clock(chaos: Chaos, n_devices: int) -> tuple[list[int], Callable[[int, int], int]]:
    """(skewed device indices, ``stamp(device, true_ms_since_start)``: the ms offset that device's clock adds)."""
    skewed = sorted(random.Random(chaos.seed).sample(range(n_devices), min(chaos.skewed_devices, n_devices)))

    def offset(d: int, since_ms: int) -> int:
        if d not in skewed:
            return 0
        return int(round(chaos.skew_s * 1000 + chaos.drift_s_per_min * since_ms / 60.0))

    return skewed, offset


def chaos_messages(spec: SimSpec, chaos: Chaos, start_ms: int) -> list[Message]:
    """Every message of ``spec`` run through ``chaos``, in send order (pure, deterministic for the seeds).

    One message per device and tick (``spec.format``; json: per reading). Chaos spares the first
    and last ``lateness + 3 s`` of the run, so a held-back message always has later ones of its
    series before it (late is late per series too) and nothing is held past the end.
    """
    rng = random.Random(chaos.seed)
    sig = Signals(spec, start_ms)
    ts = tick_times(start_ms, spec.duration_s, spec.rate_hz)
    values, present = sig.values(ts)
    n_m = len(sig.metrics)
    skewed, offset = device_clock(chaos, len(sig.devices))
    lateness_ms, tick_ms = int(chaos.lateness_s * 1000), max(1, int(1000 / spec.rate_hz))
    margin_ms, end_ms = lateness_ms + 3000, int(ts[-1])
    outages = {d: start_ms + margin_ms + rng.randrange(max(1, end_ms - start_ms - 2 * margin_ms
                                                            - int(chaos.outage_s * 1000)))
               for d in rng.sample(range(len(sig.devices)), min(chaos.outages, len(sig.devices)))}
    out: list[Message] = []
    for k, t in enumerate(ts.tolist()):
        for d, device in enumerate(sig.devices):
            stamped = t + offset(d, t - start_ms)
            rows = [(sig.metrics[i], stamped, float(values[d * n_m + i, k]), sig.unit[d * n_m + i])
                    for i in range(n_m) if present[d * n_m + i, k]]
            base = ("skewed",) if d in skewed else ()
            for payload, readings in _encode(spec.format, rows):
                out.extend(_disturb(Message(t - start_ms, device, payload, readings, base), chaos, rng, outages.get(d),
                                    start_ms, lateness_ms, tick_ms, margin_ms, end_ms))
    for i in range(chaos.oversized):
        t = rng.randrange(max(1, end_ms - start_ms))
        pad = b"x" * (chaos.max_payload_bytes + 1024)
        out.append(Message(t, sig.devices[i % len(sig.devices)],
                           b'{"ts": %d, "metric": "temp", "value": 1, "pad": "%s"}' % (start_ms + t, pad), [],
                           ("oversized",)))
    for i in range(chaos.malformed):
        out.append(Message(rng.randrange(max(1, end_ms - start_ms)), sig.devices[i % len(sig.devices)],
                           MALFORMED_PAYLOADS[i % len(MALFORMED_PAYLOADS)], [], ("malformed",)))
    return sorted(out, key=lambda m: m.send_ms)


def _send_chaos(pub: Publisher, topics: TopicPattern, spec: SimSpec, start_ms: int, summary: dict,
                sent: set | None, stop: Callable[[], bool] | None) -> dict[str, int]:
    """Send ``chaos_messages`` at their times; returns messages per effect (readings counts first copies only)."""
    effects = dict.fromkeys(CHAOS_EFFECTS, 0)
    for m in chaos_messages(spec, spec.chaos, start_ms):
        if stop and stop():
            break
        while (wait := (start_ms + m.send_ms) / 1000 - time.time()) > 0:
            pub.service(wait)
        pub.publish(topics.topic(spec.tenant, m.device), m.payload)
        summary["messages"] += 1
        for e in m.effects:
            effects[e] += 1
        if "resent" not in m.effects:
            summary["readings"] += len(m.readings)
            if sent is not None:
                sent.update((spec.tenant, m.device, r[0], r[1]) for r in m.readings)
    return effects


def _encode(fmt: str, rows: list[tuple[str, int, float, str]]) -> list[tuple[bytes, list]]:
    if not rows:
        return []
    if fmt == "json":
        return [(encode_reading(*r), [r]) for r in rows]
    if fmt == "multi":
        return [(orjson.dumps({"ts": rows[0][1], "values": {r[0]: r[2] for r in rows},
                               "units": {r[0]: r[3] for r in rows}}), rows)]
    return [(encode_senml(rows), rows)]


def _disturb(m: Message, chaos: Chaos, rng: random.Random, outage_at: int | None, start_ms: int,
             lateness_ms: int, tick_ms: int, margin_ms: int, end_ms: int) -> list[Message]:
    """The message as sent (held back, in a burst) plus a re-sent copy, each with its effects."""
    t = start_ms + m.send_ms
    if outage_at is not None and outage_at <= t < outage_at + chaos.outage_s * 1000:
        m.send_ms, m.effects = outage_at + int(chaos.outage_s * 1000) - start_ms, m.effects + ("burst",)
        return [m]
    if not start_ms + margin_ms <= t <= end_ms - margin_ms:
        return [m]
    roll = rng.random()
    if roll < chaos.late:
        m.send_ms += lateness_ms + 2 * tick_ms + rng.randrange(1000)
        m.effects += ("late",)
    elif roll < chaos.late + chaos.reorder:
        m.send_ms += tick_ms + rng.randrange(max(1, lateness_ms - 2 * tick_ms))
        m.effects += ("reordered",)
    if rng.random() < chaos.resend:
        copy = Message(m.send_ms + rng.randrange(max(1, lateness_ms // 2)), m.device, m.payload, m.readings,
                       m.effects + ("resent",))
        return [m, copy]
    return [m]


# --- offline --------------------------------------------------------------------------

def generate(devices: int | Sequence[str] = 10, metrics: int | Sequence[str] = 3, duration_s: float = 3600,
             rate_hz: float = 1.0, seed: int = 0, anomalies: int = 0, start_ms: int | None = None,
             tenant: str = "demo", dropout: float = 0.0) -> tuple[pa.Table, pa.Table]:
    """(readings, labels) tables (contract READINGS / LABELS), readings in event-time order."""
    spec = SimSpec(devices=devices, metrics=metrics, rate_hz=rate_hz, duration_s=duration_s, seed=seed,
                   tenant=tenant, anomalies=anomalies, dropout=dropout)
    start_ms = int(time.time() * 1000) - int(duration_s * 1000) if start_ms is None else int(start_ms)
    sig = Signals(spec, start_ms)
    ts = tick_times(start_ms, duration_s, rate_hz)
    values, present = sig.values(ts)
    # time-major order: every series at tick 0, then tick 1, ...
    keep = present.T.ravel()
    series = np.tile(np.arange(sig.n_series), len(ts))[keep]
    n_m = len(sig.metrics)
    dev_idx, met_idx = series // n_m, series % n_m
    readings = pa.table({
        "tenant": pa.array([tenant] * len(series), pa.string()),
        "device_id": pa.DictionaryArray.from_arrays(dev_idx.astype(np.int32), sig.devices).cast(pa.string()),
        "metric": pa.DictionaryArray.from_arrays(met_idx.astype(np.int32), sig.metrics).cast(pa.string()),
        "ts_ms": np.repeat(ts, sig.n_series)[keep],
        "value": values.T.ravel()[keep],
        "unit": pa.DictionaryArray.from_arrays(series.astype(np.int32), sig.unit).cast(pa.string()),
        "received_ms": np.repeat(ts, sig.n_series)[keep],
    }, schema=contract.READINGS)
    return readings, sig.labels()


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a table as Parquet (``.parquet``) or CSV (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


# --- live -----------------------------------------------------------------------------

def publish(cfg: Config, spec: SimSpec, labels_path: str | Path | None = None,
            progress: Callable[[dict], None] | None = None, stop: Callable[[], bool] | None = None,
            client_id: str | None = None, sent: set | None = None) -> dict:
    """Publish ``spec`` through MQTT in real time (``rate_hz`` <= 0: as fast as possible); returns a summary.

    ``sent`` (optional) receives the identity (tenant, device_id, metric, ts_ms) of every reading published.
    """
    if spec.format not in FORMATS:
        raise ValueError(f"format {spec.format!r}; accepted: {', '.join(FORMATS)}")
    telemetry = TopicPattern(cfg.mqtt.topic_pattern)
    label_topics = TopicPattern(cfg.mqtt.labels_pattern) if spec.publish_labels else None
    live_rate = spec.rate_hz if spec.rate_hz > 0 else 1.0
    start = time.time()
    sig = Signals(SimSpec(**{**spec.__dict__, "rate_hz": live_rate}), int(start * 1000))
    n_ticks = max(1, int(round(spec.duration_s * live_rate)))
    topics = [telemetry.topic(spec.tenant, d) for d in sig.devices]
    n_m = len(sig.metrics)
    packs: list[list[tuple[str, int, float, str]]] = [[] for _ in sig.devices]
    summary = {"messages": 0, "readings": 0, "labels": 0, "anomalies": len(sig.anomalies), "start_ms": int(start * 1000)}
    labels_sent = 0
    last_report = start
    ts = 0
    client_id = client_id or f"aimass-sim-{spec.tenant}-{spec.seed}-{int(start * 1000) % 1_000_000}"
    with Publisher(cfg, client_id, qos=spec.qos) as pub:
        if spec.chaos:
            if spec.rate_hz <= 0:
                raise ValueError("chaos needs a real-time rate (rate_hz > 0)")
            summary["chaos"] = _send_chaos(pub, telemetry, spec, int(start * 1000), summary, sent, stop)
            n_ticks = 0
        for k in range(n_ticks):
            if stop and stop():
                break
            if spec.rate_hz > 0:
                while (wait := start + k / spec.rate_hz - time.time()) > 0:
                    pub.service(wait)  # returns early when acks arrive
            ts = max(int(time.time() * 1000), ts + 1)  # a late tick must not repeat a reading's identity
            values, present = sig.values(np.array([ts], dtype=np.int64))
            vals, pres = values[:, 0].tolist(), present[:, 0].tolist()
            for d, topic in enumerate(topics):
                rows = [(sig.metrics[i], ts, vals[d * n_m + i], sig.unit[d * n_m + i])
                        for i in range(n_m) if pres[d * n_m + i]]
                if not rows:
                    continue
                summary["readings"] += len(rows)
                if sent is not None:
                    sent.update((spec.tenant, sig.devices[d], r[0], r[1]) for r in rows)
                if spec.format == "json":
                    for row in rows:
                        pub.publish(topic, encode_reading(*row))
                    summary["messages"] += len(rows)
                elif spec.format == "multi":
                    doc = {"ts": ts, "values": {r[0]: r[2] for r in rows}, "units": {r[0]: r[3] for r in rows}}
                    pub.publish(topic, orjson.dumps(doc))
                    summary["messages"] += 1
                else:
                    packs[d].extend(rows)
                    while len(packs[d]) >= spec.pack_size:
                        pub.publish(topic, encode_senml(packs[d][:spec.pack_size]))
                        del packs[d][:spec.pack_size]
                        summary["messages"] += 1
            if label_topics:
                for a in sig.anomalies[labels_sent:]:
                    if a.end_ms > ts:
                        break
                    device, metric = sig.series_name(a.series)
                    pub.publish(label_topics.topic(spec.tenant, device),
                                encode_label(metric, a.start_ms, a.end_ms, a.kind, a.magnitude))
                    labels_sent += 1
            if progress and time.time() - last_report >= 1.0:
                last_report = time.time()
                progress({**summary, "tick": k + 1, "ticks": n_ticks, "elapsed_s": last_report - start})
        for d, rows in enumerate(packs):
            if rows:
                pub.publish(topics[d], encode_senml(rows))
                summary["messages"] += 1
        summary["all_acked"] = pub.drain(timeout_s=120)
    elapsed = time.time() - start
    labels = sig.labels(until_ms=int(time.time() * 1000))
    if labels_path:
        write_table(labels, labels_path)
    summary.update(labels=labels.num_rows, labels_published=labels_sent, elapsed_s=round(elapsed, 3),
                   readings_per_s=round(summary["readings"] / elapsed, 1) if elapsed else 0.0)
    return summary


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--devices", type=int, default=10, help="number of devices (default 10)")
    p.add_argument("--metrics", default="3",
                   help=f"number of metrics per device, or a comma list of: {', '.join(METRICS)} (default 3)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="readings per series per second (default 1); 0: as fast as possible")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of telemetry (default 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same signals (default 0)")
    p.add_argument("--tenant", default="demo", help="tenant in the MQTT topic (default demo)")
    p.add_argument("--qos", type=int, choices=(0, 1), help="MQTT QoS (default: mqtt.qos)")
    p.add_argument("--format", choices=FORMATS, default="json",
                   help="json: one reading a message; multi: one object of all metrics a device-tick; "
                        "senml: SenML packs (default json)")
    p.add_argument("--pack-size", type=int, default=10, help="records per SenML pack (default 10)")
    p.add_argument("--anomalies", type=int, default=0, help="anomalies to inject (spike, level_shift, stuck, drift)")
    p.add_argument("--dropout", type=float, default=0.0, help="fraction of time each device is silent (default 0)")
    p.add_argument("--labels", metavar="FILE", help="write the ground-truth labels here (.parquet or .csv)")
    p.add_argument("--publish-labels", action="store_true", help="also publish each label on mqtt.labels_pattern")
    chaos = p.add_argument_group("chaos (live only; each effect is counted in the summary's \"chaos\")")
    chaos.add_argument("--skewed-devices", type=int, default=0, help="devices whose clock is off (default 0)")
    chaos.add_argument("--skew", type=float, default=0.0, help="their fixed clock offset in s, + = fast (default 0)")
    chaos.add_argument("--drift", type=float, default=0.0, help="their clock drift in s per minute (default 0)")
    chaos.add_argument("--reorder", type=float, default=0.0,
                       help="fraction of messages held back within clean.allowed_lateness_s (default 0)")
    chaos.add_argument("--late", type=float, default=0.0,
                       help="fraction of messages held back beyond clean.allowed_lateness_s (default 0)")
    chaos.add_argument("--resend", type=float, default=0.0, help="fraction of messages sent twice (default 0)")
    chaos.add_argument("--outages", type=int, default=0,
                       help="devices that go silent for --outage-s, then send their backlog at once (default 0)")
    chaos.add_argument("--outage-s", type=float, default=10.0, help="length of each outage in s (default 10)")
    chaos.add_argument("--oversized", type=int, default=0,
                       help="messages just over bridge.max_payload_bytes (default 0)")
    chaos.add_argument("--malformed", type=int, default=0, help="messages that are not telemetry (default 0)")
    p.add_argument("--out", metavar="FILE",
                   help="offline: write the readings to FILE (.parquet or .csv) instead of publishing")


def run(args: argparse.Namespace, cfg: Config) -> int:
    metrics = int(args.metrics) if args.metrics.isdigit() else [m.strip() for m in args.metrics.split(",")]
    if args.out:
        readings, labels = generate(args.devices, metrics, args.duration, args.rate or 1.0, args.seed,
                                    args.anomalies, tenant=args.tenant, dropout=args.dropout)
        write_table(readings, args.out)
        if args.labels:
            write_table(labels, args.labels)
        print(f"wrote {readings.num_rows} readings to {args.out}, {labels.num_rows} labels"
              + (f" to {args.labels}" if args.labels else ""))
        return 0
    chaos = Chaos(args.skewed_devices, args.skew, args.drift, args.reorder, args.late, args.resend, args.outages,
                  args.outage_s, args.oversized, args.malformed, cfg.clean.allowed_lateness_s,
                  cfg.bridge.max_payload_bytes, args.seed)
    spec = SimSpec(devices=args.devices, metrics=metrics, rate_hz=args.rate, duration_s=args.duration,
                   seed=args.seed, tenant=args.tenant, anomalies=args.anomalies, dropout=args.dropout,
                   format=args.format, pack_size=args.pack_size, qos=args.qos, publish_labels=args.publish_labels,
                   chaos=chaos if chaos.active else None)

    def show(p: dict) -> None:
        print(f"\r{p['tick']}/{p['ticks']} ticks  {p['readings']} readings  {p['messages']} messages  "
              f"{p['elapsed_s']:.0f}s", end="", file=sys.stderr, flush=True)

    summary = publish(cfg, spec, labels_path=args.labels, progress=show)
    print(file=sys.stderr)
    print(orjson.dumps(summary).decode())
    return 0 if summary["all_acked"] else 1
