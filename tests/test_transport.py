"""Poison-proof transport: records under kafka.max_record_bytes, bounded dead letters, records the
broker refuses for good, linear packet reassembly, and commits only past delivered output."""
from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time

import numpy as np
import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from aimass.core import contract
from aimass.core.procs import free_port
from aimass.core.stack import create_topics, start_kafka, start_mosquitto, stop_server
from aimass.streams.bridge import Bridge, Flush, Record
from aimass.streams.kafka import TableProducer, consumer_config, producer_config
from aimass.streams.mqtt import PacketSplitter, encode_varint
from aimass.streams.payloads import encode_senml
from aimass.streams.replay import DeliveryFailed, ReplayedPartitions
from tests.fixtures_ingest import BridgeProcess, isolate, read_records, rows_of
from tests.fixtures_stream import T0, synthetic
from tests.fixtures_store import wait_for

MIB = 1024 * 1024


def identities(table: pa.Table) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in ("tenant", "device_id", "metric", "ts_ms"))))


def raw_values(cfg, topic: contract.Topic, until: int, timeout_s: float = 60) -> list[tuple[int, bytes]]:
    """(partition, value) of the records of ``topic``, in offset order per partition, until ``until`` came."""
    consumer = Consumer(consumer_config(cfg, f"sizes-{time.monotonic_ns()}"))
    name = topic.name(cfg.kafka.topic_prefix)
    consumer.assign([TopicPartition(name, p, 0) for p in range(contract.topic_partitions(topic, cfg.kafka.partitions))])
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                out.append((msg.partition(), msg.value()))
            elif msg is None and sum(contract.decode(v, topic.schema).num_rows for _, v in out) >= until:
                break
    finally:
        consumer.close()
    return out


# --- splitting a table into records ---------------------------------------------------

def test_a_big_batch_splits_into_records_under_the_budget_in_order():
    table = synthetic(devices=300, seconds=100, metrics=("temp", "humidity", "pressure.absolute.sensor.1"))
    whole = contract.encode(table, contract.READINGS)
    assert len(whole) > 2 * MIB
    parts = contract.encode_parts(table, contract.READINGS, MIB)
    assert len(parts) >= 3
    assert all(len(p.value) <= MIB - contract.RECORD_OVERHEAD for p in parts)
    decoded = pa.concat_tables([contract.decode(p.value, contract.READINGS) for p in parts])
    assert identities(decoded) == identities(table)  # every reading once, in the original order
    assert decoded.equals(table)


def test_a_small_batch_is_one_record_and_a_single_huge_row_stays_whole():
    small = synthetic(devices=2, seconds=5)
    assert [p.value for p in contract.encode_parts(small, contract.READINGS, MIB)] == \
        [contract.encode(small, contract.READINGS)]
    row = {name: [None] for name in contract.REJECTS.names}
    row.update(stage=["x"], reason=["y"], payload=[b"z" * (2 * MIB)])
    huge = pa.table(row, schema=contract.REJECTS)
    assert len(contract.encode_parts(huge, contract.REJECTS, MIB)) == 1


def test_payload_excerpt_keeps_a_bounded_prefix_its_size_and_sha256():
    assert contract.payload_excerpt(b"abc") == (b"abc", "")
    big = bytes(range(256)) * 40_000
    prefix, note = contract.payload_excerpt(big)
    assert prefix == big[:contract.DEAD_LETTER_PAYLOAD_BYTES]
    assert f"{len(big)} bytes" in note and hashlib.sha256(big).hexdigest() in note


# --- MQTT packet reassembly -----------------------------------------------------------

def publish_packet(topic: bytes, payload: bytes, qos: int = 1, mid: int = 7) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") + b"\x00" + payload
    return bytes([0x30 | qos << 1]) + encode_varint(len(body)) + body


def test_packet_reassembly_keeps_reads_by_reference_and_joins_once():
    """Linear in the packet size, checked without a clock: an incomplete packet's reads are held
    as given (never copied into a growing buffer, the old tail + data per read cost ~30x for 4x
    the bytes) and joined once, when the packet is complete."""
    size = 4 * MIB
    packet = publish_packet(b"a/b", b"x" * size)
    chunks = [packet[i:i + 256 * 1024] for i in range(0, len(packet), 256 * 1024)]
    got = []
    splitter = PacketSplitter(lambda t, p, q, m: got.append(len(p)))
    assert splitter.split(chunks[0]) == b""
    for chunk in chunks[1:-1]:
        assert splitter.split(chunk) == b"" and got == []
        assert splitter._pending[-1] is chunk  # held by reference: no copy per read
        assert len(splitter._pending) <= len(chunks)
    splitter.split(chunks[-1])
    assert got == [size] and splitter._pending == []


