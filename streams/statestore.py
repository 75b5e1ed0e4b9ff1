"""Per-partition checkpoints that move with their partition: ``save(group, partition, data, offsets)``
and ``load(group, partition)``, whatever the state is (the caller turns it into bytes).

A stage that keeps state per input partition (predict, the alerter) saves a partition's state
together with the input offsets it covers, before it commits those offsets, and loads it when
the partition is assigned to it, seeking to the offsets it holds: state and position are one
record, so a new owner resumes exactly where the state stands. Two backends, one sealed format:

- ``KafkaStateStore`` (``state.store = "kafka"``): the compacted topic ``contract.STATE``, so
  replicas on different hosts hand state over with no shared volume. A checkpoint is cut into
  chunks under ``kafka.max_record_bytes`` keyed ``GROUP/PARTITION/VERSION/i``, then a manifest keyed
  ``GROUP/PARTITION`` names VERSION and the chunk count; all go to one store partition in order
  (idempotent producer) and ``save`` returns once every one is acknowledged. A reader takes the
  newest manifest whose chunks are all there and whose seal holds: a checkpoint whose writer
  died half way has no manifest and is never read, and the one before it stays whole (its chunks
  are tombstoned only after the next manifest is acknowledged). ``load`` first appends a fence
  record and reads the store partition up to it, so it sees every checkpoint acknowledged
  before it without trusting high watermarks (the local broker reports wrong ones).
- ``FileStateStore`` (``state.store = "files"``, the single-host default): one file per
  (group, partition), written atomically. The local broker keeps topics in memory and never
  compacts them, so checkpoints in it would grow without bound.

Security: checkpoints are data (predict: NumPy arrays loaded without pickles; the alerter: JSON),
and whoever may write the topic or the directory must still not choose a stage's state. Every
checkpoint is sealed with HMAC-SHA256 under the key in the environment variable ``state.key_env``
and bound to its group and partition; ``load`` checks the seal before a byte is parsed and skips a
checkpoint that fails it (logged as an error). The files store also skips a checkpoint file that
another user owns or that group / others may write. Without that variable the files store
generates a key file (mode 0600, refused if another user may write it); the kafka store refuses to
start, since every replica needs the same key.

Failures: ``save`` raises ``StateStoreError`` when the checkpoint is not durable (the caller must
not commit its offsets then); ``load`` raises it when the store cannot be read.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import struct
import time
import uuid
import zlib
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import quote

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from aimass.core import contract
from aimass.core.config import Config, ConfigError
from aimass.core.files import UnsafeFileError, check_private, private_dir, write_private
from aimass.streams.kafka import consume_available, consumer_config, producer_config

log = logging.getLogger(__name__)

MAGIC = b"AIMS1"
MAC_BYTES = 32
LOAD_TIMEOUT_S = 60.0


class StateStoreError(RuntimeError):
    """The store could not write (or read) a checkpoint; what to check is in the message."""


class Checkpoint(NamedTuple):
    """A partition's state and the next input offset per topic it covers."""

    data: bytes
    offsets: dict[str, int]


class StateStore(Protocol):
    def save(self, group: str, partition: int, data: bytes, offsets: dict[str, int]) -> None: ...
    def load(self, group: str, partition: int) -> Checkpoint | None: ...
    def close(self) -> None: ...


# --- the sealed format (pure) -------------------------------------------------------------

def seal(key: bytes, group: str, partition: int, data: bytes, offsets: dict[str, int]) -> bytes:
    """MAGIC, HMAC-SHA256 over the rest, header length, JSON header (group, partition, offsets), data."""
    header = json.dumps({"group": group, "partition": partition, "offsets": offsets}, sort_keys=True).encode()
    body = struct.pack(">I", len(header)) + header + data
    return MAGIC + hmac.new(key, MAGIC + body, hashlib.sha256).digest() + body


