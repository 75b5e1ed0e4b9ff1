"""The whole pipeline for end-to-end and fault tests: every stage as its own `aimass` process,
supervised, against the session's real servers (mosquitto, kafka, tritonserver fixtures).

Windows are short (2 s) so models warm up in seconds; rules and receivers are the test's own.
"""
from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import pyarrow as pa

from aimass.core import tables
from aimass.core.clickhouse import open_reader
from aimass.core.config import Config, to_env
from aimass.demo import stage_plans, start_pipeline
from aimass.core.procs import free_port
from aimass.receiver import WebhookReceiver
from aimass.core.stack import create_topics
from aimass.core.supervisor import Supervisor, scrape
from aimass.streams.mqtt import Publisher
from aimass.streams.payloads import TopicPattern, encode_senml
from aimass.streams.simulator import METRICS
from tests.accounting import (Identity, ReadingLedger, alarm_events, check_alarm_events, check_predictions,
                              check_readings, check_windows, eventually, read_ledger)
from tests.conftest import make_config

SECRET = "e2e-test-signing-secret"
TEST_RULES = """
rules:
  # 10, not 6: seed 12's noise, drawn tick by tick as a live publish draws it, leaves a clean series
  # with |z| up to 7.1 (over 6 in 8 of 100 simulated starts); the qualifying anomalies reach 25 or more.
  - name: window_jump
    stream: windows
    selector: {window_s: 2}
    condition: abs(zscore) > 10 and count >= 5
    for: 1 windows
    clear: abs(zscore) < 2
    value: zscore
    severity: warning
    message: "{device_id}/{metric}: window mean {mean:.2f} is {value:.1f} sigma off"
    receivers: [test-webhook]

  - name: stuck
    stream: windows
    selector: {window_s: 2}
    condition: std == 0 and count > 3
    for: 1 windows
    clear: std > 0
    value: last
    severity: warning
    message: "{device_id}/{metric} is stuck at {value}"
    receivers: [test-webhook]

  # A spike beyond the sensor's range never reaches a window (power 500 W at its daily low minus a
  # 590 W spike is refused as out of range): the reject is the evidence.
  - name: rejected
    stream: rejects
    condition: stage == "clean" and reason == "out_of_range"
    value: value
    severity: warning
    message: "{device_id}/{metric}: reading {value} rejected ({reason})"
    receivers: [test-webhook]
"""

TEST_RECEIVERS = """
receivers:
  test-webhook:
    kind: webhook
    url: {url}
    secret_env: AIMASS_WEBHOOK_SECRET
    group_wait: 0s
"""


def pipeline_config(tmp: Path, mosquitto, kafka, triton, webhook_port: int) -> Config:
    """Config for a test pipeline: fixture servers, own topics, free metrics ports, 2 s windows."""
    cfg = make_config(tmp, mosquitto, kafka, triton)
    for section in ("bridge", "worker", "predict", "alert", "clickhouse"):
        getattr(cfg, section).metrics_port = free_port()
    cfg.clickhouse.query_port = free_port()
    cfg.window.sizes_s = "2,10"
    cfg.predict.window_s = 2
    cfg.clean.allowed_lateness_s = 1.0
    cfg.bridge.flush_ms = 20
    cfg.bridge.client_id = f"bridge-{cfg.kafka.topic_prefix}"  # its own MQTT session on the shared broker
    rules = tmp / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "rules.yaml").write_text(TEST_RULES)
    (rules / "receivers.yaml").write_text(TEST_RECEIVERS.format(url=f"http://127.0.0.1:{webhook_port}/aimass/alerts"))
    cfg.alert.rules_path = str(rules)
    cfg.alert.backoff_initial_s = 0.2
    cfg.alert.backoff_max_s = 2.0
    cfg.alert.max_attempts = 80  # retries outlast a receiver that is down for a minute
    create_topics(cfg)
    return cfg


def wait_rising(ports: dict[str, int], metric: str, timeout_s: float = 60) -> str:
    """The first of ``ports`` (name -> Prometheus port) whose counter ``metric`` rises: that process is
    doing the work right now, the evidence that a fault placed on it next lands on live work."""
    deadline = time.monotonic() + timeout_s
    first = {name: scrape(port).get(metric) for name, port in ports.items()}
    while time.monotonic() < deadline:
        time.sleep(0.3)
        for name, port in ports.items():
            value = scrape(port).get(metric)
            if value is not None and first[name] is not None and value > first[name]:
                return name
            first[name] = value if first[name] is None else first[name]
    raise AssertionError(f"{metric} did not rise within {timeout_s:.0f}s on any of {ports} (last {first})")