def test_a_packet_cut_anywhere_comes_out_whole_with_its_neighbours():
    packets = [publish_packet(b"t/1", b"p" * n, mid=i + 1) for i, n in enumerate((0, 1, 127, 128, 20_000, 3))]
    stream = b"".join(packets) + b"\xd0\x00"  # + a PINGRESP for paho
    for cut in (1, 2, 3, 7, 130, 20_010):
        got, paho = [], []
        splitter = PacketSplitter(lambda t, p, q, m: got.append((m, len(p))))
        for i in range(0, len(stream), cut):
            paho.append(splitter.split(stream[i:i + cut]))
        assert got == [(i + 1, n) for i, n in enumerate((0, 1, 127, 128, 20_000, 3))], cut
        assert b"".join(paho) == b"\xd0\x00"


def test_a_qos_3_publish_is_malformed_and_left_to_paho():
    got = []
    splitter = PacketSplitter(lambda t, p, q, m: got.append(q))
    bad = bytearray(publish_packet(b"a/b", b"{}", qos=1))
    bad[0] |= 0x06  # both QoS bits: QoS 3
    assert splitter.split(bytes(bad)) == bytes(bad)  # paho answers a malformed packet by disconnecting
    assert got == []


# --- commits wait for delivery (pure logic: a broker that refuses one send) -----------

class FakeTopic:
    """Records sends; the delivery future of send number ``fail_at`` fails."""

    def __init__(self, fail_at: int | None):
        self.fail_at = fail_at
        self.sent: list[bytes] = []

    async def send(self, value, partition, headers=None):
        fut = asyncio.get_running_loop().create_future()
        if len(self.sent) == self.fail_at:
            fut.set_exception(RuntimeError("MessageSizeTooLargeError: the broker refused the record"))
        else:
            fut.set_result(("metadata", len(self.sent)))
        self.sent.append(value)
        return fut


class FakeApp:
    def __init__(self):
        self.flushes = 0
        self.commits: list[dict] = []
        self.producer = self
        self.consumer = self
        self.conf = type("Conf", (), {"id": "test"})()

    async def flush(self):
        self.flushes += 1

    async def _commit(self, offsets):
        self.commits.append(offsets)
        return True

    def highwater(self, tp):  # the lag metric's source
        return None


class FakeMarkers:
    def __init__(self):
        self.commits = []

    def commit(self, offsets, asynchronous):
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])


class NoState:
    def live_offset(self) -> int:
        return -1


def run_commits(cfg, fail_at: int | None) -> tuple[FakeApp, FakeMarkers, list]:
    async def go():
        app, markers, topic = FakeApp(), FakeMarkers(), FakeTopic(fail_at)
        parts = ReplayedPartitions(app, cfg, "raw", "clean", NoState)
        parts._markers = markers
        outcomes = []
        for offset in range(3):
            parts.state(0)
            await parts.send(topic, b"out-%d" % offset, 0)
            parts.processed(0, offset)
            try:
                await parts.commit()
                outcomes.append("committed")
            except DeliveryFailed:
                outcomes.append("refused")
        return app, markers, outcomes

    return asyncio.run(go())


def test_commits_follow_delivered_output(cfg_offline):
    app, markers, outcomes = run_commits(cfg_offline, fail_at=None)
    assert outcomes == ["committed"] * 3
    assert markers.commits == [[(0, 1)], [(0, 2)], [(0, 3)]]
    assert [list(c.values()) for c in app.commits] == [[1], [2], [3]]


def test_no_commit_past_a_send_the_broker_refused(cfg_offline):
    app, markers, outcomes = run_commits(cfg_offline, fail_at=1)
    # Offset 0 was delivered and committed; the send of offset 1 failed: nothing after it is
    # committed, not even once later sends succeed (a restart replays from offset 1, in order).
    assert outcomes == ["committed", "refused", "refused"]
    assert markers.commits == [[(0, 1)]]
    assert [list(c.values()) for c in app.commits] == [[1]]


@pytest.fixture
def cfg_offline(tmp_path):
    from tests.conftest import make_config
    cfg = make_config(tmp_path)
    cfg.kafka.bootstrap = "127.0.0.1:9"  # never contacted: the marker consumer is replaced
    return cfg


