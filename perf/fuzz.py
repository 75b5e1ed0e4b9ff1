"""Fuzz the bridge's input paths: payloads through its receive/parse path, byte streams through
the MQTT packet splitter.

- payloads: mutated valid messages (single reading, several metrics, SenML packs, labels),
  generated JSON documents (extreme and non-finite numbers, huge integers, wrong types, unknown
  and base SenML fields, deep nesting) and random bytes, on valid and on malformed topics, go
  through ``Bridge._on_publish`` exactly as a message read from MQTT does. A crash is an
  exception escaping it, a message rejected as ``internal_error`` (the parser itself failed) or a
  rejection reason that is not documented (``aimass.streams.payloads.REASONS``).
- byte streams: sequences of valid packets (PUBLISH QoS 0/1 with and without properties, QoS 2,
  PUBACKs, PINGRESPs), of malformed ones (QoS 3, cut or over-long lengths, random headers) and
  random bytes, fed to ``PacketSplitter.split`` in random cuts. A crash is an exception; for a
  stream of valid packets also any difference between what comes out of the cut feed and what
  was put in (payloads, ids, the packets left to paho).

    python perf/fuzz.py [--quick] [--payloads N] [--byte-streams M] [--seed S]

Last line: one JSON object with ``payloads``, ``byte_streams``, ``crashes`` (and the rejection
reasons seen, the first crash examples, seconds).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import Counter
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aimass.core.config import Config  # noqa: E402
from aimass.streams.bridge import Batch, Bridge  # noqa: E402
from aimass.streams.mqtt import PacketSplitter, encode_varint  # noqa: E402
from aimass.streams.payloads import INTERNAL_ERROR, REASONS  # noqa: E402

NOW_MS = 1_763_899_980_000
SENML_KEYS = ("bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut", "x")
UNITS = ("Cel", "%RH", "K", "W", "°C", "furlongs", "", "m/s2")


class ParseOnlyBridge(Bridge):
    """The bridge's receive path with no Kafka producer (nothing is flushed)."""

    def _new_producer(self):
        return None


# --- payloads -------------------------------------------------------------------------

def number(rng: random.Random):
    pick = rng.random()
    if pick < 0.3:
        return rng.choice((1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 0, 1e11, 2 ** 28, -2 ** 28,
                           2 ** 63 - 1, -2 ** 63, 18446744073709551615, 1e15, 1e300, NOW_MS, NOW_MS / 1000))
    if pick < 0.6:
        return rng.uniform(-1e6, 1e6)
    if pick < 0.8:
        return rng.randint(-10 ** 12, 10 ** 13)
    return NOW_MS / 1000 + rng.uniform(-1000, 1000)


def scalar(rng: random.Random):
    pick = rng.random()
    if pick < 0.5:
        return number(rng)
    if pick < 0.8:
        return rng.choice(("temp", "", "a" * 200, "x/y", "\u0000", "\ud7ff\ue000", "NaN", "1e400", "Cel", "é" * 50))
    return rng.choice((None, True, False, [], {}))


def nested(rng: random.Random, depth: int):
    doc = scalar(rng)
    for _ in range(depth):
        doc = [doc] if rng.random() < 0.5 else {"a": doc}
    return doc


def value(rng: random.Random, depth: int = 0):
    pick = rng.random()
    if pick < 0.7 or depth > 3:
        return scalar(rng)
    if pick < 0.85:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if pick < 0.98:
        return {rng.choice(("ts", "metric", "value", "unit", "values", "units", "v", "n")): value(rng, depth + 1)
                for _ in range(rng.randint(0, 4))}
    return nested(rng, rng.choice((10, 100, 200)))


def senml(rng: random.Random) -> list:
    pack = []
    for _ in range(rng.randint(0, 8)):
        rec = {k: value(rng) for k in rng.sample(SENML_KEYS, rng.randint(0, 4))}
        if rng.random() < 0.7:
            rec.update(n=rng.choice(("temp", "hum", "")), v=number(rng))
        if rng.random() < 0.3:
            rec["t"] = number(rng)
        if rng.random() < 0.2:
            rec["bt"] = number(rng)
        pack.append(rec if rng.random() < 0.95 else value(rng))
    return pack


