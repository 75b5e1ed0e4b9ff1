"""Asyncio gRPC client for the forecaster and anomaly models, behind a circuit breaker.

``TritonModels.infer(features)`` splits the rows into requests of at most
``max_rows_per_request``, keeps at most ``max_in_flight`` requests open, gives each one
``timeout_s``, and never raises: rows Triton did not answer come back with NaN and
``served=False`` so the caller continues from the online models and marks them degraded. After
``breaker_failures`` failed requests in a row the breaker opens and no request is sent for
``breaker_reset_s``; then one probe request is let through and a success closes the breaker.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tritonclient.grpc.aio as grpcclient
from prometheus_client import Gauge, Histogram

from aimass.models import onnx_export

log = logging.getLogger(__name__)

TRITON_SECONDS = Histogram("aimass_predict_triton_seconds", "Triton request latency (one model, one request)",
                           buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
BREAKER_OPEN = Gauge("aimass_predict_breaker_open", "1 while the Triton circuit breaker is open")

MAX_MESSAGE = 256 * 1024 * 1024
# Short reconnect backoff: a restarted tritonserver is rejoined within a second of the probe.
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000)]


class CircuitBreaker:
    """closed -> (N failures in a row) -> open -> (reset_s) -> half-open: one probe -> closed/open."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.reset_s, self.clock = failures, reset_s, clock
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a request be sent now? In half-open only the single probe may."""
        if self.state == "open" and self.clock() - self.opened_at >= self.reset_s:
            self.state = "half_open"
            return True
        return self.state == "closed"

    def success(self) -> None:
        if self.state != "closed":
            log.info("Triton answered again: circuit breaker closed, predictions use Triton")
        self.state, self.consecutive = "closed", 0
        BREAKER_OPEN.set(0)

    def failure(self, error: str) -> None:
        self.consecutive += 1
        if self.state == "half_open" or (self.state == "closed" and self.consecutive >= self.failures):
            if self.state == "closed":
                log.warning("Triton failing (%s): circuit breaker open, predictions continue from the online models (degraded)",
                            error)
            self.state, self.opened_at = "open", self.clock()
            BREAKER_OPEN.set(1)


@dataclass
class TritonOutput:
    """Per-row model outputs; NaN and ``served=False`` where Triton did not answer."""

    forecast: np.ndarray         # [N] normalized next-window mean
    score: np.ndarray            # [N] anomaly score 0..1
    served: np.ndarray           # [N] bool
    forecaster_model: str = ""   # name:version that answered
    anomaly_model: str = ""


class TritonModels:
    """The forecaster and anomaly models on one Triton, for the predict stage."""

    def __init__(self, url: str, timeout_s: float = 2.0, max_rows_per_request: int = 4096, max_in_flight: int = 8,
                 breaker_failures: int = 3, breaker_reset_s: float = 5.0,
                 forecaster: str = "forecaster", anomaly: str = "anomaly"):
        self.url, self.timeout_s, self.max_rows = url, timeout_s, max_rows_per_request
        self.models = {"forecaster": forecaster, "anomaly": anomaly}
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.breaker = CircuitBreaker(breaker_failures, breaker_reset_s)
        self.client: grpcclient.InferenceServerClient | None = None  # made in the running event loop

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _call(self, role: str, x: np.ndarray) -> tuple[np.ndarray, str]:
        """One request to one model: its [n] output and name:version."""
        inp = grpcclient.InferInput(onnx_export.INPUT, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        output = onnx_export.FORECAST if role == "forecaster" else onnx_export.SCORE
        if self.client is None:
            self.client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        async with self.in_flight:
            if self.breaker.state == "open":  # opened while this request waited for a slot: do not send it
                raise ConnectionError("circuit breaker open")
            t0 = time.perf_counter()
            result = await self.client.infer(self.models[role], [inp], outputs=[grpcclient.InferRequestedOutput(output)],
                                             client_timeout=self.timeout_s)
            TRITON_SECONDS.observe(time.perf_counter() - t0)
        return result.as_numpy(output)[:, 0], f"{self.models[role]}:{result.get_response().model_version}"

    async def _chunk(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str, str] | None:
        """Both models on one chunk of rows, or None (breaker open, error or timeout)."""
        if not self.breaker.allow():
            return None
        try:
            (fc, f_name), (sc, a_name) = await asyncio.gather(self._call("forecaster", x), self._call("anomaly", x))
        except Exception as exc:  # noqa: BLE001 - any failure degrades these rows, never the stream
            self.breaker.failure(f"{type(exc).__name__}: {str(exc)[:200]}")
            return None
        self.breaker.success()
        return fc, sc, f_name, a_name

    async def infer(self, features: np.ndarray) -> TritonOutput:
        """Forecasts and anomaly scores for features [N, K]; never raises, never waits past the timeout."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        n = len(x)
        out = TritonOutput(np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=bool))
        starts = range(0, n, self.max_rows)
        results = await asyncio.gather(*(self._chunk(x[s:s + self.max_rows]) for s in starts))
        for s, res in zip(starts, results):
            if res is not None:
                fc, sc, out.forecaster_model, out.anomaly_model = res
                out.forecast[s:s + len(fc)], out.score[s:s + len(sc)] = fc, sc
                out.served[s:s + len(fc)] = True
        return out
