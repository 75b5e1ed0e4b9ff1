"""Kafka client settings shared by every confluent-kafka producer and consumer of AI Mass."""
from __future__ import annotations

from confluent_kafka import Consumer, Message

from aimass.core.config import Config
from aimass.core.stack import kafka_client_config


def producer_config(cfg: Config, **overrides) -> dict:
    """Durable producer: acks=all, idempotent, short linger so micro-batches leave quickly."""
    conf = kafka_client_config(cfg)
    conf.update({
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "none",  # Arrow batches are already compact; CPU is the bottleneck
        "message.max.bytes": 16 * 1024 * 1024,
        "queue.buffering.max.kbytes": 1024 * 1024,
        "delivery.timeout.ms": 120000,
        # Keys Faust must co-partition are hashed like Faust/aiokafka (INFRA.md).
        "partitioner": "murmur2_random",
    })
    conf.update(overrides)
    return conf


def consumer_config(cfg: Config, group_id: str, **overrides) -> dict:
    """At-least-once consumer: commits are explicit, after the work they cover is durable."""
    conf = kafka_client_config(cfg)
    conf.update({
        "group.id": group_id,
        # The local broker's end offsets are wrong (INFRA.md): never start from "latest".
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
