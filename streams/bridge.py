"""The MQTT -> Kafka bridge (`aimass bridge`).

Subscribes (persistent session, manual acks; with ``bridge.share_group`` an MQTT v5 shared
subscription ``$share/<group>/...`` so that several bridges split the load) to device telemetry
and labels, validates every message (``aimass.streams.payloads``), and
turns the accepted readings into columnar micro-batches: Kafka records per (partition,
flush), the partition chosen explicitly with ``contract.partition_for`` so every reading of a
device lands in one partition, in arrival order. A flush happens at ``bridge.flush_readings``
readings or ``bridge.flush_ms`` after its first message; its rows of one partition are split
into consecutive records of at most ``kafka.max_record_bytes``.

Nothing is lost: a QoS 1 message is acknowledged to the broker only after Kafka (acks=all,
idempotent producer) confirmed every record of its flush; a bridge killed before that gets
the message again from its persistent session (bounded duplicates, removed downstream by
reading identity). Rejected messages go to the dead-letter topic with the original payload
(at most its first ``contract.DEAD_LETTER_PAYLOAD_BYTES``, then its size and SHA-256 in the
detail), the MQTT topic and a machine-readable reason; a message the parser fails on is
rejected as ``internal_error``, never stops the bridge. A record the broker refuses for good
(``aimass.streams.kafka.refused_for_good``) is not retried: its readings go to the dead-letter
topic as rows with reason ``record_refused`` (any other record: one row with its prefix), so one
input can never wedge the bridge. One thread drives both clients.
"""
from __future__ import annotations

import argparse
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa
from confluent_kafka import KafkaError, KafkaException, Producer
from paho.mqtt.enums import MQTTErrorCode
from prometheus_client import Counter, Histogram, start_http_server

from aimass.core.config import Config
from aimass.core.procs import StackError
from aimass.core import contract
from aimass.streams.kafka import DROPPED, REFUSED, producer_config, refused_for_good, refused_row
from aimass.streams.mqtt import BufferedSocket, connect, make_client
from aimass.streams.payloads import Limits, Rejected, TopicPattern, parse_label, parse_telemetry

log = logging.getLogger(__name__)

MESSAGES = Counter("aimass_bridge_messages", "MQTT messages received by the bridge")
READINGS_PRODUCED = Counter("aimass_bridge_readings_produced", "readings confirmed by Kafka")
REJECTED = Counter("aimass_bridge_rejected", "messages sent to the dead-letter topic", ["reason"])
BATCH_READINGS = Histogram("aimass_bridge_batch_readings", "readings per Kafka record",
                           buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000, 50000))
PUBLISH_TO_KAFKA = Histogram("aimass_bridge_publish_to_kafka_seconds",
                             "bridge receive -> Kafka confirmation, oldest message of each flush",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

TOPIC_CACHE_MAX = 200_000


# A packet the broker accepts (at most bridge.max_packet_bytes) can grow by a few bytes on its way
# to the bridge (an MQTT 3.1.1 publish gains a properties length, a length field can grow): the
# bridge announces and accepts this much more, so the broker never drops for the bridge a message
# it took from a device (an oversized payload is dead-lettered instead).
FORWARD_SLACK_BYTES = 64


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _topic_text(topic: bytes) -> str:
    """An MQTT topic as text (invalid UTF-8, which a broker should refuse, shown escaped)."""
    return topic.decode(errors="backslashreplace")


def plain_filters(cfg: Config) -> list[str]:
    """The MQTT topic filters of device telemetry and labels."""
    patterns = [cfg.mqtt.topic_pattern] + ([cfg.mqtt.labels_pattern] if cfg.mqtt.labels_pattern else [])
    return [TopicPattern(p).subscription() for p in patterns]


def subscriptions(cfg: Config) -> list[str]:
    """What a bridge subscribes to: the plain filters, or their ``$share/<bridge.share_group>/`` form."""
    group = cfg.bridge.share_group
    return [f"$share/{group}/{f}" if group else f for f in plain_filters(cfg)]


class ReadingColumns:
    """Column lists of the READINGS schema for one partition of one flush."""

    __slots__ = ("tenant", "device_id", "metric", "ts_ms", "value", "unit", "received_ms")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, [])

    def add(self, tenant: str, device_id: str, readings: list, received_ms: int) -> None:
        n = len(readings)
        metrics, ts, values, units = zip(*readings)
        self.tenant += [tenant] * n
        self.device_id += [device_id] * n
        self.metric += metrics
        self.ts_ms += ts
        self.value += values
        self.unit += units
        self.received_ms += [received_ms] * n

    def table(self) -> pa.Table:
        return pa.Table.from_pydict({name: getattr(self, name) for name in self.__slots__}, schema=contract.READINGS)


