"""`aimass sink`: store every result topic in ClickHouse (embedded chDB or a server).

The sink consumes the stored topics (``aimass.core.tables.TABLES``), buffers the decoded Arrow
batches per table, and flushes a table when it holds ``clickhouse.flush_rows`` rows or its
oldest record waited ``clickhouse.flush_ms`` (``side_flush_factor`` times that for the tables
other than readings: every insert has a fixed CPU cost, ~20-30 ms in chDB with its merges, and
those tables get few rows): one INSERT per table, then that table's Kafka offsets are committed.
Nothing is lost:

- ClickHouse down (a retryable error): back off and retry the same batch, offsets kept.
- A record that can never be inserted (or decoded) goes to the dead-letter topic with
  stage="sink", the error, and the original record bytes as payload (at most their first
  ``contract.DEAD_LETTER_PAYLOAD_BYTES``, then their size and SHA-256 in the detail), written
  with ``aimass.streams.kafka.TableProducer`` (records under ``kafka.max_record_bytes``; one the
  broker refuses for good is dead-lettered once more, or dropped and counted, never retried).
- Killed mid-batch: before inserting, the batch's offset ranges are written to a journal;
  after a restart the same ranges are re-read and re-inserted with the same insert
  deduplication tokens, so ClickHouse skips what already landed (rollups included). The
  journal is cleared only once the offsets are committed. A commit the broker refuses (the group
  moved on while the broker was away longer than the session) leaves it: no new batch is
  flushed until that commit goes through on a retry, or a rebalance hands the journal to the
  re-read path, so the records read again go in under the same tokens.
- Clean records the clean stage emitted twice (its restart replays raw records) are recognised
  by their source position (headers ``raw_offset``, ``raw_part``; not above the highest stored
  from that partition) and stored empty, so a worker's restart stores no reading twice. On each
  assignment the highest position is read back from the last ``POSITION_LOOKBACK`` records below
  the committed offset (all stored), so this holds when the sink restarted or the partition moved
  to another sink too; unreadable, copies are stored (no loss) and FINAL hides them.
  Tables are also ReplacingMergeTree on the row identity: ``FINAL`` hides any duplicate.

In chDB mode the sink owns the store and serves read-only SQL on 127.0.0.1
(``clickhouse.query_port``) for `aimass query` and the demo.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import Counter, Histogram, start_http_server

from aimass.agents.clean import source_position
from aimass.core.clickhouse import (ChdbStore, QueryLimits, QueryServer, Store, StoreError, ensure_query_token,
                                   fill_nulls, open_store)
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.files import write_private
from aimass.core.procs import StackError, port_in_use
from aimass.core import contract, tables
from aimass.streams.kafka import ConsumerLag, TableProducer, consumer_config, producer_config
from aimass.streams.replay import int_headers
from aimass.core.tables import LEGACY, TableSpec

log = logging.getLogger("aimass.sink")

ROWS = Counter("aimass_sink_rows_total", "Rows stored, per table", ["table"])
INSERT_SECONDS = Histogram("aimass_sink_insert_seconds", "Duration of one table insert",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
RETRIES = Counter("aimass_sink_retries_total", "Batch flushes retried after a retryable store error")
DEAD_LETTERS = Counter("aimass_sink_dead_letter_total", "Kafka records sent to the dead-letter topic by the sink")
REPLAYED = Counter("aimass_sink_replayed_clean_records_total",
                   "Clean records skipped as copies the clean stage emitted again after its restart")


# Test-only defects that prove the drills' accounting can fail (tests/test_accounting.py): off
# unless the environment names one; each is applied once, to the first block of its table.
TEST_FAULT_ENV = "AIMASS_TEST_FAULT"
TEST_FAULTS = {"drop_one_reading": "readings", "duplicate_one_reading": "readings", "drop_one_alarm": "alerts"}


class Stopping(Exception):
    """The sink was asked to stop while waiting to retry; the batch stays uncommitted."""


# --- pure conversions -----------------------------------------------------------------

TOPIC_TABLE: dict[str, TableSpec] = tables.table_for_topic()
MAIN_TABLE = "readings"  # flushed every flush_ms; the others every side_flush_factor x flush_ms


@dataclass
class Record:
    """One consumed Kafka record: where it came from and its decoded rows."""

    topic: str          # contract topic suffix
    partition: int
    offset: int
    value: bytes
    rows: pa.Table

    @property
    def tp(self) -> tuple[str, int]:
        return self.topic, self.partition

    @property
    def table(self) -> str:
        return TOPIC_TABLE[self.topic].name


def row_ids(topic: str, partition: int, offset: int, n: int) -> np.ndarray:
    """Stable 64-bit ids of a record's rows: the same on every re-read of that record."""
    base = int.from_bytes(hashlib.blake2b(f"{topic}/{partition}/{offset}".encode(), digest_size=8).digest(), "little")
    return np.uint64(base) + np.arange(n, dtype=np.uint64)


