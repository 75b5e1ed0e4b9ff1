"""`aimass demo`: the whole pipeline on the embedded stack, with simulated devices.

It starts Mosquitto, the Kafka broker and tritonserver (`aimass up`), every stage as its own
supervised process (bridge, two workers, predict, alerter, sink), a verifying webhook
receiver for the alerts, and the simulator with injected anomalies. It shows live progress
(``aimass.demo_screen``: a table per stage redrawn in place on a terminal, a line every 10 s
elsewhere), then prints a summary read back from the store and writes it to
``<run dir>/demo-summary.json``. The data stays in the store for `aimass query`. Ctrl-C stops
everything cleanly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aimass.core.clickhouse import open_reader
from aimass.core.config import Config, to_env
from aimass.core.stack import down, up
from aimass.core.supervisor import Supervisor, aimass_argv, scrape
from aimass.demo_screen import LiveScreen, detection_table, number
from aimass.receiver import WebhookReceiver
from aimass.rules.groundtruth import QualityTracker
from aimass.streams.simulator import SimSpec, publish

WEBHOOK_PORT = 8099  # the example receivers (rules/examples/receivers.yaml) post here
DRAIN_TABLES = ("readings", "rejects", "windows", "predictions", "outcomes", "alerts")


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage process: its `aimass` command and the environment that gives it its own ports."""

    name: str
    command: str
    env: dict[str, str]
    metrics_port: int
    priority: str = "normal"  # CPU priority (`run.background_priority` for predict and sink)


def stage_plans(cfg: Config, workers: int = 2, bridges: int = 1) -> list[StagePlan]:
    """The pipeline's stage processes, sink first (it migrates the store), bridges last.

    Extra workers and bridges get their own metrics ports (+10 per instance) and client ids.
    """
    background = cfg.run.background_priority
    plans = [StagePlan("sink", "sink", {}, cfg.clickhouse.metrics_port, background),
             StagePlan("predict", "predict", {}, cfg.predict.metrics_port, background),
             StagePlan("alerter", "alerter", {}, cfg.alert.metrics_port)]
    for i in range(workers):
        port = cfg.worker.metrics_port + 10 * i
        plans.append(StagePlan(f"worker-{i + 1}", "worker",
                               {"AIMASS_WORKER_METRICS_PORT": str(port),
                                "AIMASS_WORKER_WEB_PORT": str(cfg.worker.web_port + i)}, port))
    for i in range(bridges):
        port = cfg.bridge.metrics_port + 10 * i
        env = {"AIMASS_BRIDGE_METRICS_PORT": str(port), "AIMASS_BRIDGE_CLIENT_ID": f"{cfg.bridge.client_id}-{i + 1}"}
        if bridges > 1:  # several bridges share the stream through one shared subscription
            env["AIMASS_BRIDGE_SHARE_GROUP"] = cfg.bridge.share_group or "aimass"
        plans.append(StagePlan(f"bridge-{i + 1}" if bridges > 1 else "bridge", "bridge", env, port))
    return plans


def start_pipeline(cfg: Config, sup: Supervisor, plans: list[StagePlan], base_env: dict[str, str],
                   say=print) -> None:
    """Start every stage and wait until each serves its metrics (it is up and consuming)."""
    for plan in plans:
        say(f"starting {plan.name} (`aimass {plan.command}`, log {sup.log_dir / plan.name}.log) ...")
        sup.start(plan.name, aimass_argv(plan.command), {**base_env, **plan.env}, plan.priority)
    deadline = time.monotonic() + 120
    waiting = {p.name: p.metrics_port for p in plans}
    while waiting and time.monotonic() < deadline:
        for name, port in list(waiting.items()):
            if scrape(port):
                del waiting[name]
            elif not sup.alive(name) and sup.restarts(name) > 3:
                raise RuntimeError(f"stage {name} keeps crashing: see {sup.log_dir / name}.log")
        time.sleep(0.5)
    if waiting:
        raise RuntimeError(f"stages not up after 120 s: {', '.join(waiting)} (see their logs in {sup.log_dir})")


