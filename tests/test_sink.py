"""The sink on chDB with the real Kafka broker: every topic stored, rollups, dead letters, journal replay."""
from __future__ import annotations

import pyarrow as pa
import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from aimass.agents.sink import Batch, Sink
from aimass.core.clickhouse import ChdbStore
from aimass.core import contract
from aimass.streams.kafka import producer_config
from tests.fixtures_store import (Running, chdb_config, chdb_run_dir, committed, counts,  # noqa: F401
                                  expected_counts, produce, readings, sample_tables, sink_on, wait_for)

pytestmark = pytest.mark.integration


@pytest.fixture
def sink_cfg(cfg, chdb_run_dir):  # noqa: F811
    return chdb_config(cfg, chdb_run_dir)


def make_sink(cfg) -> Sink:
    store = ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)
    return sink_on(cfg, store)


def consumer_lag(group: str, topic: str) -> set[float]:
    """The sink's aimass_consumer_lag values for the partitions of ``topic`` it owns."""
    return {s.value for m in REGISTRY.collect() if m.name == "aimass_consumer_lag" for s in m.samples
            if (s.labels["stage"], s.labels["group"], s.labels["topic"]) == ("sink", group, topic)}


def test_every_topic_lands_in_its_table_with_rollups_and_commits(sink_cfg):
    batches = [sample_tables(seed) for seed in range(3)]
    produce(sink_cfg, [item for b in batches for item in b.items()])
    want = expected_counts(batches)
    sink = make_sink(sink_cfg)
    db = sink_cfg.clickhouse.database
    with Running(sink):
        wait_for(lambda: counts(sink.store, db) == want or None, 60, f"counts {want}")
        wait_for(lambda: committed(sink_cfg, contract.CLEAN) == 3, 30, "committed offsets")
        clean = contract.CLEAN.name(sink_cfg.kafka.topic_prefix)
        wait_for(lambda: consumer_lag(sink_cfg.clickhouse.group_id, clean) == {0.0} or None, 10, "sink lag 0")
    assert counts(sink.store, db, final=False) == want  # no duplicates even without FINAL
    r = sink.store.query(f"SELECT sum(value) AS s, min(ts) AS lo, toTypeName(ts) AS t FROM `{db}`.readings GROUP BY t")
    produced = pa.concat_tables([b[contract.CLEAN] for b in batches])
    assert r.column("s")[0].as_py() == pytest.approx(sum(produced.column("value").to_pylist()))
    assert r.column("t")[0].as_py() == "DateTime64(3, 'UTC')"
    assert r.column("lo")[0].as_py().timestamp() * 1000 == min(produced.column("ts_ms").to_pylist())
    for suffix in ("1m", "1h"):
        roll = sink.store.query(f"SELECT countMerge(n) AS n, sumMerge(value_sum) AS s FROM `{db}`.readings_{suffix}")
        assert roll.column("n")[0].as_py() == produced.num_rows
        assert roll.column("s")[0].as_py() == pytest.approx(r.column("s")[0].as_py())
    rejects = sink.store.query(f"SELECT topic, count() AS n FROM `{db}`.rejects GROUP BY topic ORDER BY topic")
    assert rejects.to_pydict() == {"topic": ["deadletter", "telemetry.late"], "n": [120, 120]}


def test_undecodable_record_goes_to_dead_letter_with_its_bytes(sink_cfg):
    producer = Producer(producer_config(sink_cfg))
    bad = b"not arrow at all"
    producer.produce(contract.WINDOW_ROWS.name(sink_cfg.kafka.topic_prefix), bad, partition=0)
    producer.flush(10)
    produce(sink_cfg, [(contract.CLEAN, readings(10))])
    sink = make_sink(sink_cfg)
    db = sink_cfg.clickhouse.database
    with Running(sink):
        # The sink consumes the dead-letter topic too: its own report lands in `rejects`.
        row = wait_for(lambda: sink.store.query(
            f"SELECT stage, reason, detail, hex(payload) AS payload FROM `{db}`.rejects WHERE stage = 'sink'").to_pylist(), 60,
            "the sink's dead-letter row")
    assert row[0]["reason"] == "insert_failed"
    assert row[0]["detail"].startswith("windows[0]@0: not an Arrow IPC stream")
    assert bytes.fromhex(row[0]["payload"]) == bad
    assert counts(sink.store, db)["readings"] == 10


def test_rows_that_never_fit_are_dead_lettered_and_the_rest_stored(sink_cfg):
    sink = make_sink(sink_cfg)
    db = sink_cfg.clickhouse.database
    # Make one table refuse every insert permanently: a CHECK constraint no row satisfies.
    sink.store.execute(f"ALTER TABLE `{db}`.windows ADD CONSTRAINT never CHECK `count` < 0")
    batch = sample_tables(7, n=5)
    produce(sink_cfg, list(batch.items()))
    want = expected_counts([batch])
    want["windows"] = 0
    want["rejects"] += 1  # the sink's own dead-letter record of the windows record
    with Running(sink):
        wait_for(lambda: counts(sink.store, db) == want or None, 60, f"counts {want}")
    row = sink.store.query(f"SELECT detail, hex(payload) AS payload FROM `{db}`.rejects WHERE stage = 'sink'")
    detail, payload = row.column("detail")[0].as_py(), row.column("payload")[0].as_py()
    assert "insert into windows" in detail and "VIOLATED_CONSTRAINT" in detail
    assert contract.decode(bytes.fromhex(payload), contract.WINDOWS).num_rows == 5  # the record, replayable


