"""A plain MQTT subscriber for tests that check what publishers sent (no bridge involved)."""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho

from aimass.core.config import Config
from aimass.streams.mqtt import connect, make_client


class Collector:
    """Subscribes to ``topic_filter`` and keeps every (topic, payload) received, in order."""

    def __init__(self, cfg: Config, topic_filter: str):
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = make_client(cfg, f"collector-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        connect(self.client, cfg)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c, _u, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def wait_for(self, n: int, timeout: float = 30) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # catch extras
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
