"""The clean stage's restart offset is computed cheaply (no dedup rebuild per commit) and stays exact."""
from __future__ import annotations

import numpy as np

from agents.clean import CleanEngine
from streams.units import UnitTable
from tests.test_kernels import clean_config, table


def duplicated_stream(n: int = 12000, per_record: int = 40, seed: int = 5) -> list:
    """Records of readings at ~100 Hz event time, 10% of them re-sent copies of earlier ones."""
    rng = np.random.default_rng(seed)
    ts = (1_763_900_000_000 + np.arange(n) * 10 + rng.integers(-3000, 200, n)).tolist()
    series = rng.integers(0, 5, n).tolist()
    dup = rng.random(n) < 0.1
    src = np.maximum(np.arange(n) - rng.integers(1, 800, n), 0)
    ts = [ts[j] if d else t for t, d, j in zip(ts, dup, src)]
    series = [series[j] if d else s for s, d, j in zip(series, dup, src)]
    t = table(series, ts, [1.0] * n)
    return [t.slice(i, per_record) for i in range(0, n, per_record)]


def test_live_offset_asked_at_every_commit_rebuilds_rarely_and_each_answer_is_an_exact_restart_point():
    records = duplicated_stream()
    cfg = clean_config(lateness_s=2.0, horizon_s=20.0, skew_s=1e6)
    original = CleanEngine(cfg, UnitTable({}))
    prunes = 0
    prune = original.seen.prune

    def counting_prune(*args, **kwargs):
        nonlocal prunes
        prunes += 1
        return prune(*args, **kwargs)

    original.seen.prune = counting_prune
    results, restarts = [], []
    for offset, record in enumerate(records):
        results.append(original.process(record, offset))
        restarts.append(original.live_offset())  # what every commit asks
    # 300 records over ~120 s of event time, 20 s horizon: a rebuild per ~2 s of event time, not per record.
    assert 20 <= prunes <= len(records) // 3
    assert restarts == sorted(restarts)  # the restart point only moves forward ...
    assert restarts[-1] > len(records) // 2  # ... and keeps up with the stream

    for cut in (30, 77, 160, 290):
        restart = restarts[cut - 1]
        assert 0 <= restart < cut
        restored = CleanEngine(cfg, UnitTable({}))
        for offset in range(restart, len(records)):
            r = restored.process(records[offset], offset)
            if offset >= cut:
                want = results[offset]
                assert r.clean.equals(want.clean), (cut, offset)
                assert r.max_ts_before == want.max_ts_before
                assert np.array_equal(r.verdict, want.verdict), (cut, offset)