@dataclass
class Batch:
    """Everything received since the last flush, grouped by Kafka partition, and the MQTT ids to ack."""

    readings: dict[int, ReadingColumns] = field(default_factory=dict)
    labels: list[dict] = field(default_factory=list)
    rejects: dict[int, list[dict]] = field(default_factory=dict)
    mids: list[int] = field(default_factory=list)
    n_messages: int = 0
    n_readings: int = 0
    first_ms: int = 0


@dataclass
class Record:
    """One Kafka record of a flush (its rows and their encoding), kept until Kafka confirms it."""

    topic: str
    partition: int
    rows: pa.Table
    value: bytes
    confirmed: bool = False


@dataclass
class Flush:
    """A batch handed to Kafka: acked to MQTT once all its records are confirmed."""

    mids: list[int]
    records: list[Record]
    n_readings: int
    first_ms: int
    rejected: dict[str, int]

    def confirmed(self) -> bool:
        return all(r.confirmed for r in self.records)


@dataclass
class Stats:
    messages: int = 0
    readings: int = 0
    rejected: int = 0
    flushes: int = 0


def reject_row(reason: str, detail: str, mqtt_topic: str, payload: bytes, tenant: str | None,
               device_id: str | None, received_ms: int) -> dict:
    """One dead-letter row (REJECTS schema) for a whole MQTT message (a bounded prefix of its payload)."""
    payload, note = contract.payload_excerpt(payload)
    if note:
        detail = f"{detail}; {note}"
    return {"stage": "bridge", "reason": reason, "detail": detail, "mqtt_topic": mqtt_topic, "payload": payload,
            "tenant": tenant, "device_id": device_id, "metric": None, "ts_ms": None, "value": None, "unit": None,
            "received_ms": received_ms, "rejected_ms": received_ms}


def refused_rows(record: Record, err: KafkaError, now: int) -> pa.Table:
    """Dead-letter rows (REJECTS) for a record the broker refused for good: one per reading of a
    readings record (nothing of it is lost), else one holding a prefix of the record."""
    rows = record.rows
    if rows.schema.equals(contract.READINGS):
        n = rows.num_rows
        return pa.table({
            "stage": pa.array(["bridge"] * n), "reason": pa.array(["record_refused"] * n),
            "detail": pa.array([f"{record.topic}[{record.partition}] refused: {err.str()}"] * n),
            "mqtt_topic": pa.nulls(n, pa.string()), "payload": pa.nulls(n, pa.binary()),
            **{name: rows[name] for name in ("tenant", "device_id", "metric", "ts_ms", "value", "unit", "received_ms")},
            "rejected_ms": pa.array([now] * n, pa.int64()),
        }, schema=contract.REJECTS)
    return pa.Table.from_pylist([refused_row("bridge", record.topic, record.partition, record.value, err, now)],
                                schema=contract.REJECTS)


