"""aimass.streams.kafka against the real broker: consume_available hands over what is there, without
waiting for a full batch."""
from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from aimass.core import contract
from aimass.streams.kafka import ConsumerLag, consume_available, consumer_config, producer_config


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


def test_consumer_lag_is_the_fetched_high_watermark_minus_the_committed_offset(cfg):
    topic = contract.WINDOW_ROWS.name(cfg.kafka.topic_prefix)
    producer = Producer(producer_config(cfg))
    for i in range(10):
        producer.produce(topic, b"r%d" % i, partition=2)
    assert producer.flush(10) == 0
    group = f"{cfg.kafka.topic_prefix}-lag"
    consumer = Consumer(consumer_config(cfg, group))
    consumer.assign([TopicPartition(topic, 2, 0)])
    lag = ConsumerLag("test", group)
    try:
        got, deadline = [], time.monotonic() + 30
        while len(got) < 10 and time.monotonic() < deadline:
            got += [m for m in consume_available(consumer, 100, 0.5) if not m.error()]
        consumer.commit(offsets=[TopicPartition(topic, 2, 4)], asynchronous=False)  # 6 records not done
        lag.update(consumer)  # the committed offset comes from the group
        assert REGISTRY.get_sample_value("aimass_consumer_lag", {"stage": "test", "group": group, "topic": topic,
                                                                 "partition": "2"}) == 6
        lag.committed([TopicPartition(topic, 2, 10)])
        lag.update(consumer)
        assert REGISTRY.get_sample_value("aimass_consumer_lag", {"stage": "test", "group": group, "topic": topic,
                                                                 "partition": "2"}) == 0
        lag.revoked([TopicPartition(topic, 2)])
        assert REGISTRY.get_sample_value("aimass_consumer_lag", {"stage": "test", "group": group, "topic": topic,
                                                                 "partition": "2"}) is None
    finally:
        consumer.close()
