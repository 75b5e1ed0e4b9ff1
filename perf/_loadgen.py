"""A cheap MQTT load generator for the benchmarks: QoS 1 PUBLISH packets written in batches.

The benchmarks run the devices on the same two cores as the pipeline they measure, so every
microsecond the load generator spends is taken from the system under test. paho's ``publish``
costs about 45 us per message (one ``send`` each, its in-flight bookkeeping); this writer builds
the packets itself, sends a whole batch with one ``sendall`` and counts PUBACKs in
``aimass.streams.mqtt.PacketSplitter``, a few microseconds per message. Connection, credentials, TLS and
keep-alive stay paho's (``aimass.streams.mqtt.make_client`` / ``connect``).

Not a device library: no resend after a reconnect (a dropped connection fails the run, and the
benchmark's accounting shows the loss), which is why the product's ``aimass.streams.mqtt.Publisher``
keeps paho's path.
"""
from __future__ import annotations

import time

from paho.mqtt.enums import MQTTErrorCode

from aimass.core.config import Config
from aimass.streams.mqtt import Client, connect, encode_varint, make_client


class _CountingClient(Client):
    """A paho client whose successful PUBACKs only count (its raw publishes are not paho's)."""

    acked = 0

    def _puback_success(self, mid: int) -> None:
        self.acked += 1


class BatchPublisher:
    """QoS 1 publishes of pre-encoded payloads, sent in batches, at most ``window`` unacknowledged."""

    def __init__(self, cfg: Config, client_id: str, window: int = 20000):
        self.window = min(window, 65535)  # packet ids must not repeat while in flight
        self.client = make_client(cfg, client_id, cls=_CountingClient)
        connect(self.client, cfg)
        self.published = 0
        self._mid = 0
        self._topics: dict[str, bytes] = {}

    @property
    def acked(self) -> int:
        return self.client.acked

    def send(self, messages: list[tuple[str, bytes]]) -> None:
        """Write ``messages`` (topic, payload) as QoS 1 PUBLISH packets in one go."""
        packets = []
        for topic, payload in messages:
            while self.published - self.acked >= self.window:
                self.service(0.01)
            head = self._topics.get(topic)
            if head is None:
                encoded = topic.encode()
                head = self._topics[topic] = len(encoded).to_bytes(2, "big") + encoded
            self._mid = self._mid % 65535 + 1
            # v5 PUBLISH: topic, packet id, empty properties, payload
            body_len = len(head) + 3 + len(payload)
            packets.append(b"\x32" + encode_varint(body_len) + head + self._mid.to_bytes(2, "big") + b"\x00"
                           + payload)
            self.published += 1
        sock = self.client._sock
        sock.cork()
        sock.send(b"".join(packets))
        sock.uncork()
        self.service(0)

    def service(self, timeout_s: float) -> None:
        """Read acknowledgements and keep the connection alive; a lost connection fails the run."""
        rc = self.client.loop(timeout=timeout_s)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"load generator lost the MQTT connection ({rc.name})")

    def drain(self, timeout_s: float = 120.0) -> bool:
        """Wait until every message is acknowledged. True if all were."""
        deadline = time.monotonic() + timeout_s
        while self.acked < self.published and time.monotonic() < deadline:
            self.service(0.05)
        return self.acked >= self.published

    def close(self) -> None:
        self.client.disconnect()

    def __enter__(self) -> "BatchPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