class Bridge:
    """One bridge process: an MQTT session feeding a Kafka producer through micro-batches."""

    def __init__(self, cfg: Config, client_id: str | None = None):
        self.cfg = cfg
        self.client_id = client_id or cfg.bridge.client_id
        self.limits = Limits.from_config(cfg.bridge)
        self.telemetry = TopicPattern(cfg.mqtt.topic_pattern)
        self.labels = TopicPattern(cfg.mqtt.labels_pattern) if cfg.mqtt.labels_pattern else None
        prefix = cfg.kafka.topic_prefix
        self.raw_topic = contract.RAW.name(prefix)
        self.dead_topic = contract.DEAD_LETTER.name(prefix)
        self.label_topic = contract.LABEL_ROWS.name(prefix)
        self.partitions = cfg.kafka.partitions
        self.routes: dict[bytes, tuple[bool, str, str, int]] = {}  # topic -> (is_label, tenant, device, partition)
        self.batch = Batch()
        self.in_kafka: deque[Flush] = deque()
        self.generation = 0       # bumped when the producer is replaced
        self.delivery_error = ""  # set by a failed delivery: the producer is replaced
        self.refused_records: list[tuple[Flush, Record, KafkaError]] = []  # dead-lettered instead
        self.stats = Stats()
        self.stopping = False
        self.refused = ""  # why the broker refused the subscription
        self.producer = self._new_producer()
        ReadingColumns().table()  # pay pyarrow's lazy imports (~1 s) now, not in the first flush
        self.client = make_client(cfg, self.client_id, manual_ack=True)
        self.client.on_publish_packet = self._on_publish
        self.client.max_packet_bytes = cfg.bridge.max_packet_bytes + FORWARD_SLACK_BYTES

    # --- receive ----------------------------------------------------------------------

    def _route(self, topic_bytes: bytes) -> tuple[bool, str, str, int]:
        """(is_label, tenant, device_id, partition) of an MQTT topic, or ``Rejected``."""
        route = self.routes.get(topic_bytes)
        if route is None:
            topic = _topic_text(topic_bytes)
            try:
                tenant, device_id = self.telemetry.parse(topic)
                is_label = False
            except Rejected as r:
                if self.labels is None or r.reason != "bad_topic":
                    raise
                tenant, device_id = self.labels.parse(topic)
                is_label = True
            if len(self.routes) >= TOPIC_CACHE_MAX:
                self.routes.clear()
            route = self.routes[topic_bytes] = (is_label, tenant, device_id,
                                          contract.partition_for(tenant, device_id, self.partitions))
        return route

    def _on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int) -> None:
        """One MQTT message (``aimass.streams.mqtt.PacketSplitter``): into the batch, or rejected."""
        received = now_ms()
        batch = self.batch
        if not batch.n_messages:
            batch.first_ms = received
        batch.n_messages += 1
        if qos:
            batch.mids.append(mid)
        self._receive(topic, payload, received)

    def _receive(self, topic: bytes, payload: bytes, received: int) -> None:
        batch = self.batch
        tenant = device_id = None
        try:
            is_label, tenant, device_id, partition = self._route(topic)
            if is_label:
                label = parse_label(payload, received, self.limits)
                batch.labels.append({"tenant": tenant, "device_id": device_id, "metric": label.metric,
                                     "start_ms": label.start_ms, "end_ms": label.end_ms, "kind": label.kind,
                                     "magnitude": label.magnitude, "source": "mqtt"})
                return
            readings = parse_telemetry(payload, received, self.limits)
        except Exception as exc:  # noqa: BLE001 - no message may stop the bridge
            if isinstance(exc, Rejected):
                reason, detail = exc.reason, exc.detail
            else:
                log.exception("unexpected error on a message from %r", topic[:200])
                reason, detail = "internal_error", f"{type(exc).__name__}: {str(exc)[:400]}"
            part = contract.partition_for(tenant, device_id, self.partitions) if device_id else 0
            batch.rejects.setdefault(part, []).append(
                reject_row(reason, detail, _topic_text(topic), payload, tenant, device_id, received))
            return
        cols = batch.readings.get(partition)
        if cols is None:
            cols = batch.readings[partition] = ReadingColumns()
        cols.add(tenant, device_id, readings, received)
        batch.n_readings += len(readings)

    # --- flush to Kafka ---------------------------------------------------------------

    def _due(self, now: int) -> bool:
        b = self.batch
        return b.n_messages > 0 and (b.n_readings >= self.cfg.bridge.flush_readings
                                     or now - b.first_ms >= self.cfg.bridge.flush_ms)

    def flush(self) -> None:
        """Hand the current batch to Kafka: one record per (topic, partition)."""
        b, self.batch = self.batch, Batch()
        if not b.n_messages:
            return
        tables = [(self.raw_topic, p, cols.table()) for p, cols in b.readings.items()]
        tables += [(self.dead_topic, p, pa.Table.from_pylist(rows, contract.REJECTS)) for p, rows in b.rejects.items()]
        if b.labels:
            tables.append((self.label_topic, 0, pa.Table.from_pylist(b.labels, contract.LABELS)))
        records = [record for topic, p, table in tables for record in self._records(topic, p, table)]
        rejected: dict[str, int] = {}
        for rows in b.rejects.values():
            for row in rows:
                rejected[row["reason"]] = rejected.get(row["reason"], 0) + 1
        flush = Flush(b.mids, records, b.n_readings, b.first_ms, rejected)
        self.in_kafka.append(flush)
        for record in records:
            self._produce(record, flush)
        for cols in b.readings.values():
            BATCH_READINGS.observe(len(cols.ts_ms))
        self.stats.messages += b.n_messages
        MESSAGES.inc(b.n_messages)

    def _records(self, topic: str, partition: int, table: pa.Table) -> list[Record]:
        """``table`` as records of at most ``kafka.max_record_bytes``, rows in order."""
        schema = {self.raw_topic: contract.READINGS, self.dead_topic: contract.REJECTS}.get(topic, contract.LABELS)
        return [Record(topic, partition, part.rows, part.value)
                for part in contract.encode_parts(table, schema, self.cfg.kafka.max_record_bytes)]

    def _produce(self, record: Record, flush: Flush) -> None:
        generation = self.generation

        def delivered(err: KafkaError | None, _msg) -> None:
            if generation != self.generation:
                return  # a replaced producer's leftovers: its records were produced again
            if err is None:
                record.confirmed = True
            elif refused_for_good(err):
                self.refused_records.append((flush, record, err))
            else:
                self.delivery_error = f"{record.topic}[{record.partition}]: {err}"

        while True:
            try:
                self.producer.produce(record.topic, record.value, partition=record.partition, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                if refused_for_good(exc.args[0]):  # e.g. larger than the client's message.max.bytes
                    self.refused_records.append((flush, record, exc.args[0]))
                else:  # fatal producer state
                    self.delivery_error = str(exc)
                return

    def _dead_letter_refused(self) -> None:
        """Replace each record the broker refused for good by dead-letter records in the same flush."""
        refused, self.refused_records = self.refused_records, []
        for flush, record, err in refused:
            record.confirmed = True  # stands for its replacement, which the flush now waits for too
            if record.topic == self.dead_topic:
                DROPPED.labels("bridge").inc()
                log.error("the broker refused a dead-letter record of %d bytes for good (%s); it is dropped: "
                          "lower kafka.max_record_bytes to the broker's message.max.bytes", len(record.value), err)
                continue
            REFUSED.labels("bridge").inc()
            log.error("the broker refused a record of %d bytes to %s[%d] for good (%s); its rows go to the "
                      "dead-letter topic", len(record.value), record.topic, record.partition, err)
            rows = refused_rows(record, err, now_ms())
            flush.rejected["record_refused"] = flush.rejected.get("record_refused", 0) + rows.num_rows
            for replacement in self._records(self.dead_topic, record.partition, rows):
                flush.records.append(replacement)
                self._produce(replacement, flush)

    def _new_producer(self) -> Producer:
        def on_error(err: KafkaError) -> None:
            log.warning("Kafka: %s", err)

        timeout_ms = int(self.cfg.bridge.kafka_timeout_s * 1000)
        return Producer(producer_config(self.cfg, error_cb=on_error, **{
            "delivery.timeout.ms": timeout_ms, "request.timeout.ms": min(30000, timeout_ms // 2)}))

    def _restart_producer(self) -> None:
        """After a delivery failure: a new producer (fresh idempotence state, e.g. after a broker
        restart lost it) produces every unconfirmed record again; the MQTT acks still wait."""
        log.warning("Kafka did not confirm %s; starting a new producer and producing %d records again",
                    self.delivery_error, sum(not r.confirmed for f in self.in_kafka for r in f.records))
        self.delivery_error = ""
        self.generation += 1
        self.producer = self._new_producer()
        for flush in self.in_kafka:
            for record in flush.records:
                if not record.confirmed:
                    self._produce(record, flush)

    def _ack_confirmed(self) -> None:
        """Ack, in order, the MQTT messages of every flush Kafka has fully confirmed."""
        while self.in_kafka and self.in_kafka[0].confirmed():
            flush = self.in_kafka.popleft()
            self._ack(flush.mids)
            self.stats.readings += flush.n_readings
            self.stats.flushes += 1
            READINGS_PRODUCED.inc(flush.n_readings)
            PUBLISH_TO_KAFKA.observe((now_ms() - flush.first_ms) / 1000)
            for reason, n in flush.rejected.items():
                REJECTED.labels(reason).inc(n)
                self.stats.rejected += n

    def _ack(self, mids: list[int]) -> None:
        """PUBACK every id, written to the socket in one go."""
        sock = self.client.socket()
        if isinstance(sock, BufferedSocket):
            sock.cork()
        try:
            for mid in mids:
                self.client.ack(mid, 1)
        finally:
            if isinstance(sock, BufferedSocket):
                sock.uncork()

    def _service_kafka(self) -> None:
        self.producer.poll(0)
        if self.refused_records:
            self._dead_letter_refused()
        if self.delivery_error:
            self._restart_producer()
        self._ack_confirmed()

    # --- MQTT session -----------------------------------------------------------------

    def connect_mqtt(self) -> None:
        """Connect resuming the persistent session (queued and unacked messages come back) and subscribe."""
        b = self.cfg.bridge
        connect(self.client, self.cfg, clean_start=False, session_expiry_s=b.session_expiry_s,
                receive_maximum=b.receive_maximum)
        self.client.on_subscribe = self._on_subscribe
        if b.share_group:  # a session resumed from a single-bridge run still holds the plain filters
            self.client.unsubscribe(plain_filters(self.cfg))
        # SUBACK is not awaited here: a resumed session's backlog arrives before it and must be
        # flushed as it comes (the main loop does).
        self.client.subscribe([(sub, self.cfg.mqtt.qos) for sub in subscriptions(self.cfg)])

    def _on_subscribe(self, _client, _userdata, _mid, reason_codes, _props) -> None:
        refused = [c for c in reason_codes if c.is_failure]
        if refused:
            self.refused = (f"the MQTT broker refused the subscription ({refused[0]}): check the ACL of "
                            f"mqtt.username for {', '.join(subscriptions(self.cfg))}")
            return
        log.info("bridge %s subscribed to %s -> Kafka %s", self.client_id, ", ".join(subscriptions(self.cfg)),
                 self.cfg.kafka.bootstrap)

    def _reconnect_mqtt(self) -> None:
        """After a lost connection the broker redelivers every unacked message: forget the old ids."""
        self.batch.mids.clear()
        for flush in self.in_kafka:
            flush.mids.clear()
        delay = 0.2
        while not self.stopping:
            try:
                self.connect_mqtt()
                log.info("reconnected to the MQTT broker")
                return
            except StackError as exc:
                log.warning("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- main loop --------------------------------------------------------------------

    def run(self, max_seconds: float = 0.0) -> Stats:
        """Bridge until ``stop()`` (SIGTERM/SIGINT) or ``max_seconds``; then flush, ack and disconnect."""
        self.connect_mqtt()
        flush_s = self.cfg.bridge.flush_ms / 1000
        deadline = time.monotonic() + max_seconds if max_seconds else float("inf")
        while not self.stopping and time.monotonic() < deadline:
            busy = self.batch.n_messages or self.in_kafka
            rc = self.client.loop(timeout=0.001 if busy else flush_s)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = self._read_buffered()
            if self.refused:
                raise StackError(self.refused)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("MQTT connection lost (%s)", rc)
                self._reconnect_mqtt()
            if self._due(now_ms()):
                self.flush()
            self._service_kafka()
        self.close()
        return self.stats

    def _read_buffered(self) -> MQTTErrorCode:
        """Handle the packets already read from the socket, without a select() for each."""
        sock = self.client.socket()
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if not isinstance(sock, BufferedSocket):
            return rc
        limit = self.cfg.bridge.flush_readings
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and sock.pending() and self.batch.n_readings < limit:
            rc = self.client.loop_read()
        return rc

    def stop(self, *_args) -> None:
        self.stopping = True

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what was received, wait for Kafka, ack, and leave the session for the next start."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        while self.in_kafka and time.monotonic() < deadline:
            self.producer.flush(0.1)
            self._service_kafka()
        self.client.loop(timeout=0.01)
        self.client.disconnect()
        log.info("bridge %s stopped: %d messages, %d readings to Kafka, %d rejected, %d unconfirmed flushes",
                 self.client_id, self.stats.messages, self.stats.readings, self.stats.rejected, len(self.in_kafka))


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n")[1]
    p.add_argument("--client-id", help="MQTT client id of this bridge process (default: bridge.client_id); "
                                       "each process sharing the load needs its own, stable across restarts")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this many seconds (default: run until "
                                                                   "SIGTERM/SIGINT)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.bridge.metrics_port:
        start_http_server(cfg.bridge.metrics_port, addr=cfg.run.metrics_host)
    bridge = Bridge(cfg, args.client_id)
    signal.signal(signal.SIGTERM, bridge.stop)
    signal.signal(signal.SIGINT, bridge.stop)
    bridge.run(args.max_seconds)
    return 0
