"""tritonserver killed mid-stream: predictions continue from the online models, degraded; Triton rejoins on its own."""
from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from aimass.agents.predict import FORECASTER_NAME, Predictor
from aimass.core import contract
from aimass.core.config import Config
from aimass.core.procs import free_port, stop_pid
from aimass.core.stack import start_triton, stop_server
from aimass.models.triton_client import TritonModels
from tests.fixtures_predict import synthetic_windows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent / "triton_repo"
SERIES = 20
TIMEOUT_S = 1.0


def test_triton_killed_mid_stream_degrades_then_recovers(tmp_path):
    ports = (free_port(), free_port(), free_port())
    server = start_triton(tmp_path, *ports, REPO)
    windows, _ = synthetic_windows(SERIES, 400)
    cfg = Config()

    async def stream():
        client = TritonModels(f"127.0.0.1:{ports[1]}", timeout_s=TIMEOUT_S, breaker_failures=2, breaker_reset_s=0.5)
        predictor = Predictor(cfg, client)
        step = iter(range(400))
        phases: dict[str, list] = {"before": [], "down": [], "after": []}

        async def one() -> tuple:
            t = next(step)
            t0 = time.monotonic()
            preds, _ = await predictor.predict([(0, windows.slice(t * SERIES, SERIES))])
            preds = preds.filter(pc.not_equal(preds["metric"], contract.DEVICE_METRIC))  # device rows use no Triton
            return preds, time.monotonic() - t0, client.breaker.state

        for _ in range(5):
            phases["before"].append(await one())
        os.killpg(server.pid, signal.SIGKILL)  # the server and its Python-backend stubs, no goodbye
        stop_pid(server.pid, timeout=5)
        for _ in range(8):
            phases["down"].append(await one())
        restarted = await asyncio.to_thread(start_triton, tmp_path, *ports, REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            phases["after"].append(await one())
            if not phases["after"][-1][0]["degraded"].to_numpy().any():
                break
            await asyncio.sleep(0.2)
        await client.close()
        return phases, restarted

    try:
        phases, restarted = asyncio.run(stream())
    finally:
        stop_server(server)
    try:
        for preds, _, _ in phases["before"]:
            assert not preds["degraded"].to_numpy().any()
        for preds, waited, _ in phases["down"]:
            d = preds.to_pydict()
            assert preds.num_rows == SERIES and all(d["degraded"])
            assert all(math.isnan(v) for v in d["forecast_triton"] + d["anomaly_triton"])
            assert d["forecast"] == d["forecast_online"]
            assert all(math.isfinite(v) for v in d["forecast"])
            assert set(d["forecaster_model"]) == {FORECASTER_NAME}
            assert waited < 2 * TIMEOUT_S + 5  # bounded by the request timeout, never a stall
        assert phases["down"][-1][2] == "open"  # no more requests wait on a dead server
        last = phases["after"][-1][0].to_pydict()
        assert not any(last["degraded"]), "Triton did not rejoin within 60 s of coming back"
        assert all(m.startswith("forecaster:") for m in last["forecaster_model"])
    finally:
        stop_server(restarted)
