"""The clean stage: raw reading batches in, clean batches, dead letters and late readings out.

Per batch (vectorised, then one numba pass for the stateful part): non-finite values, unknown
units and out-of-range values (``aimass.streams.units``), readings more than ``clean.max_clock_skew_s``
after their bridge receive time ("future"), duplicates of (device, metric, ts) within
``clean.dedup_horizon_s`` (at least the allowed lateness) of the series' newest reading, and late
readings (event time below the series' watermark: the newest event time of the same
(tenant, device, metric) - ``clean.allowed_lateness_s``). Watermarks are per series, so a device
with a skewed clock or history replayed next to live traffic never makes another device late.
Rejects go to the dead-letter topic with a reason, late readings to the late topic. Every clean
record carries headers ``raw_offset`` plus ``raw_part`` (its source record and which of the
records under ``kafka.max_record_bytes`` it is, so the window agent skips records this stage
emitted twice around a restart). Besides, the agent writes a clock tick (an empty clean
record with header ``tick_ms``, its wall clock) to every partition it owns every
``window.idle_close_s / 8`` (at least 1 s): the window stage's processing time for closing idle
series, in the data so that a replay sees the same clock.

State (dedup set, series watermarks) survives restarts by replay (``aimass.streams.replay``): the
committed offset stays at the first raw record of the dedup set's oldest generation (so up to the
horizon and a quarter back, in partition event time, which paces the generations) or the one
holding the partition's max event time, so a new owner rebuilds exactly the dedup set and the
watermark of every series active within that span. Approximations: a series quiet for longer
than that span comes back after a restart without its watermark, so a reading of it that the
old owner would have found late may pass (the window stage drops it if its window was closed:
windows are unaffected); a reading that was late before the restart point and is duplicated
later may be reported as "duplicate" instead of "late" (rejected either way). Duplicates are
recognised while their key is held, which is about the horizon of partition event time: history
replayed slower than real time may have its duplicates older than that accepted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import faust
import numpy as np
import pyarrow as pa
from prometheus_client import Counter

from aimass.agents import kernels as K
from aimass.core.config import CleanConfig, Config
from aimass.core import contract
from aimass.streams.app import raw_topic
from aimass.streams.replay import ReplayedPartitions
from aimass.streams.units import UnitTable


READINGS_IN = Counter("aimass_clean_readings_in_total", "Readings the clean stage received")
READINGS_OUT = Counter("aimass_clean_readings_out_total", "Readings the clean stage passed on")
REJECTED = Counter("aimass_clean_rejected_total", "Readings sent to the dead-letter topic", ["reason"])
LATE = Counter("aimass_clean_late_total", "Readings below the watermark, sent to the late topic")

DETAILS = {
    K.NON_FINITE: "value is NaN or infinite",
    K.OUT_OF_RANGE: "value outside the metric's valid range (canonical unit)",
    K.BAD_UNIT: "unit cannot be converted to the metric's canonical unit",
    K.FUTURE: "timestamp later than bridge receive time + clean.max_clock_skew_s",
    K.DUPLICATE: "same device, metric and timestamp already seen within clean.dedup_horizon_s",
    K.LATE: "event time below the series watermark (its newest event time - clean.allowed_lateness_s)",
}
RAW_OFFSET_HEADER = "raw_offset"
RAW_PART_HEADER = "raw_part"
PARTS_PER_RECORD = 1 << 20  # more clean records than one raw record can make


def source_position(headers: dict) -> int | None:
    """Where a clean record comes from, comparable across records: raw offset, then part."""
    offset = headers.get(RAW_OFFSET_HEADER)
    return None if offset is None else offset * PARTS_PER_RECORD + headers.get(RAW_PART_HEADER, 0)
TICK_HEADER = "tick_ms"
EMPTY_CLEAN = contract.encode(contract.empty(contract.READINGS), contract.READINGS)  # the body of every tick


@dataclass
class CleanResult:
    """Outputs of one raw batch."""

    clean: pa.Table        # READINGS, canonical units
    dead: pa.Table         # REJECTS, stage "clean"
    late: pa.Table         # REJECTS, reason "late"
    verdict: np.ndarray    # int8 per input reading: kernels.OK or the reject reason code


class CleanEngine:
    """Clean state of one partition: series index, dedup set and series watermarks."""

    def __init__(self, clean: CleanConfig, units: UnitTable) -> None:
        self.units = units
        self.drop_non_finite = clean.drop_non_finite
        self.lateness_ms = int(clean.allowed_lateness_s * 1000)
        self.horizon_ms = max(int(clean.dedup_horizon_s * 1000), self.lateness_ms)
        self.skew_ms = int(clean.max_clock_skew_s * 1000)
        self.series = K.SeriesIndex()
        self.seen = K.DedupSet(self.horizon_ms)
        self.max_ts = K.NO_TS
        self.max_ts_offset = -1

    def process(self, raw: pa.Table, offset: int = 0) -> CleanResult:
        """Classify every reading of one raw batch (Kafka ``offset``) in arrival order."""
        ts = raw["ts_ms"].to_numpy()
        value = raw["value"].to_numpy(zero_copy_only=False)
        canonical, unit, bad_unit, out_of_range = self.units.apply(raw["metric"], raw["unit"], value)
        verdict = np.zeros(raw.num_rows, np.int8)
        verdict[ts > raw["received_ms"].to_numpy() + self.skew_ms] = K.FUTURE
        verdict[out_of_range] = K.OUT_OF_RANGE
        verdict[bad_unit] = K.BAD_UNIT
        if self.drop_non_finite:
            verdict[~np.isfinite(value)] = K.NON_FINITE
        series = self.series.lookup(raw["tenant"], raw["device_id"], raw["metric"])
        self.max_ts, self.max_ts_offset = self.seen.check(series, ts, offset, verdict, self.max_ts,
                                                          self.max_ts_offset, self.lateness_ms)
        ok = verdict == K.OK
        clean = raw.set_column(raw.schema.get_field_index("value"), "value", pa.array(canonical)) \
                   .set_column(raw.schema.get_field_index("unit"), "unit", unit).filter(ok)
        late = verdict == K.LATE
        return CleanResult(clean, rejects(raw, verdict, ~ok & ~late), rejects(raw, verdict, late), verdict)

    def live_offset(self) -> int:
        """Oldest raw offset the dedup set or the partition max event time depends on (-1: none): the restart point."""
        live = [o for o in (self.seen.live_offset(), self.max_ts_offset) if o >= 0]
        return min(live) if live else -1


NO_REJECTS = contract.empty(contract.REJECTS)  # built once: most batches reject nothing


def rejects(raw: pa.Table, verdict: np.ndarray, mask: np.ndarray, stage: str = "clean") -> pa.Table:
    """REJECTS rows for the masked readings, reason and detail from their verdict."""
    if not mask.any():
        return NO_REJECTS
    rows = raw.filter(pa.array(mask))
    codes = verdict[mask]
    n = rows.num_rows
    reason = np.array(K.REASONS, dtype=object)[codes]
    detail = np.array([DETAILS.get(c, "") for c in range(len(K.REASONS))], dtype=object)[codes]
    return pa.table({
        "stage": pa.array([stage] * n, pa.string()),
        "reason": pa.array(reason, pa.string()),
        "detail": pa.array(detail, pa.string()),
        "mqtt_topic": pa.nulls(n, pa.string()),
        "payload": pa.nulls(n, pa.binary()),
        **{name: rows[name] for name in ("tenant", "device_id", "metric", "ts_ms", "value", "unit", "received_ms")},
        "rejected_ms": pa.array(np.full(n, int(time.time() * 1000), np.int64)),
    }, schema=contract.REJECTS)


def register(app: faust.App, cfg: Config) -> ReplayedPartitions[CleanEngine]:
    """The clean agent: RAW -> CLEAN / DEAD_LETTER / LATE, same partition numbers."""
    units = UnitTable.load(cfg.clean.units_file)
    source = raw_topic(app, cfg, contract.RAW, acks=False)
    clean_out = raw_topic(app, cfg, contract.CLEAN)
    dead_out = raw_topic(app, cfg, contract.DEAD_LETTER)
    late_out = raw_topic(app, cfg, contract.LATE)
    partitions = ReplayedPartitions(app, cfg, source.get_topic_name(), "clean",
                                    lambda: CleanEngine(cfg.clean, units))

    async def handle(engine: CleanEngine, partition: int, offset: int, raw: pa.Table, headers: dict, emit: bool):
        result = engine.process(raw, offset)
        if emit:
            await publish(partitions, result, partition, offset, clean_out, dead_out, late_out)

    partitions.install(source, contract.READINGS, "clean", dead_out, handle,
                       on_unreadable=REJECTED.labels("bad_record").inc)

    @app.timer(tick_interval_s(cfg), name=f"{app.conf.id}.clean.tick")
    async def tick() -> None:
        """The window stage's clock: a tick to every partition this worker owns."""
        header = [(TICK_HEADER, str(int(time.time() * 1000)).encode())]
        for tp in app.consumer.assignment():
            if tp.topic == source.get_topic_name():
                await partitions.send(clean_out, EMPTY_CLEAN, tp.partition, header)

    return partitions


