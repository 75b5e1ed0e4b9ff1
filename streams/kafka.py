"""Kafka client settings shared by every confluent-kafka producer and consumer of AI Mass, and
``TableProducer``, the one way the confluent-kafka stages write contract tables.

Every record a stage produces is at most ``kafka.max_record_bytes`` (``contract.encode_parts``
splits a batch into consecutive row ranges, so a device's rows stay in order). A record the
broker refuses for a reason that will not change on a retry (``refused_for_good``: too large,
invalid) becomes a dead-letter row holding a bounded prefix of it, its size and SHA-256, and
is counted; it is never retried. Any other delivery failure is raised, so the caller keeps its
offsets and tries again.

``ConsumerLag`` exports ``aimass_consumer_lag``{stage, group, topic, partition} for the partitions
a consumer owns: the high watermark its last fetch saw minus the offset its group committed. The
watermark comes from fetch responses (``cached=True``), not from ListOffsets, which the local
broker answers wrongly; a partition not fetched yet has no value until it is.
"""
from __future__ import annotations

import logging
import time

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge

from aimass.core.config import Config
from aimass.core import contract
from aimass.core.stack import kafka_client_config

log = logging.getLogger(__name__)

REFUSED = Counter("aimass_kafka_records_refused_total",
                  "records the broker refused for good, sent to the dead-letter topic instead", ["stage"])
DROPPED = Counter("aimass_kafka_dead_letters_dropped_total",
                  "dead-letter records the broker refused for good (logged, nowhere else to go)", ["stage"])
LAG = Gauge("aimass_consumer_lag", "records of a partition after the offset its consumer group committed "
            "(high watermark of the last fetch minus the committed offset)", ["stage", "group", "topic", "partition"])

# Errors a retry cannot cure: the record itself is wrong for this broker.
PERMANENT = frozenset((KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_MSG,
                       KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
                       KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT))


def refused_for_good(err: KafkaError | None) -> bool:
    """True when the broker (or the client, checking for it) refuses a record for a reason that will not change."""
    return isinstance(err, KafkaError) and err.code() in PERMANENT


def refused_row(stage: str, topic: str, partition: int, value: bytes, err: KafkaError, now_ms: int) -> dict:
    """The dead-letter row (REJECTS) standing for a record the broker refused for good."""
    payload, note = contract.payload_excerpt(value)
    detail = f"{topic}[{partition}] refused: {err.str()}; check kafka.max_record_bytes against the broker's " \
             f"message.max.bytes" + (f"; {note}" if note else "")
    return {"stage": stage, "reason": "record_refused", "detail": detail, "payload": payload,
            "received_ms": now_ms, "rejected_ms": now_ms}


def producer_config(cfg: Config, **overrides) -> dict:
    """Durable producer: acks=all, idempotent, short linger so micro-batches leave quickly."""
    conf = kafka_client_config(cfg)
    conf.update({
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "none",  # Arrow batches are already compact; CPU is the bottleneck
        # Stages split their records below kafka.max_record_bytes; anything larger is refused here.
        "message.max.bytes": cfg.kafka.max_record_bytes,
        "queue.buffering.max.kbytes": 1024 * 1024,
        "delivery.timeout.ms": 120000,
        # Keys Faust must co-partition are hashed like Faust/aiokafka (docs/infrastructure.md).
        "partitioner": "murmur2_random",
    })
    conf.update(overrides)
    return conf


