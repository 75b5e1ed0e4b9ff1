"""The one place MQTT clients are built: MQTT v5, username/password from the environment, TLS.

The bridge, the simulator and replay all connect through ``make_client`` + ``connect``.
``Publisher`` is the windowed QoS 0/1 publisher the simulator and replay share.
All clients here are driven from the calling thread (no paho background thread).
"""
from __future__ import annotations

import logging
import ssl
import time
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from aimass.core.config import Config
from aimass.core.procs import StackError

log = logging.getLogger(__name__)


class PacketTooLarge(OSError):
    """The broker sent a packet above the Maximum Packet Size this client announced: the connection is dropped."""


class PacketSplitter:
    """Takes the hot packets out of the bytes read from the broker, before paho sees them.

    - a QoS 0/1 PUBLISH goes to ``on_publish(topic, payload, qos, mid)`` (bytes; mid 0 for QoS 0);
    - a successful PUBACK goes to ``on_puback(mid)``.

    Every other packet (CONNACK, SUBACK, PINGRESP, QoS 2, failed acks, packets with no handler
    set, a malformed PUBLISH such as QoS 3, which paho answers by closing the connection, ...)
    is returned, in order, for paho. paho's receive path costs tens of microseconds per packet
    (docs/infrastructure.md); this one a few. A packet cut at the end of a read waits for the rest: the reads
    are kept as a list and joined once the packet is complete, so a large packet costs time
    linear in its size. Unless its header already says it is longer than ``max_packet`` (bytes,
    0 = no limit): then ``PacketTooLarge`` is raised before any of it is buffered.
    """

    def __init__(self, on_publish: Callable[[bytes, bytes, int, int], None] | None = None,
                 on_puback: Callable[[int], None] | None = None, mqtt_v5: bool = True, max_packet: int = 0):
        self.on_publish = on_publish
        self.on_puback = on_puback
        self.mqtt_v5 = mqtt_v5
        self.max_packet = max_packet
        self._pending: list[bytes] = []  # an incomplete packet's reads so far
        self._buffered = 0               # their total size
        self._needed = 0                 # the size at which it can be complete

    def split(self, data: bytes) -> bytes:
        """Handle the complete hot packets of ``data``; return the other complete packets."""
        if self._pending:
            self._pending.append(data)
            self._buffered += len(data)
            if self._buffered < self._needed:
                return b""
            data = b"".join(self._pending)
            self._pending = []
        for_paho = []
        end, pos = len(data), 0
        while pos < end:
            start = pos
            length, pos = _varint(data, pos + 1)
            if length < 0:  # a malformed length: paho reports it and drops the connection
                for_paho.append(data[start:])
                pos = end
                break
            packet_end = pos + length
            if self.max_packet and pos <= end and packet_end - start > self.max_packet:
                raise PacketTooLarge(f"the MQTT broker sent a {packet_end - start}-byte packet, above the "
                                     f"{self.max_packet} bytes announced (bridge.max_payload_bytes + headers)")
            if pos > end or packet_end > end:  # incomplete: wait for the rest (a cut length: one more byte)
                self._needed = packet_end - start if pos <= end else end - start + 1
                pos = start
                break
            kind = data[start] >> 4
            if not (kind == 3 and self._publish(data, data[start], pos, packet_end)
                    or kind == 4 and self._puback(data, pos, packet_end)):
                for_paho.append(data[start:packet_end])
            pos = packet_end
        if pos < end:
            self._pending = [data[pos:]]
            self._buffered = end - pos
        return b"".join(for_paho)

    def _publish(self, data: bytes, head: int, pos: int, packet_end: int) -> bool:
        """Hand over the PUBLISH packet at ``pos``; False if it is paho's (QoS 2, topic alias, malformed)."""
        qos = (head >> 1) & 3
        if self.on_publish is None or qos >= 2 or packet_end - pos < 2:
            return False
        at = pos + 2 + ((data[pos] << 8) | data[pos + 1])
        topic = data[pos + 2:at]
        mid = 0
        if qos:
            mid = (data[at] << 8) | data[at + 1] if at + 2 <= packet_end else -1
            at += 2
        if self.mqtt_v5:
            props, at = _varint(data, at)
            at += props if props >= 0 else packet_end
        if not topic or at > packet_end or mid < 0:
            return False
        self.on_publish(topic, data[at:packet_end], qos, mid)
        return True

    def _puback(self, data: bytes, pos: int, packet_end: int) -> bool:
        """Hand over the PUBACK at ``pos`` if it reports success (no reason code, or one below 0x80)."""
        if self.on_puback is None or packet_end - pos < 2 or packet_end - pos > 2 and data[pos + 2] >= 0x80:
            return False
        self.on_puback((data[pos] << 8) | data[pos + 1])
        return True


