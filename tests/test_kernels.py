"""The numba kernels (through WindowEngine / CleanEngine) against a plain Python/pandas reference,
on random and adversarial data (hypothesis), plus the replay-restore property they exist for."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from aimass.agents import kernels as K
from aimass.agents.clean import CleanEngine
from aimass.agents.window import WindowEngine, batch_windows
from aimass.core.config import CleanConfig
from aimass.core import contract
from aimass.streams.units import UnitTable

HOP_MS = 1000
LATENESS_MS = 2500
HISTORY = 4
MIN_HISTORY = 3  # below HISTORY, so both sides of the z-score warm-up are checked
ALPHA = 0.3
SPECS = [(1, 1), (3, 1), (2, 2)]  # tumbling 1 s, sliding 3 s every 1 s, tumbling 2 s


def table(series: list[int], ts: list[int], values: list[float]) -> pa.Table:
    n = len(ts)
    return pa.table({
        "tenant": ["t"] * n, "device_id": [f"d{s}" for s in series], "metric": ["m"] * n,
        "ts_ms": pa.array(ts, pa.int64()), "value": pa.array(values, pa.float64()), "unit": [""] * n,
        "received_ms": pa.array([t + 7 for t in ts], pa.int64()),
    }, schema=contract.READINGS)


# --- reference -----------------------------------------------------------------------

def reference_accepted(df: pd.DataFrame, lateness_ms: int) -> tuple[pd.DataFrame, dict[str, float]]:
    """Readings not below their series' running watermark (arrival order), finite values only;
    and each series' final watermark."""
    max_ts: dict[str, float] = {}
    keep = []
    for d, t, v in zip(df.device_id, df.ts_ms, df.value):
        late = t < max_ts.get(d, -math.inf) - lateness_ms
        keep.append(not late and math.isfinite(v))
        if not late:
            max_ts[d] = max(max_ts.get(d, -math.inf), t)
    return df[np.array(keep, dtype=bool)], {d: m - lateness_ms for d, m in max_ts.items()}


def reference_row(device: str, size_s: int, hop_s: int, p: int, wt: np.ndarray, wv: np.ndarray, wrecv: np.ndarray,
                  history: list[tuple[int, float]]) -> dict:
    """The window ending at pane ``p`` over readings (wt, wv, wrecv) in arrival order, EWMA and
    z-score from the series' earlier ``history`` of (pane, mean), which gets this window's mean."""
    end = (p + 1) * hop_s * 1000
    first_i = int(np.argmin(wt))                        # earliest ts, first arrival on ties
    last_i = len(wt) - 1 - int(np.argmax(wt[::-1]))     # latest ts, last arrival on ties
    span = (wt[last_i] - wt[first_i]) / 1000
    mean = wv.mean()
    recent = [m for e, m in history if e >= p - HISTORY]
    ewma = mean
    if recent:
        ewma = recent[0]
        for m in recent[1:]:
            ewma = ALPHA * m + (1 - ALPHA) * ewma
        ewma = ALPHA * mean + (1 - ALPHA) * ewma
    z = 0.0
    if len(recent) >= MIN_HISTORY and np.std(recent, ddof=1) > 1e-12:
        z = (mean - np.mean(recent)) / np.std(recent, ddof=1)
    history.append((p, mean))
    return dict(tenant="t", device_id=device, metric="m", window_s=size_s, window_start_ms=end - size_s * 1000,
                window_end_ms=end, count=len(wv), mean=mean, min=wv.min(), max=wv.max(), std=wv.std(),
                first=wv[first_i], last=wv[last_i], rate=(wv[last_i] - wv[first_i]) / span if span > 0 else 0.0,
                ewma=ewma, zscore=z, max_received_ms=wrecv.max())