def unseal(key: bytes, group: str, partition: int, sealed: bytes) -> Checkpoint:
    """The checkpoint inside ``sealed``; ``ValueError`` unless the seal holds for this group and partition."""
    if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + MAC_BYTES + 4:
        raise ValueError("not a sealed checkpoint")
    mac, body = sealed[len(MAGIC):len(MAGIC) + MAC_BYTES], sealed[len(MAGIC) + MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, MAGIC + body, hashlib.sha256).digest()):
        raise ValueError("its seal does not match the key (written with another key, or forged)")
    (n,) = struct.unpack(">I", body[:4])
    header = json.loads(body[4:4 + n])
    if header["group"] != group or header["partition"] != partition:
        raise ValueError(f"it belongs to {header['group']}[{header['partition']}]")
    return Checkpoint(body[4 + n:], {t: int(o) for t, o in header["offsets"].items()})


def _refused(where: str, exc: ValueError) -> None:
    log.error("refusing the checkpoint %s: %s; starting that partition empty. Give every replica the same "
              "checkpoint key, and find out who else writes there", where, exc)


# --- files ------------------------------------------------------------------------------

class FileStateStore:
    """Checkpoints as files ``DIR/GROUP/pPARTITION.state`` on one host."""

    def __init__(self, directory: Path, key: bytes):
        self.dir, self.key = private_dir(directory), key  # 0700 also when it lies outside the run dir

    def path(self, group: str, partition: int) -> Path:
        return self.dir / quote(group, safe="") / f"p{partition}.state"

    def save(self, group: str, partition: int, data: bytes, offsets: dict[str, int]) -> None:
        try:
            write_private(self.path(group, partition), seal(self.key, group, partition, data, offsets))
        except OSError as exc:
            raise StateStoreError(f"cannot write checkpoint {self.path(group, partition)}: {exc}") from None

    def load(self, group: str, partition: int) -> Checkpoint | None:
        path = self.path(group, partition)
        if not path.exists():
            return None
        try:
            check_private(path, "checkpoint")
        except UnsafeFileError as exc:
            log.error("%s; starting that partition empty", exc)
            return None
        try:
            return unseal(self.key, group, partition, path.read_bytes())
        except ValueError as exc:
            _refused(str(path), exc)
            return None

    def close(self) -> None:
        pass


def file_key(directory: Path) -> bytes:
    """The generated checkpoint key of a files store (created 0600 on first use)."""
    path = Path(directory) / ".key"
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode())
    check_private(path, "checkpoint key")
    return path.read_bytes().strip()


# --- Kafka --------------------------------------------------------------------------------