def _ranks(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """Each string's rank among the column's distinct values (byte order), and how many there are."""
    encoded = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    rank = np.empty(len(encoded.dictionary), np.int64)
    rank[pc.array_sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(rank))
    return rank[encoded.indices.to_numpy()], len(rank)


def identity_order(data: pa.Table, identity: tuple[str, ...]) -> np.ndarray | None:
    """The row order that sorts ``data`` by ``identity`` (string fields, then one int64 field), or None
    where the identity has another shape or its packed key would not fit 64 bits.

    A block already sorted by the table's ORDER BY skips ClickHouse's own sort, which compares
    strings row by row (measured ~3x the cost of this: ranks of the distinct strings, one packed
    integer key per row, one argsort).
    """
    *strings, last = identity
    fields = {f.name: f.type for f in data.schema}
    if not strings or any(not pa.types.is_string(fields.get(s, pa.null())) for s in strings) \
            or not pa.types.is_int64(fields.get(last, pa.null())) or data.num_rows < 2:
        return None
    series, count = np.zeros(data.num_rows, np.int64), 1
    for name in strings:
        rank, distinct = _ranks(data.column(name))
        series, count = series * distinct + rank, count * distinct
    times = data.column(last).to_numpy()
    span = int(times.max()) - int(times.min())
    if count >= 2 ** 31 or span >= 2 ** 32:
        return None
    return np.argsort((series << 32) | (times - times.min()), kind="stable")


def to_store_table(spec: TableSpec, records: list[Record], dialect: str, sort: bool = False) -> pa.Table:
    """The insert block for ``spec`` from records of its contract schema, in record order (``sort``: in
    the table's identity order where ``identity_order`` can compute it)."""
    data = fill_nulls(pa.concat_tables([r.rows for r in records]))
    order = identity_order(data, spec.identity) if sort else None
    if order is not None:
        data = data.take(order)
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for f in spec.schema:
        col = data.column(f.name)
        if tables.is_time_field(f) and dialect != LEGACY:
            columns[tables.column_name(f.name)] = col.cast(pa.timestamp("ms", tz="UTC"))
        elif tables.is_time_field(f):
            columns[f.name] = col
        else:
            columns[f.name] = col.cast(pa.uint8()) if dialect == LEGACY and pa.types.is_boolean(f.type) else col
    if spec.with_row_id:
        columns["topic"] = pa.array(np.concatenate([np.full(r.rows.num_rows, r.topic, dtype=object) for r in records]),
                                    pa.string())
        columns["row_id"] = pa.array(np.concatenate(
            [row_ids(r.topic, r.partition, r.offset, r.rows.num_rows) for r in records]), pa.uint64())
    return pa.table(columns)


def dead_letter_rows(records: list[Record], reason: str, errors: list[str], now_ms: int) -> pa.Table:
    """REJECTS rows (stage "sink") carrying (a bounded prefix of) each failed record's bytes as payload."""
    n = len(records)
    excerpts = [contract.payload_excerpt(r.value) for r in records]
    return pa.table({
        "stage": ["sink"] * n,
        "reason": [reason] * n,
        "detail": [f"{r.topic}[{r.partition}]@{r.offset}: {e}" + (f"; {note}" if note else "")
                   for r, e, (_, note) in zip(records, errors, excerpts)],
        "mqtt_topic": [""] * n,
        "payload": pa.array([payload for payload, _ in excerpts], pa.binary()),
        "tenant": [""] * n, "device_id": [""] * n, "metric": [""] * n,
        "ts_ms": pa.array([0] * n, pa.int64()),
        "value": pa.array([float("nan")] * n),
        "unit": [""] * n,
        "received_ms": pa.array([0] * n, pa.int64()),
        "rejected_ms": pa.array([now_ms] * n, pa.int64()),
    }, schema=contract.REJECTS)


# --- the journal of the batch being inserted ------------------------------------------

@dataclass
class Manifest:
    """A batch's id (the dedup token prefix) and its offset range per (topic, partition)."""

    batch_id: str
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"batch_id": self.batch_id,
                           "ranges": [[t, p, a, b] for (t, p), (a, b) in sorted(self.ranges.items())]})

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        return cls(d["batch_id"], {(t, p): (a, b) for t, p, a, b in d["ranges"]})


