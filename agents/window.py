"""The window stage: per-series tumbling and sliding windows over clean readings.

``WindowEngine`` holds the state of one partition (series index, pane rings, window history)
and turns clean micro-batches into closed window rows with the numba kernels of
``aimass.agents.kernels``. ``batch_windows`` runs the same engine over a whole history offline (training,
backtests), so offline and online windows are the same function.

Event time is per series (tenant, device_id, metric): a series' windows close when its own
watermark (its max event time - ``clean.allowed_lateness_s``) passes their end, so one device's
clock, or old history replayed next to live traffic, never closes or late-marks another series'
windows. Readings below their series' watermark were routed to the late topic by the clean stage
already; the few that still arrive here (below an idle floor, see below) are dropped and counted.

Idle series: processing time comes from clock ticks, empty clean records with header ``tick_ms``
(the clean stage's wall clock) that the clean agent writes to every partition it owns every
``window.idle_close_s / 8`` (at least 1 s). At each tick, a series without an accepted reading
for ``window.idle_close_s`` of tick time has all its windows closed, and readings below the end
of the last of them are dropped from then on; one quiet for longer than its history span is
forgotten (watermark, panes, history), which bounds both the state and the restart replay. The
decisions depend only on ticks read in order, never on the reader's own clock, so a replay
repeats them exactly (the choice made so that idle closing survives restarts; a series' idle
time is measured to within one tick interval).

State across restarts and rebalances (no Faust tables, no changelog: ``aimass.streams.replay``):
window rows are a deterministic function of the clean partition read in order: every watermark,
idle floor and clock is rebuilt from records the restart point covers, EWMA and z-score read only
the series' windows of the last ``window.zscore_history`` hops, and a clean record the clean
stage emitted twice (its at-least-once replay) is recognised by its source position (headers
``raw_offset``, ``raw_part``: not above the highest seen) and skipped. The committed offset of the clean topic
stays at the oldest record that any open pane, any pane a later sliding window reuses, any
history window still needed, any remembered series' last accepted reading, or the highest source
offset contains, moved back to the tick in effect there. A new owner replays from there:
records whose outputs were already produced (below the emitted-through marker) only rebuild
state, later ones emit. So after a crash or rebalance no reading is missing from a window, and
a window emitted twice (at-least-once after the last commit) has identical values; downstream
dedupes by (tenant, device_id, metric, window_s, window_start_ms).
"""
from __future__ import annotations

import bisect
import math

import faust
import numpy as np
import pyarrow as pa
from prometheus_client import Counter

from aimass.agents import kernels as K
from aimass.agents.clean import TICK_HEADER, source_position
from aimass.core.config import Config, ConfigError, WindowConfig
from aimass.core import contract
from aimass.streams.app import raw_topic
from aimass.streams.replay import ReplayedPartitions

WINDOW_ROWS = Counter("aimass_window_rows_total", "Window rows emitted")
WINDOW_DROPPED = Counter("aimass_window_dropped_readings_total",
                         "Clean readings left out of windows: copies from an upstream replay, or below their "
                         "series' idle floor (windows closed by window.idle_close_s)")