def encode_varint(n: int) -> bytes:
    """An MQTT variable byte integer (remaining lengths, property lengths)."""
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``pos``: (value, position after it); value -1 if malformed,
    position past the end if cut off."""
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 127) << shift
        if byte < 128:
            return value, pos
        shift += 7
        if shift > 21:
            return -1, pos
    return 0, len(data) + 1


class BufferedSocket:
    """A socket (plain or TLS) that reads in 256 KiB chunks and can hold writes back (``cork``).

    paho reads every packet with three or more ``recv()`` calls and sends every PUBACK with its
    own ``send()``; this cuts both to one system call per chunk. ``pending()`` (the SSL socket
    method paho already honours) tells paho's loop that buffered bytes are waiting. With a
    ``PacketSplitter`` the hot packets never reach paho.
    """

    CHUNK = 256 * 1024

    def __init__(self, sock, splitter: PacketSplitter | None = None, on_read: Callable[[], None] = lambda: None):
        self._sock = sock
        self._splitter = splitter
        self._on_read = on_read
        self._rbuf = b""
        self._rpos = 0
        self._corked: bytearray | None = None

    def recv(self, n: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = self._sock.recv(self.CHUNK)  # BlockingIOError (or ssl.SSLWantReadError) when nothing is there
            if not data:
                return data
            self._on_read()
            if self._splitter is not None:
                data = self._splitter.split(data)
                if not data:
                    raise BlockingIOError("every packet read was handled by the splitter")
            self._rbuf, self._rpos = data, 0
        chunk = self._rbuf[self._rpos:self._rpos + n]
        self._rpos += len(chunk)
        return chunk

    def pending(self) -> int:
        tls_pending = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._rbuf) - self._rpos + tls_pending

    def send(self, data) -> int:
        if self._corked is not None:
            self._corked += data
            return len(data)
        return self._sock.send(data)

    def cork(self) -> None:
        """Hold writes until ``uncork()`` sends them in one go."""
        self._corked = bytearray()

    def uncork(self) -> None:
        """Send what ``cork()`` held back."""
        data, self._corked = self._corked, None
        if data:
            self._sock.settimeout(10.0)
            try:
                self._sock.sendall(data)
            except OSError as exc:  # the next loop() sees the lost connection; unacked messages come again
                log.warning("MQTT write failed: %s", exc)
            finally:
                self._sock.setblocking(False)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _SharedTableProperties(Properties):
    """paho's Properties rebuilds three lookup tables for every packet it decodes (a quarter of
    a publisher's PUBACK handling); this one shares a single copy of them. Same behaviour."""

    _tables = {k: v for k, v in vars(Properties(PacketTypes.PUBLISH)).items() if k != "packetType"}

    def __init__(self, packetType):  # noqa: N803 - paho's signature
        object.__setattr__(self, "packetType", packetType)
        for name, table in self._tables.items():
            object.__setattr__(self, name, table)

    def clear(self):
        if len(self.__dict__) > 1 + len(self._tables):  # only scan when a property was set
            super().clear()


# Passed to on_publish callbacks for fast-path PUBACKs (callbacks only read them).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK, "Success")
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class Client(paho.Client):
    """paho's client over a ``BufferedSocket`` (TCP, with or without TLS) and a ``PacketSplitter``.

    Successful PUBACKs complete publishes without paho's packet decoding. Set
    ``on_publish_packet(topic, payload, qos, mid)`` before connecting to receive QoS 0/1
    messages that way instead of through ``on_message`` (QoS 1 then always needs ``ack(mid, 1)``:
    make the client with ``manual_ack=True``).
    """

    on_publish_packet: Callable[[bytes, bytes, int, int], None] | None = None
    max_packet_bytes: int = 0  # refuse incoming packets above this (also announce it in ``connect``)

    def _create_socket(self):
        sock = super()._create_socket()
        if self._transport != "tcp":
            return sock
        splitter = PacketSplitter(self.on_publish_packet, self._puback_success,
                                  self._protocol == MQTTProtocolVersion.MQTTv5, self.max_packet_bytes)
        return BufferedSocket(sock, splitter, self._note_bytes_received)

    def loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        # paho's loop() sets up a wake-up socket pair for its background thread (AI Mass drives
        # clients from their own thread) and then writes one byte to it for every queued packet.
        return self._loop(timeout)

    def _puback_success(self, mid: int) -> None:
        """What paho does for a PUBACK reporting success."""
        with self._out_message_mutex:
            if mid in self._out_messages:
                self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)

    def _update_inflight(self) -> MQTTErrorCode:
        # paho scans every unacknowledged message after each PUBACK, for messages it queued beyond
        # max_inflight_messages; with none queued (every one in flight) there is nothing to find.
        if len(self._out_messages) <= self._inflight_messages:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def _note_bytes_received(self) -> None:
        """Keep-alive bookkeeping paho does only for the packets it reads itself."""
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()