class Journal:
    """The pending batch's manifest on disk: written before the insert, removed after the commit."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Manifest | None:
        try:
            return Manifest.from_json(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable sink journal %s: %s", self.path, exc)
            return None

    def save(self, manifest: Manifest) -> None:
        write_private(self.path, manifest.to_json().encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# --- the batch buffer -----------------------------------------------------------------

@dataclass
class Batch:
    """Records waiting to be stored, and records that could not be decoded; rows and age per table."""

    records: list[Record] = field(default_factory=list)
    undecodable: list[tuple[Record, str]] = field(default_factory=list)
    rows: int = 0
    table_rows: dict[str, int] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)  # table -> when its first record arrived

    def add(self, record: Record) -> None:
        self.records.append(record)
        self._count(record, record.rows.num_rows)

    def add_undecodable(self, record: Record, error: str) -> None:
        self.undecodable.append((record, error))
        self._count(record, 0)

    def _count(self, record: Record, rows: int) -> None:
        self.started.setdefault(record.table, time.monotonic())
        self.table_rows[record.table] = self.table_rows.get(record.table, 0) + rows
        self.rows += rows

    def __bool__(self) -> bool:
        return bool(self.records or self.undecodable)

    def due(self, now: float, flush_rows: int, max_age_s: dict[str, float]) -> set[str]:
        """Tables holding ``flush_rows`` rows or older than their maximum age."""
        return {t for t, since in self.started.items()
                if self.table_rows[t] >= flush_rows or now - since >= max_age_s[t]}

    def split(self, names: set[str]) -> tuple["Batch", "Batch"]:
        """(the records of tables ``names``, the others), each table keeping its age."""
        taken, kept = Batch(), Batch()
        for r in self.records:
            (taken if r.table in names else kept).add(r)
        for r, e in self.undecodable:
            (taken if r.table in names else kept).add_undecodable(r, e)
        for b in (taken, kept):
            b.started = {t: self.started[t] for t in b.started}
        return taken, kept

    def manifest(self, batch_id: str) -> Manifest:
        m = Manifest(batch_id)
        for r in [*self.records, *(u for u, _ in self.undecodable)]:
            lo, hi = m.ranges.get(r.tp, (r.offset, r.offset))
            m.ranges[r.tp] = (min(lo, r.offset), max(hi, r.offset))
        return m

    def by_table(self) -> dict[str, list[Record]]:
        """Records per table, ordered by (topic, partition, offset) so a re-read builds the same blocks."""
        out: dict[str, list[Record]] = {}
        for r in sorted(self.records, key=lambda r: (r.topic, r.partition, r.offset)):
            out.setdefault(r.table, []).append(r)
        return out


# --- the sink -------------------------------------------------------------------------

POSITION_LOOKBACK = 16  # clean records read back from the committed offset on assignment (whole records: keep it small)


def record_position(msg) -> int | None:
    """A clean record's source position (None: a clock tick, or a producer that sets none)."""
    return source_position(int_headers(msg.headers()))


