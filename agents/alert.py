"""`aimass alerter`: rules, ground truth, alarms, notification delivery and the alarm API in one process.

It consumes clean readings, window rows, prediction rows and labels; joins predictions with
the windows they predicted (outcome rows, a stream rules can watch too); runs the rule engine;
turns its signals into alarm events; enqueues notifications; and serves the alarm API.

Why confluent-kafka and not a Faust agent: the alerter's side effects (alarm state, the
notification outbox, the checkpoints of the engine and the join) live in one SQLite file, and
offsets may be committed only after those side effects and the records it produced are
durable. With a plain consumer the loop says exactly that, in order, per batch:

    consume -> process -> one SQLite transaction (alarms, outbox, queued events; checkpoints when due)
            -> produce outcomes + queued events, flush -> delete the queue rows
            -> (checkpoint due) commit offsets

Checkpoints of the engine, the join and the quality tracker are written, and offsets committed,
every ``alert.checkpoint_ms`` (1 s): writing them every batch was half the alerter's CPU at high
rates. A crash anywhere replays the input since the last checkpoint; replays are harmless
because the engine restarts from the checkpoint that matches the committed offsets, an active
alarm is not raised twice, event ids and notification ids are deterministic, and receivers dedup
on the idempotency key.
Alarm state is one process's (a single alerter per deployment, all partitions).
Records are written with ``aimass.streams.kafka.TableProducer``: under ``kafka.max_record_bytes``,
and a record the broker refuses for good is dead-lettered and counted instead of retried, so
no queued row can wedge the alerter, across restarts either.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from aimass.core.config import Config
from aimass.rules.alarms import AlarmStore, StateDB, now_ms, should_notify
from aimass.rules.api import make_app
from aimass.rules.delivery import Dispatcher, Outbox, Senders
from aimass.rules.engine import Engine, RuleWatcher, warm_up
from aimass.rules.groundtruth import OutcomeJoiner, QualityTracker
from aimass.core import contract
from aimass.streams.kafka import TableProducer, consume_available, consumer_config

log = logging.getLogger("aimass.alerter")

EVENTS = Counter("aimass_alert_events_total", "Alarm state-change events", ["transition"])
ACTIVE = Gauge("aimass_alarms_active", "Alarms currently active")
RULES = Gauge("aimass_rules_loaded", "Rules the engine runs")
RULE_FILE_ERRORS = Gauge("aimass_rule_file_errors", "Errors in the rule files on disk (0 when they load)")
NOTIFICATIONS = Counter("aimass_notifications_total", "Notification attempts by outcome", ["receiver", "status"])
LATENCY = Histogram("aimass_alert_latency_seconds", "Alarm event time minus bridge receive time of its data",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))

KEEP_FINISHED_MS = 7 * 86400 * 1000  # delivered / dead-lettered notifications kept this long in the outbox

# input topic -> stream the rules know it as
INPUTS = {contract.CLEAN: "readings", contract.WINDOW_ROWS: "windows", contract.PREDICTION_ROWS: "predictions",
          contract.LABEL_ROWS: "labels"}


class Alerter:
    """The alerter's state and its per-batch logic, independent of the Kafka loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        a = cfg.alert
        state_dir = Path(a.state_dir) if a.state_dir else cfg.run_dir / "alerts"
        self.db = StateDB(state_dir / "alerts.sqlite")
        self.store = AlarmStore(self.db)
        self.outbox = Outbox(self.db)
        self.engine = Engine()
        warm_up()  # the first alarm must not wait for the rule kernel to compile
        self.watcher = RuleWatcher(a.rules_path, self.engine)
        self.joiner = OutcomeJoiner(a.outcome_horizon_s)
        self.quality = QualityTracker(a.label_grace_s, a.anomaly_threshold)
        self._restore()
        ACTIVE.set(self.store.active_count())
        self.senders = Senders()
        self.dispatcher = Dispatcher(cfg, self.db, self.outbox, self.senders, lambda: self.engine.ruleset.receivers)
        prefix = cfg.kafka.topic_prefix
        self.topics = {t.name(prefix): t for t in contract.ALL_TOPICS}
        self.inputs = {t.name(prefix): stream for t, stream in INPUTS.items()}

    def _restore(self) -> None:
        if (snap := self.db.get("engine")) is not None:
            self.engine.restore(json.loads(snap))
        if (blob := self.db.get("joiner")) is not None:
            self.joiner.restore(blob, self.db.actuals())
        if (text := self.db.get("quality")) is not None:
            self.quality.restore(text)

    def topic(self, t: contract.Topic) -> str:
        return t.name(self.cfg.kafka.topic_prefix)

    def process(self, records: list[tuple[str, bytes]], checkpoint: bool = True) -> list[tuple[contract.Topic, pa.Table]]:
        """Run one batch of (topic, value) records; returns high-volume tables to produce now.

        Alarm changes, notifications, alarm events and (if ``checkpoint``) checkpoints are written
        in one transaction.
        """
        tables: dict[str, list[pa.Table]] = defaultdict(list)
        out: list[tuple[contract.Topic, pa.Table]] = []
        rejects = []
        for topic, value in records:
            stream = self.inputs[topic]
            if stream == "readings" and not self.engine.ruleset.for_stream("readings"):
                continue  # no rule watches raw readings: skip decoding them
            try:
                table = contract.decode(value, self.topics[topic].schema)
            except ValueError as exc:
                payload, note = contract.payload_excerpt(value)
                rejects.append({"stage": "alert", "reason": "bad_record", "payload": payload, "rejected_ms": now_ms(),
                                "detail": f"{topic}: {exc}" + (f"; {note}" if note else "")})
                continue
            tables[stream].append(table)
        if rejects:
            log.warning("%d undecodable records sent to the dead-letter topic", len(rejects))
            out.append((contract.DEAD_LETTER, pa.Table.from_pylist(rejects, schema=contract.REJECTS)))
        batches = {s: pa.concat_tables(ts) for s, ts in tables.items()}
        signals = []
        if "labels" in batches:
            self.quality.add_labels(batches["labels"])
        outcomes = []
        if "windows" in batches:
            windows = batches["windows"]
            outcomes.append(self.joiner.add_windows(windows))
            signals += self.engine.process("windows", windows)
            self.quality.advance(self.joiner.watermark_ms)
        if "predictions" in batches:
            predictions = batches["predictions"]
            outcomes.append(self.joiner.add_predictions(predictions))
            signals += self.engine.process("predictions", predictions)
            self.quality.add_predictions(predictions)
        if outcomes:
            outcome_table = pa.concat_tables(outcomes)
            signals += self.engine.process("outcomes", outcome_table)
            if outcome_table.num_rows:
                out.append((contract.OUTCOME_ROWS, outcome_table))
        if "readings" in batches:
            signals += self.engine.process("readings", batches["readings"])
        events = self.store.apply(signals)
        self.quality.add_alert_events(events)
        self.persist(events, checkpoint)
        return out

    def persist(self, events: list[dict], checkpoint: bool = False) -> None:
        """Save alarms, enqueue notifications and queue the events for Kafka, atomically."""
        rules = {r.name: r for r in self.engine.ruleset.rules}
        with self.db:
            self.store.save()
            for e in events:
                rule = rules.get(e["rule"])
                if rule is not None and rule.receivers and should_notify(e):
                    self.outbox.enqueue(e, rule.receivers)
            self.db.queue(self.topic(contract.ALERT_EVENTS), events)
            if checkpoint:
                self.db.put("engine", json.dumps(self.engine.snapshot()))
                self.db.save_actuals(*self.joiner.take_actual_changes())
                self.db.put("joiner", self.joiner.snapshot())
                self.db.put("quality", self.quality.snapshot())
        for e in events:
            EVENTS.labels(e["transition"]).inc()
            if e["source_received_ms"]:
                LATENCY.observe(max(0.0, (e["event_ms"] - e["source_received_ms"]) / 1000))
        ACTIVE.set(self.store.active_count())

    def queue_quality(self) -> None:
        rows = self.quality.rows(now_ms())
        with self.db:
            self.db.queue(self.topic(contract.QUALITY_ROWS), rows)
            self.db.put("quality", self.quality.snapshot())

    def close(self) -> None:
        self.db.close()