# --- records the broker refuses for good (real broker, real client limit) -------------

def test_a_record_refused_for_good_becomes_dead_letters_and_the_bridge_acks_on(cfg):
    cfg.kafka.max_record_bytes = MIB
    bridge = Bridge(cfg, "refusal-test")
    rows = synthetic(devices=50, seconds=200)
    value = contract.encode(rows, contract.READINGS)
    assert len(value) > MIB  # as if the split were skipped or the broker's limit below the budget
    record = Record(bridge.raw_topic, 0, rows, value)
    flush = Flush([], [record], rows.num_rows, int(time.time() * 1000), {})
    bridge.in_kafka.append(flush)
    bridge._produce(record, flush)
    deadline = time.monotonic() + 30
    while bridge.in_kafka and time.monotonic() < deadline:
        bridge.producer.poll(0.1)
        bridge._service_kafka()
    assert not bridge.in_kafka and bridge.generation == 0  # acknowledged, no producer restarts
    dead = pa.concat_tables([t for _, t in read_records(cfg, contract.DEAD_LETTER, rows.num_rows)])
    assert set(dead["reason"].to_pylist()) == {"record_refused"}
    assert sorted(identities(dead)) == sorted(identities(rows))  # every reading kept, once
    assert "MSG_SIZE_TOO_LARGE" in dead["detail"][0].as_py() or "too large" in dead["detail"][0].as_py()


def test_an_alarm_row_too_large_for_the_broker_is_dead_lettered_not_retried(cfg):
    cfg.kafka.max_record_bytes = MIB
    out = TableProducer(cfg, "alert")
    row = {name: [None] for name in contract.ALERTS.names}
    message = "x" * (2 * MIB)
    row.update(event_id=["e1"], rule=["huge"], message=[message], event_ms=[1], ts_ms=[1])
    out.produce(contract.ALERT_EVENTS, pa.table(row, schema=contract.ALERTS))
    out.flush(30)  # does not raise: the record is replaced by a dead-letter row
    dead = rows_of(read_records(cfg, contract.DEAD_LETTER, 1))
    assert [d["reason"] for d in dead] == ["record_refused"]
    value = contract.encode(pa.table(row, schema=contract.ALERTS), contract.ALERTS)
    assert dead[0]["payload"] == value[:contract.DEAD_LETTER_PAYLOAD_BYTES]
    assert hashlib.sha256(value).hexdigest() in dead[0]["detail"] and f"{len(value)} bytes" in dead[0]["detail"]


# --- through real Mosquitto + bridge + broker ------------------------------------------

def publish(cfg, topic: str, payloads: list[bytes]) -> None:
    from aimass.streams.mqtt import Publisher
    with Publisher(cfg, f"pub-{time.monotonic_ns()}", qos=1, window=100) as pub:
        for payload in payloads:
            pub.publish(topic, payload)
        assert pub.drain(60)


def reading(ts_ms: int, value: float) -> bytes:
    return orjson.dumps({"ts": ts_ms, "metric": "temp", "value": value})


@pytest.mark.timeout(240)
def test_a_17mb_message_is_refused_at_the_broker_and_the_stream_flows_on(cfg, tmp_path):
    """The shipped broker config (max_packet_size = bridge.max_packet_bytes) disconnects the sender
    of a 17 MB message before any subscriber sees it: never accepted, so nothing to dead-letter,
    and the bridge never stalls; the readings before and after it all arrive."""
    cfg = isolate(cfg)
    topic = cfg.mqtt.topic_pattern.format(tenant="acme", device_id="big1")
    now = int(time.time() * 1000)
    huge = tmp_path / "huge.json"
    huge.write_bytes(b'{"ts": 1, "metric": "temp", "value": 1, "pad": "' + b"y" * (17 * MIB) + b'"}')
    before = [reading(now - 5000 + i, float(i)) for i in range(50)]
    after = [reading(now - 2000 + i, float(i)) for i in range(50)]
    with BridgeProcess(cfg, "big-1", tmp_path / "bridge.log") as bridge:
        publish(cfg, topic, before)
        refused = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(cfg.mqtt.port), "-t", topic,
                                  "-q", "1", "-V", "mqttv311", "-f", str(huge)], capture_output=True, timeout=60)
        publish(cfg, topic, after)
        readings = rows_of(read_records(cfg, contract.RAW, 100, timeout=90))
        counts = bridge.terminate()
        assert "new producer" not in bridge.text()
    assert refused.returncode != 0, refused                            # the broker dropped the sender
    assert sorted((r["device_id"], r["ts_ms"]) for r in readings) == \
        sorted(("big1", orjson.loads(p)["ts"]) for p in before + after)
    assert counts == {"messages": 100, "readings": 100, "rejected": 0}