MILLIS = re.compile(r"toUnixTimestamp64Milli\((\w+)\)")


class SeriesTraffic:
    """Telemetry of named devices published in a background thread, one SenML pack per device and
    second: ``clocks`` maps each device to how far its clock runs ahead (s). Values are noisy until
    ``stick()`` (or ``stuck_after_s``), then constant, so the test rules' ``stuck`` alarm is raised
    on every series from then on: a deterministic alarm per series."""

    def __init__(self, cfg: Config, tenant: str, clocks: dict[str, float], seconds: float,
                 metrics: tuple[str, ...] = ("temp", "power"), rate_hz: int = 5, stuck_after_s: float | None = None):
        self.cfg, self.tenant, self.clocks, self.metrics, self.rate_hz = cfg, tenant, clocks, metrics, rate_hz
        self.seconds = seconds
        self.sent: set[Identity] = set()
        self.stuck_from_ms: int | None = None  # wall time of the first constant reading
        self.acked = False
        self._stuck = threading.Event()
        if stuck_after_s is not None:
            timer = threading.Timer(stuck_after_s, self.stick)
            timer.daemon = True
            timer.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stick(self) -> None:
        self._stuck.set()

    def _run(self) -> None:
        rng = random.Random(1)
        last = dict.fromkeys(self.clocks, 0)
        packs: dict[str, list] = {d: [] for d in self.clocks}
        topics = TopicPattern(self.cfg.mqtt.topic_pattern)
        ticks = int(self.seconds * self.rate_hz)
        start = time.time()
        with Publisher(self.cfg, f"series-{self.tenant}", qos=1) as pub:
            for k in range(ticks):
                while (wait := start + k / self.rate_hz - time.time()) > 0:
                    pub.service(wait)
                now_ms = int(time.time() * 1000)
                if self._stuck.is_set() and self.stuck_from_ms is None:
                    self.stuck_from_ms = now_ms
                for device, ahead_s in self.clocks.items():
                    ts = last[device] = max(now_ms + int(ahead_s * 1000), last[device] + 1)
                    for m in self.metrics:
                        model = METRICS[m]
                        noise = 0.0 if self.stuck_from_ms is not None else rng.gauss(0, 3 * model.noise_sd)
                        packs[device].append((m, ts, model.base + noise, model.unit))
                        self.sent.add((self.tenant, device, m, ts))
                    if len(packs[device]) >= self.rate_hz * len(self.metrics) or k == ticks - 1:
                        pub.publish(topics.topic(self.tenant, device), encode_senml(packs[device]))
                        packs[device] = []
            self.acked = pub.drain(timeout_s=120)

    def join(self) -> set[Identity]:
        """The identities of every reading published, once the publisher has every ack."""
        self.thread.join(timeout=self.seconds + 180)
        assert self.acked, "publisher did not get every ack"
        return self.sent


def per_series(pipeline: "TestPipeline", table: str, tenant: str, time_column: str, since_ms: int = 0,
               where: str = "") -> dict[tuple[str, str], int]:
    """(device_id, metric) -> rows of ``table`` (FINAL) whose ``time_column`` is ``since_ms`` or later."""
    rows = pipeline.query(f"SELECT device_id, metric, count() AS n FROM {{db}}.{table} FINAL WHERE tenant = '{tenant}' "
                          f"AND toUnixTimestamp64Milli({time_column}) >= {since_ms} {where} "
                          "GROUP BY device_id, metric").to_pydict()
    return {(d, m): n for d, m, n in zip(rows["device_id"], rows["metric"], rows["n"])}


def check_every_series_produced(pipeline: "TestPipeline", tenant: str, series: set[tuple[str, str]],
                                since_ms: int = 0, timeout_s: float = 30) -> None:
    """Every series has readings, windows (of ``predict.window_s``), predictions and a raised ``stuck``
    alarm from ``since_ms`` on (``SeriesTraffic`` values are flat by then): each stage produced for it."""
    w = pipeline.cfg.predict.window_s
    outputs = {"readings": ("readings", "ts", ""), "windows": ("windows", "window_end_at", f"AND window_s = {w}"),
               "predictions": ("predictions", "window_end_at", f"AND window_s = {w}"),
               "stuck alarms": ("alerts", "ts", "AND rule = 'stuck' AND transition IN ('raised', 'reraised')")}

    def check() -> None:
        for name, (table, column, where) in outputs.items():
            missing = series - set(per_series(pipeline, table, tenant, column, since_ms, where))
            assert not missing, f"no {name} from {since_ms} on for {sorted(missing)}"

    eventually(check, timeout_s)


