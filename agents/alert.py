"""`aimass alerter`: rules, ground truth, alarms, notification delivery and the alarm API in one process.

It consumes clean readings, window rows, prediction rows and labels; joins predictions with
the windows they predicted (outcome rows, a stream rules can watch too); runs the rule engine;
turns its signals into alarm events; enqueues notifications; and serves the alarm API.

Why confluent-kafka and not a Faust agent: offsets may be committed only after the alerter's
side effects and the records it produced are durable, and a partition's state must be saved and
loaded exactly at revoke / assign. With a plain consumer the loop says exactly that, per batch:

    consume -> process -> one SQLite transaction (alarms, outbox, queued events)
            -> produce outcomes + queued events, flush -> delete the queue rows
            -> (checkpoint due) per input partition: save its state (with its outbox) and offsets
               in the state store; commit offsets; release the notifications composed so far

Alarm state is per input partition, so several alerters in one consumer group share the
partitions (clean readings, windows and predictions of a device share a partition number; the
range assignor gives one alerter the same numbers of every input). A partition's checkpoint
(``aimass.streams.statestore``) holds its alarms, rule-engine and join state and the
notifications it still has to send, with the input offsets they cover; it is written every
``alert.checkpoint_ms`` (1 s) and on revoke, and the next owner (after a rebalance, a restart or
a replica's death) loads it and resumes at those offsets. A process starts owning nothing: what
its SQLite file held of partitions is dropped, since their checkpoints carry it. A crash replays
the input since the last checkpoint; replays are harmless because the state matches those
offsets, an active alarm is not raised twice and event ids are deterministic. A notification is
sent only once the checkpoint holding it is durable (``Outbox.hold``), so a new owner resends the
same notification id, which receivers deduplicate, never a regrouping of the same events.
The quality tracker (labels vs detections) stays per process: with several alerters each scores
the partitions it owns. The alarm API answers for all of them when ``alert.api_peers`` names the
replicas (``aimass.rules.peers``).
Alerts on the pipeline itself (Alertmanager -> ``POST /pipeline-alerts``, ``aimass.rules.pipeline``)
are alarms of one input partition, that of their series: the alerter holding it applies them and
answers once the checkpoint holding their changes is durable (so Alertmanager, which retries until
it gets a 2xx, never loses one to a crash); any other alerter answers 503 and closes the
connection, and Alertmanager's retry reaches another replica.
Records are written with ``aimass.streams.kafka.TableProducer``: under ``kafka.max_record_bytes``,
and a record the broker refuses for good is dead-lettered and counted instead of retried, so
no queued row can wedge the alerter, across restarts either.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from aimass.core.config import Config, ConfigError
from aimass.rules.alarms import AlarmStore, StateDB, now_ms, should_notify
from aimass.rules.api import ApiHooks, Unavailable, api_tls_context, api_tokens, make_app
from aimass.rules.delivery import Dispatcher, Outbox, Senders
from aimass.rules.engine import Engine, RuleWatcher, warm_up
from aimass.rules.model import RULE_ERROR
from aimass.rules.groundtruth import OutcomeJoiner, QualityTracker
from aimass.rules.pipeline import PIPELINE_DEVICE, PIPELINE_TENANT, PipelineAlert, apply_alerts, is_pipeline
from aimass.rules.peers import Peers
from aimass.core import contract
from aimass.streams.kafka import ConsumerLag, TableProducer, consume_available, consumer_config
from aimass.streams.statestore import open_store

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
DURABLE_WAIT_S = 10.0  # POST /pipeline-alerts waits this long for the checkpoint holding its alarms, else 503

# input topic -> stream the rules know it as
INPUTS = {contract.CLEAN: "readings", contract.WINDOW_ROWS: "windows", contract.PREDICTION_ROWS: "predictions",
          contract.LABEL_ROWS: "labels", contract.DEAD_LETTER: "rejects"}
# partitioned by device (dead letters too: TableProducer keys them like the rest)
KEYED_INPUTS = (contract.CLEAN, contract.WINDOW_ROWS, contract.PREDICTION_ROWS, contract.DEAD_LETTER)


class Alerter:
    """The alerter's state and its per-batch logic, independent of the Kafka loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        a = cfg.alert
        state_dir = Path(a.state_dir) if a.state_dir else cfg.run_dir / "alerts"
        self.db = StateDB(state_dir / "alerts.sqlite")
        self.store = AlarmStore(self.db)
        self.outbox = Outbox(self.db, hold=True)
        self.engine = Engine()
        warm_up()  # the first alarm must not wait for the rule kernel to compile
        self.watcher = RuleWatcher(a.rules_path, self.engine)
        self.joiner = OutcomeJoiner(a.outcome_horizon_s)
        self.quality = QualityTracker(a.label_grace_s, a.anomaly_threshold)
        self._start_owning_nothing()
        self.senders = Senders()
        self.dispatcher = Dispatcher(cfg, self.db, self.outbox, self.senders, lambda: self.engine.ruleset.receivers)
        prefix = cfg.kafka.topic_prefix
        self.topics = {t.name(prefix): t for t in contract.ALL_TOPICS}
        self.inputs = {t.name(prefix): stream for t, stream in INPUTS.items()}

    def _start_owning_nothing(self) -> None:
        """Drop what the file holds of partitions (their checkpoints bring it back); keep the quality tracker."""
        with self.db:
            self.store.forget(lambda alarm: True)
            self.outbox.forget()
        if (text := self.db.get("quality")) is not None:
            self.quality.restore(text)
        ACTIVE.set(0)

    def part_of(self, tenant: str | None, device_id: str | None) -> int:
        """The input partition of a device (the same number in every keyed input topic)."""
        return contract.partition_for(tenant or "", device_id or "", self.cfg.kafka.partitions)

    def partition_states(self, parts: Iterable[int]) -> dict[int, bytes]:
        """Each partition's checkpoint: its alarms, engine and join state, and its outbox (events and notifications
        still to send)."""
        parts = sorted(parts)
        joiner = self.joiner.shares(self.part_of, parts)
        states = {}
        for part in parts:
            mine = lambda tenant, device_id: self.part_of(tenant, device_id) == part  # noqa: E731
            states[part] = json.dumps({"engine": self.engine.snapshot(lambda key: mine(key[0], key[1])),
                                       "alarms": self.store.export(lambda a: mine(a.tenant, a.device_id)),
                                       "joiner": base64.b64encode(joiner[part]).decode(),
                                       "outbox": self.outbox.export(part)}).encode()
        return states

    def adopt(self, part: int, state: bytes) -> None:
        """Take a partition over from its checkpoint."""
        doc = json.loads(state)
        self.engine.merge(doc["engine"])
        self.joiner.merge(base64.b64decode(doc["joiner"]))
        with self.db:
            self.store.adopt(doc["alarms"])
            self.store.save()
            self.outbox.adopt(part, doc["outbox"])
        ACTIVE.set(self.store.active_count())

    def forget(self, part: int) -> None:
        """Drop a partition's state (checkpointed; another alerter takes it over)."""
        mine = lambda tenant, device_id: self.part_of(tenant, device_id) == part  # noqa: E731
        self.engine.forget(lambda key: mine(key[0], key[1]))
        self.joiner.forget(mine)
        with self.db:
            self.store.forget(lambda a: mine(a.tenant, a.device_id))
            self.outbox.forget(part)
        ACTIVE.set(self.store.active_count())

    def topic(self, t: contract.Topic) -> str:
        return t.name(self.cfg.kafka.topic_prefix)

    def process(self, records: list[tuple[str, bytes]], checkpoint: bool = True) -> list[tuple[contract.Topic, pa.Table]]:
        """Run one batch of (topic, value) records; returns high-volume tables to produce now.

        Alarm changes, notifications, alarm events and (if ``checkpoint``) the quality tracker are
        written in one transaction.
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
            rejected = batches["rejects"]
            event_time = pc.coalesce(rejected["ts_ms"], rejected["rejected_ms"])  # undecodable records have none
            rejected = rejected.set_column(rejected.schema.get_field_index("ts_ms"), "ts_ms", event_time)
            signals += self.engine.process("rejects", rejected)
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
                receivers = self.receivers_of(e)
                if self.cfg.alert.notify and receivers and should_notify(e) and not self.store.silenced(e["alarm_id"], at):
                    self.outbox.enqueue(e, receivers, part=self.part_of(e["tenant"], e["device_id"]))
            self.db.queue(self.topic(contract.ALERT_EVENTS), events)
            if checkpoint:
                self.db.put("quality", self.quality.snapshot())
        for e in events:
            EVENTS.labels(e["transition"]).inc()
            if e["source_received_ms"]:
                LATENCY.observe(max(0.0, (e["event_ms"] - e["source_received_ms"]) / 1000))
        ACTIVE.set(self.store.active_count())

    def receivers_of(self, event: dict) -> tuple[str, ...]:
        """Who an alarm event goes to: its rule's receivers; for an alert on the pipeline, the ``pipeline:`` route."""
        if is_pipeline(event):
            route = self.engine.ruleset.pipeline
            return route.receivers_for(event["severity"]) if route else ()
        return self.engine.receivers_of(event["rule"], (event["tenant"], event["device_id"], event["metric"], 0))

    def take_pipeline_alerts(self, alerts: list[PipelineAlert], owned: set[int]) -> list[dict]:
        """Apply an Alertmanager post and persist its alarm events; Unavailable when another alerter holds the
        pipeline alarms' partition, or no rule file routes them."""
        part = self.part_of(PIPELINE_TENANT, PIPELINE_DEVICE)
        if part not in owned:
            raise Unavailable(f"the pipeline alarms are in input partition {part}, which this alerter does not "
                              "hold: retry (another alerter holds it, or one will after the rebalance)")
        if self.engine.ruleset.pipeline is None:
            raise Unavailable("no rule file routes alerts on the pipeline: add a `pipeline: {receivers: [...]}` "
                              "section to one")
        events = apply_alerts(self.store, alerts)
        self.persist(events)
        return events

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
        self.state = open_store(cfg)
        self.lag = ConsumerLag("alert", self.group_id)
        prefix = cfg.kafka.topic_prefix
        self.keyed = {t.name(prefix) for t in KEYED_INPUTS}
        self.owned: set[int] = set()  # input partitions whose state this process holds
        self.positions: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset, processed or resumed
        self.uncommitted: dict[tuple[str, int], int] = {}  # offsets processed since the last commit
        self.changed = False  # state changed outside the input (API, deliveries): checkpoint even without records
        self.failed = False  # the loop died: a revoke must not checkpoint state that may not match the outputs
        self.next_checkpoint: asyncio.Future | None = None  # done when a checkpoint holds the changes made so far
        self.loop: asyncio.AbstractEventLoop | None = None

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
                    self.changed = True
                if self.alerter.outbox.held(range(self.cfg.kafka.partitions)):
                    self.changed = True  # composed: the next checkpoint must hold it before it is sent
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
            self.changed = True

        async def pipeline(alerts: list[PipelineAlert]) -> dict:
            events = self.alerter.take_pipeline_alerts(alerts, self.owned)
            await self.durable()  # also when nothing changed: a retried post may repeat one not yet durable
            return {"alerts": len(alerts), "events": [{k: e[k] for k in ("alarm_id", "rule", "transition")}
                                                      for e in events]}

        a = self.cfg.alert
        try:
            tokens = api_tokens(a)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not tokens:
            log.warning("neither %s nor %s is set: the alarm API will refuse every request",
                        a.api_tokens_env, a.api_token_env)
        context = api_tls_context(a)
        hooks = ApiHooks(on_events, self.status, self.alerter.reload_rules, pipeline)
        peers = Peers.from_config(a)
        runner = web.AppRunner(make_app(self.alerter.store, tokens, hooks, a, peers), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, a.api_host, a.api_port, ssl_context=context).start()
        log.info("alarm API on %s://%s:%d (%d tokens: %s)", "https" if context else "http", a.api_host, a.api_port,
                 len(tokens), ", ".join(f"{t.name}={t.role}" for t in tokens))
        return runner

    # --- partitions: checkpoint, hand over, take over -------------------------------------

    async def durable(self) -> None:
        """Wait until a checkpoint holds every change made so far (the loop takes one soon: ``changed``);
        Unavailable when none does within DURABLE_WAIT_S."""
        self.changed = True
        if self.next_checkpoint is None:
            self.next_checkpoint = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.next_checkpoint), DURABLE_WAIT_S)
        except asyncio.TimeoutError:
            raise Unavailable(f"the alarms changed but no checkpoint held them within {DURABLE_WAIT_S:.0f} s: "
                              "retry (the same alerts posted again change nothing twice)") from None

    async def checkpoint(self, parts: set[int]) -> None:
        """Save each partition's state with its offsets, then commit the offsets and release its notifications.
        Call only once every record processed is flushed to Kafka."""
        self.alerter.persist([], checkpoint=True)
        # Notifications the states below hold (no await in between), and those of partitions owned by no
        # checkpoint here (a rule_error alarm's series may map to one): better sent than never.
        unowned = set(range(self.cfg.kafka.partitions)) - self.owned
        held = self.alerter.outbox.held(set(parts) | unowned)
        saves = [(p, data, {t: o for (t, q), o in self.positions.items() if q == p and t in self.keyed})
                 for p, data in self.alerter.partition_states(parts).items()]
        covered = None
        if set(parts) >= self.owned:  # holds every change so far; later ones wait for the next checkpoint
            covered, self.next_checkpoint = self.next_checkpoint, None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: [self.state.save(self.group_id, p, data, offsets)
                                                  for p, data, offsets in saves])
        if covered is not None:  # (a failed save leaves it pending: its waiters time out and answer 503)
            covered.set_result(None)
        self.alerter.outbox.release(held)
        if self.uncommitted:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self.uncommitted.items()]
            await loop.run_in_executor(None, lambda: self.consumer.commit(offsets=offsets, asynchronous=False))
            self.lag.committed(offsets)
            self.uncommitted.clear()
        self.changed = self.next_checkpoint is not None  # a post waits for changes made during this one

    async def _assign(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Load the checkpoints of newly assigned partitions; the partitions with the offsets to resume at."""
        parts = sorted({tp.partition for tp in partitions if tp.topic in self.keyed} - self.owned)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        loaded = await loop.run_in_executor(None, lambda: {p: self.state.load(self.group_id, p) for p in parts})
        for p, checkpoint in loaded.items():
            if checkpoint is not None:
                self.alerter.adopt(p, checkpoint.data)
        self.owned |= set(parts)
        for tp in partitions:
            checkpoint = loaded.get(tp.partition) if tp.topic in self.keyed else None
            if checkpoint is not None and tp.topic in checkpoint.offsets:
                tp.offset = self.positions[(tp.topic, tp.partition)] = checkpoint.offsets[tp.topic]
        log.info("assigned partitions %s; resuming from checkpoints at %s (loaded in %.2f s)", parts,
                 {p: c.offsets for p, c in loaded.items() if c is not None}, time.monotonic() - started)
        return partitions

    async def _revoke(self, partitions: list[TopicPartition]) -> None:
        """Checkpoint and commit everything processed, then drop the revoked partitions' state."""
        parts = {tp.partition for tp in partitions if tp.topic in self.keyed} & self.owned
        if not self.failed:
            await self.flush([])
            await self.checkpoint(parts)
        for p in parts:
            self.alerter.forget(p)
        self.owned -= parts
        for tp in partitions:
            self.positions.pop((tp.topic, tp.partition), None)
            self.uncommitted.pop((tp.topic, tp.partition), None)
        self.lag.revoked(partitions)
        log.info("revoked partitions %s", sorted(parts))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(self._on_loop(self._assign(partitions)))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._on_loop(self._revoke(partitions))

    def _on_loop(self, step):
        """Run a rebalance step on the event loop, which owns the alerter's state, and wait for it: the
        callbacks run in the consumer's thread (a poll or close run in an executor), while the loop waits."""
        return asyncio.run_coroutine_threadsafe(step, self.loop).result()

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        a = self.cfg.alert
        self.alerter.watcher.poll()
        if not self.alerter.engine.ruleset.rules and self.alerter.watcher.errors:
            log.error("starting with no rules: fix the files above (they are re-read every %.1fs)", a.reload_s)
        # range: partition p of every keyed input goes to the same alerter (its state covers all of them)
        consumer = self.consumer = Consumer(consumer_config(self.cfg, self.group_id,
                                                            **{"partition.assignment.strategy": "range"}))
        consumer.subscribe(list(self.alerter.inputs), on_assign=self._on_assign, on_revoke=self._on_revoke)
        runner = None
        # The API opens once the group has assigned this alerter its partitions (their alarms are loaded
        # then), or after two session timeouts when it gets none (more alerters than partitions).
        api_at = time.monotonic() + 2 * self.cfg.kafka.session_timeout_ms / 1000
        delivery = asyncio.create_task(self.deliver_forever())
        next_reload = next_quality = next_batch = next_checkpoint = time.monotonic()
        await self.flush([])  # whatever a previous run queued but did not send
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_reload:
                    self.alerter.watcher.poll()
                    RULES.set(len(self.alerter.engine.ruleset.rules))
                    RULE_FILE_ERRORS.set(len(self.alerter.watcher.errors))
                    next_reload = time.monotonic() + a.reload_s
                if runner is None and a.api_port and (self.owned or time.monotonic() >= api_at):
                    runner = await self.serve_api()
                await asyncio.sleep(next_batch - time.monotonic())  # returns at once when it is due
                next_batch = time.monotonic() + a.batch_interval_ms / 1000
                msgs = await loop.run_in_executor(None, consume_available, consumer, 2000, 0.2)
                records = []
                for m in msgs:
                    if m.error():
                        log.warning("consume error: %s", m.error())
                        continue
                    records.append((m.topic(), m.value()))
                    self.uncommitted[(m.topic(), m.partition())] = m.offset() + 1
                    self.positions[(m.topic(), m.partition())] = m.offset() + 1
                checkpoint = bool(self.uncommitted or self.changed) and time.monotonic() >= next_checkpoint
                busy = records or checkpoint or self.alerter.engine.notices  # notices: rule_error clears
                tables = self.alerter.process(records, checkpoint) if busy else []
                await self.flush(tables)
                if checkpoint:  # covers every offset processed so far, all flushed just above
                    await self.checkpoint(self.owned)
                    await loop.run_in_executor(None, self.lag.update, consumer)
                    next_checkpoint = time.monotonic() + a.checkpoint_ms / 1000
                if not self.uncommitted and time.monotonic() >= next_quality:
                    # only where the state matches the committed offsets, since this saves the tracker
                    self.alerter.queue_quality()
                    self.alerter.outbox.purge(now_ms() - KEEP_FINISHED_MS)
                    next_quality = time.monotonic() + a.quality_every_s
            await self.checkpoint(self.owned)  # stopping: checkpoint what was processed, then commit it
        except BaseException:
            self.failed = True
            raise
        finally:
            self.stopping.set()
            await delivery
            await self.alerter.dispatcher.drain()
            try:
                await self.flush([])
            except KafkaException as exc:
                log.error("stopping with records still queued in %s (sent at the next start): %s",
                          self.alerter.db.path, exc)
            await loop.run_in_executor(None, consumer.close)  # revokes: the last checkpoint (unless failed)
            self.state.close()
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