def reference_windows(df: pd.DataFrame, size_s: int, hop_s: int, lateness_ms: int, close_all: bool) -> pd.DataFrame:
    """Windows of the accepted readings, each computed from scratch with numpy."""
    acc, watermarks = reference_accepted(df, lateness_ms)
    hop, k = hop_s * 1000, size_s // hop_s
    rows = []
    for device, g in acc.groupby("device_id"):
        watermark = watermarks[device]
        ts, v, recv = g.ts_ms.to_numpy(), g.value.to_numpy(), g.received_ms.to_numpy()
        panes = ts // hop
        history: list[tuple[int, float]] = []
        for p in range(int(panes.min()), int(panes.max()) + k):
            inside = (panes >= p - k + 1) & (panes <= p)
            end = (p + 1) * hop
            if not inside.any() or (not close_all and end > watermark):
                continue
            rows.append(reference_row(device, size_s, hop_s, p, ts[inside], v[inside], recv[inside], history))
    return pd.DataFrame(rows, columns=contract.WINDOWS.names)


def engine_windows(t: pa.Table, cuts: list[int], close_all: bool) -> dict[int, pd.DataFrame]:
    """Run the streaming engine over ``t`` split at ``cuts``; windows per window size."""
    engine = WindowEngine(SPECS, LATENESS_MS, HISTORY, ALPHA, MIN_HISTORY)
    parts, start = [], 0
    for cut in sorted(set(cuts)) + [t.num_rows]:
        parts.append(engine.update(t.slice(start, cut - start), offset=start)[0])
        start = cut
    if close_all:
        parts.append(engine.flush())
    out = pa.concat_tables(parts).to_pandas()
    return {size: out[out.window_s == size] for size, _ in SPECS}


def assert_same_windows(got: pd.DataFrame, want: pd.DataFrame, unique: bool = True) -> None:
    """Same rows; with ``unique``, at most one per window key (a forgotten series may repeat one)."""
    key = ["tenant", "device_id", "metric", "window_start_ms"]
    order = key + ["count", "mean", "max_received_ms"]
    got = got.sort_values(order).reset_index(drop=True)
    want = want.sort_values(order).reset_index(drop=True)
    assert len(got) == len(want), (got[key], want[key])
    assert not unique or not got.duplicated(key).any()
    for col in contract.WINDOWS.names:
        if col in ("mean", "min", "max", "std", "first", "last", "rate", "ewma", "zscore"):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float),
                                       rtol=1e-7, atol=1e-7, err_msg=col)
        else:
            assert (got[col].to_numpy() == want[col].to_numpy()).all(), col


# --- strategies ----------------------------------------------------------------------

# No "explain" phase: its tracing takes minutes on a failure under Python 3.11.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
values = st.one_of(st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))