@pytest.mark.timeout(240)
def test_2mb_messages_with_a_1mib_record_limit(cfg, tmp_path, request):
    """An accepted 2 MB SenML pack is split into raw records under 1 MiB (every reading once, in
    order); a rejected 2 MB message is dead-lettered with a bounded prefix."""
    cfg = isolate(cfg)
    cfg.kafka.max_record_bytes = MIB
    cfg.bridge.max_payload_bytes = 4 * MIB
    # a broker of its own whose maximum packet size follows the bridge's, as the shipped configs do
    broker = start_mosquitto(tmp_path, free_port(), max_packet_bytes=cfg.bridge.max_packet_bytes)
    cfg.mqtt.port = broker.ports["mqtt"]
    request.addfinalizer(lambda: stop_server(broker))
    topic = cfg.mqtt.topic_pattern.format(tenant="acme", device_id="pack1")
    now = int(time.time() * 1000)
    pack = [(f"m{i % 7}", now - 60_000 + i, float(i), "Cel") for i in range(60_000)]
    payload = encode_senml(pack)
    assert 2 * MIB < len(payload) < 4 * MIB
    bad = b"[" * 10 + b"1," * MIB  # 2 MB of broken JSON
    with BridgeProcess(cfg, "pack-1", tmp_path / "bridge.log") as bridge:
        publish(cfg, topic, [payload, bad])
        values = raw_values(cfg, contract.RAW, len(pack))
        dead = rows_of(read_records(cfg, contract.DEAD_LETTER, 1, timeout=30))
        bridge.terminate()
    assert len(values) >= 2 and all(len(v) <= MIB - contract.RECORD_OVERHEAD for _, v in values)
    table = pa.concat_tables([contract.decode(v, contract.READINGS) for _, v in values])
    got = list(zip(table["metric"].to_pylist(), table["ts_ms"].to_pylist(), table["value"].to_pylist()))
    expected = [(m, ts, v) for m, ts, v, _ in pack]
    assert got == expected  # every reading once, in the pack's order
    assert [d["reason"] for d in dead] == ["bad_json"]
    assert dead[0]["payload"] == bad[:contract.DEAD_LETTER_PAYLOAD_BYTES]
    assert hashlib.sha256(bad).hexdigest() in dead[0]["detail"]


# --- the worker splits its outputs and still windows every reading ----------------------

@pytest.mark.timeout(240)
def test_worker_splits_clean_records_and_windows_every_part(cfg, tmp_path):
    """One raw record far over a 16 KiB budget: clean writes it as many records (headers
    raw_offset + raw_part), and the window stage uses every part (not only the first)."""
    from confluent_kafka import Producer

    from aimass.agents.window import batch_windows
    from aimass.streams.kafka import producer_config
    from tests.fixtures_stream import consume, rows_of as table_of, start_worker, stop_worker

    cfg.kafka.max_record_bytes = 16 * 1024
    raw = synthetic(devices=1, seconds=1800, metrics=("temp",))
    partition = contract.partition_for("acme", "dev0000", cfg.kafka.partitions)
    producer = Producer(producer_config(cfg, **{"message.max.bytes": 16 * MIB}))  # e.g. an older bridge's record
    producer.produce(contract.RAW.name(cfg.kafka.topic_prefix), contract.encode(raw, contract.READINGS),
                     partition=partition)
    assert producer.flush(30) == 0
    watermark = raw["ts_ms"][-1].as_py() - int(cfg.clean.allowed_lateness_s * 1000)
    expected = pa.concat_tables([batch_windows(raw, size, hop) for size, hop in cfg.window.specs()])
    expected = expected.filter(pa.compute.less_equal(expected["window_end_ms"], watermark))
    worker = start_worker(cfg, tmp_path / "worker.log")
    try:
        windows = table_of(consume(cfg, contract.WINDOW_ROWS, idle_s=3, timeout_s=120,
                                   until_rows=expected.num_rows), contract.WINDOWS)
    finally:
        assert stop_worker(worker) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    clean = raw_values(cfg, contract.CLEAN, raw.num_rows)
    assert len(clean) > 5 and all(len(v) <= 16 * 1024 - contract.RECORD_OVERHEAD for _, v in clean)
    decoded = pa.concat_tables([contract.decode(v, contract.READINGS) for _, v in clean])
    assert identities(decoded) == identities(raw)
    key = ["window_s", "window_start_ms", "count", "mean"]
    got = sorted(zip(*(windows[c].to_pylist() for c in key)))
    want = sorted(zip(*(expected[c].to_pylist() for c in key)))
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert [g[3] for g in got] == pytest.approx([w[3] for w in want])