def document(rng: random.Random):
    pick = rng.random()
    if pick < 0.3:
        doc = {"ts": number(rng), "metric": rng.choice(("temp", "hum.1", "")), "value": number(rng)}
        if rng.random() < 0.5:
            doc["unit"] = rng.choice(UNITS)
        for _ in range(rng.randint(0, 1)):
            doc[rng.choice(("ts", "metric", "value", "unit", "extra"))] = value(rng)
        return doc
    if pick < 0.5:
        values = {rng.choice(("temp", "hum", "p", "")): value(rng) if rng.random() < 0.2 else number(rng)
                  for _ in range(rng.randint(0, 4))}
        doc = {"ts": number(rng), "values": values} if rng.random() < 0.5 else {"ts": number(rng), **values}
        if rng.random() < 0.3:
            doc["units"] = {k: rng.choice(UNITS) for k in values} if rng.random() < 0.8 else value(rng)
        return doc
    if pick < 0.8:
        return senml(rng)
    if pick < 0.9:  # a label
        return {"start": number(rng), "end": number(rng), "kind": rng.choice(("spike", "", "a b")),
                "metric": value(rng), "magnitude": value(rng)}
    return value(rng)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        at = rng.randint(0, len(data))
        if op < 0.3 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op < 0.5:
            data[at:at] = rng.choice((b"[", b"{", b"}", b"]", b",", b'"', b"\\", b"1e999", b"-", b"\x00", b"\xff",
                                      b"NaN", b"null", b"9" * 40))
        elif op < 0.7:
            del data[at:at + rng.randint(1, 8)]
        elif op < 0.85:
            data = data[:at]
        else:
            data[at:at] = data[max(0, at - 16):at]
    return bytes(data)


def deep(rng: random.Random) -> bytes:
    """A document nested 1,000+ deep somewhere a parser looks (orjson reads up to 1,024 levels)."""
    depth = rng.choice((999, 1000, 1023, 1024, 1025, 5000))
    inner = (b"[" * depth + b"1" + b"]" * depth) if rng.random() < 0.5 else \
        (b'{"a":' * depth + b"1" + b"}" * depth)
    return rng.choice((b'{"metric": %s, "value": 1}', b'{"ts": 1, "temp": %s}', b'[{"n": "t", "v": %s}]',
                       b'{"metric": "t", "value": 1, "unit": %s}', b'[{"bn": %s, "n": "t", "v": 1}]', b"%s",
                       b'{"start": 1, "kind": %s}')) % inner


def payload(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.03:
        return rng.randbytes(rng.randint(0, 64))
    if pick < 0.05:
        return deep(rng)
    doc = document(rng)
    try:
        data = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):  # an integer beyond 64 bits: the standard library writes it
        data = json.dumps(doc).encode(errors="surrogatepass")
    return mutate(rng, data) if rng.random() < 0.4 else data


def topic(rng: random.Random, root: str) -> bytes:
    pick = rng.random()
    if pick < 0.85:
        return f"{root}/acme/dev{rng.randint(0, 50)}/telemetry".encode()
    if pick < 0.92:
        return f"{root}/acme/dev{rng.randint(0, 5)}/labels".encode()
    return rng.choice((f"{root}/acme/{'x' * 200}/telemetry".encode(), f"{root}/a b/d/telemetry".encode(),
                       b"\xff\xfe/\x00", f"{root}/acme/dev1".encode(), b""))


def fuzz_payloads(n: int, seed: int, crashes: list[str]) -> Counter:
    """Run ``n`` payloads through the bridge's receive path; returns the rejection reasons seen."""
    cfg = Config()
    root = "fuzz"
    cfg.mqtt.topic_pattern = f"{root}/{{tenant}}/{{device_id}}/telemetry"
    cfg.mqtt.labels_pattern = f"{root}/{{tenant}}/{{device_id}}/labels"
    bridge = ParseOnlyBridge(cfg, "fuzz")
    documented = set(REASONS)
    rng = random.Random(seed)
    reasons: Counter = Counter()
    for i in range(n):
        data = payload(rng)
        try:
            bridge._on_publish(topic(rng, root), data, 1, i & 0xFFFF)
        except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
            crashes.append(f"payload {data[:120]!r}: escaped {exc!r}"[:300])
        if bridge.batch.n_messages >= 2000 or i == n - 1:
            for rows in bridge.batch.rejects.values():
                for row in rows:
                    reasons[row["reason"]] += 1
                    if row["reason"] == INTERNAL_ERROR or row["reason"] not in documented:
                        crashes.append(f"payload {row['payload'][:120]!r}: {row['reason']} {row['detail'][:150]}")
            reasons["accepted_readings"] += bridge.batch.n_readings
            bridge.batch = Batch()
    return reasons


