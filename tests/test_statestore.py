"""The per-partition state store on the real broker (and in files): the newest complete, authentic
checkpoint wins; a half-written, foreign or forged one is never loaded."""
from __future__ import annotations

import os
import json

import pytest
from confluent_kafka import Producer

from aimass.core import contract
from aimass.core.config import ConfigError
from aimass.streams.kafka import producer_config
from aimass.streams.statestore import FileStateStore, KafkaStateStore, open_store, seal, unseal
from aimass.core.files import UnsafeFileError

KEY = b"k" * 32


@pytest.fixture
def store(cfg):
    cfg.kafka.max_record_bytes = 16 * 1024  # several chunks per checkpoint
    s = KafkaStateStore(cfg, KEY)
    yield s
    s.close()


def test_seal_binds_key_group_and_partition() -> None:
    sealed = seal(KEY, "g", 3, b"state", {"t": 7})
    assert unseal(KEY, "g", 3, sealed) == (b"state", {"t": 7})
    for key, group, partition, blob in [(b"x" * 32, "g", 3, sealed), (KEY, "other", 3, sealed), (KEY, "g", 4, sealed),
                                        (KEY, "g", 3, sealed[:-1] + b"X"), (KEY, "g", 3, b"\x80\x04pickle")]:
        with pytest.raises(ValueError):
            unseal(key, group, partition, blob)


def test_newest_checkpoint_wins_across_chunks_and_processes(cfg, store) -> None:
    assert store.load("g", 0) is None
    big = os.urandom(50_000)  # 4 chunks of 16 KiB
    store.save("g", 0, b"first", {"in": 10})
    store.save("g", 0, big, {"in": 20})
    store.save("g", 1, b"other partition", {"in": 5})
    reader = KafkaStateStore(cfg, KEY)  # another replica
    try:
        assert reader.load("g", 0) == (big, {"in": 20})
        assert reader.load("g", 1) == (b"other partition", {"in": 5})
        assert reader.load("other-group", 0) is None
    finally:
        reader.close()


def test_half_written_checkpoint_is_never_loaded(cfg, store) -> None:
    store.save("g", 2, b"complete", {"in": 1})
    # A writer that died after some chunks of a new version, before its manifest.
    sealed = seal(KEY, "g", 2, os.urandom(40_000), {"in": 2})
    producer = Producer(producer_config(cfg))
    for i in range(2):
        producer.produce(store.topic, sealed[i * store.chunk_bytes:(i + 1) * store.chunk_bytes],
                         f"g/2/dead/{i}".encode(), partition=store._partition("g/2"))
    # ... and a manifest whose chunks never arrived.
    producer.produce(store.topic, json.dumps({"version": "lost", "chunks": 3}).encode(), b"g/2",
                     partition=store._partition("g/2"))
    assert producer.flush(10) == 0
    assert store.load("g", 2) == (b"complete", {"in": 1})


def test_forged_checkpoint_is_refused(cfg, store) -> None:
    store.save("g", 3, b"genuine", {"in": 4})
    forger = KafkaStateStore(cfg, b"not the key")
    forger.save("g", 3, b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.", {"in": 99})
    forger.close()
    assert store.load("g", 3) == (b"genuine", {"in": 4})  # the forged newer one is skipped


def test_kafka_store_needs_a_key(cfg, monkeypatch) -> None:
    cfg.state.store = "kafka"
    monkeypatch.delenv(cfg.state.key_env, raising=False)
    with pytest.raises(ConfigError, match=cfg.state.key_env):
        open_store(cfg)


def test_file_store_generates_a_private_key_and_refuses_foreign_files(cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(cfg.state.key_env, raising=False)
    cfg.state.dir = str(tmp_path / "state")
    s = open_store(cfg)
    assert isinstance(s, FileStateStore) and s.load("g", 0) is None
    s.save("g", 0, b"abc", {"t": 1})
    assert open_store(cfg).load("g", 0) == (b"abc", {"t": 1})
    assert (tmp_path / "state" / ".key").stat().st_mode & 0o077 == 0
    s.path("g", 0).write_bytes(seal(b"guessed", "g", 0, b"evil", {"t": 9}))
    assert s.load("g", 0) is None
    (tmp_path / "state" / ".key").chmod(0o666)
    with pytest.raises(UnsafeFileError):
        open_store(cfg)


def test_state_topic_is_declared_in_the_contract(cfg, store) -> None:
    assert store.topic == contract.STATE.name(cfg.kafka.topic_prefix)
    assert store.partitions == cfg.kafka.partitions