def test_journaled_batch_is_reinserted_with_the_same_tokens_after_a_crash(sink_cfg):
    """Simulate a kill between insert and commit: the restarted sink re-reads and dedups by token."""
    batches = [sample_tables(seed, n=30) for seed in (11, 12)]
    produce(sink_cfg, [item for b in batches for item in b.items()], partition=0)
    want = expected_counts(batches)
    first = make_sink(sink_cfg)
    db = sink_cfg.clickhouse.database
    first.consumer.subscribe(first.topics())
    while first.batch.rows < sum(want.values()):  # consume everything, insert, but "crash" before commit
        for msg in first.consumer.consume(500, timeout=0.5):
            first._add(msg)
    manifest = first.batch.manifest("crashed-batch")
    first.journal.save(manifest)
    first._store(first.batch, manifest.batch_id)
    first.consumer.close()
    assert counts(first.store, db, final=False) == want

    second = make_sink(sink_cfg)
    assert second.replay is not None and second.replay.batch_id == "crashed-batch"
    with Running(second):
        wait_for(lambda: second.replay is None or None, 60, "the journaled batch to be replayed")
        wait_for(lambda: committed(sink_cfg, contract.CLEAN) == 2, 30, "committed offsets")
    assert counts(second.store, db, final=False) == want  # token dedup: nothing inserted twice
    roll = second.store.query(f"SELECT countMerge(n) AS n FROM `{db}`.readings_1m")
    assert roll.column("n")[0].as_py() == want["readings"]  # rollups deduplicated too
    assert not second.journal.path.exists()


def emit_clean(cfg, raw_offsets: tuple[int, ...]) -> None:
    """One clean record of 20 readings of device d<raw offset> per raw offset, as the clean stage emits it."""
    producer = Producer(producer_config(cfg))
    for raw_offset in raw_offsets:
        value = contract.encode(readings(20, device=f"d{raw_offset}"), contract.READINGS)
        producer.produce(contract.CLEAN.name(cfg.kafka.topic_prefix), value=value, partition=0,
                         headers=[("raw_offset", str(raw_offset).encode()), ("raw_part", b"0")])
    assert producer.flush(10) == 0


def stored_until_committed(cfg, sink: Sink, records: int) -> list[dict]:
    """Run ``sink`` until ``records`` clean records are committed; its raw readings rows (no FINAL) per device."""
    with Running(sink):
        wait_for(lambda: committed(cfg, contract.CLEAN) == records or None, 60, f"{records} clean records committed")
    return sink.store.query(f"SELECT device_id, count() AS n FROM `{cfg.clickhouse.database}`.readings "
                            "GROUP BY device_id ORDER BY device_id").to_pylist()


def test_clean_records_emitted_again_by_a_restarted_clean_stage_are_stored_empty(sink_cfg):
    """A clean worker's restart replays raw records and emits their clean records again (same
    raw_offset / raw_part): the sink keeps their offsets but stores their readings once."""
    emit_clean(sink_cfg, (5, 6, 5, 6, 7))  # 5 and 6 again after a "restart", then a new one
    assert stored_until_committed(sink_cfg, make_sink(sink_cfg), 5) == [{"device_id": f"d{o}", "n": 20}
                                                                        for o in (5, 6, 7)]


def test_clean_records_emitted_again_after_the_sink_restarted_are_stored_empty(sink_cfg):
    """The sink and a clean worker killed together (or the partition moved to another sink): the
    worker's copies reach a sink that never saw the originals. It takes the highest source position
    from the records below its committed offset, so the copies are still stored empty."""
    emit_clean(sink_cfg, (5, 6))
    first = make_sink(sink_cfg)
    stored_until_committed(sink_cfg, first, 2)
    emit_clean(sink_cfg, (5, 6, 7))  # the worker's copies of 5 and 6, then a new record
    assert stored_until_committed(sink_cfg, sink_on(sink_cfg, first.store), 5) == [{"device_id": f"d{o}", "n": 20}
                                                                                   for o in (5, 6, 7)]


def test_a_refused_commit_keeps_the_journal_and_holds_new_flushes(sink_cfg):
    """The broker refused the commit (the group moved on): the journal stays, no new batch replaces it,
    and a rebalance hands it to the re-read path, so re-read records reuse its tokens."""
    from confluent_kafka import KafkaError, KafkaException

    produce(sink_cfg, list(sample_tables(21, n=10).items()), partition=0)
    sink = make_sink(sink_cfg)
    sink.consumer.subscribe(sink.topics())
    while not sink.batch:
        for msg in sink.consumer.consume(500, timeout=0.5):
            sink._add(msg)
    real_commit = sink.consumer.commit

    def refused(*args, **kwargs):
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID))
    sink.consumer = type("Refusing", (), {"commit": staticmethod(refused)})()
    batch = sink.batch
    sink.flush(batch, "refused-batch")
    assert sink.uncommitted is not None and sink.journal.load().batch_id == "refused-batch"
    sink.batch = Batch()
    sink.batch.add(next(r for r in batch.by_table().get("readings", [])))
    sink.max_age_s = {name: 0.0 for name in sink.max_age_s}
    sink._flush_due()                                                   # held: the journal is not replaced
    assert sink.journal.load().batch_id == "refused-batch" and sink.batch
    sink._on_revoke(None, [])
    assert sink.replay is not None and sink.replay.batch_id == "refused-batch" and sink.uncommitted is None
    assert real_commit  # the real consumer was only set aside