def consumer_config(cfg: Config, group_id: str, **overrides) -> dict:
    """At-least-once consumer: commits are explicit, after the work they cover is durable."""
    conf = kafka_client_config(cfg)
    conf.update({
        "group.id": group_id,
        # The local broker's end offsets are wrong (docs/infrastructure.md): never start from "latest".
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "session.timeout.ms": cfg.kafka.session_timeout_ms,
        "fetch.wait.max.ms": cfg.kafka.fetch_max_wait_ms,
        "heartbeat.interval.ms": max(500, cfg.kafka.session_timeout_ms // 6),
        "fetch.max.bytes": 64 * 1024 * 1024,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
    })
    conf.update(overrides)
    return conf


def consume_available(consumer: Consumer, max_messages: int, timeout_s: float) -> list[Message]:
    """Up to ``max_messages`` messages as soon as one is there, waiting at most ``timeout_s`` for it.

    ``Consumer.consume(n, timeout)`` waits out the whole timeout unless ``n`` messages arrive
    (measured: one message, ``consume(1000, 2.0)`` returned after 2.0 s), which at live rates adds
    the timeout to every hop.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, 0)] if max_messages > 1 else [first]


class ConsumerLag:
    """``aimass_consumer_lag`` of one stage's consumer: call ``committed`` after each commit, ``revoked``
    from the revoke callback and ``update`` now and then from the consuming thread."""

    def __init__(self, stage: str, group: str):
        self.stage, self.group = stage, group
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> committed offset

    def committed(self, offsets: list[TopicPartition]) -> None:
        self.offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets if tp.offset >= 0})

    def revoked(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if self.offsets.pop((tp.topic, tp.partition), None) is not None:
                LAG.remove(self.stage, self.group, tp.topic, str(tp.partition))

    def update(self, consumer: Consumer) -> None:
        owned = consumer.assignment()
        unknown = [tp for tp in owned if (tp.topic, tp.partition) not in self.offsets]
        if unknown:  # owned since the last update: ask the group
            try:
                self.committed(consumer.committed(unknown, timeout=5))
            except KafkaException as exc:  # a metric must never stop the stage
                log.warning("committed offsets unavailable for the lag metric: %s", exc)
        for tp in owned:
            committed = self.offsets.get((tp.topic, tp.partition))
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if committed is not None and high >= 0:
                LAG.labels(self.stage, self.group, tp.topic, str(tp.partition)).set(max(0, high - committed))


class TableProducer:
    """Writes contract tables as records under ``kafka.max_record_bytes`` and checks every delivery."""

    def __init__(self, cfg: Config, stage: str, producer: Producer | None = None):
        self.cfg = cfg
        self.stage = stage
        self.producer = producer or Producer(producer_config(cfg))
        self.dead_topic = contract.DEAD_LETTER.name(cfg.kafka.topic_prefix)
        self.errors: list[str] = []
        self.refused: list[dict] = []

    def produce(self, topic: contract.Topic, table: pa.Table) -> None:
        """Every row to its device's partition (partition 0 on single-partition topics)."""
        if table.num_rows == 0:
            return
        name = topic.name(self.cfg.kafka.topic_prefix)
        if not topic.partitioned:
            self.produce_to(name, 0, table, topic.schema)
            return
        parts = contract.partitions_for(table.column("tenant").fill_null("").to_numpy(zero_copy_only=False),
                                        table.column("device_id").fill_null("").to_numpy(zero_copy_only=False),
                                        self.cfg.kafka.partitions)
        for p in sorted(set(parts.tolist())):
            self.produce_to(name, p, table.filter(pa.array(parts == p)), topic.schema)
        self.producer.poll(0)

    def produce_to(self, name: str, partition: int, table: pa.Table, schema: pa.Schema) -> None:
        """``table`` to one partition, in order, split into records under the budget."""
        for part in contract.encode_parts(table, schema, self.cfg.kafka.max_record_bytes):
            self._send(name, partition, part.value)

    def _send(self, name: str, partition: int, value: bytes) -> None:
        def delivered(err: KafkaError | None, _msg) -> None:
            if err is not None:
                self._failed(name, partition, value, err)

        while True:
            try:
                self.producer.produce(name, value, partition=partition, on_delivery=delivered)
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                self._failed(name, partition, value, exc.args[0])
                return

    def _failed(self, name: str, partition: int, value: bytes, err: KafkaError) -> None:
        if not refused_for_good(err):
            self.errors.append(f"{name}[{partition}]: {err}")
        elif name == self.dead_topic:
            DROPPED.labels(self.stage).inc()
            log.error("the broker refused a dead-letter record of %d bytes for good (%s); it is dropped: lower "
                      "kafka.max_record_bytes to the broker's message.max.bytes", len(value), err)
        else:
            REFUSED.labels(self.stage).inc()
            log.error("the broker refused a record of %d bytes to %s[%d] for good (%s); it goes to the dead-letter "
                      "topic", len(value), name, partition, err)
            self.refused.append(refused_row(self.stage, name, partition, value, err, int(time.time() * 1000)))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything produced is acknowledged (refused records dead-lettered); raise
        ``KafkaException`` if anything else failed or is still unacknowledged."""
        left = self.producer.flush(timeout_s)
        while self.refused and not left:
            rows, self.refused = self.refused, []
            self.produce_to(self.dead_topic, 0, pa.Table.from_pylist(rows, schema=contract.REJECTS),
                            contract.REJECTS)
            left = self.producer.flush(timeout_s)
        errors, self.errors = self.errors, []
        if left or errors:
            raise KafkaException(f"{left} records unacknowledged, errors: {errors[:3]}")
