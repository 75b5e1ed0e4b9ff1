"""State that survives restarts and rebalances by replay, not by changelogs.

A stateful agent (clean, window) keeps per-partition state that is a deterministic function of
its input partition, read in order from some restart offset. Two offsets per partition make a
restart exact:

- the restart offset (the consumer group's committed offset, where Faust resumes): the oldest
  input record the state still depends on (``state.live_offset()``);
- the emitted-through offset (committed in the sibling group ``<app id>-<stage>-emitted``):
  every record below it has had its outputs produced.

After any assignment the agent drops its state, Faust seeks to the restart offset, and records
below the emitted-through offset are replayed in *restore* mode: they rebuild the state but emit
nothing. From there on the agent emits exactly what the previous owner would have emitted
(at-least-once: records after the last commit are emitted again, with identical content).
The broker's end offsets and Faust table changelogs are not used (broken on the local broker).

Every output goes through ``send``, which keeps the delivery future of each record (split
under ``kafka.max_record_bytes``). Each commit first flushes the producer and waits for every
delivery the commit covers, then commits the marker, then the restart offset. A failed delivery
(Faust only logs it, and the producer's flush returns anyway) stops the worker without
committing, for good: resending just that record would put it after later records of its
partition (the window stage skips a record older than one it saw), whereas a restart replays
everything after the last commit in order, and downstream drops the identical copies.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Generic, Protocol, TypeVar

import faust
import pyarrow as pa
from confluent_kafka import Consumer, KafkaException, TopicPartition
from faust.types import TP

from aimass.core.config import Config
from aimass.core import contract
from aimass.streams.kafka import LAG, consumer_config

log = logging.getLogger(__name__)


class DeliveryFailed(RuntimeError):
    """An output record was not delivered: nothing past it may be committed."""


class ReplayableState(Protocol):
    def live_offset(self) -> int:
        """Oldest input offset the state depends on; -1 when it depends on none."""


S = TypeVar("S", bound=ReplayableState)


class ReplayedPartitions(Generic[S]):
    """Per-partition state of one agent's input topic, rebuilt by replay after each assignment."""

    def __init__(self, app: faust.App, cfg: Config, topic_name: str, stage: str, new_state: Callable[[], S]):
        self.app = app
        self.topic_name = topic_name
        self.stage = stage
        self.new_state = new_state
        self.max_record_bytes = cfg.kafka.max_record_bytes
        self.states: dict[int, S] = {}
        self._emitted_through: dict[int, int] = {}  # restore mode below this offset
        self._next: dict[int, int] = {}              # last processed offset + 1
        self._committed: dict[int, tuple[int, int]] = {}
        self._sent: list[Awaitable] = []             # delivery futures since the last commit
        self.failed: DeliveryFailed | None = None
        self._lock = asyncio.Lock()
        self._markers = Consumer(consumer_config(cfg, f"{app.conf.id}-{stage}-emitted"))

    def state(self, partition: int) -> S:
        state = self.states.get(partition)
        if state is None:
            state = self.states[partition] = self.new_state()
        return state

    def restoring(self, partition: int, offset: int) -> bool:
        """True while replaying records whose outputs the previous owner already produced."""
        return offset < self._emitted_through.get(partition, -1)

    def processed(self, partition: int, offset: int) -> None:
        self._next[partition] = offset + 1

    async def on_assigned(self, assigned: set[TP]) -> None:
        """Forget all state (Faust seeks every partition back to its restart offset) and load markers."""
        async with self._lock:
            partitions = sorted(tp.partition for tp in assigned if tp.topic == self.topic_name)
            for p in self._committed:
                LAG.remove(self.stage, self.app.conf.id, self.topic_name, str(p))
            self.states.clear()
            self._next.clear()
            self._committed.clear()
            self._emitted_through = await asyncio.get_running_loop().run_in_executor(
                None, self._read_markers, partitions)
            log.info("%s: assigned partitions %s; replaying up to %s before emitting", self.topic_name,
                     partitions, self._emitted_through)

    def _read_markers(self, partitions: list[int]) -> dict[int, int]:
        if not partitions:
            return {}
        found = self._markers.committed([TopicPartition(self.topic_name, p) for p in partitions], timeout=30)
        return {tp.partition: tp.offset for tp in found if tp.offset >= 0}

    async def send(self, topic: faust.TopicT, value: bytes, partition: int, headers: list | None = None) -> None:
        """Send one output record; the next commit waits for its delivery."""
        try:
            self._sent.append(await topic.send(value=value, partition=partition, headers=headers))
        except Exception as exc:  # refused before sending (e.g. larger than the producer allows)
            self._fail([exc])
            raise

    async def send_table(self, topic: faust.TopicT, table: pa.Table, schema: pa.Schema, partition: int) -> None:
        """Send ``table`` as records under ``kafka.max_record_bytes``, in row order."""
        for part in contract.encode_parts(table, schema, self.max_record_bytes):
            await self.send(topic, part.value, partition)

    async def _check_delivered(self, sent: list[Awaitable]) -> None:
        """Wait for the deliveries of ``sent``; ``DeliveryFailed`` (from now on) if one failed."""
        failed = [r for r in await asyncio.gather(*sent, return_exceptions=True) if isinstance(r, BaseException)]
        if failed:
            self._fail(failed)
        if self.failed is not None:
            raise self.failed

    def _fail(self, errors: list[BaseException]) -> None:
        if self.failed is None:
            self.failed = DeliveryFailed(
                f"{self.topic_name}: {len(errors)} output record(s) not delivered ({errors[0]!r}); stopping without "
                f"committing, the input is replayed from the last commit")
            log.error("%s", self.failed)

    async def commit(self) -> None:
        """Flush outputs and check their delivery, then commit emitted-through markers and restart
        offsets of every partition; ``DeliveryFailed`` after a failed delivery."""
        async with self._lock:
            self._export_lag()
            if self.failed is not None:
                raise self.failed
            sent, self._sent = self._sent, []  # every output of the records below the marks
            marks: dict[int, tuple[int, int]] = {}
            for partition, nxt in self._next.items():
                live = self.states[partition].live_offset() if partition in self.states else -1
                restart = nxt if live < 0 else min(live, nxt)
                emitted = max(nxt, self._emitted_through.get(partition, -1))
                if self._committed.get(partition) != (emitted, restart):
                    marks[partition] = (emitted, restart)
            if not marks and not sent:
                return
            await self.app.producer.flush()
            await self._check_delivered(sent)
            if not marks:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(None, lambda: self._markers.commit(
                    offsets=[TopicPartition(self.topic_name, p, e) for p, (e, _) in marks.items()],
                    asynchronous=False))
            except KafkaException as exc:
                log.warning("%s: marker commit failed (will retry): %s", self.topic_name, exc)
                return
            if await self.app.consumer._commit({TP(self.topic_name, p): r for p, (_, r) in marks.items()}):
                self._committed.update(marks)

    def _export_lag(self) -> None:
        """aimass_consumer_lag of the owned partitions: the fetched high watermark minus the committed
        emitted-through offset (the restart offset trails on purpose, to rebuild state)."""
        for p, (emitted, _) in list(self._committed.items()):
            try:
                high = self.app.consumer.highwater(TP(self.topic_name, p))
            except Exception as exc:  # noqa: BLE001 - a metric must never fail a commit (e.g. mid-rebalance)
                log.debug("%s[%d]: no high watermark for the lag metric (%s)", self.topic_name, p, exc)
                continue
            if high is not None and high >= 0:
                LAG.labels(self.stage, self.app.conf.id, self.topic_name, str(p)).set(max(0, high - emitted))

    def install(self, source: faust.TopicT, schema: pa.Schema, stage: str, dead_out: faust.TopicT,
                handle: Callable[[S, int, int, pa.Table, dict, bool], Awaitable[None]],
                on_unreadable: Callable[[], None] = lambda: None) -> None:
        """Register the agent: each record of ``source`` is decoded and passed to
        ``handle(state, partition, offset, table, headers, emit)`` (records that are not ``schema``
        go to the dead-letter topic), plus the commit timer, the assignment hook and a final commit."""
        app = self.app

        @app.agent(source, name=f"{app.conf.id}.{stage}")
        async def agent(stream):
            async for event in stream.events():
                p, offset = event.message.partition, event.message.offset
                emit = not self.restoring(p, offset)
                try:
                    table = contract.decode(event.value, schema)
                except ValueError as exc:
                    if emit:
                        on_unreadable()
                        await self.send(dead_out, contract.encode(unreadable(event.value, str(exc), stage),
                                                                  contract.REJECTS), p)
                else:
                    await handle(self.state(p), p, offset, table, int_headers(event.message.headers), emit)
                self.processed(p, offset)

        app.on_partitions_assigned.connect(lambda sender, assigned, **_: self.on_assigned(assigned))
        app.timer(1.0, name=f"{app.conf.id}.{stage}.commit")(self.commit)
        app.before_stop(self.commit)


def unreadable(value: bytes, error: str, stage: str) -> pa.Table:
    """One REJECTS row for a Kafka record that is not the expected Arrow batch (a bounded prefix of it)."""
    payload, note = contract.payload_excerpt(value)
    row = {name: [None] for name in contract.REJECTS.names}
    row.update(stage=[stage], reason=["bad_record"], detail=[error[:500] + (f"; {note}" if note else "")],
               payload=[payload],
               rejected_ms=[int(time.time() * 1000)])
    return pa.table(row, schema=contract.REJECTS)


def int_headers(headers) -> dict[str, int]:
    """Record headers whose values are integers (watermark bases, source offsets)."""
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    out = {}
    for key, value in items:
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            continue
    return out