# --- a record the broker itself refuses: the worker commits nothing past it -------------

# Every record of the late topic must be a JSON object: the broker refuses Arrow records there (INVALID_RECORD).
REFUSE_ALL = '{"type": "object", "properties": {"value": {"type": "object"}}}'


def committed_offset(cfg, group: str, topic: contract.Topic, partition: int) -> int:
    """The offset ``group`` committed on ``topic``'s ``partition`` (-1001 when none)."""
    consumer = Consumer(consumer_config(cfg, group))
    try:
        return consumer.committed([TopicPartition(topic.name(cfg.kafka.topic_prefix), partition)], timeout=10)[0].offset
    finally:
        consumer.close()


@pytest.mark.timeout(240)
def test_worker_commits_nothing_past_a_send_the_broker_refused(tmp_path):
    """The broker refuses every record of the late topic (its schema registry: INVALID_RECORD, a real
    refusal that does not change). The worker commits the raw records it delivered the outputs of,
    then sends one late reading there: neither its restart offset nor its emitted-through marker
    passes that raw record, and a restarted worker stops at it again, so the refused reading and
    every one after it stay uncommitted, to be replayed once the broker takes them."""
    from tests.conftest import make_config
    from tests.fixtures_stream import consume, rows_of as table_of, start_worker, stop_worker

    cfg = make_config(tmp_path)
    broker = start_kafka(tmp_path, free_port(), schemas={contract.LATE.name(cfg.kafka.topic_prefix): REFUSE_ALL})
    workers = []
    try:
        cfg.kafka.bootstrap = f"127.0.0.1:{broker.ports['kafka']}"
        create_topics(cfg)
        readings = synthetic(devices=1, seconds=120, metrics=("temp",))
        before, after = readings.slice(0, 60), readings.slice(60)
        late = readings.slice(0, 1).set_column(3, "ts_ms", pa.array([T0 - 600_000], pa.int64()))
        partition = contract.partition_for("acme", "dev0000", cfg.kafka.partitions)
        group = f"{cfg.kafka.topic_prefix}-worker"

        def produce(table: pa.Table) -> None:
            producer = Producer(producer_config(cfg))
            producer.produce(contract.RAW.name(cfg.kafka.topic_prefix), contract.encode(table, contract.READINGS),
                             partition=partition)
            assert producer.flush(30) == 0

        def offsets() -> tuple[int, int]:
            return (committed_offset(cfg, group, contract.RAW, partition),
                    committed_offset(cfg, f"{group}-clean-emitted", contract.RAW, partition))

        produce(before)  # offset 0
        workers.append(start_worker(cfg, tmp_path / "worker.log"))
        # the emitted-through marker passes the first record; the restart offset may stay on it (dedup
        # state), committed as 0 or not yet committed at all (-1001): either way it does not pass offset 1
        wait_for(lambda: offsets()[1] == 1, 60, "the worker to commit the first raw record")
        produce(late)    # offset 1: its late reading goes to the refusing topic
        produce(after)   # offset 2
        late_topic = contract.LATE.name(cfg.kafka.topic_prefix)
        for log in (tmp_path / "worker.log", tmp_path / "worker-2.log"):
            if not workers:  # a peer takes over: it replays from the commit and stops at the same record
                workers.append(start_worker(cfg, log))
            assert workers[-1].wait(timeout=90) != 0, "the worker went on past a send the broker refused"
            text = log.read_text(errors="replace")
            assert f"topic {late_topic} error" in text and "not delivered" in text, text[-3000:]
            restart, emitted = offsets()
            assert restart <= 1 and emitted == 1, (restart, emitted, text[-3000:])
            workers.pop()
        clean = table_of(consume(cfg, contract.CLEAN, idle_s=2, timeout_s=30), contract.READINGS)
        assert set(identities(before)) <= set(identities(clean))  # delivered before the refusal
        assert not set(identities(late)) & set(identities(clean))
    finally:
        for w in workers:
            stop_worker(w)
        stop_server(broker)
