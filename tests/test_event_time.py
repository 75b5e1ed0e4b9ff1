"""Event time per series through the clean and window engines of one partition (in-process):
a device with a fast clock, or old history replayed next to live traffic, leaves every other
device's windows as they would be on its own; a quiet series' last windows close at the idle tick."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from aimass.agents.clean import CleanEngine
from aimass.agents.window import WindowEngine, batch_windows
from aimass.core.config import CleanConfig, ConfigError, WindowConfig
from aimass.core import contract
from aimass.streams.units import UnitTable
from tests.fixtures_stream import T0, synthetic

SKEW_MS = 30_000  # accepted: under clean.max_clock_skew_s (60 s)
RECORD_MS = 1000  # the bridge flushes a record per second of receive time
WINDOW = WindowConfig()
CLEAN = CleanConfig()
KEY = ["tenant", "device_id", "metric", "window_s", "window_start_ms"]


def arrival_records(*streams: pa.Table) -> list[pa.Table]:
    """The streams merged in receive-time order and cut into one raw record per second."""
    merged = pa.concat_tables(streams)
    merged = merged.take(np.argsort(merged["received_ms"].to_numpy(), kind="stable"))
    second = merged["received_ms"].to_numpy() // RECORD_MS
    cuts = np.flatnonzero(np.diff(second)) + 1
    return [merged.slice(a, b - a) for a, b in zip(np.r_[0, cuts], np.r_[cuts, merged.num_rows])]


def run_partition(records: list[pa.Table], ticks: dict[int, int] | None = None) -> tuple[pa.Table, int]:
    """Clean then window engine over the raw records in order, as one worker runs a partition
    (a clock tick after record i where ``ticks`` says so); returns (window rows, late readings)."""
    cleaner = CleanEngine(CLEAN, UnitTable.load())
    windows = WindowEngine.from_config(WINDOW, CLEAN.allowed_lateness_s)
    out, late, offset = [], 0, 0
    for i, raw in enumerate(records):
        result = cleaner.process(raw, i)
        late += result.late.num_rows
        out.append(windows.update(result.clean, offset, source_offset=i)[0])
        offset += 1
        if ticks and i in ticks:
            out.append(windows.tick(ticks[i], offset))
            offset += 1
    return pa.concat_tables(out), late


def expected(readings: pa.Table, closed_through: dict[str, int] | None = None) -> pa.Table:
    """The windows of these (all accepted) readings that end at or before their series' watermark
    (the device's newest ts - lateness), or ``closed_through[device]`` where given."""
    lateness_ms = int(CLEAN.allowed_lateness_s * 1000)
    parts = []
    for device in sorted(set(readings["device_id"].to_pylist())):
        mine = readings.filter(pc.equal(readings["device_id"], device))
        for metric in sorted(set(mine["metric"].to_pylist())):
            series = mine.filter(pc.equal(mine["metric"], metric))
            limit = (closed_through or {}).get(device, pc.max(series["ts_ms"]).as_py() - lateness_ms)
            for size, hop in WINDOW.specs():
                w = batch_windows(series, size, hop)
                parts.append(w.filter(pc.less_equal(w["window_end_ms"], limit)))
    return pa.concat_tables(parts)


def assert_same_windows(got: pa.Table, want: pa.Table) -> None:
    """The same window identities, each once, with the same statistics."""
    g = got.to_pandas().sort_values(KEY).reset_index(drop=True)
    w = want.to_pandas().sort_values(KEY).reset_index(drop=True)
    assert not g.duplicated(KEY).any()
    missing = set(map(tuple, w[KEY].values)) - set(map(tuple, g[KEY].values))
    extra = set(map(tuple, g[KEY].values)) - set(map(tuple, w[KEY].values))
    assert not missing and not extra, (sorted(missing)[:5], len(missing), sorted(extra)[:5], len(extra))
    assert g["count"].tolist() == w["count"].tolist()
    for col in ("mean", "min", "max", "std", "first", "last", "rate", "ewma", "zscore"):
        np.testing.assert_allclose(g[col], w[col], rtol=1e-9, atol=1e-9, err_msg=col)


def test_a_device_with_a_fast_clock_leaves_the_other_devices_windows_untouched():
    """+30 s device next to normal ones in one partition, two tenants: every device gets every
    window its own watermark closed, nothing is late (on a partition watermark the normal
    devices' readings were all late: no windows, only a counter)."""
    normal = synthetic(devices=4, seconds=300, seed=1)
    other_tenant = synthetic(devices=2, seconds=300, seed=2, tenant="globex")
    fast = synthetic(devices=1, seconds=300, seed=3)
    fast = fast.set_column(1, "device_id", pa.array(["fast"] * fast.num_rows)) \
               .set_column(3, "ts_ms", pc.add(fast["ts_ms"], SKEW_MS))  # received_ms stays: the clock is off
    got, late = run_partition(arrival_records(normal, other_tenant, fast))
    assert late == 0
    want = expected(pa.concat_tables([normal, other_tenant, fast]))
    assert set(zip(want["tenant"].to_pylist(), want["device_id"].to_pylist())) == {
        *(("acme", f"dev000{d}") for d in range(4)), ("globex", "dev0000"), ("globex", "dev0001"), ("acme", "fast")}
    assert_same_windows(got, want)


def test_old_history_replayed_into_a_live_partition_gets_its_windows_and_so_does_the_live_traffic():
    """`aimass replay` / `aimass backtest` against a running pipeline: yesterday's readings of one
    device, published as fast as possible while another device reports live, in one partition.
    Both get all their windows; the history's last ones close at the idle tick after it ends."""
    live = synthetic(devices=1, seconds=400, seed=4)
    history = synthetic(devices=1, seconds=3600, rate_hz=2.0, seed=5, tenant="backtest")
    history = history.set_column(1, "device_id", pa.array(["pump-7"] * history.num_rows))
    # event times a day back, received within 100 s of live time (the replay publishes at ~36x)
    history = history.set_column(3, "ts_ms", pc.subtract(history["ts_ms"], 86_400_000)) \
                     .set_column(6, "received_ms", pa.array(T0 + 100_000 + np.arange(history.num_rows) * 100 //
                                                            (2 * 36), pa.int64()))
    records = arrival_records(live, history)
    idle_ms = int(WINDOW.idle_close_s * 1000)
    # clock ticks every 15 s of receive time, as the clean agent writes them
    ticks = {i: int(r["received_ms"][-1].as_py()) for i, r in enumerate(records) if i % 15 == 0}
    last_history_tick = max(t for t in ticks.values() if t <= T0 + 200_000)
    assert any(t >= last_history_tick + idle_ms for t in ticks.values())  # the stream lasts past the idle time
    got, late = run_partition(records, ticks)
    assert late == 0
    got_history = got.filter(pc.equal(got["tenant"], "backtest"))
    got_live = got.filter(pc.equal(got["tenant"], "acme"))
    assert_same_windows(got_history, expected(history, {"pump-7": 2 ** 62}))  # every window, the last ones included
    assert_same_windows(got_live, expected(live))


def test_a_quiet_device_has_its_last_windows_closed_by_the_idle_tick():
    """A partition that goes quiet: only ticks arrive, and once window.idle_close_s of tick time
    has passed since the devices' last readings, their last windows are out, not before."""
    quiet = synthetic(devices=2, seconds=125, seed=6)
    records = arrival_records(quiet) + [contract.empty(contract.READINGS)]  # then nothing but ticks
    last, first_tick, idle_ms = len(records) - 1, T0 + 200_000, int(WINDOW.idle_close_s * 1000)
    not_yet, _ = run_partition(records, {last - 1: first_tick, last: first_tick + idle_ms - 1})
    assert_same_windows(not_yet, expected(quiet))
    got, _ = run_partition(records, {last - 1: first_tick, last: first_tick + idle_ms})
    assert_same_windows(got, expected(quiet, {"dev0000": 2 ** 62, "dev0001": 2 ** 62}))
    assert got.num_rows > not_yet.num_rows


def test_idle_close_shorter_than_the_largest_window_is_a_config_error():
    with pytest.raises(ConfigError, match="window.idle_close_s"):
        WindowEngine.from_config(WindowConfig(sizes_s="10,300", idle_close_s=120), 5.0)
