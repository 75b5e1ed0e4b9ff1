"""The window stage: per-series tumbling and sliding windows over clean readings.

``WindowEngine`` holds the state of one partition (series index, pane rings, window history)
and turns clean micro-batches into closed window rows with the numba kernels of
``aimass.agents.kernels``. ``batch_windows`` runs the same engine over a whole history offline (training,
backtests), so offline and online windows are the same function.

State across restarts and rebalances (no Faust tables, no changelog: ``aimass.streams.replay``):
window rows are a deterministic function of the clean partition read in order, because the
watermark travels with the data (header ``max_ts_before`` of each clean record), EWMA and
z-score read only the series' windows of the last ``window.zscore_history`` hops, and a clean
record the clean stage emitted twice (its at-least-once replay) is recognised by its source
position (headers ``raw_offset``, ``raw_part``: not above the highest seen) and skipped. A
replayed copy whose original lies before the restart point is recognised by lateness instead: its readings belong
to windows that were closed before that point (otherwise the restart point would not be past
the original), so they are below the watermark and dropped (counted, not re-sent: the clean
stage already routed every genuinely late reading). The committed
offset of the clean topic stays at the oldest record that any open pane, any pane a later sliding
window reuses, or any history window still needed contains. A new owner replays from there:
records whose outputs were already produced (below the emitted-through marker) only rebuild
state, later ones emit. So after a crash or rebalance no reading is missing from a window, and
a window emitted twice (at-least-once after the last commit) has identical values; downstream
dedupes by (tenant, device_id, metric, window_s, window_start_ms).
"""
from __future__ import annotations

import math

import faust
import numpy as np
import pyarrow as pa
from prometheus_client import Counter

from aimass.agents import kernels as K
from aimass.agents.clean import MAX_TS_HEADER, source_position
from aimass.core.config import Config, WindowConfig
from aimass.core import contract
from aimass.streams.app import raw_topic
from aimass.streams.replay import ReplayedPartitions

WINDOW_ROWS = Counter("aimass_window_rows_total", "Window rows emitted")
WINDOW_REPLAYED = Counter("aimass_window_replayed_readings_total",
                          "Clean readings dropped as copies from an upstream replay (skipped record or late)")


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
        self.closed_through = K.NO_TS
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
    """Window state of one partition: feed clean batches in arrival order, get closed windows."""

    def __init__(self, specs: list[tuple[int, int]], lateness_ms: int, history: int, alpha: float,
                 min_history: int) -> None:
        self.series = K.SeriesIndex()
        self.lateness_ms = int(lateness_ms)
        self.alpha = float(alpha)
        self.specs = [_SpecState(size, hop, self.lateness_ms, history, min_history) for size, hop in specs]
        self.max_ts = K.NO_TS
        self.max_source_offset = -1

    @classmethod
    def from_config(cls, window: WindowConfig, lateness_s: float) -> "WindowEngine":
        return cls(window.specs(), int(lateness_s * 1000), window.zscore_history, window.ewma_alpha,
                   window.zscore_min_history)

    def update(self, readings: pa.Table, offset: int = 0, max_ts_before: int | None = None,
               source_offset: int | None = None) -> tuple[pa.Table, int]:
        """Add one batch (READINGS, arrival order) from Kafka ``offset``; returns the windows it
        closed and how many of its readings were dropped (late, or a replayed copy of a batch).

        ``max_ts_before`` is the upstream watermark base before this batch; it lets a restarted
        engine take the same lateness decisions as the one it replaces. ``source_offset``
        identifies the upstream record the batch came from: a batch from a source offset already
        seen is an upstream replay and is skipped. Non-finite values are not counted.
        """
        if source_offset is not None:
            if source_offset <= self.max_source_offset:
                return NO_WINDOWS, readings.num_rows
            self.max_source_offset = source_offset
        if max_ts_before is not None and max_ts_before > self.max_ts:
            self.max_ts = int(max_ts_before)
        n = readings.num_rows
        late = np.zeros(n, np.bool_)
        series = self.series.lookup(readings["tenant"], readings["device_id"], readings["metric"])
        ts = readings["ts_ms"].to_numpy()
        value = readings["value"].to_numpy()
        recv = readings["received_ms"].to_numpy()
        offsets = np.full(n, offset, np.int64)
        parts = []
        max_ts = self.max_ts
        for spec in self.specs:
            spec.reserve(len(self.series))
            out_i, out_f = spec.out_buffers(n)
            n_out, max_ts, spec.closed_through = K.window_update(
                series, ts, value, recv, offsets, self.max_ts, spec.closed_through, self.lateness_ms,
                spec.hop_ms, spec.size_ms, spec.k, self.alpha, spec.history, spec.min_history, spec.pane_i,
                spec.pane_f, spec.next_close, spec.last_pane, spec.hist_mean, spec.hist_end, spec.hist_off,
                spec.hist_n, len(self.series), out_i, out_f, late, spec.counters)
            if n_out:
                parts.append(self._rows(spec, out_i[:n_out], out_f[:n_out]))
        self.max_ts = max_ts
        return _concat(parts), int(late.sum())

    def flush(self) -> pa.Table:
        """Close every open window (end of a finite history)."""
        parts = []
        for spec in self.specs:
            out_i, out_f = spec.out_buffers(0)
            n_out = K.window_flush(spec.hop_ms, spec.size_ms, spec.k, self.alpha, spec.history,
                                   spec.min_history, spec.pane_i, spec.pane_f, spec.next_close, spec.last_pane,
                                   spec.hist_mean, spec.hist_end, spec.hist_off, spec.hist_n, len(self.series),
                                   out_i, out_f, spec.counters)
            if n_out:
                parts.append(self._rows(spec, out_i[:n_out], out_f[:n_out]))
        return _concat(parts)

    def live_offset(self) -> int:
        """Smallest Kafka offset the state still depends on (-1: none): the restart point."""
        offsets = [K.window_live_offset(spec.pane_i, spec.next_close, spec.hist_end, spec.hist_off, spec.hist_n,
                                        len(self.series), spec.k, spec.history, spec.closed_through)
                   for spec in self.specs]
        live = [o for o in offsets if o >= 0]
        return min(live) if live else -1

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
    cfg.window.specs()  # fail at start on a bad window configuration
    source = raw_topic(app, cfg, contract.CLEAN, acks=False)
    windows_out = raw_topic(app, cfg, contract.WINDOW_ROWS)
    dead_out = raw_topic(app, cfg, contract.DEAD_LETTER)
    partitions = ReplayedPartitions(app, cfg, source.get_topic_name(), "window",
                                    lambda: WindowEngine.from_config(cfg.window, cfg.clean.allowed_lateness_s))

    async def handle(engine: WindowEngine, partition: int, offset: int, readings: pa.Table, headers: dict,
                     emit: bool):
        closed, dropped = engine.update(readings, offset, headers.get(MAX_TS_HEADER), source_position(headers))
        if emit and closed.num_rows:
            WINDOW_ROWS.inc(closed.num_rows)
            await partitions.send_table(windows_out, closed, contract.WINDOWS, partition)
        if emit and dropped:
            WINDOW_REPLAYED.inc(dropped)

    partitions.install(source, contract.READINGS, "window", dead_out, handle)
    return partitions
