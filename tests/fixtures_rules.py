"""Hand-made contract tables, rule files and a self-signed certificate for the rules/alerter tests."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from aimass.rules.model import RuleSet, load_rules
from aimass.core import contract

READING = dict(tenant="acme", device_id="pump-1", metric="temperature", ts_ms=0, value=0.0, unit="Cel",
               received_ms=0)
WINDOW = dict(tenant="acme", device_id="pump-1", metric="temperature", window_s=10, window_start_ms=0,
              window_end_ms=0, count=10, mean=0.0, min=0.0, max=0.0, std=1.0, first=0.0, last=0.0, rate=0.0,
              ewma=0.0, zscore=0.0, max_received_ms=0)
PREDICTION = dict(tenant="acme", device_id="pump-1", metric="temperature", window_s=10, window_end_ms=0,
                  target_end_ms=0, observed_mean=20.0, forecast_triton=20.0, forecast_river=20.0, forecast=20.0,
                  band_low=18.0, band_high=22.0, anomaly_triton=0.1, anomaly_river=0.1, anomaly=0.1,
                  forecaster_model="fc:1", anomaly_model="ae:1", degraded=False, max_received_ms=0, predicted_ms=0)
LABEL = dict(tenant="acme", device_id="pump-1", metric="", start_ms=0, end_ms=0, kind="spike", magnitude=1.0,
             source="simulator")


def table(schema: pa.Schema, base: dict, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=schema)


def readings(*rows: dict) -> pa.Table:
    return table(contract.READINGS, READING, list(rows))


def windows(*rows: dict) -> pa.Table:
    return table(contract.WINDOWS, WINDOW, list(rows))


def predictions(*rows: dict) -> pa.Table:
    return table(contract.PREDICTIONS, PREDICTION, list(rows))


def labels(*rows: dict) -> pa.Table:
    return table(contract.LABELS, LABEL, list(rows))


WEBHOOK_RECEIVER = """
receivers:
  hook:
    kind: webhook
    url: {url}
    secret_env: TEST_HOOK_SECRET
    group_wait: {group_wait}
"""


def ruleset(tmp_path: Path, text: str, name: str = "rules.yaml") -> RuleSet:
    path = tmp_path / name
    path.write_text(text)
    return load_rules(path)


@pytest.fixture
def tls_files(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM paths)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)
