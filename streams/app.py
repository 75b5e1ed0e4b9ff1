"""The Faust application: one app per stage process, configured for the local broker or a cluster.

Each stage (``worker`` for clean + window, ``predict``, ...) runs its own Faust app with its
own consumer group id, so stages scale and restart independently. Topics carry raw bytes:
each value is one Arrow IPC micro-batch from ``aimass.core.contract``.
"""
from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path
from typing import Awaitable, Callable

import faust

from aimass.core.config import Config
from aimass.core import contract

CRASH_EXIT_S = 20.0  # a crashed stage's shutdown takes ~1 s; past this it hangs and the process exits anyway


class StageApp(faust.App):
    """A Faust app that runs ``before_stop`` hooks (final flush + commit) while its consumer still runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._before_stop: list[Callable[[], Awaitable[None]]] = []

    def before_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        self._before_stop.append(hook)

    async def on_stop(self) -> None:
        for hook in self._before_stop:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - stopping must go on; replay covers what was not committed
                logging.getLogger(__name__).exception("stop hook %r failed", hook)
        await super().on_stop()

    async def crash(self, reason: BaseException) -> None:
        """Crash as Faust does, and exit the process if that shutdown hangs (seen after a send the
        broker refused while the worker replayed): a stage neither running nor gone is never restarted."""
        timer = threading.Timer(CRASH_EXIT_S, _exit_after_hung_crash, (reason,))
        timer.daemon = True
        timer.start()
        await super().crash(reason)


def _exit_after_hung_crash(reason: BaseException) -> None:
    logging.getLogger(__name__).critical("crashed (%r) and still not stopped after %.0f s: exiting", reason,
                                         CRASH_EXIT_S)
    os._exit(70)


def make_app(cfg: Config, stage: str, web_port: int | None = None) -> faust.App:
    """A Faust app for ``stage``: at-least-once, local-broker-safe timeouts (docs/infrastructure.md)."""
    k = cfg.kafka
    _cap_fetch_wait(k.fetch_max_wait_ms)
    brokers = ";".join(f"kafka://{b}" for b in k.bootstrap.split(","))
    data_dir = Path(cfg.worker.data_dir or cfg.run_dir / f"faust-{stage}")
    settings = dict(
        broker=brokers,
        value_serializer="raw",
        key_serializer="raw",
        processing_guarantee="at_least_once",
        # Group joins on the local broker wait ~session timeout / 2; defaults cost 30 s per join.
        broker_session_timeout=max(1.0, k.session_timeout_ms / 1000),
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=max(1.0, k.session_timeout_ms / 1000),
        broker_commit_every=10_000,
        broker_commit_interval=1.0,
        producer_acks=-1,
        # Agents split their records below kafka.max_record_bytes (aimass.streams.replay.send_table).
        producer_max_request_size=k.max_record_bytes,
        # aiokafka's default batch (16 KiB) holds one micro-batch record; a send() to a partition whose
        # batch is full waits for that batch's acknowledgement, so an agent managed one record per
        # broker round trip per partition (~120/s here) and fell behind at live rates.
        producer_max_batch_size=k.max_record_bytes,
        consumer_max_fetch_size=16 * 1024 * 1024,
        consumer_auto_offset_reset="earliest",
        topic_partitions=k.partitions,
        topic_replication_factor=k.replication,
        topic_allow_declare=False,  # `aimass up` / create_topics own the topic layout
        datadir=str(data_dir),
        store="memory://",
        web_enabled=web_port is not None and web_port > 0,
        web_port=web_port or 6066,
        web_bind="127.0.0.1",
        logging_config=None,
    )
    credentials = _credentials(cfg)
    if credentials is not None:
        settings["broker_credentials"] = credentials
    return StageApp(f"{k.topic_prefix}-{stage}", **settings)


def _cap_fetch_wait(ms: int) -> None:
    """Make Faust's consumers wait at most ``ms`` per fetch (kafka.fetch_max_wait_ms).

    Faust hard-codes aiokafka's ``fetch_max_wait_ms=1500``; a broker that holds fetches until the
    wait runs out (the local Tansu does, measured) then adds up to 1.5 s of latency per hop.
    """
    import aiokafka
    from faust.transport.drivers import aiokafka as driver

    base = aiokafka.AIOKafkaConsumer

    class CappedFetchWaitConsumer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = min(kwargs.get("fetch_max_wait_ms", ms), ms)
            super().__init__(*args, **kwargs)

    if getattr(driver.aiokafka.AIOKafkaConsumer, "capped_ms", None) != ms:
        CappedFetchWaitConsumer.capped_ms = ms
        driver.aiokafka = _ModuleWith(aiokafka, AIOKafkaConsumer=CappedFetchWaitConsumer)


class _ModuleWith:
    """A view of a module with some attributes replaced (leaves the real module untouched)."""

    def __init__(self, module, **replaced):
        self._module, self._replaced = module, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._module, name)


def _credentials(cfg: Config):
    """SASL/TLS credentials for a real cluster, from config and environment secrets."""
    k = cfg.kafka
    if k.security_protocol == "PLAINTEXT":
        return None
    context = ssl.create_default_context(cafile=k.ssl_ca_file or None) if "SSL" in k.security_protocol else None
    if k.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=k.sasl_username, password=cfg.secret(k.sasl_password_env),
                                     ssl_context=context, mechanism=k.sasl_mechanism)
    return faust.SSLCredentials(context)


def raw_topic(app: faust.App, cfg: Config, topic: contract.Topic, acks: bool = True) -> faust.TopicT:
    """The Faust topic of a contract topic (raw bytes keys and values).

    ``acks=False``: Faust never commits this topic's offsets; the agent commits them itself
    (``aimass.streams.replay``).
    """
    return app.topic(topic.name(cfg.kafka.topic_prefix), key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw", acks=acks,
                     partitions=contract.topic_partitions(topic, cfg.kafka.partitions))


def run_worker(app: faust.App, cfg: Config) -> int:
    """Run the app's agents until SIGTERM / SIGINT; returns the exit code."""
    logging.getLogger("faust").setLevel(max(logging.INFO, logging.getLevelName(cfg.run.log_level)))
    worker = faust.Worker(app, loglevel=cfg.run.log_level.lower(), quiet=True, override_logging=False)
    worker.execute_from_commandline()  # exits the process via sys.exit when stopped
    return 0