class KafkaStateStore:
    """Checkpoints in the compacted topic ``contract.STATE`` (see the module docstring for the layout)."""

    def __init__(self, cfg: Config, key: bytes):
        self.key = key
        self.topic = contract.STATE.name(cfg.kafka.topic_prefix)
        self.chunk_bytes = cfg.kafka.max_record_bytes - contract.RECORD_OVERHEAD
        self.producer = Producer(producer_config(cfg))
        # Reads by assignment only; never joins its group nor commits.
        self.consumer = Consumer(consumer_config(cfg, f"{self.topic}-reader-{uuid.uuid4().hex[:8]}"))
        self.partitions = ensure_topic(cfg, self.topic)
        self.replaced: dict[str, list[str]] = {}  # manifest key -> chunk keys to tombstone after the next save

    def _partition(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.partitions

    def _produce(self, key: str, value: bytes | None, partition: int, on_delivery=None) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key.encode(), partition=partition, on_delivery=on_delivery)
                return
            except BufferError:
                self.producer.poll(0.05)

    def _send(self, records: list[tuple[str, bytes]], partition: int) -> list[int]:
        """Produce ``records`` in order and wait for them; their offsets, or StateStoreError."""
        offsets: dict[int, int] = {}
        errors: list[str] = []

        def delivered(i: int):
            return lambda err, msg: errors.append(str(err)) if err else offsets.__setitem__(i, msg.offset())

        for i, (key, value) in enumerate(records):
            self._produce(key, value, partition, delivered(i))
        left = self.producer.flush(30)
        if left or errors or len(offsets) < len(records):
            raise StateStoreError(f"the broker did not acknowledge a checkpoint in {self.topic}[{partition}] "
                                  f"({left} unacknowledged, errors: {errors[:3]}); check the broker")
        return [offsets[i] for i in range(len(records))]

    def save(self, group: str, partition: int, data: bytes, offsets: dict[str, int]) -> None:
        key = f"{group}/{partition}"
        sealed = seal(self.key, group, partition, data, offsets)
        version = uuid.uuid4().hex
        chunks = [f"{key}/{version}/{i}" for i in range(max(1, -(-len(sealed) // self.chunk_bytes)))]
        manifest = json.dumps({"version": version, "chunks": len(chunks)}).encode()
        records = [(c, sealed[i * self.chunk_bytes:(i + 1) * self.chunk_bytes]) for i, c in enumerate(chunks)]
        self._send([*records, (key, manifest)], self._partition(key))
        for old in self.replaced.pop(key, []):  # best effort: compaction then drops the old chunks
            self._produce(old, None, self._partition(key))
        self.replaced[key] = chunks

    def load(self, group: str, partition: int) -> Checkpoint | None:
        key = f"{group}/{partition}"
        part = self._partition(key)
        (fence,) = self._send([(f"fence/{key}", b"f")], part)
        manifests, chunks = self._read_until(key, part, fence)
        for m in reversed(manifests):  # newest first; an incomplete or refused one falls back to the one before
            body = [chunks.get(f"{key}/{m['version']}/{i}") for i in range(m["chunks"])]
            if None in body:
                log.warning("checkpoint %s version %s misses chunks; trying the one before", key, m["version"])
                continue
            try:
                return unseal(self.key, group, partition, b"".join(body))
            except ValueError as exc:
                _refused(f"{self.topic}/{key} version {m['version']}", exc)
        return None

    def _read_until(self, key: str, part: int, fence: int) -> tuple[list[dict], dict[str, bytes]]:
        """Manifests of ``key`` in order, and the chunks of the last two of them, read up to ``fence``."""
        self.consumer.assign([TopicPartition(self.topic, part, OFFSET_BEGINNING)])
        manifests: list[dict] = []
        chunks: dict[str, bytes] = {}
        prefix = key + "/"
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        try:
            while True:
                for m in consume_available(self.consumer, 1000, 0.5):
                    if m.error():
                        if m.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("reading %s[%d]: %s", self.topic, part, m.error())
                        continue
                    if m.offset() >= fence:
                        return manifests, chunks
                    k = (m.key() or b"").decode(errors="replace")
                    if k == key and m.value():
                        manifests.append(json.loads(m.value()))
                        keep = {x["version"] for x in manifests[-2:]}
                        chunks = {c: v for c, v in chunks.items() if c.split("/")[-2] in keep}
                    elif k.startswith(prefix):
                        if m.value() is None:
                            chunks.pop(k, None)
                        else:
                            chunks[k] = m.value()
                if time.monotonic() > deadline:
                    raise StateStoreError(f"could not read {self.topic}[{part}] up to offset {fence} in "
                                          f"{LOAD_TIMEOUT_S:.0f} s; check the broker")
        finally:
            self.consumer.unassign()

    def close(self) -> None:
        self.producer.flush(10)
        self.consumer.close()


def ensure_topic(cfg: Config, topic: str) -> int:
    """Create the compacted state topic if it is missing; its partition count."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from aimass.core.stack import kafka_client_config

    admin = AdminClient(kafka_client_config(cfg))
    if topic not in admin.list_topics(timeout=10).topics:
        new = NewTopic(topic, cfg.kafka.partitions, cfg.kafka.replication,
                       config={"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"})
        for name, fut in admin.create_topics([new], operation_timeout=10).items():
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - another replica may have created it first
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise StateStoreError(f"cannot create the state topic {name}: {exc}; create it compacted "
                                          f"with {cfg.kafka.partitions} partitions") from None
    deadline = time.monotonic() + 10
    while True:
        meta = admin.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return len(meta.partitions)
        if time.monotonic() > deadline:
            raise StateStoreError(f"the state topic {topic} has no partitions after creation; check the broker")
        time.sleep(0.1)


def open_store(cfg: Config) -> StateStore:
    """The store ``state.store`` names, with its checkpoint key."""
    s = cfg.state
    key = cfg.secret(s.key_env).encode()
    if s.store == "kafka":
        if not key:
            raise ConfigError(f"state.store = kafka needs a checkpoint key: set {s.key_env} to a long random "
                              "secret, the same for every replica (e.g. `openssl rand -hex 32`)")
        return KafkaStateStore(cfg, key)
    directory = Path(s.dir) if s.dir else cfg.run_dir / "state"
    return FileStateStore(directory, key or file_key(directory))
