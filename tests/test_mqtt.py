"""aimass.streams.mqtt.PacketSplitter: PUBLISH and PUBACK packets out of a byte stream, at any read boundary;
packets above the announced maximum size refused."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimass.streams.mqtt import PacketSplitter, PacketTooLarge, _varint, encode_varint


def publish(topic: bytes, payload: bytes, qos: int, mid: int, props: bytes = b"", v5: bool = True) -> bytes:
    """A PUBLISH packet as a broker sends it (MQTT 5 or 3.1.1)."""
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    body += (encode_varint(len(props)) + props if v5 else b"") + payload
    return bytes([0x30 | qos << 1]) + encode_varint(len(body)) + body


def puback(mid: int, reason: int | None = None) -> bytes:
    body = mid.to_bytes(2, "big") + (bytes([reason, 0]) if reason is not None else b"")
    return bytes([0x40, len(body)]) + body


PINGRESP = b"\xd0\x00"
SUBACK = b"\x90\x04\x00\x01\x00\x01"
USER_PROPERTY = b"\x26\x00\x01k\x00\x01v"  # MQTT 5 user property k=v

packets = st.one_of(
    st.tuples(st.just("publish"), st.binary(min_size=1, max_size=40), st.binary(max_size=300),
              st.integers(0, 1), st.integers(1, 65535), st.sampled_from([b"", USER_PROPERTY])),
    st.tuples(st.just("puback"), st.integers(1, 65535), st.sampled_from([None, 0, 0x10])),
    st.tuples(st.just("other"), st.sampled_from([PINGRESP, SUBACK, publish(b"q2/topic", b"x", 2, 7),
                                                 puback(9, 0x87)])),
)


def run(stream: bytes, cuts: list[int], v5: bool = True) -> tuple[list, bytes]:
    """What the splitter hands over (("ack", mid) for PUBACKs) and what it leaves to paho."""
    seen = []
    splitter = PacketSplitter(lambda *msg: seen.append(msg), lambda mid: seen.append(("ack", mid)), mqtt_v5=v5)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for_paho = b"".join(splitter.split(stream[a:b]) for a, b in zip(bounds, bounds[1:]))
    return seen, for_paho


@settings(max_examples=300, deadline=None)
@given(st.lists(packets, max_size=30), st.lists(st.integers(0, 20000), max_size=20))
def test_every_publish_and_successful_ack_is_handed_over_once_in_order_and_the_rest_goes_to_paho(items, cuts):
    stream, expected, others = b"", [], b""
    for item in items:
        if item[0] == "publish":
            _, topic, payload, qos, mid, props = item
            stream += publish(topic, payload, qos, mid, props)
            expected.append((topic, payload, qos, mid if qos else 0))
        elif item[0] == "puback":
            stream += puback(item[1], item[2])
            expected.append(("ack", item[1]))
        else:
            stream += item[1]
            others += item[1]
    seen, for_paho = run(stream, cuts)
    assert seen == expected
    assert for_paho == others


def test_a_packet_cut_anywhere_waits_for_its_rest():
    packet = publish(b"aimass/t/d1/telemetry", b'{"metric":"temp","value":1}' * 20, 1, 42)
    for cut in range(1, len(packet)):
        seen, for_paho = run(packet, [cut])
        assert seen == [(b"aimass/t/d1/telemetry", b'{"metric":"temp","value":1}' * 20, 1, 42)]
        assert for_paho == b""


def test_mqtt_311_packets_have_no_properties():
    stream = publish(b"a/b", b"payload", 1, 9, v5=False) + PINGRESP
    assert run(stream, [], v5=False) == ([(b"a/b", b"payload", 1, 9)], PINGRESP)


def test_qos2_topic_aliases_and_malformed_packets_are_left_to_paho():
    alias = publish(b"", b"x", 1, 3, props=b"\x23\x00\x01")  # topic alias, empty topic
    bad_topic_length = bytes([0x32, 4, 0xFF, 0xFF, 0, 1])      # topic longer than the packet
    bad_length = b"\x30\xff\xff\xff\xff\x01"                   # remaining length over 4 bytes
    q2 = publish(b"t", b"x", 2, 5)
    for packet in (alias, bad_topic_length, q2):
        assert run(packet + PINGRESP, []) == ([], packet + PINGRESP)
    assert run(bad_length + PINGRESP, []) == ([], bad_length + PINGRESP)


def test_without_handlers_everything_goes_to_paho():
    stream = publish(b"a/b", b"payload", 1, 9) + puback(3) + PINGRESP
    assert PacketSplitter().split(stream) == stream


@given(st.integers(min_value=0, max_value=268_435_455))  # the largest MQTT variable byte integer
def test_varint_round_trip(n):
    encoded = encode_varint(n)
    assert len(encoded) <= 4 and _varint(encoded, 0) == (n, len(encoded))


def test_a_packet_above_the_maximum_is_refused_from_its_header_before_it_is_buffered():
    limit = 1000
    splitter = PacketSplitter(lambda *msg: None, mqtt_v5=True, max_packet=limit)
    at_limit = publish(b"t", b"x" * (limit - 7), 0, 0)  # 3 fixed header + 3 topic + 1 props + payload = limit
    assert len(at_limit) == limit and splitter.split(at_limit) == b""
    too_big = publish(b"t", b"x" * (limit - 6), 0, 0)
    with pytest.raises(PacketTooLarge, match=f"{limit + 1}-byte packet, above the {limit} bytes"):
        splitter.split(too_big[:4])  # only the header has arrived
    assert PacketSplitter(lambda *msg: None, max_packet=0).split(too_big) == b""  # 0: no limit
