"""Payload parsing and validation (pure): formats, normalization, every rejection reason, fuzzing."""
from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimass.streams.payloads import (
    REASONS, Limits, Reading, Rejected, TopicPattern, encode_label, encode_reading, encode_senml, parse_label,
    parse_telemetry,
)

NOW_MS = 1_800_000_000_000
NOW_S = NOW_MS // 1000
LIMITS = Limits(max_payload_bytes=4096, max_future_ms=300_000, max_past_ms=365 * 86_400_000)


def parse(doc) -> list[Reading]:
    return parse_telemetry(orjson.dumps(doc), NOW_MS, LIMITS)


def reason_of(payload) -> str:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    with pytest.raises(Rejected) as info:
        parse_telemetry(raw, NOW_MS, LIMITS)
    return info.value.reason


def test_single_reading_seconds_and_milliseconds_normalize_to_the_same_ms():
    in_s = parse({"ts": NOW_S - 10.25, "metric": "temp", "value": 21.5, "unit": "Cel"})
    in_ms = parse({"ts": NOW_MS - 10_250, "metric": "temp", "value": 21.5, "unit": "Cel"})
    assert in_s == in_ms == [("temp", NOW_MS - 10_250, 21.5, "Cel")]


def test_missing_ts_means_now_and_integer_values_become_floats():
    [(metric, ts_ms, value, unit)] = parse({"metric": "count", "value": 3})
    assert ts_ms == NOW_MS and value == 3.0 and isinstance(value, float) and unit == ""


def test_multi_metric_object_with_values_and_units():
    readings = parse({"ts": NOW_S, "values": {"temp": 20.0, "humidity": 40}, "units": {"temp": "Cel",
                                                                                      "humidity": "%RH"}})
    assert readings == [("temp", NOW_MS, 20.0, "Cel"), ("humidity", NOW_MS, 40.0, "%RH")]


def test_flat_multi_metric_object():
    assert parse({"ts": NOW_MS, "temp": 1.5, "power": 2}) == [("temp", NOW_MS, 1.5, ""),
                                                              ("power", NOW_MS, 2.0, "")]


def test_unit_aliases_map_to_senml_names():
    assert parse({"metric": "t", "value": 1, "unit": "°C"})[0][3] == "Cel"
    assert parse({"metric": "h", "value": 1, "unit": "%rh"})[0][3] == "%RH"


def test_senml_base_fields_and_relative_times():
    pack = [
        {"bn": "room1:", "bt": NOW_S - 60, "bu": "Cel", "n": "temp", "v": 20.0},
        {"n": "temp", "t": 10, "v": 20.5},
        {"n": "humidity", "u": "%RH", "t": 10.5, "v": 41},
    ]
    assert parse(pack) == [
        ("room1:temp", NOW_MS - 60_000, 20.0, "Cel"),
        ("room1:temp", NOW_MS - 50_000, 20.5, "Cel"),
        ("room1:humidity", NOW_MS - 49_500, 41.0, "%RH"),
    ]


def test_senml_time_below_2_pow_28_is_relative_to_now_and_base_value_adds():
    pack = [{"bv": 100, "n": "power", "t": -5, "v": 2.5}, {"n": "power", "v": -1}]
    assert parse(pack) == [("power", NOW_MS - 5000, 102.5, ""), ("power", NOW_MS, 99.0, "")]


def test_senml_base_only_record_is_allowed():
    assert parse([{"bn": "d:", "bt": NOW_S}, {"n": "x", "v": 1}]) == [("d:x", NOW_MS, 1.0, "")]


def test_encoders_round_trip():
    rows = [("temp", NOW_MS - 2000, 1.25, "Cel"), ("temp", NOW_MS - 1000, 2.5, "Cel"), ("hum", NOW_MS, 3.0, "")]
    assert parse_telemetry(encode_senml(rows), NOW_MS, LIMITS) == rows
    assert parse_telemetry(encode_reading(*rows[0]), NOW_MS, LIMITS) == [rows[0]]
    label = parse_label(encode_label("temp", NOW_MS - 5000, NOW_MS, "spike", 3.5), NOW_MS, LIMITS)
    assert (label.metric, label.start_ms, label.end_ms, label.kind, label.magnitude) == (
        "temp", NOW_MS - 5000, NOW_MS, "spike", 3.5)