class TestPipeline:
    """Stage processes under a Supervisor plus a verifying webhook receiver."""

    __test__ = False  # not a pytest class

    def __init__(self, cfg: Config, workers: int = 2, bridges: int = 1, webhook_port: int | None = None):
        self.cfg = cfg
        self.plans = stage_plans(cfg, workers, bridges)
        self.sup = Supervisor(cfg.run_dir, auto_restart=True, backoff_initial_s=0.5, backoff_max_s=2.0)
        self.receiver = WebhookReceiver(SECRET, webhook_port or free_port())
        self.env = {**to_env(cfg), "AIMASS_WEBHOOK_SECRET": SECRET, "AIMASS_RUN_LOG_LEVEL": "INFO"}

    def start(self) -> "TestPipeline":
        self.receiver.start()
        start_pipeline(self.cfg, self.sup, self.plans, self.env, say=lambda *_: None)
        return self

    def stop(self) -> dict[str, int]:
        codes = self.sup.stop_all(timeout=20)
        self.receiver.stop()
        return codes

    def metrics(self) -> dict[str, float]:
        return scrape(*[p.metrics_port for p in self.plans])

    def ports(self, prefix: str) -> dict[str, int]:
        """Name -> metrics port of the stages whose name starts with ``prefix``."""
        return {p.name: p.metrics_port for p in self.plans if p.name.startswith(prefix)}

    def log_of(self, name: str) -> str:
        log = self.sup.log_dir / f"{name}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def query(self, sql: str) -> pa.Table:
        store = open_reader(self.cfg)
        sql = sql.replace("{db}", self.cfg.clickhouse.database)
        if getattr(store, "dialect", tables.MODERN) == tables.LEGACY:  # an old server: times are Int64 ms columns
            sql = MILLIS.sub(lambda m: tables.legacy_ms_name(m[1]), sql)
        return store.query(sql)

    def count(self, sql: str) -> int:
        return int(self.query(sql).column(0)[0].as_py())

    def wait_stored(self, tenant: str, expected: int, timeout: float = 180, settle_s: float = 8) -> int:
        """Wait until readings + rejects of ``tenant`` reach ``expected`` and stop changing."""
        deadline, last, since = time.monotonic() + timeout, -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count(f"SELECT (SELECT count() FROM (SELECT * FROM {{db}}.readings FINAL WHERE tenant = '{tenant}'))"
                           f" + (SELECT count() FROM {{db}}.rejects FINAL WHERE tenant = '{tenant}')")
            if n != last:
                last, since = n, time.monotonic()
            elif n >= expected and time.monotonic() - since > settle_s:
                return n
            time.sleep(1)
        return last

    def account(self, tenant: str, published: set[Identity], extra_rejects: int = 0,
                timeout_s: float = 90, wait_s: float = 180) -> ReadingLedger:
        """Wait (up to ``wait_s``) for the tenant's readings, then hold every published reading, every
        closed window of ``predict.window_s``, its prediction and every alarm event to account by identity
        (``tests.accounting``), retried until outputs settle or ``timeout_s``; the logs on failure."""
        self.wait_stored(tenant, len(published) + extra_rejects, timeout=wait_s)
        w, lateness_ms = self.cfg.predict.window_s, int(self.cfg.clean.allowed_lateness_s * 1000)

        def check() -> ReadingLedger:
            ledger = read_ledger(self.query, tenant)
            check_readings(ledger, published)
            check_predictions(self.query, tenant, check_windows(self.query, tenant, ledger, w, lateness_ms), w)
            check_alarm_events(alarm_events(self.query, tenant))
            return ledger

        try:
            return eventually(check, timeout_s)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        """Tails of every stage log, for assertion messages."""
        out = []
        for plan in self.plans:
            log = self.sup.log_dir / f"{plan.name}.log"
            if log.exists():
                out.append(f"--- {plan.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)