class AlerterService:
    """The async shell: Kafka loop, delivery loop, API and rule reloads, stopped by SIGTERM/SIGINT."""

    def __init__(self, cfg: Config, group_id: str = ""):
        self.cfg = cfg
        self.alerter = Alerter(cfg)
        self.io = TableProducer(cfg, "alert")
        self.group_id = group_id or f"{cfg.kafka.topic_prefix}-alerter"
        self.stopping = asyncio.Event()

    def publish(self, tables: list[tuple[contract.Topic, pa.Table]]) -> int:
        """Produce tables plus the durable queue and flush (blocking: run in a thread); returns last seq sent."""
        queued = self.alerter.db.queued()
        by_topic: dict[str, list[dict]] = defaultdict(list)
        for _, topic, row in queued:
            by_topic[topic].append(row)
        for topic, table in tables:
            self.io.produce(topic, table)
        for name, rows in by_topic.items():
            topic = self.alerter.topics[name]
            self.io.produce(topic, pa.Table.from_pylist(rows, schema=topic.schema))
        self.io.flush()
        return queued[-1][0] if queued else 0

    async def flush(self, tables: list[tuple[contract.Topic, pa.Table]]) -> None:
        """Publish until Kafka has everything (retrying while it is unreachable), then drop the queue rows."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                last = await loop.run_in_executor(None, self.publish, tables)
                break
            except KafkaException as exc:
                if self.stopping.is_set():
                    raise
                log.error("Kafka did not take the alerter's output (%s); retrying, offsets stay uncommitted", exc)
                await asyncio.sleep(1.0)
        if last:
            self.alerter.db.unqueue(last)

    async def deliver_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                for receiver, status in await self.alerter.dispatcher.tick():
                    NOTIFICATIONS.labels(receiver, status).inc()
            except Exception:  # noqa: BLE001 - a delivery bug must not stop alarms
                log.exception("notification delivery round failed")
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    async def serve_api(self):
        from aiohttp import web

        async def on_events(events: list[dict]) -> None:
            self.alerter.persist(events)

        token = Config.secret(self.cfg.alert.api_token_env)
        if not token:
            log.warning("%s is not set: the alarm API will refuse every request", self.cfg.alert.api_token_env)
        runner = web.AppRunner(make_app(self.alerter.store, token, on_events), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.cfg.alert.api_host, self.cfg.alert.api_port).start()
        log.info("alarm API on http://%s:%d", self.cfg.alert.api_host, self.cfg.alert.api_port)
        return runner

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        a = self.cfg.alert
        self.alerter.watcher.poll()
        if not self.alerter.engine.ruleset.rules and self.alerter.watcher.errors:
            log.error("starting with no rules: fix the files above (they are re-read every %.1fs)", a.reload_s)
        consumer = Consumer(consumer_config(self.cfg, self.group_id))
        consumer.subscribe(list(self.alerter.inputs))
        runner = await self.serve_api() if a.api_port else None
        delivery = asyncio.create_task(self.deliver_forever())
        next_reload = next_quality = next_batch = next_checkpoint = time.monotonic()
        uncommitted: dict[tuple[str, int], int] = {}  # offsets processed since the last checkpoint
        await self.flush([])  # whatever a previous run queued but did not send

        async def commit() -> None:
            if uncommitted:
                offsets = [TopicPartition(t, p, o) for (t, p), o in uncommitted.items()]
                await loop.run_in_executor(None, lambda: consumer.commit(offsets=offsets, asynchronous=False))
                uncommitted.clear()

        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_reload:
                    self.alerter.watcher.poll()
                    RULES.set(len(self.alerter.engine.ruleset.rules))
                    RULE_FILE_ERRORS.set(len(self.alerter.watcher.errors))
                    next_reload = time.monotonic() + a.reload_s
                await asyncio.sleep(next_batch - time.monotonic())  # returns at once when it is due
                next_batch = time.monotonic() + a.batch_interval_ms / 1000
                msgs = await loop.run_in_executor(None, consume_available, consumer, 2000, 0.2)
                records = []
                for m in msgs:
                    if m.error():
                        log.warning("consume error: %s", m.error())
                        continue
                    records.append((m.topic(), m.value()))
                    uncommitted[(m.topic(), m.partition())] = m.offset() + 1
                checkpoint = bool(uncommitted) and time.monotonic() >= next_checkpoint
                tables = self.alerter.process(records, checkpoint) if records or checkpoint else []
                await self.flush(tables)
                if checkpoint:  # the checkpoint just written covers every offset processed so far
                    await commit()
                    next_checkpoint = time.monotonic() + a.checkpoint_ms / 1000
                if not uncommitted and time.monotonic() >= next_quality:
                    # only where the state matches the committed offsets, since this saves the tracker
                    self.alerter.queue_quality()
                    self.alerter.outbox.purge(now_ms() - KEEP_FINISHED_MS)
                    next_quality = time.monotonic() + a.quality_every_s
            if uncommitted:  # stopping: checkpoint what was processed, then commit it
                self.alerter.persist([], checkpoint=True)
                await commit()
        finally:
            self.stopping.set()
            await delivery
            await self.alerter.dispatcher.drain()
            try:
                await self.flush([])
            except KafkaException as exc:
                log.error("stopping with records still queued in %s (sent at the next start): %s",
                          self.alerter.db.path, exc)
            consumer.close()
            if runner is not None:
                await runner.cleanup()
            await self.alerter.senders.close()
            self.alerter.close()
            log.info("alerter stopped")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rules", help="rule file or directory (default: alert.rules_path)")
    p.add_argument("--state-dir", help="where alarm state and the outbox live (default: alert.state_dir, "
                                       "else <run dir>/alerts)")
    p.add_argument("--api-port", type=int, help="alarm API port, 0 = no API (default: alert.api_port)")
    p.add_argument("--group-id", default="", help="Kafka consumer group (default: <topic prefix>-alerter)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.rules:
        cfg.alert.rules_path = args.rules
    if args.state_dir:
        cfg.alert.state_dir = args.state_dir
    if args.api_port is not None:
        cfg.alert.api_port = args.api_port
    if cfg.alert.metrics_port:
        start_http_server(cfg.alert.metrics_port, addr=cfg.run.metrics_host)
    return asyncio.run(_main(cfg, args.group_id))


async def _main(cfg: Config, group_id: str) -> int:
    service = AlerterService(cfg, group_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stopping.set)
    log.info("alerter consuming %s", ", ".join(service.alerter.inputs))
    await service.run()
    return 0