@pytest.mark.parametrize("payload, reason", [
    (b"x" * 5000, "too_large"),
    (b"", "empty"),
    (b"{not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"NaN", "bad_json"),
    (b"1e999", "bad_json"),
    (b"42", "bad_schema"),
    ([], "bad_schema"),
    ({}, "bad_schema"),
    ({"metric": "t"}, "bad_schema"),
    ({"metric": "t", "value": 1, "extra": 2}, "bad_schema"),
    ({"values": [1, 2]}, "bad_schema"),
    ({"ts": NOW_S, "units": "Cel", "temp": 1}, "bad_schema"),
    ([1, 2], "bad_schema"),
    ([{"n": "t"}], "bad_schema"),
    ([{"bn": 5, "n": "t", "v": 1}], "bad_schema"),
    ({"metric": "", "value": 1}, "bad_metric"),
    ({"metric": "a b", "value": 1}, "bad_metric"),
    ({"metric": 7, "value": 1}, "bad_metric"),
    ({"metric": ["temp"], "value": 1}, "bad_metric"),
    ({"values": {"ok": 1}, "units": {"ok": ["Cel"]}}, "unknown_unit"),
    ([{"n": "t", "v": 1, "u": {"x": 1}}], "unknown_unit"),
    ({"metric": "t", "value": "21.5"}, "bad_value"),
    ({"metric": "t", "value": True}, "bad_value"),
    ({"metric": "t", "value": None}, "bad_value"),
    ({"temp": {"nested": 1}}, "bad_value"),
    ([{"n": "t", "vs": "on"}], "bad_value"),
    ({"metric": "t", "value": 1, "ts": "yesterday"}, "bad_ts"),
    ({"metric": "t", "value": 1, "ts": -5}, "bad_ts"),
    ([{"n": "t", "v": 1, "t": "x"}], "bad_ts"),
    ({"metric": "t", "value": 1, "ts": NOW_S + 3600}, "future_ts"),
    ({"metric": "t", "value": 1, "ts": NOW_MS + 3_600_000}, "future_ts"),
    ([{"n": "t", "v": 1, "t": 3600}], "future_ts"),
    ({"metric": "t", "value": 1, "ts": NOW_S - 400 * 86400}, "too_old"),
    ({"metric": "t", "value": 1, "unit": "furlongs"}, "unknown_unit"),
    ({"metric": "t", "value": 1, "unit": 5}, "unknown_unit"),
])
def test_rejections_have_the_right_reason(payload, reason):
    assert reason_of(payload) == reason


def test_non_finite_after_base_value():
    assert reason_of([{"bv": 1.7e308, "n": "t", "v": 1.7e308}]) == "non_finite"


def test_topic_pattern_parses_and_rejects():
    p = TopicPattern("aimass/{tenant}/{device_id}/telemetry")
    assert p.subscription() == "aimass/+/+/telemetry"
    assert p.parse("aimass/acme/dev-1/telemetry") == ("acme", "dev-1")
    assert p.topic("acme", "dev-1") == "aimass/acme/dev-1/telemetry"
    for topic, reason in [("aimass/acme/dev-1/other", "bad_topic"), ("aimass/acme/telemetry", "bad_topic"),
                          ("aimass/acme/dev 1/telemetry", "bad_device_id"), ("aimass//dev-1/telemetry",
                                                                             "bad_device_id"),
                          ("aimass/acme/" + "d" * 200 + "/telemetry", "bad_device_id")]:
        with pytest.raises(Rejected) as info:
            p.parse(topic)
        assert info.value.reason == reason
    with pytest.raises(ValueError):
        TopicPattern("aimass/{device_id}/telemetry")


def test_label_validation():
    with pytest.raises(Rejected) as info:
        parse_label(orjson.dumps({"start": NOW_MS, "end": NOW_MS - 1, "kind": "spike"}), NOW_MS, LIMITS)
    assert info.value.reason == "bad_ts"
    with pytest.raises(Rejected) as info:
        parse_label(b'{"end": 1}', NOW_MS, LIMITS)
    assert info.value.reason == "bad_schema"
    label = parse_label(orjson.dumps({"start": NOW_S, "kind": "maintenance"}), NOW_MS, LIMITS)
    assert (label.metric, label.end_ms, label.magnitude) == ("", NOW_MS, 0.0)


# --- fuzzing: no input crashes the parser; every rejection has a known reason --------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=20)
field_names = st.sampled_from(["ts", "metric", "value", "unit", "values", "units", "bn", "bt", "bu", "bv", "n",
                               "v", "t", "u", "vs", "temp", "start", "end", "kind", "magnitude"])
any_ts = st.one_of(json_values, st.integers(NOW_S - 10**6, NOW_S + 10**3), st.integers(NOW_MS - 10**9, NOW_MS))
single_readings = st.fixed_dictionaries({"metric": json_values, "value": json_values},
                                        optional={"ts": any_ts, "unit": json_values})
senml_records = st.fixed_dictionaries({}, optional={k: json_values for k in ("bn", "bu", "bv", "n", "v", "u", "vs")}
                                      | {"bt": any_ts, "t": json_values})
plausible_docs = st.one_of(
    st.dictionaries(field_names, json_values, max_size=6),
    st.lists(st.dictionaries(field_names, json_values, max_size=6), max_size=6),
    single_readings,
    st.fixed_dictionaries({"values": st.dictionaries(st.text(max_size=8), json_values, max_size=4)},
                          optional={"ts": any_ts, "units": json_values}),
    st.lists(senml_records, min_size=1, max_size=5),
    st.fixed_dictionaries({"start": any_ts, "kind": json_values},
                          optional={"end": any_ts, "metric": json_values, "magnitude": json_values}),
)


def check_outcome(payload: bytes) -> None:
    for parser in (parse_telemetry, parse_label):
        try:
            result = parser(payload, NOW_MS, LIMITS)
        except Rejected as r:
            assert r.reason in REASONS and r.detail
            continue
        readings = result if isinstance(result, list) else []
        for _metric, ts_ms, value, _unit in readings:
            assert math.isfinite(value) and isinstance(value, float) and isinstance(ts_ms, int)
            assert NOW_MS - LIMITS.max_past_ms <= ts_ms <= NOW_MS + LIMITS.max_future_ms


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(payload):
    check_outcome(payload)


@settings(max_examples=400, deadline=None)
@given(plausible_docs)
def test_fuzz_structured_json(doc):
    check_outcome(json.dumps(doc).encode())  # stdlib: also writes integers beyond 64 bits
