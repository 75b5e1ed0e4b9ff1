"""aimass.streams.kafka against the real broker: consume_available hands over what is there, without
waiting for a full batch."""
from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer

from aimass.core import contract
from aimass.streams.kafka import consume_available, consumer_config, producer_config


def test_consume_available_returns_what_is_there_instead_of_waiting_for_a_full_batch(cfg):
    topic = contract.LABEL_ROWS.name(cfg.kafka.topic_prefix)  # one partition
    producer = Producer(producer_config(cfg))
    for i in range(3):
        producer.produce(topic, f"record {i}".encode(), partition=0)
    assert producer.flush(30) == 0
    consumer = Consumer(consumer_config(cfg, f"{cfg.kafka.topic_prefix}-consume-available"))
    consumer.subscribe([topic])
    try:
        seen: list[bytes] = []
        started = time.monotonic()
        while len(seen) < 3 and time.monotonic() - started < 60:
            seen += [m.value() for m in consume_available(consumer, 1000, 30.0) if not m.error()]
        # consumer.consume(1000, 30.0) would have returned after 30 s, with all three
        assert seen == [b"record 0", b"record 1", b"record 2"]
        assert time.monotonic() - started < 25
        assert consume_available(consumer, 1000, 0.5) == []  # nothing more: empty after the timeout
        producer.produce(topic, b"record 3", partition=0)
        producer.produce(topic, b"record 4", partition=0)
        producer.flush(30)
        got: list[bytes] = []
        while len(got) < 2 and time.monotonic() - started < 60:
            got += [m.value() for m in consume_available(consumer, 1, 5.0) if not m.error()]
        assert got == [b"record 3", b"record 4"]  # at most max_messages per call, in order
    finally:
        consumer.close()