@st.composite
def streams(draw, max_series: int = 4, max_n: int = 60):
    """Arrival-ordered readings: timestamps on a coarse grid (boundaries hit), jittered out of order."""
    n = draw(st.integers(0, max_n))
    series = draw(st.lists(st.integers(0, max_series - 1), min_size=n, max_size=n))
    base = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    jitter = draw(st.lists(st.sampled_from([-6, -3, -1, 0, 0, 0, 1]), min_size=n, max_size=n))
    ts = [1_000_000 + 500 * (b + j + i // 3) for i, (b, j) in enumerate(zip(sorted(base), jitter))]
    vals = draw(st.lists(values, min_size=n, max_size=n))
    cuts = draw(st.lists(st.integers(0, n), max_size=4))
    return series, ts, vals, cuts


# --- window kernel ---------------------------------------------------------------------

@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(streams(), st.booleans())
def test_window_engine_matches_reference(stream, close_all):
    series, ts, vals, cuts = stream
    t = table(series, ts, vals)
    got = engine_windows(t, cuts, close_all)
    df = t.to_pandas()
    for size, hop in SPECS:
        assert_same_windows(got[size], reference_windows(df, size, hop, LATENESS_MS, close_all))


@pytest.mark.parametrize("case", ["empty", "one", "all_non_finite", "reversed", "many_series", "on_boundary"])
def test_window_engine_adversarial(case):
    rng = np.random.default_rng(7)
    if case == "empty":
        series, ts, vals = [], [], []
    elif case == "one":
        series, ts, vals = [0], [5_000], [1.5]
    elif case == "all_non_finite":
        series, ts, vals = [0, 1, 0], [1000, 2000, 3000], [math.nan, math.inf, -math.inf]
    elif case == "reversed":  # heavy out-of-order: most readings late, the rest in reverse
        ts = list(range(60_000, 0, -250))
        series, vals = [i % 3 for i in range(len(ts))], rng.normal(size=len(ts)).tolist()
    elif case == "many_series":
        n = 3000
        series, ts = rng.integers(0, 700, n).tolist(), np.sort(rng.integers(0, 20_000, n)).tolist()
        vals = rng.normal(size=n).tolist()
    else:  # every reading exactly on a window boundary
        ts = [1000 * i for i in range(20) for _ in range(2)]
        series, vals = [0, 1] * 20, rng.normal(size=40).tolist()
    t = table(series, ts, vals)
    for close_all in (False, True):
        got = engine_windows(t, [len(ts) // 3], close_all)
        for size, hop in SPECS:
            want = reference_windows(t.to_pandas(), size, hop, LATENESS_MS, close_all)
            assert_same_windows(got[size], want)
            if case in ("empty", "all_non_finite"):
                assert got[size].empty
    if case == "on_boundary":  # a reading at ts == window end belongs to the next window
        one_s = engine_windows(t, [], True)[1]
        assert (one_s["count"] == 1).all() and sorted(one_s.window_start_ms) == sorted(ts)


# --- idle close: clock ticks ---------------------------------------------------------------

IDLE_MS = 3000  # the largest window of SPECS
FORGET_MS = max(HISTORY * hop * 1000 + size * 1000 for size, hop in SPECS)  # the longest history span
TICK_STEPS = st.sampled_from([0, 500, 1500, 3000, 11_000])  # clock advances between ticks (ms)


def new_engine() -> WindowEngine:
    return WindowEngine(SPECS, LATENESS_MS, HISTORY, ALPHA, MIN_HISTORY, IDLE_MS)


@st.composite
def ticked_streams(draw, max_n: int = 60):
    """A stream (``streams``) with clock ticks between its readings: [("readings", table) | ("tick", clock)]."""
    series, ts, vals, _ = draw(streams(max_n=max_n))
    after = draw(st.lists(st.integers(0, max(len(ts), 1)), max_size=8))
    steps = draw(st.lists(TICK_STEPS, min_size=len(after), max_size=len(after)))
    t = table(series, ts, vals)
    events, start, clock = [], 0, 10_000_000
    for at, step in sorted(zip(after, steps)):
        if at > start:
            events.append(("readings", t.slice(start, at - start)))
            start = at
        clock += step
        events.append(("tick", clock))
    if start < t.num_rows:
        events.append(("readings", t.slice(start)))
    return events


class ReferenceSeries:
    """One series as the window stage's contract says: watermark, idle floor, windows, history."""

    def __init__(self) -> None:
        self.max_ts, self.floor, self.active = -math.inf, -math.inf, None
        self.accepted: list[tuple[int, float, int]] = []  # (ts, value, received) of finite readings
        self.emitted: dict[int, set[int]] = {size: set() for size, _ in SPECS}
        self.history: dict[int, list[tuple[int, float]]] = {size: [] for size, _ in SPECS}

    def windows(self, device: str, limit: float) -> list[dict]:
        """Rows of the windows not emitted yet that end at or before ``limit``, in end order."""
        rows = []
        for size_s, hop_s in SPECS:
            hop, k = hop_s * 1000, size_s // hop_s
            if not self.accepted:
                continue
            ts, v, recv = (np.array(c) for c in zip(*self.accepted))
            panes = ts // hop
            for p in range(int(panes.min()), int(panes.max()) + k):
                end = (p + 1) * hop
                inside = (panes >= p - k + 1) & (panes <= p)
                if end > limit or p in self.emitted[size_s] or not inside.any():
                    continue
                self.emitted[size_s].add(p)
                rows.append(reference_row(device, size_s, hop_s, p, ts[inside], v[inside], recv[inside],
                                          self.history[size_s]))
        return rows


def reference_ticked_windows(events, close_all: bool) -> pd.DataFrame:
    """Windows of a ticked stream, series by series: watermark closes, idle closes, forgetting."""
    state: dict[str, ReferenceSeries] = {}
    rows, clock = [], None
    for kind, item in events:
        if kind == "tick":
            clock = item
            for device, ref in list(state.items()):
                if ref.active is None:
                    ref.active = clock
                    continue
                if ref.active + IDLE_MS <= clock and ref.floor <= ref.max_ts:
                    rows += ref.windows(device, math.inf)
                    ref.floor = max((ref.max_ts // (hop * 1000) + size // hop) * hop * 1000 for size, hop in SPECS)
                if ref.active + FORGET_MS <= clock:
                    del state[device]
            continue
        for device, t, v, r in zip(*(item[c].to_pylist() for c in ("device_id", "ts_ms", "value", "received_ms"))):
            ref = state.setdefault(device, ReferenceSeries())
            if t < ref.max_ts - LATENESS_MS or t < ref.floor:
                continue
            ref.max_ts, ref.active = max(ref.max_ts, t), clock
            if math.isfinite(v):
                ref.accepted.append((t, v, r))
            watermark = ref.max_ts - LATENESS_MS
            rows += ref.windows(device, watermark)
    if close_all:
        for device, ref in state.items():
            rows += ref.windows(device, math.inf)
    return pd.DataFrame(rows, columns=contract.WINDOWS.names)


def run_ticked(engine: WindowEngine, events, first_offset: int = 0) -> list[pa.Table]:
    """Feed ticked events to ``engine`` as the window agent does (one Kafka offset each)."""
    out = []
    for offset, (kind, item) in enumerate(events, first_offset):
        out.append(engine.tick(item, offset) if kind == "tick" else engine.update(item, offset)[0])
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
@given(ticked_streams(), st.booleans())
def test_idle_close_and_forgetting_match_reference(events, close_all):
    """Ticks close the windows of series idle for IDLE_MS, raise their floor, forget them after
    FORGET_MS; the engine (series_sweep, window_flush, window_forget) agrees with the reference."""
    engine = new_engine()
    parts = run_ticked(engine, events)
    if close_all:
        parts.append(engine.flush())
    got = pa.concat_tables([contract.empty(contract.WINDOWS)] + parts).to_pandas()
    want = reference_ticked_windows(events, close_all)
    for size, _ in SPECS:
        assert_same_windows(got[got.window_s == size], want[want.window_s == size], unique=False)


def test_a_quiet_series_is_closed_at_the_idle_tick_and_its_late_readings_are_dropped():
    engine = new_engine()
    engine.update(table([0, 1], [1_000_000, 1_000_100], [1.0, 2.0]), 0)
    assert engine.tick(50_000, 1).num_rows == 0  # both series turn active at the first tick
    assert engine.tick(51_000, 2).num_rows == 0
    engine.update(table([1], [1_000_200], [3.0]), 3)  # series 1 active at 51_000
    assert engine.tick(50_000 + IDLE_MS - 1, 4).num_rows == 0
    closed = engine.tick(50_000 + IDLE_MS, 5)  # series 0 idle for IDLE_MS, series 1 not yet
    assert sorted(zip(closed["device_id"].to_pylist(), closed["window_s"].to_pylist())) == \
        [("d0", 1), ("d0", 2), ("d0", 3), ("d0", 3), ("d0", 3)]  # sliding 3 s: three windows hold 1_000_000
    closed, dropped = engine.update(table([0, 0], [1_002_500, 1_003_000], [9.0, 9.0]), 6)
    assert dropped == 1  # below d0's floor, the end of its last window (1_003_000): that window is out
    closed = engine.tick(51_000 + IDLE_MS, 7)
    assert sorted(set(closed["device_id"].to_pylist())) == ["d1"]
    assert closed.filter(pa.compute.equal(closed["window_s"], 1))["count"].to_pylist() == [2]


@settings(max_examples=80, deadline=None, phases=PHASES)
@given(ticked_streams(max_n=80), st.integers(0, 100), st.lists(st.integers(0, 20), max_size=4))
def test_window_replay_from_live_offset_emits_identical_rows(events, cut_at, replays):
    """The restart mechanism: upstream replays (records emitted again, same source offset) change
    nothing, and an engine rebuilt from the live offset emits exactly what the original emits,
    idle closes and forgetting included (the clock comes from ticks in the topic)."""
    sources = []  # clean records (5 readings each) and ticks, in topic order
    for kind, item in events:
        if kind == "tick":
            sources.append((kind, item))
        else:
            sources += [("readings", item.slice(i, 5)) for i in range(0, item.num_rows, 5)]

    def feed(engine: WindowEngine, offset: int, src: int) -> pa.Table:
        kind, item = sources[src]
        return engine.tick(item, offset) if kind == "tick" else engine.update(item, offset, src)[0]

    undisturbed = new_engine()
    want_all = [feed(undisturbed, src, src) for src in range(len(sources))]
    # The topic as the window agent reads it: after source record r, records r-2..r again (not ticks).
    topic = []
    for src in range(len(sources)):
        topic.append(src)
        if src in replays:
            topic += [r for r in range(max(0, src - 2), src + 1) if sources[r][0] == "readings"]
    original = new_engine()
    out = []
    b = min(cut_at, len(topic))
    restart = None
    for offset, src in enumerate(topic):
        if offset == b:
            restart = original.live_offset()
        out.append(feed(original, offset, src))
    if restart is None:
        restart = original.live_offset()
    restart = b if restart < 0 else restart
    assert restart <= b

    def frame(tables):
        df = pa.concat_tables([contract.empty(contract.WINDOWS)] + tables).to_pandas()
        return df.sort_values(["device_id", "window_s", "window_start_ms"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(frame(out), frame(want_all))  # replays are invisible
    restored = new_engine()
    emitted = []
    for offset in range(restart, len(topic)):
        closed = feed(restored, offset, topic[offset])
        if offset >= b:
            emitted.append(closed)
    pd.testing.assert_frame_equal(frame(emitted), frame(out[b:]))


def test_batch_windows_matches_pandas_groupby():
    rng = np.random.default_rng(3)
    n = 5000
    ts = rng.integers(0, 600_000, n)
    t = table(rng.integers(0, 20, n).tolist(), ts.tolist(), rng.normal(20, 2, n).tolist())
    got = batch_windows(t, 60).to_pandas()
    df = t.to_pandas().assign(start=lambda d: d.ts_ms // 60_000 * 60_000)
    want = df.groupby(["device_id", "start"]).value.agg(["count", "mean", "min", "max", "std"]).reset_index()
    merged = got.merge(want, left_on=["device_id", "window_start_ms"], right_on=["device_id", "start"])
    assert len(merged) == len(want) == len(got)
    assert (merged.count_x == merged.count_y).all()
    np.testing.assert_allclose(merged.mean_x, merged.mean_y, rtol=1e-9)
    np.testing.assert_allclose(merged.min_x, merged.min_y)
    np.testing.assert_allclose(merged.max_x, merged.max_y)
    assert batch_windows(t, 60).schema.equals(contract.WINDOWS)


def test_series_index_is_dense_and_stable():
    index = K.SeriesIndex()
    a = table([0, 1, 0], [1, 2, 3], [0.0] * 3)
    first = index.lookup(a["tenant"], a["device_id"], a["metric"])
    b = table([2, 0, 3], [1, 2, 3], [0.0] * 3)
    second = index.lookup(b["tenant"], b["device_id"], b["metric"])
    assert first.tolist() == [0, 1, 0] and second.tolist() == [2, 0, 3] and len(index) == 4
    tenant, device, metric = index.columns(np.array([3, 0]))
    assert device.to_pylist() == ["d3", "d0"] and tenant.to_pylist() == ["t", "t"]


# --- clean kernel ----------------------------------------------------------------------

def reference_clean(series, ts, vals, received, lateness_ms, horizon_ms, skew_ms):
    """Verdict per reading: stateless checks, then duplicate (within horizon), then late; both
    measured from the reading's series' newest accepted ts."""
    seen, newest, out = set(), {}, []
    for s, t, v, r in zip(series, ts, vals, received):
        if not math.isfinite(v):
            out.append("non_finite")
        elif t > r + skew_ms:
            out.append("future")
        elif (s, t) in seen and t >= newest.get(s, -math.inf) - horizon_ms:
            out.append("duplicate")
        elif t < newest.get(s, -math.inf) - lateness_ms:
            out.append("late")
        else:
            seen.add((s, t))
            newest[s] = max(newest.get(s, -math.inf), t)
            out.append("ok")
    return out


def clean_config(lateness_s=2.5, horizon_s=6.0, skew_s=3.0) -> CleanConfig:
    return CleanConfig(dedup_horizon_s=horizon_s, allowed_lateness_s=lateness_s, max_clock_skew_s=skew_s)


@settings(max_examples=120, deadline=None, phases=PHASES)
@given(streams(), st.lists(st.integers(-2000, 5000), min_size=80, max_size=80))
def test_clean_engine_matches_reference(stream, delays):
    series, ts, vals, cuts = stream
    received = [t + d for t, d in zip(ts, delays)]
    t = table(series, ts, vals).set_column(6, "received_ms", pa.array(received, pa.int64()))
    engine = CleanEngine(clean_config(), UnitTable({}))
    got, start = [], 0
    for cut in sorted(set(cuts)) + [t.num_rows]:
        got.extend(K.REASONS[v] for v in engine.process(t.slice(start, cut - start), start).verdict)
        start = cut
    assert got == reference_clean(series, ts, vals, received, 2500, 6000, 3000)


def test_clean_units_and_ranges():
    units = UnitTable.load()
    rows = table([0] * 5, [1000, 2000, 3000, 4000, 5000], [300.15, 25.0, 500.0, 7.0, 1.0])
    rows = rows.set_column(2, "metric", pa.array(["temp", "temp", "temp", "humidity", "brightness"])) \
               .set_column(5, "unit", pa.array(["K", "Cel", "Cel", "lx", "lx"]))
    r = CleanEngine(clean_config(), units).process(rows)
    assert r.clean.column("value").to_pylist() == pytest.approx([27.0, 25.0, 1.0])
    assert r.clean.column("unit").to_pylist() == ["Cel", "Cel", "lx"]  # unknown metrics pass unchanged
    assert sorted(r.dead.column("reason").to_pylist()) == ["bad_unit", "out_of_range"]
    assert r.dead.column("value").to_pylist() == [500.0, 7.0]  # rejects keep the original reading


def duplicated_stream(n: int, seed: int, start_ms: int, per_record: int = 40) -> list[pa.Table]:
    """Records of readings at ~100 Hz event time from ``start_ms``, 10% of them re-sent copies of
    earlier ones (bridge restart duplicates)."""
    rng = np.random.default_rng(seed)
    ts = (start_ms + np.arange(n) * 10 + rng.integers(-3000, 200, n)).tolist()
    series = rng.integers(0, 5, n).tolist()
    dup = rng.random(n) < 0.1
    src = np.maximum(np.arange(n) - rng.integers(1, 800, n), 0)
    ts = [ts[j] if d else t for t, d, j in zip(ts, dup, src)]
    series = [series[j] if d else s for s, d, j in zip(series, dup, src)]
    t = table(series, ts, [1.0] * n)
    return [t.slice(i, per_record) for i in range(0, n, per_record)]


def replayed(cfg: CleanConfig, records: list[pa.Table], restart: int) -> dict:
    """What a fresh engine makes of ``records`` replayed from offset ``restart``: offset -> result."""
    restored = CleanEngine(cfg, UnitTable({}))
    return {offset: restored.process(records[offset], offset) for offset in range(restart, len(records))}


def test_clean_replay_from_live_offset_rebuilds_dedup_and_watermark():
    """A restarted engine replaying from live_offset() classifies later records like the original."""
    records = duplicated_stream(4000, seed=11, start_ms=0)
    cfg = clean_config(lateness_s=2.0, horizon_s=5.0, skew_s=1e6)
    original = CleanEngine(cfg, UnitTable({}))
    results, b, restart = [], 60, None
    for offset, rec in enumerate(records):
        if offset == b:
            restart = original.live_offset()
        results.append(original.process(rec, offset))
    assert 0 <= restart < b
    for offset, r in replayed(cfg, records, restart).items():
        if offset >= b:
            want = results[offset]
            assert r.clean.equals(want.clean)
            assert r.dead.num_rows + r.late.num_rows == want.dead.num_rows + want.late.num_rows


def test_dedup_table_spreads_the_series_of_one_timestamp():
    """Keys of one timestamp differ only in their high (series) bits: the slot hash must still spread
    them, or every reading of a tick probes one long chain (it did, with a bare multiply)."""
    table = np.zeros(1 << 15, np.int64)
    ts = 1_795_452_670_000
    keys = [((series << K._TS_BITS) | (ts & K._TS_MASK)) + 1 for series in range(10_000)]
    probes = []
    for key in keys:
        home = K._slot(np.zeros_like(table), key)  # the slot in an empty table
        slot = K._slot(table, key)
        table[slot] = key
        probes.append((slot - home) % table.shape[0])
    assert np.mean(probes) < 2 and max(probes) < 64  # linear probing at load 0.3: ~0.2 expected


def test_dedup_set_at_a_steady_rate_keeps_a_bounded_set_of_generations_and_never_rehashes(monkeypatch):
    """Expiry drops whole generations: at a steady rate the set holds the horizon and a quarter, and
    once the first generation is sized nothing is rehashed (a rebuild stalled the partition)."""
    rehashed_at = []
    rehash = K._rehash
    monkeypatch.setattr(K, "_rehash", lambda keys, capacity: rehashed_at.append(second) or rehash(keys, capacity))
    horizon_ms, n = 100_000, 500
    series = np.arange(n, dtype=np.int64)
    seen, max_ts, max_ts_offset = K.DedupSet(horizon_ms), K.NO_TS, -1
    for second in range(1000):
        verdict = np.zeros(n, np.int8)
        max_ts, max_ts_offset = seen.check(series, np.full(n, second * 1000, np.int64), second, verdict, max_ts,
                                           max_ts_offset, 5000)
        assert not verdict.any()
        assert len(seen.tables) <= K.DEDUP_GENERATIONS + 1
        # the restart point: the horizon, a quarter of it, and the span being filled back at most
        assert second - seen.live_offset() <= 1.5 * horizon_ms / 1000 + 2
    assert rehashed_at and max(rehashed_at) < 30  # only the first generation grew
    assert sum(seen.counts) <= n * (1.5 * horizon_ms / 1000 + 2)
    copies = np.zeros(n, np.int8)
    seen.check(series, np.full(n, 950_000, np.int64), 1000, copies, max_ts, max_ts_offset, 5000)
    assert (copies == K.DUPLICATE).all()  # 49 s old: still in the set