class Pipeline:
    """The embedded stack, a verifying webhook receiver (unless ``webhook_port`` is None) and every
    stage, as a context manager."""

    def __init__(self, cfg: Config, workers: int = 2, keep_stack: bool = False, say=print,
                 webhook_port: int | None = WEBHOOK_PORT):
        self.cfg, self.workers, self.keep_stack, self.say = cfg, workers, keep_stack, say
        self.secret = os.environ.get(cfg.alert.webhook_secret_env) or secrets.token_hex(16)
        self.plans = stage_plans(cfg, workers)
        self.sup = Supervisor(cfg.run_dir, auto_restart=True)
        self.receiver = WebhookReceiver(self.secret, webhook_port) if webhook_port is not None else None

    @property
    def metrics_ports(self) -> list[int]:
        return [p.metrics_port for p in self.plans]

    def __enter__(self) -> "Pipeline":
        up(self.cfg, say=self.say)
        if self.receiver:
            self.receiver.start()
        try:
            start_pipeline(self.cfg, self.sup, self.plans,
                           {**to_env(self.cfg), self.cfg.alert.webhook_secret_env: self.secret},
                           self.say)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        codes = self.sup.stop_all(timeout=20)
        if self.receiver:
            self.receiver.stop()
        self.say("stages stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))
        if not self.keep_stack:
            down(self.cfg, say=self.say)


def pipeline_running(cfg: Config) -> bool:
    """True when a pipeline's bridge and sink already serve metrics on this config's ports."""
    return bool(scrape(cfg.bridge.metrics_port)) and bool(scrape(cfg.clickhouse.metrics_port))


def percentiles(reader, sql_expr: str, table: str, where: str = "1") -> tuple[float, float]:
    """p50 and p99 of an expression over a table (seconds), NaN when empty."""
    t = reader.query(f"SELECT quantile(0.5)({sql_expr}) AS p50, quantile(0.99)({sql_expr}) AS p99 "
                     f"FROM {table} WHERE {where}")
    return float(t.column("p50")[0].as_py() or float("nan")), float(t.column("p99")[0].as_py() or float("nan"))


def summarize(cfg: Config, tenant: str, published: dict, labels_path: Path, receiver: WebhookReceiver,
              say=print) -> dict:
    """Read the run back from the store and print the summary; returns the figures."""
    reader = open_reader(cfg)
    db = cfg.clickhouse.database
    t = f"tenant = '{tenant}'"

    def scalar(sql: str) -> float:
        value = reader.query(sql).column(0)[0].as_py()
        return float(value) if value is not None else 0.0

    stored = scalar(f"SELECT count() FROM (SELECT * FROM {db}.readings FINAL WHERE {t})")
    rejects = reader.query(f"SELECT stage, reason, count() AS n FROM {db}.rejects FINAL WHERE {t} OR tenant = '' "
                           "GROUP BY stage, reason ORDER BY n DESC").to_pylist()
    windows = scalar(f"SELECT count() FROM (SELECT * FROM {db}.windows FINAL WHERE {t})")
    predictions = scalar(f"SELECT count() FROM (SELECT * FROM {db}.predictions FINAL WHERE {t})")
    degraded = scalar(f"SELECT countIf(degraded) FROM (SELECT * FROM {db}.predictions FINAL WHERE {t})")
    alerts = reader.query(f"SELECT * FROM {db}.alerts FINAL WHERE {t} ORDER BY event_at").to_pylist()
    stored_p50, stored_p99 = percentiles(reader, "dateDiff('millisecond', ts, inserted_at) / 1000", f"{db}.readings", t)
    alert_p50, alert_p99 = percentiles(
        reader, "dateDiff('millisecond', source_received_at, event_at) / 1000", f"{db}.alerts",
        f"{t} AND transition IN ('raised', 'reraised') AND toUnixTimestamp64Milli(source_received_at) > 0")
    scored_windows = reader.query(
        f"SELECT tenant, device_id, metric, window_s, toUnixTimestamp64Milli(window_end_at) AS window_end_ms, "
        f"anomaly, anomaly_model FROM {db}.predictions FINAL WHERE {t} ORDER BY window_end_at")
    scores = detection_scores(pq.read_table(labels_path) if labels_path.exists() else None, alerts, scored_windows,
                              cfg.alert.label_grace_s, cfg.alert.anomaly_threshold)
    raised = [a for a in alerts if a["transition"] in ("raised", "reraised")]

    say("\n=== AI Mass demo summary ===")
    say(f"readings published      {published.get('readings', 0):,d} in {published.get('messages', 0):,d} MQTT messages")
    say(f"readings stored         {stored:,.0f} (ClickHouse, exactly once)")
    say("rejected / late         " + (", ".join(f"{r['stage']}:{r['reason']}={r['n']}" for r in rejects) or "none"))
    say(f"windows                 {windows:,.0f}")
    say(f"predictions             {predictions:,.0f} ({(degraded / predictions if predictions else 0):.1%} degraded)")
    say(f"alarm events            {len(alerts)} ({len(raised)} raised)")
    say(f"webhook                 {len(receiver.events)} events in {len(receiver.notifications)} notifications, "
        f"{receiver.bad_signatures} bad signatures")
    say(f"latency (s)             publish->stored p50 {number(stored_p50, '.2f')} p99 {number(stored_p99, '.2f')}")
    say(f"                        publish->alert p50 {number(alert_p50, '.2f')} p99 {number(alert_p99, '.2f')}")
    say("")
    for line in detection_table(scores):
        say(line)
    summary = {"tenant": tenant, "published": published, "stored": stored, "rejects": rejects, "windows": windows,
               "predictions": predictions, "degraded": degraded, "alert_events": len(alerts),
               "alarms_raised": len(raised), "webhook_events": len(receiver.events),
               "webhook_notifications": len(receiver.notifications), "webhook_bad_signatures": receiver.bad_signatures,
               "detection": scores, "latency_stored_p50_s": stored_p50, "latency_stored_p99_s": stored_p99,
               "latency_alert_p50_s": alert_p50, "latency_alert_p99_s": alert_p99}
    path = cfg.run_dir / "demo-summary.json"
    path.write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    say(f"\nsummary written to {path}")
    say("explore: `aimass query --list`, e.g. `aimass query top-anomalous`")
    return summary


def json_safe(value):
    """``value`` as strict JSON takes it: NaN as null, timestamps as ISO 8601."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value.isoformat() if hasattr(value, "isoformat") else value


ANY_RULE = "(any rule)"


def detection_scores(labels: pa.Table | None, alerts: list[dict], predictions: pa.Table | None = None,
                     grace_s: float = 60.0, threshold: float = 0.8) -> list[dict]:
    """Precision, recall and mean delay per rule, for the alarms of every rule together
    (``ANY_RULE``) and per model: stored alarm events, and the rising edges of the anomaly score
    over ``threshold`` in ``predictions`` (sorted by window end), against labelled intervals."""
    quality = QualityTracker(grace_s, threshold)
    if labels is not None:
        quality.add_labels(labels)
    events = [{**a, "ts_ms": _ms(a["ts"])} for a in alerts]
    quality.add_alert_events(events + [{**e, "rule": ANY_RULE} for e in events])
    if predictions is not None:
        quality.add_predictions(predictions)
    quality.advance(2 ** 62)  # the run is over: settle every label and detection
    quality.decide()
    return quality.rows(int(time.time() * 1000))


def _ms(value) -> int:
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value)


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--minutes", type=float, default=3.0, help="how long the simulator publishes (default 3)")
    p.add_argument("--devices", type=int, default=50, help="simulated devices (default 50)")
    p.add_argument("--metrics", type=int, default=3, help="metrics per device (default 3)")
    p.add_argument("--rate", type=float, default=2.0, help="readings per series per second (default 2)")
    p.add_argument("--anomalies", type=int, default=12, help="anomalies to inject (default 12)")
    p.add_argument("--format", choices=("json", "multi", "senml"), default="senml",
                   help="device payload format (default senml packs)")
    p.add_argument("--workers", type=int, default=2, help="Faust worker processes (default 2)")
    p.add_argument("--seed", type=int, default=7, help="simulator seed (default 7)")
    p.add_argument("--keep-stack", action="store_true",
                   help="leave mosquitto / kafka / tritonserver running afterwards (`aimass down` stops them)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    tenant = f"demo{int(time.time()) % 100000}"
    labels_path = cfg.run_dir / f"labels-{tenant}.parquet"
    say = print
    say(f"AI Mass demo: {args.devices} devices x {args.metrics} metrics at {args.rate}/s for {args.minutes} min, "
        f"{args.anomalies} injected anomalies; run dir {cfg.run_dir}")
    stop = threading.Event()
    published: dict = {}
    try:
        with Pipeline(cfg, args.workers, args.keep_stack, say) as pipe:
            spec = SimSpec(devices=args.devices, metrics=args.metrics, rate_hz=args.rate,
                           duration_s=args.minutes * 60, seed=args.seed, tenant=tenant, anomalies=args.anomalies,
                           format=args.format, publish_labels=True)
            live: dict = {"readings": 0}
            sim = threading.Thread(target=lambda: published.update(
                publish(cfg, spec, labels_path=labels_path, progress=live.update, stop=stop.is_set)), daemon=True)
            sim.start()
            watch_until_drained(pipe, lambda: not sim.is_alive(),
                                lambda: int(published.get("readings", live["readings"])), args.minutes * 60,
                                args.minutes * 60 + 180, LiveScreen())
            summarize(cfg, tenant, published, labels_path, pipe.receiver, say)
        say(f"data kept in {cfg.run_dir} (`aimass query` reads it)")
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: the pipeline was stopped")
        return 130
    finally:
        stop.set()


def watch_until_drained(pipe: Pipeline, source_done, published, publish_s: float, max_s: float,
                        screen: LiveScreen) -> None:
    """Show progress until the source is done and the sink stored nothing new for 10 s."""
    t0 = drained_since = time.monotonic()
    last_stored = -1.0
    while True:
        time.sleep(screen.interval_s)
        now = time.monotonic()
        m = scrape(*pipe.metrics_ports)
        done = source_done()
        screen.update(now, {**m, "published": published()}, now - t0, None if done else publish_s - (now - t0))
        # Data tables only: the alerter writes quality rows every few seconds, forever.
        stored = sum(m.get(f'aimass_sink_rows_total{{table="{t}"}}', 0) for t in DRAIN_TABLES)
        if done:
            if stored != last_stored or stored == 0:
                last_stored, drained_since = stored, now
            elif now - drained_since > 10:
                return
        if now - t0 > max_s:
            print(f"pipeline did not drain within {max_s:.0f}s; summarizing anyway")
            return
