"""The clean stage's restart offset (asked at every commit) stays exact and moves on with the stream."""
from __future__ import annotations

import numpy as np

from aimass.agents.clean import CleanEngine
from aimass.streams.units import UnitTable
from tests.test_kernels import clean_config, duplicated_stream, replayed


def test_live_offset_asked_at_every_commit_is_an_exact_restart_point_that_keeps_up():
    records = duplicated_stream(12000, seed=5, start_ms=1_763_900_000_000)
    cfg = clean_config(lateness_s=2.0, horizon_s=20.0, skew_s=1e6)
    original = CleanEngine(cfg, UnitTable({}))
    results, restarts = [], []
    for offset, record in enumerate(records):
        results.append(original.process(record, offset))
        restarts.append(original.live_offset())  # what every commit asks
    assert restarts == sorted(restarts)  # the restart point only moves forward ...
    assert restarts[-1] > len(records) // 2  # ... and keeps up with the stream

    for cut in (30, 77, 160, 290):
        restart = restarts[cut - 1]
        assert 0 <= restart < cut
        for offset, r in replayed(cfg, records, restart).items():
            if offset >= cut:
                want = results[offset]
                assert r.clean.equals(want.clean), (cut, offset)
                assert np.array_equal(r.verdict, want.verdict), (cut, offset)