class _SpecState:
    """Pane rings and window history of one window spec (size, hop) for every series."""

    def __init__(self, size_s: int, hop_s: int, lateness_ms: int, history: int, min_history: int) -> None:
        self.size_s = size_s
        self.size_ms = size_s * 1000
        self.hop_ms = hop_s * 1000
        self.k = size_s // hop_s
        # Enough slots that a slot is only reused once the pane it held can be closed; a power of
        # two, so the kernels find a pane's slot with a bit mask.
        ring = 1 << (self.k + math.ceil(lateness_ms / self.hop_ms)).bit_length()
        self.history = history
        self.min_history = min_history
        self.pane_i = np.full((0, ring, K.PANE_INT_FIELDS), K.NO_PANE, np.int64)
        self.pane_f = np.zeros((0, ring, K.PANE_FLOAT_FIELDS))
        self.next_close = np.full(0, K.NO_PANE, np.int64)
        self.last_pane = np.full(0, K.NO_PANE, np.int64)
        cap = 1 << (history - 1).bit_length()  # room for `history` window means, a power of two
        self.hist_mean = np.zeros((0, cap))
        self.hist_end = np.full((0, cap), -1, np.int64)
        self.hist_off = np.zeros((0, cap), np.int64)
        self.hist_n = np.zeros(0, np.int64)
        self.counters = np.zeros(2, np.int64)  # panes created, pane uses by emitted windows
        self.out_i = np.empty((0, K.OUT_INT_COLS), np.int64)  # reused by every call: fresh pages cost
        self.out_f = np.empty((0, K.OUT_FLOAT_COLS))

    def reserve(self, n_series: int) -> None:
        """Grow the per-series arrays to hold ``n_series`` series."""
        if self.next_close.shape[0] >= n_series:
            return
        self.pane_i = K.grow(self.pane_i, n_series, K.NO_PANE)
        self.pane_f = K.grow(self.pane_f, n_series, 0.0)
        self.next_close = K.grow(self.next_close, n_series, K.NO_PANE)
        self.last_pane = K.grow(self.last_pane, n_series, K.NO_PANE)
        self.hist_mean = K.grow(self.hist_mean, n_series, 0.0)
        self.hist_end = K.grow(self.hist_end, n_series, -1)
        self.hist_off = K.grow(self.hist_off, n_series, 0)
        self.hist_n = K.grow(self.hist_n, n_series, 0)

    def out_buffers(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Output arrays large enough for every window the next call can emit, reused between
        calls (their contents are only valid until the next call)."""
        rows = int(self.k * (self.counters[0] + batch) - self.counters[1])
        if self.out_i.shape[0] < rows:
            self.out_i = np.empty((max(rows, 2 * self.out_i.shape[0]), K.OUT_INT_COLS), np.int64)
            self.out_f = np.empty((self.out_i.shape[0], K.OUT_FLOAT_COLS))
        return self.out_i, self.out_f


class WindowEngine:
    """Window state of one partition: feed clean batches and clock ticks in arrival order, get
    closed windows."""

    def __init__(self, specs: list[tuple[int, int]], lateness_ms: int, history: int, alpha: float,
                 min_history: int, idle_close_ms: int = int(WindowConfig.idle_close_s * 1000)) -> None:
        self.series = K.SeriesIndex()
        self.lateness_ms = int(lateness_ms)
        self.alpha = float(alpha)
        self.specs = [_SpecState(size, hop, self.lateness_ms, history, min_history) for size, hop in specs]
        self.idle_ms = int(idle_close_ms)
        # A series quiet this long is forgotten: its history would no longer reach its next window.
        self.forget_ms = max([self.idle_ms] + [history * spec.hop_ms + spec.size_ms for spec in self.specs])
        self.hops = np.array([spec.hop_ms for spec in self.specs], np.int64)
        self.ks = np.array([spec.k for spec in self.specs], np.int64)
        self.series_max = np.full(0, K.NO_TS, np.int64)    # per series: max accepted event time
        self.floor = np.full(0, K.NO_TS, np.int64)         # per series: end of its windows closed as idle
        self.active_clock = np.full(0, K.NO_TS, np.int64)  # per series: tick clock at its last accepted reading
        self.active_at = np.full(0, -1, np.int64)          # per series: offset of that reading
        self.clock = K.NO_TS                               # the latest tick's wall clock (ms)
        self.ticks: list[int] = []                         # offsets of ticks a restart may have to replay
        self.max_source_offset = -1
        self.max_source_at = -1                            # offset of the record that set it

    @classmethod
    def from_config(cls, window: WindowConfig, lateness_s: float) -> "WindowEngine":
        specs = window.specs()
        largest = max(size for size, _ in specs)
        if window.idle_close_s < largest:
            raise ConfigError(f"config key window.idle_close_s: {window.idle_close_s:g} s is shorter than the largest "
                              f"window ({largest} s): readings of a series that reports less often than that would "
                              f"be split off their window; set it to at least {largest}")
        return cls(specs, int(lateness_s * 1000), window.zscore_history, window.ewma_alpha,
                   window.zscore_min_history, int(window.idle_close_s * 1000))

    def update(self, readings: pa.Table, offset: int = 0, source_offset: int | None = None) -> tuple[pa.Table, int]:
        """Add one batch (READINGS, arrival order) from Kafka ``offset``; returns the windows it
        closed and how many of its readings were dropped (below their series' watermark or idle
        floor, or a replayed copy of a batch).

        ``source_offset`` identifies the upstream record the batch came from: a batch from a source
        offset already seen is an upstream replay and is skipped. Non-finite values are not counted.
        """
        if source_offset is not None:
            if source_offset <= self.max_source_offset:
                return NO_WINDOWS, readings.num_rows
            self.max_source_offset, self.max_source_at = source_offset, offset
        n = readings.num_rows
        series = self.series.lookup(readings["tenant"], readings["device_id"], readings["metric"])
        self._reserve(len(self.series))
        ts = readings["ts_ms"].to_numpy()
        value = readings["value"].to_numpy()
        recv = readings["received_ms"].to_numpy()
        late = np.zeros(n, np.bool_)
        dropped = K.series_event_time(series, ts, offset, self.lateness_ms, self.clock, self.series_max, self.floor,
                                      self.active_clock, self.active_at, late)
        parts = []
        for spec in self.specs:
            spec.reserve(len(self.series))
            out_i, out_f = spec.out_buffers(n)
            n_out = K.window_update(
                series, ts, value, recv, offset, late, self.series_max, self.lateness_ms, spec.hop_ms, spec.size_ms,
                spec.k, self.alpha, spec.history, spec.min_history, spec.pane_i, spec.pane_f, spec.next_close,
                spec.last_pane, spec.hist_mean, spec.hist_end, spec.hist_off, spec.hist_n, out_i, out_f, spec.counters)
            if n_out:
                parts.append(self._rows(spec, out_i[:n_out], out_f[:n_out]))
        return _concat(parts), int(dropped)

    def tick(self, clock_ms: int, offset: int) -> pa.Table:
        """A clock tick (the wall clock of the clean stage, Kafka ``offset``): close the windows of
        series idle for ``idle_close_ms`` and forget series quiet for longer; returns the windows."""
        self.clock = int(clock_ms)
        self.ticks.append(offset)
        n = len(self.series)
        to_close, to_forget = np.empty(n, np.int64), np.empty(n, np.int64)
        n_close, n_forget = K.series_sweep(self.clock, self.idle_ms, self.forget_ms, self.hops, self.ks,
                                           self.series_max, self.floor, self.active_clock, self.active_at, n,
                                           to_close, to_forget)
        parts = [self._close(to_close[:n_close])] if n_close else []
        if n_forget:
            for spec in self.specs:
                K.window_forget(to_forget[:n_forget], spec.pane_i, spec.next_close, spec.last_pane, spec.hist_n)
        return _concat(parts)

    def flush(self) -> pa.Table:
        """Close every open window (end of a finite history)."""
        return self._close(np.arange(len(self.series), dtype=np.int64))

    def live_offset(self) -> int:
        """Smallest Kafka offset the state still depends on (-1: none): the restart point. It is
        moved back to the tick in effect there, so a replay from it sees the same clock."""
        n = len(self.series)
        offsets = [K.window_live_offset(spec.pane_i, spec.next_close, spec.hist_end, spec.hist_off, spec.hist_n,
                                        n, spec.k, spec.history)
                   for spec in self.specs]
        known = self.series_max[:n] != K.NO_TS
        if known.any():
            offsets.append(int(self.active_at[:n][known].min()))
        offsets.append(self.max_source_at)
        live = [o for o in offsets if o >= 0]
        if not live:
            return -1
        lowest = min(live)
        in_effect = bisect.bisect_right(self.ticks, lowest) - 1
        if in_effect < 0:
            return lowest
        del self.ticks[:in_effect]  # the restart point never moves back: older ticks are not needed again
        return self.ticks[0]

    def _reserve(self, n_series: int) -> None:
        if self.series_max.shape[0] < n_series:
            self.series_max = K.grow(self.series_max, n_series, K.NO_TS)
            self.floor = K.grow(self.floor, n_series, K.NO_TS)
            self.active_clock = K.grow(self.active_clock, n_series, K.NO_TS)
            self.active_at = K.grow(self.active_at, n_series, -1)

    def _close(self, chosen: np.ndarray) -> pa.Table:
        """Every remaining window of the chosen series, for every spec."""
        parts = []
        for spec in self.specs:
            out_i, out_f = spec.out_buffers(0)
            n_out = K.window_flush(chosen, spec.hop_ms, spec.size_ms, spec.k, self.alpha, spec.history,
                                   spec.min_history, spec.pane_i, spec.pane_f, spec.next_close, spec.last_pane,
                                   spec.hist_mean, spec.hist_end, spec.hist_off, spec.hist_n, out_i, out_f,
                                   spec.counters)
            if n_out:
                parts.append(self._rows(spec, out_i[:n_out], out_f[:n_out]))
        return _concat(parts)

    def _rows(self, spec: _SpecState, out_i: np.ndarray, out_f: np.ndarray) -> pa.Table:
        tenant, device_id, metric = self.series.columns(out_i[:, K.O_SERIES])
        n = out_i.shape[0]
        return pa.table([
            tenant, device_id, metric,
            pa.array(np.full(n, spec.size_s, np.int32)),
            *(pa.array(out_i[:, c].copy()) for c in (K.O_START, K.O_END, K.O_COUNT)),  # copies: buffers are reused
            *(pa.array(out_f[:, c].copy()) for c in (K.F_MEAN, K.F_MIN, K.F_MAX, K.F_STD, K.F_FIRST, K.F_LAST,
                                                     K.F_RATE, K.F_EWMA, K.F_ZSCORE)),
            pa.array(out_i[:, K.O_MAX_RECV].copy()),
        ], schema=contract.WINDOWS)


NO_WINDOWS = contract.empty(contract.WINDOWS)  # built once: most batches close no window


def _concat(parts: list[pa.Table]) -> pa.Table:
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(parts) if parts else NO_WINDOWS


def batch_windows(readings: pa.Table, window_s: int, hop_s: int | None = None, *,
                  ewma_alpha: float | None = None, zscore_history: int | None = None,
                  zscore_min_history: int | None = None) -> pa.Table:
    """Windows (WINDOWS schema) of a finite history of READINGS, every window closed.

    Readings are taken in event-time order (nothing is late); the result is what the window
    stage emits for the same readings (tumbling unless ``hop_s`` < ``window_s``).
    """
    defaults = WindowConfig()
    engine = WindowEngine([(window_s, hop_s or window_s)], 0,
                          zscore_history or defaults.zscore_history,
                          defaults.ewma_alpha if ewma_alpha is None else ewma_alpha,
                          zscore_min_history or defaults.zscore_min_history)
    readings = readings.select(contract.READINGS.names).cast(contract.READINGS)
    if readings.num_rows:
        readings = readings.take(np.argsort(readings["ts_ms"].to_numpy(), kind="stable"))
    closed, _ = engine.update(readings)
    return pa.concat_tables([closed, engine.flush()]).sort_by(
        [("tenant", "ascending"), ("device_id", "ascending"), ("metric", "ascending"),
         ("window_start_ms", "ascending")])


def register(app: faust.App, cfg: Config) -> ReplayedPartitions[WindowEngine]:
    """The window agent: CLEAN -> WINDOW_ROWS, same partition numbers."""
    WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s)  # fail at start on a bad window configuration
    source = raw_topic(app, cfg, contract.CLEAN, acks=False)
    windows_out = raw_topic(app, cfg, contract.WINDOW_ROWS)
    dead_out = raw_topic(app, cfg, contract.DEAD_LETTER)
    partitions = ReplayedPartitions(app, cfg, source.get_topic_name(), "window",
                                    lambda: WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s))

    async def handle(engine: WindowEngine, partition: int, offset: int, readings: pa.Table, headers: dict,
                     emit: bool):
        if TICK_HEADER in headers:
            closed, dropped = engine.tick(headers[TICK_HEADER], offset), 0
        else:
            closed, dropped = engine.update(readings, offset, source_position(headers))
        if emit and closed.num_rows:
            WINDOW_ROWS.inc(closed.num_rows)
            await partitions.send_table(windows_out, closed, contract.WINDOWS, partition)
        if emit and dropped:
            WINDOW_DROPPED.inc(dropped)

    partitions.install(source, contract.READINGS, "window", dead_out, handle)
    return partitions