def make_client(cfg: Config, client_id: str, manual_ack: bool = False, cls: type[Client] = Client) -> Client:
    """A paho MQTT v5 client (``cls``) with this config's credentials and TLS options (not yet connected)."""
    _packet.Properties = _SharedTableProperties
    m = cfg.mqtt
    client = cls(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                 manual_ack=manual_ack, reconnect_on_failure=False)
    if m.username:
        client.username_pw_set(m.username, Config.secret(m.password_env) or None)
    if m.tls:
        client.tls_set(ca_certs=m.tls_ca_file or None, certfile=m.tls_cert_file or None,
                       keyfile=m.tls_key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        client.tls_insecure_set(m.tls_insecure)
    return client


def connect(client: paho.Client, cfg: Config, clean_start: bool = True, session_expiry_s: int = 0,
            receive_maximum: int | None = None, timeout_s: float = 10.0) -> None:
    """Connect and wait for the CONNACK; ``StackError`` saying what to check when refused or unreachable."""
    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    if getattr(client, "max_packet_bytes", 0):  # the broker must not send us anything larger
        props.MaximumPacketSize = client.max_packet_bytes
    result: dict = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["rc"] = reason_code

    client.on_connect = on_connect
    where = f"{cfg.mqtt.host}:{cfg.mqtt.port}"
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive_s, clean_start=clean_start,
                       properties=props)
    except (OSError, ssl.SSLError) as exc:
        raise StackError(f"cannot reach the MQTT broker at {where}: {exc}; is it running (`aimass up`)?") from None
    deadline = time.monotonic() + timeout_s
    while "rc" not in result:
        rc = client.loop(timeout=0.05)
        if "rc" not in result and (rc != MQTTErrorCode.MQTT_ERR_SUCCESS or time.monotonic() > deadline):
            raise StackError(f"no CONNACK from the MQTT broker at {where} ({rc.name}); is it running (`aimass up`), "
                             f"and do mqtt.tls / mqtt.port match its listener?")
    if result["rc"].is_failure:
        raise StackError(f"the MQTT broker at {where} refused the connection: {result['rc']}; "
                         f"check mqtt.username and the password in ${cfg.mqtt.password_env}")


class Publisher:
    """Publishes with at most ``window`` unacknowledged QoS 1 messages (paho refuses > 65,535)."""

    def __init__(self, cfg: Config, client_id: str, qos: int | None = None, window: int = 10000):
        self.cfg = cfg
        self.qos = cfg.mqtt.qos if qos is None else qos
        self.window = window
        self.client = make_client(cfg, client_id)
        self.client.max_inflight_messages_set(window)
        self.client.max_queued_messages_set(0)
        self.published = 0
        self.acked = 0
        self.client.on_publish = self._on_publish
        connect(self.client, cfg)

    def _on_publish(self, _c, _u, _mid, _rc, _props) -> None:
        self.acked += 1  # QoS 1: PUBACK received; QoS 0: written to the socket

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue one message, waiting while the window is full; reconnects if the broker went away."""
        if self.qos:
            while self.published - self.acked >= self.window:
                self.service(0.01)
        info = self.client.publish(topic, payload, qos=self.qos)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._reconnect()
        self.published += 1
        if self.published % 256 == 0:
            self.service(0)

    def service(self, timeout_s: float) -> None:
        """Read acknowledgements and keep the connection alive."""
        if self.client.loop(timeout=timeout_s) != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._reconnect()

    def _reconnect(self) -> None:
        delay = 0.2
        while True:
            try:
                self.client.reconnect()
                return
            except OSError as exc:
                log.warning("MQTT broker unreachable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def drain(self, timeout_s: float = 60.0, progress: Callable[[], None] | None = None) -> bool:
        """Wait until every QoS 1 message is acknowledged. True if all were."""
        deadline = time.monotonic() + timeout_s
        while self.acked < self.published and time.monotonic() < deadline:
            self.service(0.05)
            if progress:
                progress()
        return self.acked >= self.published

    def close(self) -> None:
        self.drain()
        self.client.disconnect()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