def stored_positions(cfg: Config, topic: str, committed: dict[int, int], lookback: int = POSITION_LOOKBACK,
                     timeout_s: float = 10.0) -> dict[int, int]:
    """Per partition of ``topic``, the highest source position among the ``lookback`` records below
    its ``committed`` offset: every one of them is stored, so a later record at or below it is a copy."""
    from confluent_kafka import Consumer, TopicPartition

    ends = {p: o for p, o in committed.items() if o > 0}
    if not ends:
        return {}
    reader = Consumer(consumer_config(cfg, f"{cfg.clickhouse.group_id}-positions"))
    found: dict[int, int] = {}
    try:
        reader.assign([TopicPartition(topic, p, max(0, o - lookback)) for p, o in ends.items()])
        pending, deadline = set(ends), time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            msg = reader.poll(0.2)
            if msg is None or msg.error() or msg.partition() not in pending:
                continue
            if msg.offset() < ends[msg.partition()] and (position := record_position(msg)) is not None:
                found[msg.partition()] = max(found.get(msg.partition(), -1), position)
            if msg.offset() >= ends[msg.partition()] - 1:
                pending.discard(msg.partition())
        if pending:
            log.warning("could not read back the stored source positions of %s partitions %s within %.0fs; "
                        "clean records a restarted worker emits again may be stored twice (FINAL hides them)",
                        topic, sorted(pending), timeout_s)
    finally:
        reader.close()
    return found


