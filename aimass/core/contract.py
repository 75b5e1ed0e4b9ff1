"""The data contract: Kafka topics and the Arrow schemas of their records.

Every Kafka record on a data topic is one Arrow IPC stream holding a columnar micro-batch
(many rows of one partition's devices), so Python pays per batch, not per row.
Timestamps are int64 milliseconds since the Unix epoch, UTC. A series is
(tenant, device_id, metric); a reading's identity is (tenant, device_id, metric, ts_ms).
All readings of one device land in the same partition (``partition_for``) in order.

This module is the only place topics and record schemas are defined; import it.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

# --- record schemas -------------------------------------------------------------------

READINGS = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("ts_ms", pa.int64()),         # event time (device clock), ms since epoch
    ("value", pa.float64()),
    ("unit", pa.string()),         # SenML unit name, e.g. "Cel", "%RH", "W"
    ("received_ms", pa.int64()),   # bridge receive time, ms since epoch (for latency)
])

# One row per rejected or late reading, or per rejected MQTT message or Kafka record (payload set:
# at most its first DEAD_LETTER_PAYLOAD_BYTES, the detail then ends with its size and SHA-256).
REJECTS = pa.schema([
    ("stage", pa.string()),        # bridge | clean | window | predict | alert | notify | sink
    ("reason", pa.string()),       # machine-readable, e.g. "non_finite", "bad_json", "late"
    ("detail", pa.string()),       # human-readable explanation
    ("mqtt_topic", pa.string()),
    ("payload", pa.binary()),      # original bytes where the reading could not be parsed
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("ts_ms", pa.int64()),
    ("value", pa.float64()),
    ("unit", pa.string()),
    ("received_ms", pa.int64()),
    ("rejected_ms", pa.int64()),
])

WINDOWS = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("window_s", pa.int32()),
    ("window_start_ms", pa.int64()),
    ("window_end_ms", pa.int64()),   # exclusive
    ("count", pa.int64()),
    ("mean", pa.float64()),
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("std", pa.float64()),
    ("first", pa.float64()),
    ("last", pa.float64()),
    ("rate", pa.float64()),          # (last - first) / seconds between them, 0 for one reading
    ("ewma", pa.float64()),          # EWMA of window means of this series
    ("zscore", pa.float64()),        # window mean vs the series' recent window means
    ("max_received_ms", pa.int64()), # latest bridge receive time in the window (latency)
])

DEVICE_METRIC = "*"  # the metric of a device-level prediction row (no real metric may be named so)

PREDICTIONS = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("window_s", pa.int32()),
    ("window_end_ms", pa.int64()),    # end of the last observed window (the model input)
    ("target_end_ms", pa.int64()),    # end of the window whose mean is predicted
    ("observed_mean", pa.float64()),  # mean of the last observed window
    ("forecast_triton", pa.float64()),  # NaN when degraded
    ("forecast_online", pa.float64()),  # the online robust seasonal forecaster (aimass.models.series_model)
    ("forecast", pa.float64()),         # the forecast rules use (Triton, else online)
    ("band_low", pa.float64()),
    ("band_high", pa.float64()),
    # Calibrated 0..1 scores: 0.5 at the statistic's normal 99th percentile. NaN: not judged.
    ("anomaly_triton", pa.float64()),   # Triton's anomaly model (NaN when degraded)
    ("anomaly_level", pa.float64()),    # the window mean vs the one-step forecast
    ("anomaly_spread", pa.float64()),   # the window's std vs its usual spread (stuck / noisy sensor)
    ("anomaly_change", pa.float64()),   # CUSUM: a sustained shift or drift
    ("anomaly_device", pa.float64()),   # device rows (metric DEVICE_METRIC): all metrics of the device together
    ("anomaly", pa.float64()),          # the score rules use: max(level, spread, change); the device score on device rows
    ("regime_change", pa.bool_()),      # device rows: the device's open incident moved to a new state
    ("forecaster_model", pa.string()),  # name:version
    ("anomaly_model", pa.string()),
    ("degraded", pa.bool_()),
    ("max_received_ms", pa.int64()),
    ("predicted_ms", pa.int64()),
])

# A prediction joined with the actual mean of the window it predicted.
OUTCOMES = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("window_s", pa.int32()),
    ("target_end_ms", pa.int64()),
    ("forecast", pa.float64()),
    ("actual", pa.float64()),
    ("residual", pa.float64()),        # actual - forecast
    ("rel_error", pa.float64()),       # |residual| / max(|actual|, eps)
    ("in_band", pa.bool_()),
    ("forecaster_model", pa.string()),
    ("degraded", pa.bool_()),
])

LABELS = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),           # "" = every metric of the device
    ("start_ms", pa.int64()),
    ("end_ms", pa.int64()),
    ("kind", pa.string()),             # spike | level_shift | stuck | drift | maintenance | ...
    ("magnitude", pa.float64()),
    ("source", pa.string()),           # simulator | mqtt | file
])

# Alarm state changes (one row per transition).
ALERTS = pa.schema([
    ("event_id", pa.string()),
    ("event_ms", pa.int64()),          # wall-clock time of the transition
    ("ts_ms", pa.int64()),             # event time of the data row that caused it
    ("rule", pa.string()),
    ("severity", pa.string()),         # info | warning | critical
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("state", pa.string()),            # active_unack | active_ack | cleared_unack | cleared
    ("transition", pa.string()),       # raised | reraised | acknowledged | cleared | repeated | flapping
                                       # | silenced | unsilenced
    ("value", pa.float64()),
    ("message", pa.string()),
    ("labels_json", pa.string()),
    ("first_ms", pa.int64()),          # when the alarm first became active
    ("count", pa.int64()),             # times raised
    ("flapping", pa.bool_()),
    ("source_received_ms", pa.int64()),  # bridge receive time of the triggering data (latency)
    ("actor", pa.string()),            # API token name behind an acknowledgement or silence; "" for rules
])

DRIFT = pa.schema([
    ("tenant", pa.string()),
    ("device_id", pa.string()),
    ("metric", pa.string()),
    ("window_s", pa.int32()),
    ("detected_ms", pa.int64()),
    ("window_end_ms", pa.int64()),
    ("detector", pa.string()),
    ("model", pa.string()),
    ("residual_mean_before", pa.float64()),
    ("residual_mean_after", pa.float64()),
])

QUALITY = pa.schema([
    ("computed_ms", pa.int64()),
    ("rule", pa.string()),
    ("model", pa.string()),
    ("true_positives", pa.int64()),
    ("false_positives", pa.int64()),
    ("false_negatives", pa.int64()),
    ("precision", pa.float64()),
    ("recall", pa.float64()),
    ("mean_delay_s", pa.float64()),
])

NOTIFICATIONS = pa.schema([
    ("notification_id", pa.string()),  # idempotency key
    ("event_id", pa.string()),
    ("receiver", pa.string()),
    ("kind", pa.string()),             # email | sms | webhook
    ("status", pa.string()),           # delivered | failed | dead_letter
    ("attempts", pa.int32()),
    ("error", pa.string()),
    ("created_ms", pa.int64()),
    ("finished_ms", pa.int64()),
])


# --- topics ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Topic:
    """A Kafka topic of the contract: its suffix, record schema and whether it is keyed by device."""

    suffix: str
    schema: pa.Schema | None  # None: records are not Arrow (the state topic's checkpoint chunks)
    partitioned: bool = True  # False: a single partition is enough (low volume, global order)

    def name(self, prefix: str = "aimass") -> str:
        return f"{prefix}.{self.suffix}"


RAW = Topic("telemetry.raw", READINGS)
CLEAN = Topic("telemetry.clean", READINGS)
LATE = Topic("telemetry.late", REJECTS)
DEAD_LETTER = Topic("deadletter", REJECTS)
WINDOW_ROWS = Topic("windows", WINDOWS)
PREDICTION_ROWS = Topic("predictions", PREDICTIONS)
OUTCOME_ROWS = Topic("outcomes", OUTCOMES)
LABEL_ROWS = Topic("labels", LABELS, partitioned=False)
ALERT_EVENTS = Topic("alerts", ALERTS, partitioned=False)
DRIFT_EVENTS = Topic("drift", DRIFT, partitioned=False)
QUALITY_ROWS = Topic("quality", QUALITY, partitioned=False)
NOTIFICATION_ROWS = Topic("notifications", NOTIFICATIONS, partitioned=False)

# Checkpoints of per-partition state (aimass.streams.statestore): compacted, keyed by group/partition,
# created by the store itself on first use; not a data topic, so not in ALL_TOPICS.
STATE = Topic("state", None)

ALL_TOPICS: tuple[Topic, ...] = (
    RAW, CLEAN, LATE, DEAD_LETTER, WINDOW_ROWS, PREDICTION_ROWS, OUTCOME_ROWS,
    LABEL_ROWS, ALERT_EVENTS, DRIFT_EVENTS, QUALITY_ROWS, NOTIFICATION_ROWS,
)


def topic_partitions(topic: Topic, partitions: int) -> int:
    """Partition count a topic is created with."""
    return partitions if topic.partitioned else 1


# --- keys and partitions --------------------------------------------------------------

def series_key(tenant: str, device_id: str) -> bytes:
    """The Kafka key of a device: every reading of it goes to one partition."""
    return f"{tenant}/{device_id}".encode()


def partition_for(tenant: str, device_id: str, partitions: int) -> int:
    """Stable partition of a device (CRC32 of its key), the same in every process."""
    return zlib.crc32(series_key(tenant, device_id)) % partitions


def partitions_for(tenants: np.ndarray, device_ids: np.ndarray, partitions: int) -> np.ndarray:
    """Vector form of ``partition_for`` over arrays of tenants and device ids."""
    return np.fromiter(
        (zlib.crc32(f"{t}/{d}".encode()) % partitions for t, d in zip(tenants, device_ids)),
        dtype=np.int32, count=len(device_ids),
    )


# --- encoding -------------------------------------------------------------------------

def encode(table: pa.Table | pa.RecordBatch, schema: pa.Schema) -> bytes:
    """One Arrow IPC stream (the Kafka record value) from a table that matches ``schema``."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(value: bytes, schema: pa.Schema) -> pa.Table:
    """The table inside one Kafka record value; raises ``ValueError`` if it is not ``schema``."""
    try:
        table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"not an Arrow IPC stream: {exc}") from None
    if not table.schema.equals(schema):
        raise ValueError(f"record schema {table.schema.names} does not match the contract {schema.names}")
    return table