# --- byte streams ---------------------------------------------------------------------

def publish_packet(rng: random.Random, qos: int, mid: int) -> tuple[bytes, tuple]:
    topic = rng.choice((b"a/b", b"x" * rng.randint(1, 300)))
    props = b"" if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 20))
    payload = rng.randbytes(rng.choice((0, 1, 5, 200, 20_000)))
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"") \
        + encode_varint(len(props)) + props + payload
    packet = bytes([0x30 | qos << 1 | rng.randint(0, 1)]) + encode_varint(len(body)) + body
    return packet, (topic, payload, qos, mid if qos else 0)


def valid_stream(rng: random.Random) -> tuple[bytes, list, bytes]:
    """(stream, the publishes the splitter should hand over, the bytes it should leave to paho)."""
    parts, published, for_paho = [], [], []
    for _ in range(rng.randint(1, 8)):
        pick = rng.random()
        mid = rng.randint(1, 65535)
        if pick < 0.6:
            packet, pub = publish_packet(rng, rng.randint(0, 1), mid)
            published.append(pub)
        elif pick < 0.8:
            packet = b"\x40\x02" + mid.to_bytes(2, "big")
            published.append(("puback", mid))
        elif pick < 0.9:
            packet, _ = publish_packet(rng, 2, mid)  # QoS 2: paho's
            for_paho.append(packet)
        else:
            packet = b"\xd0\x00"
            for_paho.append(packet)
        parts.append(packet)
    return b"".join(parts), published, b"".join(for_paho)


def malformed_stream(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.3:
        return rng.randbytes(rng.randint(1, 200))
    stream = bytearray(valid_stream(rng)[0])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(stream)) if stream else 0
        op = rng.random()
        if op < 0.4 and stream:
            stream[at] = rng.randrange(256)
        elif op < 0.6:
            stream[at:at] = rng.choice((b"\xff\xff\xff\xff\x7f", b"\x36\x05", b"\x30", b"\x3e\x04\x00\x01a"))
        else:
            del stream[at:at + rng.randint(1, 10)]
    return bytes(stream)


def feed(stream: bytes, rng: random.Random) -> tuple[list, bytes]:
    got: list = []
    splitter = PacketSplitter(lambda t, p, q, m: got.append((t, p, q, m)), lambda m: got.append(("puback", m)))
    out, pos = [], 0
    while pos < len(stream):
        step = rng.choice((1, 2, 3, 7, 64, 1000, 100_000))
        out.append(splitter.split(stream[pos:pos + step]))
        pos += step
    return got, b"".join(out)


def fuzz_streams(n: int, seed: int, crashes: list[str]) -> Counter:
    rng = random.Random(seed + 1)
    kinds: Counter = Counter()
    for _ in range(n):
        valid = rng.random() < 0.5
        if valid:
            stream, published, for_paho = valid_stream(rng)
        else:
            stream = malformed_stream(rng)
        try:
            got, paho = feed(stream, rng)
        except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
            crashes.append(f"stream {stream[:80]!r}: {exc!r}"[:300])
            continue
        kinds["valid" if valid else "malformed"] += 1
        if valid and (got != published or paho != for_paho):
            crashes.append(f"stream {stream[:80]!r}: split differently from what was put in"[:300])
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20,000 of each (a few seconds)")
    p.add_argument("--payloads", type=int, default=None, help="payloads to try (default 1,000,000; quick 20,000)")
    p.add_argument("--byte-streams", type=int, default=None,
                   help="byte streams to try (default 1,000,000; quick 20,000)")
    p.add_argument("--seed", type=int, default=1, help="random seed (a run is reproducible)")
    args = p.parse_args(argv)
    n_payloads = args.payloads if args.payloads is not None else (20_000 if args.quick else 1_000_000)
    n_streams = args.byte_streams if args.byte_streams is not None else (20_000 if args.quick else 1_000_000)
    logging.basicConfig(level=logging.CRITICAL)  # internal errors are counted, not logged
    crashes: list[str] = []
    started = time.monotonic()
    reasons = fuzz_payloads(n_payloads, args.seed, crashes)
    kinds = fuzz_streams(n_streams, args.seed, crashes)
    result = {"payloads": n_payloads, "byte_streams": n_streams, "crashes": len(crashes),
              "reasons": dict(reasons.most_common()), "streams": dict(kinds), "examples": crashes[:5],
              "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(result))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