class Sink:
    """Consume, buffer, insert, then commit; see the module docstring for the guarantees."""

    presort = True  # blocks in identity order (``identity_order``); perf/bench_sink.py's baseline turns it off

    def __init__(self, cfg: Config, store: Store, consumer, producer, journal: Journal):
        self.cfg = cfg
        self.store = store
        self.consumer = consumer
        self.producer = producer
        self.out = TableProducer(cfg, "sink", producer)
        self.journal = journal
        self.prefix = cfg.kafka.topic_prefix
        side_s = cfg.clickhouse.flush_ms * cfg.clickhouse.side_flush_factor / 1000
        self.max_age_s = {spec.name: side_s for spec in tables.TABLES} | {MAIN_TABLE: cfg.clickhouse.flush_ms / 1000}
        self.dead_letter_topic = contract.DEAD_LETTER.name(self.prefix)
        self.stopping = threading.Event()
        self.lag = ConsumerLag("sink", cfg.clickhouse.group_id)
        self.batch = Batch()
        self.replay: Manifest | None = journal.load()   # a batch a killed sink may have half-inserted
        self.replay_batch = Batch()
        self.replay_seen: set[tuple[str, int]] = set()
        self.replay_fresh = False       # ranges were given up: insert under a new id
        self.replay_deadline = float("inf")  # set when partitions are assigned
        self.assigned: set[tuple[str, int]] = set()
        self.clean_position: dict[int, int] = {}  # per clean partition: the highest source position taken
        self.uncommitted: Manifest | None = None  # stored, but the broker refused its offsets
        self.stored_rows = 0
        self.test_fault = os.environ.get(TEST_FAULT_ENV, "")
        if self.test_fault:
            log.warning("%s=%s: this sink corrupts what it stores (tests only)", TEST_FAULT_ENV, self.test_fault)

    # Kafka topic name <-> contract suffix
    def _suffix(self, name: str) -> str:
        return name[len(self.prefix) + 1:]

    def topics(self) -> list[str]:
        return [t.name(self.prefix) for t in tables.stored_topics()]

    # --- consuming --------------------------------------------------------------------

    def run(self) -> None:
        """Consume until ``stopping`` is set, then flush and commit what is buffered."""
        from confluent_kafka import KafkaException

        self.consumer.subscribe(self.topics(), on_assign=self._on_assign, on_revoke=self._on_revoke)
        flush_s = self.cfg.clickhouse.flush_ms / 1000
        next_lag = time.monotonic()
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= next_lag:
                    self.lag.update(self.consumer)
                    next_lag = time.monotonic() + 1.0
                for msg in self.consumer.consume(num_messages=1000, timeout=min(0.2, flush_s)):
                    if msg.error():
                        log.warning("kafka: %s", msg.error())
                        continue
                    self._add(msg)
                    if self.replay is None and self.batch.rows >= self.cfg.clickhouse.flush_rows:
                        self._flush_due()
                if self.replay is not None:
                    self._expire_replay_ranges()
                else:
                    self._flush_due()
            if self.batch and self.replay is None:
                self.flush(self.batch, retry=False)
                self.batch = Batch()
        except (Stopping, StoreError) as exc:
            log.info("stopped with an uncommitted batch (%s): it is re-read on the next start", exc or "stopping")
        except KafkaException as exc:
            raise StackError(f"kafka consumer failed: {exc}") from None

    def _flush_due(self) -> None:
        """Flush the tables that are full or old enough; the others stay buffered."""
        if self.uncommitted is not None:  # its journal must not be replaced: retry its commit first
            if not self._commit(self.uncommitted):
                return
            self.uncommitted = None
            self.journal.clear()
        due = self.batch.due(time.monotonic(), self.cfg.clickhouse.flush_rows, self.max_age_s)
        if due:
            ready, self.batch = self.batch.split(due)
            self.flush(ready)

    def _add(self, msg) -> None:
        suffix = self._suffix(msg.topic())
        value = msg.value() or b""
        record = Record(suffix, msg.partition(), msg.offset(), value, contract.empty(contract.READINGS))
        error = ""
        try:
            record.rows = contract.decode(value, TOPIC_TABLE[suffix].schema)
        except ValueError as exc:
            error = str(exc)
        if suffix == contract.CLEAN.suffix and self._emitted_before(msg):
            REPLAYED.inc()
            record.rows = record.rows.slice(0, 0)  # kept in the batch: its offset is committed with it
        target = self._target(record)
        if error:
            target.add_undecodable(record, error)
        else:
            target.add(record)
        if self.replay is not None:
            self._check_replay_done()

    def _emitted_before(self, msg) -> bool:
        """Whether a clean record is a copy of one taken already (its source position is not new)."""
        position = record_position(msg)
        if position is None:  # a clock tick, or a record of a producer that sets no position
            return False
        if position <= self.clean_position.get(msg.partition(), -1):
            return True
        self.clean_position[msg.partition()] = position
        return False

    # --- re-inserting a batch a killed sink may have half-stored ----------------------
    #
    # The journal names the batch's offset ranges. After a restart the sink collects exactly
    # those records again and inserts them under the same batch id, so ClickHouse drops the
    # blocks it already has (insert_deduplication_token). Until then nothing else is flushed:
    # committing later offsets first could skip the replayed ones. Ranges of partitions this
    # sink does not get back within a grace period are given up, and the rest is inserted
    # under a NEW id (no loss; duplicates, if any, are hidden by ReplacingMergeTree FINAL).

    def _target(self, record: Record) -> Batch:
        """The replay batch for records inside the journal's ranges, else the normal batch."""
        if self.replay is None or record.tp not in self.replay.ranges:
            return self.batch
        first, last = self.replay.ranges[record.tp]
        if record.offset < first:  # older than the journal says: it cannot be trusted
            log.warning("sink journal does not match %s[%d]@%d; storing it as a new batch", *record.tp, record.offset)
            for r in self.replay_batch.records:
                self.batch.add(r)
            for r, e in self.replay_batch.undecodable:
                self.batch.add_undecodable(r, e)
            self._reset_replay()
            return self.batch
        if record.offset >= last:
            self.replay_seen.add(record.tp)
        return self.replay_batch if record.offset <= last else self.batch

    def _check_replay_done(self) -> None:
        if self.replay is None or not self.replay_seen >= set(self.replay.ranges):
            return
        batch_id = uuid.uuid4().hex if self.replay_fresh else self.replay.batch_id
        log.info("re-inserting journaled batch %s (%d rows) as %s", self.replay.batch_id, self.replay_batch.rows,
                 batch_id)
        self.flush(self.replay_batch, batch_id=batch_id)
        self._reset_replay()

    def _reset_replay(self) -> None:
        self.replay, self.replay_batch, self.replay_seen, self.replay_fresh = None, Batch(), set(), False

    def _expire_replay_ranges(self) -> None:
        """Give up journal ranges of partitions not assigned back within the grace period."""
        if self.replay is None or time.monotonic() < self.replay_deadline:
            return
        missing = set(self.replay.ranges) - self.assigned
        if missing:
            log.warning("partitions %s of journaled batch %s went to another consumer; not waiting for them",
                        sorted(missing), self.replay.batch_id)
            for tp in missing:
                del self.replay.ranges[tp]
            self.replay_fresh = True
        self._check_replay_done()

    def _on_assign(self, consumer, partitions) -> None:
        from confluent_kafka import TopicPartition

        self.assigned = {(self._suffix(p.topic), p.partition) for p in partitions}
        self._read_clean_positions(consumer, [p for p in partitions if self._suffix(p.topic) == contract.CLEAN.suffix])
        if self.replay is None:
            return

        wanted = [TopicPartition(f"{self.prefix}.{t}", p) for (t, p) in self.replay.ranges if (t, p) in self.assigned]
        committed = consumer.committed(wanted, timeout=10) if wanted else []
        if any(tp.offset > self.replay.ranges[(self._suffix(tp.topic), tp.partition)][1] for tp in committed):
            log.info("sink journal %s was already committed", self.replay.batch_id)
            self._reset_replay()
            self.journal.clear()
            return
        # A killed sink stays a group member until its session times out: wait for its partitions.
        self.replay_deadline = time.monotonic() + 3 * self.cfg.kafka.session_timeout_ms / 1000
        log.info("sink journal %s: re-reading %d partition range(s)", self.replay.batch_id, len(self.replay.ranges))

    def _read_clean_positions(self, consumer, partitions: list) -> None:
        """Take the highest source position stored from each assigned clean partition (read back)."""
        if not partitions:
            return
        from confluent_kafka import KafkaException

        try:
            committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
            found = stored_positions(self.cfg, partitions[0].topic, committed)
        except KafkaException as exc:
            log.warning("could not read the committed clean offsets (%s); clean records a restarted worker "
                        "emits again may be stored twice (FINAL hides them)", exc)
            return
        for partition, position in found.items():
            self.clean_position[partition] = max(self.clean_position.get(partition, -1), position)

    def _on_revoke(self, consumer, partitions) -> None:
        """Store what is buffered before giving the partitions away, else drop it: it is re-read.

        A batch whose journal still waits (a killed sink's, or one whose commit the broker refused)
        is collected again after the rebalance and re-inserted under its own tokens."""
        self.assigned = set()
        self.lag.revoked(partitions)
        if self.replay is None and self.uncommitted is None and self.batch:
            try:
                self.flush(self.batch, retry=False)
            except (StoreError, Stopping) as exc:
                log.warning("could not store the batch before a rebalance (%s); it will be re-read", exc)
                self.replay = self.journal.load()
        if self.uncommitted is not None:
            self.replay, self.uncommitted = self.uncommitted, None
        if self.replay is not None:  # positions go back to the committed offsets: collect again
            self.replay_batch, self.replay_seen = Batch(), set()
        self.batch = Batch()

    # --- storing ----------------------------------------------------------------------

    def flush(self, batch: Batch, batch_id: str | None = None, retry: bool = True) -> None:
        """Insert every table of ``batch``, dead-letter what cannot be stored, commit the offsets.

        Retryable store errors are retried with backoff until stopped (then ``Stopping``); with
        ``retry=False`` the error is raised. Either way the offsets stay uncommitted.
        """
        manifest = batch.manifest(batch_id or uuid.uuid4().hex)
        self.journal.save(manifest)
        delay = self.cfg.clickhouse.retry_initial_s
        while True:
            try:
                self._store(batch, manifest.batch_id)
                break
            except StoreError as exc:
                if not retry:
                    raise
                RETRIES.inc()
                log.warning("store unavailable (%s); retrying in %.1fs, offsets kept", exc, delay)
                if self.stopping.wait(delay):
                    raise Stopping() from None
                delay = min(delay * 2, self.cfg.clickhouse.retry_max_s)
        if self._commit(manifest):
            self.journal.clear()
        else:
            self.uncommitted = manifest

    def _store(self, batch: Batch, batch_id: str) -> None:
        failed: list[Record] = [r for r, _ in batch.undecodable]
        errors: list[str] = [e for _, e in batch.undecodable]
        for name, records in batch.by_table().items():
            spec = tables.TABLE_BY_NAME[name]
            try:
                self._insert(spec, records, f"{batch_id}-{name}")
            except StoreError as exc:
                if exc.retryable:
                    raise
                log.error("insert into %s failed permanently (%s); isolating bad records", name, exc)
                for r in records:  # find the records that cannot be stored, keep the others
                    try:
                        self._insert(spec, [r], f"{batch_id}-{name}-{r.topic}-{r.partition}-{r.offset}")
                    except StoreError as one:
                        if one.retryable:
                            raise
                        failed.append(r)
                        errors.append(f"insert into {name}: {one}")
        self._dead_letter(failed, errors)

    def _insert(self, spec: TableSpec, records: list[Record], token: str) -> None:
        try:
            data = to_store_table(spec, records, self.store.dialect, sort=self.presort)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise StoreError(f"cannot convert rows for {spec.name}: {exc}", retryable=False) from None
        if self.test_fault and TEST_FAULTS.get(self.test_fault) == spec.name:
            data = self._inject_test_fault(data, token)
        started = time.perf_counter()
        self.store.insert(spec.name, data, token)
        INSERT_SECONDS.observe(time.perf_counter() - started)
        ROWS.labels(spec.name).inc(data.num_rows)
        self.stored_rows += data.num_rows

    def _inject_test_fault(self, data: pa.Table, token: str) -> pa.Table:
        """Drop one row (an alarm: a raise), or insert one row a second time, then never again."""
        rows = [i for i, t in enumerate(data.column("transition").to_pylist()) if t == "raised"] \
            if "transition" in data.column_names else list(range(data.num_rows))
        if not rows:
            return data
        fault, self.test_fault, i = self.test_fault, "", rows[0]
        log.warning("%s=%s: row %s of this block", TEST_FAULT_ENV, fault, data.slice(i, 1).to_pylist()[0])
        if fault == "duplicate_one_reading":
            self.store.insert(MAIN_TABLE, data.slice(i, 1), f"{token}-duplicate")
            return data
        return pa.concat_tables([data.slice(0, i), data.slice(i + 1)])

    def _dead_letter(self, records: list[Record], errors: list[str]) -> None:
        """Produce failed records to the dead-letter topic and wait until the broker has them."""
        keep = [(r, e) for r, e in zip(records, errors) if r.topic != contract.DEAD_LETTER.suffix]
        for r, e in zip(records, errors):
            if r.topic == contract.DEAD_LETTER.suffix:  # re-dead-lettering would loop forever
                log.error("dead-letter record %s[%d]@%d cannot be stored and is skipped: %s",
                          r.topic, r.partition, r.offset, e)
        if not keep:
            return
        from confluent_kafka import KafkaException

        rows = dead_letter_rows([r for r, _ in keep], "insert_failed", [e for _, e in keep], int(time.time() * 1000))
        self.out.produce_to(self.dead_letter_topic, 0, rows, contract.REJECTS)
        try:
            self.out.flush(30)
        except KafkaException as exc:
            raise StoreError(f"dead-letter topic not reachable: {exc}", retryable=True) from None
        DEAD_LETTERS.inc(len(keep))
        log.warning("sent %d record(s) to %s: %s", len(keep), self.dead_letter_topic, keep[0][1])

    def _commit(self, manifest: Manifest) -> bool:
        """Commit the batch's offsets; False when the broker refused (the journal then stays)."""
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [TopicPartition(f"{self.prefix}.{t}", p, last + 1) for (t, p), (_, last) in manifest.ranges.items()]
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.lag.committed(offsets)
            log.debug("batch %s committed: %s", manifest.batch_id,
                      ", ".join(f"{tp.topic}[{tp.partition}]={tp.offset}" for tp in offsets))
            return True
        except KafkaException as exc:  # partitions moved: re-read after the rebalance, under the same tokens
            log.warning("offset commit of batch %s failed (%s); its journal stays, so the records re-read "
                        "after the rebalance are inserted under the same tokens", manifest.batch_id, exc)
            return False


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flush-rows", type=int, help="override clickhouse.flush_rows (rows per insert)")
    p.add_argument("--flush-ms", type=int, help="override clickhouse.flush_ms (max buffering time)")
    p.add_argument("--no-migrate", action="store_true", help="do not create/upgrade the schema at start")
    p.epilog = ("flushing, per table: at clickhouse.flush_rows rows, else readings after clickhouse.flush_ms and the\n"
                "  other tables (windows, predictions, alerts, rejects ...) after clickhouse.side_flush_factor x flush_ms\n"
                "stores:\n"
                "  clickhouse.url empty: embedded chDB under <run dir>/chdb; the sink then serves read-only\n"
                "    SQL on 127.0.0.1:clickhouse.query_port for `aimass query` and the demo (bearer token from\n"
                "    $AIMASS_QUERY_TOKEN, else generated into <run dir>/query-token, mode 0600)\n"
                "  clickhouse://user:password@host:9000/db: a ClickHouse server over the native protocol\n"
                "    (password from $AIMASS_CLICKHOUSE_PASSWORD when not in the URL; TLS: clickhouse.secure)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from confluent_kafka import Consumer, Producer

    ch = cfg.clickhouse
    ch.flush_rows = args.flush_rows or ch.flush_rows
    ch.flush_ms = args.flush_ms or ch.flush_ms
    store = open_store(cfg)
    if not args.no_migrate:
        for change in migrate(store, cfg):
            log.info("schema: %s", change)
    query_server = None
    if isinstance(store, ChdbStore) and ch.query_port:
        if port_in_use(ch.query_port):
            raise StackError(f"clickhouse.query_port {ch.query_port} is in use (another sink?): stop it or set "
                             f"AIMASS_CLICKHOUSE_QUERY_PORT")
        query_server = QueryServer(store, ch.query_port, ensure_query_token(cfg), QueryLimits.of(cfg)).start()
    if ch.metrics_port:
        start_http_server(ch.metrics_port, addr=cfg.run.metrics_host)
    # A store outage can outlast the default 5 min poll interval: stay in the group while retrying.
    consumer = Consumer(consumer_config(cfg, ch.group_id, **{"max.poll.interval.ms": 86_400_000}))
    producer = Producer(producer_config(cfg))
    sink = Sink(cfg, store, consumer, producer, Journal(cfg.run_dir / "sink" / f"{ch.group_id}.journal.json"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sink.stopping.set())
    where = ch.url.split("@")[-1] if ch.url else f"chDB {store.path}"
    log.info("sink: %d topics -> %s (%s), flush %d rows / %d ms%s", len(sink.topics()), where, store.dialect,
             ch.flush_rows, ch.flush_ms, f", SQL on 127.0.0.1:{query_server.port}" if query_server else "")
    try:
        sink.run()
    finally:
        consumer.close()
        producer.flush(10)
        if query_server:
            query_server.stop()
        store.close()
    log.info("sink stopped after storing %d rows", sink.stored_rows)
    return 0