def tick_interval_s(cfg: Config) -> float:
    """Seconds between clock ticks: an idle series' windows close within this of window.idle_close_s."""
    return max(1.0, cfg.window.idle_close_s / 8)


async def publish(out: ReplayedPartitions, result: CleanResult, partition: int, raw_offset: int, clean_out, dead_out,
                  late_out) -> None:
    """Send one batch's outputs to the same partition number of each topic (records under
    ``kafka.max_record_bytes``); count them."""
    n_in = result.clean.num_rows + result.dead.num_rows + result.late.num_rows
    READINGS_IN.inc(n_in)
    if result.clean.num_rows:
        READINGS_OUT.inc(result.clean.num_rows)
        for i, part in enumerate(contract.encode_parts(result.clean, contract.READINGS, out.max_record_bytes)):
            await out.send(clean_out, part.value, partition, [(RAW_OFFSET_HEADER, str(raw_offset).encode()),
                                                              (RAW_PART_HEADER, str(i).encode())])
    if result.dead.num_rows:
        for reason, count in zip(*np.unique(result.dead["reason"].to_numpy(zero_copy_only=False), return_counts=True)):
            REJECTED.labels(reason).inc(int(count))
        await out.send_table(dead_out, result.dead, contract.REJECTS, partition)
    if result.late.num_rows:
        LATE.inc(result.late.num_rows)
        await out.send_table(late_out, result.late, contract.REJECTS, partition)
