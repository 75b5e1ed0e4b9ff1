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
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from aimass.core.config import Config, ConfigError
from aimass.rules.alarms import AlarmStore, StateDB, now_ms, should_notify
from aimass.rules.api import ApiHooks, api_tls_context, api_tokens, make_app
from aimass.rules.delivery import Dispatcher, Outbox, Senders
from aimass.rules.engine import Engine, RuleWatcher, warm_up
from aimass.rules.model import RULE_ERROR
from aimass.rules.groundtruth import OutcomeJoiner, QualityTracker
from aimass.core import contract
from aimass.streams.kafka import TableProducer, consume_available, consumer_config

log = logging.getLogger("aimass.alerter")

EVENTS = Counter("aimass_alert_events_total", "Alarm state-change events", ["transition"])
ACTIVE = Gauge("aimass_alarms_active", "Alarms currently active")
RULES = Gauge("aimass_rules_loaded", "Rules the engine runs")
RULE_FILE_ERRORS = Gauge("aimass_rule_file_errors", "Errors in the rule files on disk (0 when they load)")
RULE_ERRORS = Counter("aimass_rule_errors_total", "Rules suspended after failing on a batch", ["rule"])
NOTIFICATIONS = Counter("aimass_notifications_total", "Notification attempts by outcome", ["receiver", "status"])
LATENCY = Histogram("aimass_alert_latency_seconds", "Alarm event time minus bridge receive time of its data",
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))

KEEP_FINISHED_MS = 7 * 86400 * 1000  # delivered / dead-lettered notifications kept this long in the outbox

# input topic -> stream the rules know it as
INPUTS = {contract.CLEAN: "readings", contract.WINDOW_ROWS: "windows", contract.PREDICTION_ROWS: "predictions",
          contract.LABEL_ROWS: "labels", contract.DEAD_LETTER: "rejects"}


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
            if stream in ("readings", "rejects") and not self.engine.ruleset.for_stream(stream):
                continue  # no rule watches raw readings / rejects: skip decoding them
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
        signals = self.engine.take_notices()
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
            per_series = predictions.filter(pc.not_equal(predictions["metric"], contract.DEVICE_METRIC))
            outcomes.append(self.joiner.add_predictions(per_series))  # device rows predict no window
            signals += self.engine.process("predictions", predictions)
            self.quality.add_predictions(predictions)
        if outcomes:
            outcome_table = pa.concat_tables(outcomes)
            signals += self.engine.process("outcomes", outcome_table)
            if outcome_table.num_rows:
                out.append((contract.OUTCOME_ROWS, outcome_table))
        if "readings" in batches:
            signals += self.engine.process("readings", batches["readings"])
        if "rejects" in batches:
            signals += self.engine.process("rejects", batches["rejects"])
        for s in signals:
            if s.rule.name == RULE_ERROR and s.kind == "fire":
                RULE_ERRORS.labels(s.series[2]).inc()
        events = self.store.apply(signals)
        self.quality.add_alert_events(events)
        self.persist(events, checkpoint)
        return out

    def persist(self, events: list[dict], checkpoint: bool = False) -> None:
        """Save alarms, enqueue notifications and queue the events for Kafka, atomically."""
        at = now_ms()
        with self.db:
            self.store.save()
            for e in events:
                receivers = self.engine.receivers_of(e["rule"], (e["tenant"], e["device_id"], e["metric"], 0))
                if self.cfg.alert.notify and receivers and should_notify(e) and not self.store.silenced(e["alarm_id"], at):
                    self.outbox.enqueue(e, receivers)
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

    def reload_rules(self) -> dict:
        """Re-read the rule files now (POST /rules/reload)."""
        loaded = self.watcher.poll(force=True)
        RULES.set(len(self.engine.ruleset.rules))
        RULE_FILE_ERRORS.set(len(self.watcher.errors))
        return {"loaded": loaded, "rules": len(self.engine.ruleset.rules),
                "receivers": len(self.engine.ruleset.receivers), "errors": self.watcher.errors}

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
        self.consumer: Consumer | None = None
        self.kafka_error = ""  # why the last publish failed; "" once Kafka takes the output again

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
                self.kafka_error = ""
                break
            except KafkaException as exc:
                self.kafka_error = str(exc)[:500]
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

    def consumer_lag(self) -> dict[str, int | None]:
        """"topic[partition]" -> records not yet consumed (None where the broker has not said its end yet)."""
        if self.consumer is None:
            return {}
        lag: dict[str, int | None] = {}
        for tp in self.consumer.position(self.consumer.assignment()):
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
            lag[f"{tp.topic}[{tp.partition}]"] = max(0, high - tp.offset) if high >= 0 and tp.offset >= 0 else None
        return lag

    def status(self) -> dict:
        """GET /status: what this alerter knows about its own health."""
        a = self.alerter
        return {"rules": len(a.engine.ruleset.rules), "rule_file_errors": a.watcher.errors,
                "alarms_active": a.store.active_count(),
                "kafka": {"ok": not self.kafka_error, "last_error": self.kafka_error,
                          "records_waiting": a.db.queue_depth()},
                "consumer_lag": self.consumer_lag(),
                "delivery": {"pending": a.outbox.pending_count(), "retrying_by_receiver": a.outbox.retrying(),
                             "in_flight": len(a.dispatcher.in_flight)}}

    async def serve_api(self):
        from aiohttp import web

        async def on_events(events: list[dict]) -> None:
            self.alerter.persist(events)

        a = self.cfg.alert
        try:
            tokens = api_tokens(a)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not tokens:
            log.warning("neither %s nor %s is set: the alarm API will refuse every request",
                        a.api_tokens_env, a.api_token_env)
        context = api_tls_context(a)
        hooks = ApiHooks(on_events, self.status, self.alerter.reload_rules)
        runner = web.AppRunner(make_app(self.alerter.store, tokens, hooks, a), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.api_host, a.api_port, ssl_context=context).start()
        log.info("alarm API on %s://%s:%d (%d tokens: %s)", "https" if context else "http", a.api_host, a.api_port,
                 len(tokens), ", ".join(f"{t.name}={t.role}" for t in tokens))
        return runner

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        a = self.cfg.alert
        self.alerter.watcher.poll()
        if not self.alerter.engine.ruleset.rules and self.alerter.watcher.errors:
            log.error("starting with no rules: fix the files above (they are re-read every %.1fs)", a.reload_s)
        consumer = self.consumer = Consumer(consumer_config(self.cfg, self.group_id))
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
                busy = records or checkpoint or self.alerter.engine.notices  # notices: rule_error clears
                tables = self.alerter.process(records, checkpoint) if busy else []
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