def empty(schema: pa.Schema) -> pa.Table:
    """An empty table of ``schema``."""
    return schema.empty_table()


# --- records under a size budget ------------------------------------------------------

RECORD_OVERHEAD = 1024  # a record's key, headers and batch framing: kept free under kafka.max_record_bytes
DEAD_LETTER_PAYLOAD_BYTES = 4096  # the most of a rejected payload a dead-letter row keeps


class Part(NamedTuple):
    """Consecutive rows of a table and their encoded record."""

    rows: pa.Table
    value: bytes


def encode_parts(table: pa.Table, schema: pa.Schema, max_record_bytes: int) -> list[Part]:
    """``table`` as consecutive row ranges (order kept), each one record of at most
    ``max_record_bytes - RECORD_OVERHEAD`` bytes; a single row larger than that is one record."""
    budget = max_record_bytes - RECORD_OVERHEAD
    value = encode(table, schema)
    if len(value) <= budget or table.num_rows <= 1:
        return [Part(table, value)]
    n = min(table.num_rows, -(-len(value) * 5 // (budget * 4)))  # 25% spare: rows differ in size
    step = -(-table.num_rows // n)
    parts: list[Part] = []
    for start in range(0, table.num_rows, step):
        parts += encode_parts(table.slice(start, step), schema, max_record_bytes)
    return parts


def payload_excerpt(payload: bytes) -> tuple[bytes, str]:
    """(at most ``DEAD_LETTER_PAYLOAD_BYTES`` of ``payload``, "" or a note of its full size and SHA-256)."""
    if len(payload) <= DEAD_LETTER_PAYLOAD_BYTES:
        return payload, ""
    return payload[:DEAD_LETTER_PAYLOAD_BYTES], (
        f"payload of {len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()}, "
        f"first {DEAD_LETTER_PAYLOAD_BYTES} bytes kept")
