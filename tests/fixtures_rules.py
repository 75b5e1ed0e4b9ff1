"""Hand-made contract tables, rule files and a self-signed certificate for the rules/alerter tests."""
from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Consumer

from aimass.rules import expr
from aimass.rules.model import RuleSet, load_rules
from aimass.core import contract
from aimass.streams.kafka import consumer_config

READING = dict(tenant="acme", device_id="pump-1", metric="temperature", ts_ms=0, value=0.0, unit="Cel",
               received_ms=0)
WINDOW = dict(tenant="acme", device_id="pump-1", metric="temperature", window_s=10, window_start_ms=0,
              window_end_ms=0, count=10, mean=0.0, min=0.0, max=0.0, std=1.0, first=0.0, last=0.0, rate=0.0,
              ewma=0.0, zscore=0.0, max_received_ms=0)
PREDICTION = dict(tenant="acme", device_id="pump-1", metric="temperature", window_s=10, window_end_ms=0,
                  target_end_ms=0, observed_mean=20.0, forecast_triton=20.0, forecast_online=20.0, forecast=20.0,
                  band_low=18.0, band_high=22.0, anomaly_triton=0.1, anomaly_level=0.1, anomaly_spread=0.0,
                  anomaly_change=0.0, anomaly_device=float("nan"), regime_change=False, anomaly=0.1,
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


def _rule(condition: str, extra: str = "") -> str:
    return f"rules:\n  - name: hot\n    stream: windows\n    condition: {condition}\n{extra}"


# Rule files that must be rejected with their location, never crash the loader or the alerter:
# id -> (file content, "LINE:COL: start of the error message").
POISON_FILES: dict[str, tuple[str | bytes, str]] = {
    "bad_escape": (_rule("'device_id == \"\\x\"'"), "4:31: condition: bad escape '\\x'"),
    "bad_unicode_escape": (_rule("'metric == \"\\u12\"'"), "4:28: condition: bad escape '\\u'"),
    "deep_parentheses": (_rule("'" + "(" * 200 + "mean" + ")" * 200 + " > 1'"),
                         "4:50: condition: nested more than 32 levels deep"),
    "deep_not": (_rule("'" + "not " * 5000 + "mean > 1'"), "4:149: condition: nested more than 32 levels deep"),
    "long_chain": (_rule("'" + "mean + " * 5000 + "mean > 1'"), "4:34331: condition: more than 100 operators deep"),
    "deep_yaml_list": ("rules: " + "[" * 5000 + "]" * 5000 + "\n", "1:57: YAML: nested more than 50 levels deep"),
    "deep_yaml_mapping": ("rules:\n  - name: hot\n    labels: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
                          "3:198: YAML: nested more than 50 levels deep"),
    "huge_number": (_rule("mean > 1e999"), "4:23: condition: number '1e999' is too large"),
    "huge_width": (_rule("mean > 80", '    message: "{value:>2000000000}"\n'),
                   "5:14: message: {value:>2000000000}: '>2000000000': widths and precisions are at most 64"),
    "huge_precision": (_rule("mean > 80", '    message: "{mean:.999999999f}"\n'),
                       "5:14: message: {mean:.999999999f}: '.999999999f': widths and precisions are at most 64"),
    "huge_sms_body": ("receivers:\n  sms:\n    kind: sms\n    url: http://x\n    to: '+1'\n"
                      "    body: {to: '{to}', text: '{text:.3000000000}'}\n",
                      "6:11: body: {text:.3000000000}: '.3000000000': widths and precisions are at most 64"),
    "bad_format_spec": (_rule("mean > 80", '    message: "{mean:%%%}"\n'), "5:14: message: {mean:%%%}: '%%%' is not"),
    "huge_message": (_rule("mean > 80", f'    message: "{"x" * 5000}"\n'), "5:14: message: 5000 characters"),
    "unknown_field": (_rule("nosuch > 1"), "4:16: condition: unknown field 'nosuch'"),
    "unknown_key": (_rule("mean > 1", "    bogus: 1\n"), "5:5: unknown key 'bogus' in a rule"),
    "reserved_name": ("rules:\n  - {name: rule_error, stream: windows, condition: mean > 1}\n",
                      "2:12: name: 'rule_error' is reserved"),
    "non_mapping": ("- just\n- a list\n", "1:1: a rule file must be a mapping"),
    "rule_not_mapping": ("rules:\n  - 42\n", "2:5: a rule must be a mapping"),
    "binary_garbage": (bytes(range(256)) * 4, "2:118: not UTF-8 text (byte 0x80)"),
    "control_characters": ("rules: \x00\x01\n", "1:8: YAML: character U+0000 is not allowed"),
    "empty": ("", "1:1: the file is empty"),
    "oversized": ("#" * (1 << 20) + "\nrules: []\n", "1:1: 1048587 bytes; a rule file is at most 1048576"),
}


POISON_VALUE = 13.0


def poisoned_sqrt() -> tuple:
    """A test fault for ``expr.FUNCTIONS["sqrt"]``: rules compiled with it raise on ``POISON_VALUE``, a
    value the trial run's synthetic batch does not hold, i.e. they pass every check and fail on live data."""
    arity, vector, row = expr.FUNCTIONS["sqrt"]

    def poisoned(x):
        if np.any(np.asarray(x) == POISON_VALUE):
            raise FloatingPointError(f"poisoned sqrt({POISON_VALUE})")
        return vector(x)
    return arity, poisoned, row


class Reader:
    """Reads a contract topic from the beginning, accumulating rows."""

    def __init__(self, cfg, topic: contract.Topic):
        self.topic = topic
        self.consumer = Consumer(consumer_config(cfg, f"reader-{uuid.uuid4().hex[:8]}"))
        self.consumer.subscribe([topic.name(cfg.kafka.topic_prefix)])
        self.rows: list[dict] = []

    def until(self, predicate, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(self.rows):
            assert time.monotonic() < deadline, f"timed out on {self.topic.suffix}; rows so far: {self.rows}"
            for m in self.consumer.consume(100, 0.3):
                if not m.error():
                    self.rows += contract.decode(m.value(), self.topic.schema).to_pylist()
        return self.rows

    def close(self) -> None:
        self.consumer.close()


def offline_alerter(tmp_path: Path, rules_text: str):
    """An ``Alerter`` (no Kafka) over one rule file written into ``tmp_path``, rules loaded."""
    from aimass.agents.alert import Alerter
    from aimass.core.config import Config

    (tmp_path / "rules.yaml").write_text(rules_text)
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.alert.rules_path = str(tmp_path / "rules.yaml")
    alerter = Alerter(cfg)
    alerter.watcher.poll()
    return alerter
