"""Device payloads: parse and validate what devices publish, and encode what the simulator sends.

Accepted on ``aimass/{tenant}/{device_id}/telemetry`` (pattern configurable), one MQTT
message is one of:

- a single reading: ``{"ts": 1700000000.5, "metric": "temp", "value": 21.5, "unit": "Cel"}``
- several metrics at one time: ``{"ts": ..., "values": {"temp": 21.5, "hum": 40}, "units": {"temp": "Cel"}}``
  or flat ``{"ts": ..., "temp": 21.5, "hum": 40}``
- a SenML pack (RFC 8428): ``[{"bn": "", "bt": 1.7e9, "bu": "Cel", "n": "temp", "v": 21.5}, {"n": "temp", "t": 1, "v": 21.6}]``

Timestamps may be seconds or milliseconds (normalized to int64 ms); a missing time means
"now". A message is accepted or rejected as a whole: every rejection is a ``Rejected`` with a
machine-readable ``reason`` and a human ``detail``. Nothing here does I/O.
"""
from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import orjson

# Machine-readable rejection reasons (the dead-letter topic's `reason` column).
REASONS = (
    "too_large", "empty", "bad_json", "bad_schema", "bad_topic", "bad_device_id", "bad_metric",
    "bad_value", "non_finite", "bad_ts", "future_ts", "too_old", "unknown_unit",
)
# The bridge's reason for a payload the parser itself failed on (a bug: the row keeps the payload).
INTERNAL_ERROR = "internal_error"

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
METRIC_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")

# At or above this a timestamp is taken as milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
MS_THRESHOLD = 1e11
# RFC 8428 4.5.3: a resolved SenML time below 2**28 is relative to now (seconds).
SENML_RELATIVE_LIMIT = 2 ** 28
MAX_TIME_S = 1e15  # beyond any accepted time in seconds or milliseconds, far below float overflow

# SenML unit names (RFC 8428 section 12.1 and the secondary units of RFC 8798).
SENML_UNITS = frozenset("""
m kg g s A K cd mol Hz rad sr N Pa J W C V F Ohm S Wb T H Cel lm lx Bq Gy Sv kat m2 m3 l m/s m/s2
m3/s l/s W/m2 cd/m2 bit bit/s lat lon pH dB dBW Bspl count / % %RH %EL EL 1/s 1/min beat/min beats
S/m B VA VAs var vars J/m kg/m3 deg
ms min h MHz kW kVA kvar Ah Wh kWh varh kvarh kVAh Wh/km KiB GB Mbit/s B/s MB/s mV mA dBm ug/m3
mm/h m/h ppm /100 /1000 hPa mm cm km km/h gravity dps
""".split())
# Common spellings devices send instead of the SenML name.
UNIT_ALIASES = {
    "°C": "Cel", "degC": "Cel", "celsius": "Cel", "Celsius": "Cel", "%rh": "%RH", "RH": "%RH",
    "percent": "%", "kelvin": "K", "watt": "W", "volt": "V", "ampere": "A", "hertz": "Hz", "lux": "lx",
    "µg/m3": "ug/m3", "m/s^2": "m/s2", "rpm": "1/min",
}


class Rejected(ValueError):
    """A message that cannot be accepted: ``reason`` is machine-readable, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# One accepted reading of the message's device: (metric, ts_ms, value, unit). A plain tuple, as a
# pack holds many and building a NamedTuple costs as much as validating the reading.
Reading = tuple[str, int, float, str]


class Label(NamedTuple):
    """One ground-truth label published by a device or operator."""

    metric: str
    start_ms: int
    end_ms: int
    kind: str
    magnitude: float


@dataclass(frozen=True)
class Limits:
    """Validation limits (from ``cfg.bridge``)."""

    max_payload_bytes: int = 65536
    max_future_ms: int = 300_000
    max_past_ms: int = 3650 * 86_400_000

    @classmethod
    def from_config(cls, bridge_cfg: Any) -> "Limits":
        return cls(bridge_cfg.max_payload_bytes, int(bridge_cfg.max_future_s * 1000),
                   int(bridge_cfg.max_past_days * 86_400_000))


# --- topics ---------------------------------------------------------------------------

class TopicPattern:
    """An MQTT topic pattern with ``{tenant}`` and ``{device_id}`` levels, e.g. ``aimass/{tenant}/{device_id}/telemetry``."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.levels = pattern.split("/")
        if self.levels.count("{tenant}") != 1 or self.levels.count("{device_id}") != 1:
            raise ValueError(f"topic pattern {pattern!r} needs exactly one {{tenant}} and one {{device_id}} level")
        self.tenant_at = self.levels.index("{tenant}")
        self.device_at = self.levels.index("{device_id}")
        self.fixed = [(i, lvl) for i, lvl in enumerate(self.levels) if i not in (self.tenant_at, self.device_at)]

    def subscription(self) -> str:
        """The MQTT topic filter matching every tenant and device."""
        return "/".join("+" if i in (self.tenant_at, self.device_at) else lvl for i, lvl in enumerate(self.levels))

    def topic(self, tenant: str, device_id: str) -> str:
        return self.pattern.replace("{tenant}", tenant).replace("{device_id}", device_id)

    def parse(self, topic: str) -> tuple[str, str]:
        """(tenant, device_id) of a topic; ``Rejected`` if it does not match or the ids are malformed."""
        levels = topic.split("/")
        if len(levels) != len(self.levels) or any(levels[i] != lvl for i, lvl in self.fixed):
            raise Rejected("bad_topic", f"topic {topic[:200]!r} does not match {self.pattern!r}")
        tenant, device_id = levels[self.tenant_at], levels[self.device_at]
        if not ID_RE.fullmatch(tenant):
            raise Rejected("bad_device_id", f"tenant {tenant[:200]!r} must match {ID_RE.pattern}")
        if not ID_RE.fullmatch(device_id):
            raise Rejected("bad_device_id", f"device id {device_id[:200]!r} must match {ID_RE.pattern}")
        return tenant, device_id


# --- scalar checks --------------------------------------------------------------------

def normalize_ts(raw: Any, now_ms: int, limits: Limits, what: str = "ts") -> int:
    """Seconds or milliseconds since the epoch -> int64 ms, checked against now and the limits."""
    if raw is None:
        return now_ms
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise Rejected("bad_ts", f"{what} must be a number of seconds or milliseconds, got {_show(raw)}")
    if not math.isfinite(raw) or raw < 0:
        raise Rejected("bad_ts", f"{what} {raw!r} is not a valid epoch time")
    ts_ms = int(raw) if raw >= MS_THRESHOLD else int(round(raw * 1000))
    return check_ts(ts_ms, now_ms, limits, what)


def check_ts(ts_ms: int, now_ms: int, limits: Limits, what: str = "ts") -> int:
    if ts_ms > now_ms + limits.max_future_ms:
        raise Rejected("future_ts", f"{what} {ts_ms} ms is {(ts_ms - now_ms) / 1000:.0f} s in the future "
                                    f"(limit {limits.max_future_ms / 1000:.0f} s)")
    if ts_ms < now_ms - limits.max_past_ms:
        raise Rejected("too_old", f"{what} {ts_ms} ms is older than {limits.max_past_ms / 86_400_000:.0f} days")
    return ts_ms


def check_value(raw: Any, metric: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise Rejected("bad_value", f"value of {metric!r} must be a number, got {_show(raw)}")
    value = float(raw)
    if not math.isfinite(value):
        raise Rejected("non_finite", f"value of {metric!r} is {raw!r}")
    return value


_valid_metrics: set[str] = set()  # names already checked (devices repeat a handful of names)


def check_metric(raw: Any) -> str:
    if isinstance(raw, str) and raw in _valid_metrics:
        return raw
    if not isinstance(raw, str) or not METRIC_RE.fullmatch(raw):
        raise Rejected("bad_metric", f"metric name {_show(raw)} must match {METRIC_RE.pattern}")
    if len(_valid_metrics) < 100_000:
        _valid_metrics.add(raw)
    return raw


UNITS = {"": "", **{u: u for u in SENML_UNITS}, **UNIT_ALIASES}  # what devices send -> SenML name


def check_unit(raw: Any) -> str:
    """A SenML unit name (common aliases mapped); "" for none."""
    if raw is None:
        return ""
    if isinstance(raw, str) and raw in UNITS:
        return UNITS[raw]
    raise Rejected("unknown_unit", f"unit {_show(raw)} is not a SenML unit name (e.g. Cel, %RH, W, V, A, hPa)")


_SHOW = reprlib.Repr()  # bounded depth (maxlevel 6): a 1,000-deep list is no RecursionError
_SHOW.maxstring = _SHOW.maxother = 70


def _show(raw: Any) -> str:
    text = _SHOW.repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


# --- telemetry ------------------------------------------------------------------------

def load_json(payload: bytes, limits: Limits) -> Any:
    """The decoded JSON document of a payload, size-checked."""
    if len(payload) > limits.max_payload_bytes:
        raise Rejected("too_large", f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes}")
    if not payload:
        raise Rejected("empty", "empty payload")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise Rejected("bad_json", str(exc)[:200]) from None


def parse_telemetry(payload: bytes, now_ms: int, limits: Limits) -> list[Reading]:
    """Every reading of one telemetry message, or ``Rejected``."""
    doc = load_json(payload, limits)
    if isinstance(doc, dict):
        if "metric" in doc:
            return [_single(doc, now_ms, limits)]
        return _multi(doc, now_ms, limits)
    if isinstance(doc, list):
        return _senml(doc, now_ms, limits)
    raise Rejected("bad_schema", f"expected a JSON object or a SenML array, got {type(doc).__name__}")


SINGLE_FIELDS = frozenset(("ts", "metric", "value", "unit"))


def _single(doc: dict, now_ms: int, limits: Limits) -> Reading:
    if "value" not in doc:
        raise Rejected("bad_schema", "a single reading needs 'value'")
    if len(doc) != 2 + ("ts" in doc) + ("unit" in doc):
        unknown = sorted(doc.keys() - SINGLE_FIELDS)[:5]
        raise Rejected("bad_schema", f"unknown fields {unknown} in a single reading (fields: ts, metric, value, unit)")
    metric = check_metric(doc["metric"])
    return (metric, normalize_ts(doc.get("ts"), now_ms, limits), check_value(doc["value"], metric),
            check_unit(doc.get("unit")))


def _multi(doc: dict, now_ms: int, limits: Limits) -> list[Reading]:
    ts_ms = normalize_ts(doc.get("ts"), now_ms, limits)
    units = doc.get("units") or {}
    if not isinstance(units, dict):
        raise Rejected("bad_schema", "'units' must be an object of metric -> unit")
    if "values" in doc:
        values = doc["values"]
        extra = doc.keys() - {"ts", "values", "units"}
        if not isinstance(values, dict) or extra:
            raise Rejected("bad_schema", "expected {'ts', 'values': {metric: number}, 'units': {metric: unit}}")
    else:
        values = {k: v for k, v in doc.items() if k not in ("ts", "units")}
    if not values:
        raise Rejected("bad_schema", "no metrics in the message")
    return [(check_metric(m), ts_ms, check_value(v, m), check_unit(units.get(m))) for m, v in values.items()]


SENML_PLAIN_FIELDS = frozenset(("n", "v", "t", "u"))  # a record with only these needs no base-field handling
NUMBER = frozenset((int, float))  # JSON numbers (bool is its own type, and not one)


def _senml(pack: list, now_ms: int, limits: Limits) -> list[Reading]:
    """RFC 8428 pack: base fields carry forward to later records; relative times are from now."""
    if not pack:
        raise Rejected("bad_schema", "empty SenML pack")
    base = ("", 0.0, None, 0.0)  # name, time, unit, value
    lowest_ms, highest_ms = now_ms - limits.max_past_ms, now_ms + limits.max_future_ms
    readings = []
    append, units, valid_metrics, plain, isfinite = readings.append, UNITS, _valid_metrics, SENML_PLAIN_FIELDS, math.isfinite
    base_name, base_time, base_unit, base_value = base
    # The common path is inlined and tests the usual case first (a pack is many records); the
    # check_* calls only run to explain a rejection.
    for i, rec in enumerate(pack):
        if type(rec) is not dict:
            raise Rejected("bad_schema", f"SenML record {i} is not an object")
        if "v" not in rec or not rec.keys() <= plain:
            base = base_name, base_time, base_unit, base_value = _senml_base(rec, i, base)
            if "v" not in rec:
                continue  # a record holding base fields only
        name = rec.get("n", "")
        metric = base_name + name if type(name) is str else None
        if metric not in valid_metrics:
            check_metric(metric)
        v = rec["v"]
        if type(v) not in NUMBER:
            check_value(v, metric)
        value = base_value + v
        if not isfinite(value):
            raise Rejected("non_finite", f"SenML record {i}: value {value!r}")
        t = rec.get("t")
        if t is None:
            time_s = base_time
        elif type(t) in NUMBER and isfinite(t):
            time_s = base_time + t
        else:
            raise Rejected("bad_ts", f"SenML record {i}: 't' must be a finite number")
        if not -MAX_TIME_S < time_s < MAX_TIME_S:  # 'bt' + 't' can overflow, and * 1000 below
            raise Rejected("bad_ts", f"SenML record {i}: time {time_s!r} is not a valid epoch time")
        if time_s >= MS_THRESHOLD:
            ts_ms = int(time_s)
        elif time_s >= SENML_RELATIVE_LIMIT or time_s <= -SENML_RELATIVE_LIMIT:
            ts_ms = round(time_s * 1000)
        else:
            ts_ms = now_ms + round(time_s * 1000)
        if not lowest_ms <= ts_ms <= highest_ms:
            check_ts(ts_ms, now_ms, limits, f"record {i} time")  # raises future_ts / too_old
        u = rec.get("u", base_unit)
        unit = units.get(u) if type(u) is str else None
        append((metric, ts_ms, float(value), check_unit(u) if unit is None else unit))
    if not readings:
        raise Rejected("bad_schema", "SenML pack has no record with a value")
    return readings


def _senml_base(rec: dict, i: int, base: tuple) -> tuple:
    """The base fields (name, time, unit, value) after record ``i``; rejects a record that has no value but should."""
    base_name, base_time, base_unit, base_value = base
    if "bn" in rec:
        base_name = rec["bn"]
        if not isinstance(base_name, str):
            raise Rejected("bad_schema", f"SenML record {i}: 'bn' must be a string")
    if "bt" in rec:
        base_time = rec["bt"]
        if isinstance(base_time, bool) or not isinstance(base_time, (int, float)) or not math.isfinite(base_time):
            raise Rejected("bad_ts", f"SenML record {i}: 'bt' must be a finite number")
    if "bu" in rec:
        base_unit = rec["bu"]
    if "bv" in rec:
        base_value = check_value(rec["bv"], "bv")
    if "v" not in rec:
        if any(k in rec for k in ("vs", "vb", "vd")):
            raise Rejected("bad_value", f"SenML record {i}: only numeric values ('v') are accepted")
        if "n" in rec or "s" in rec:
            raise Rejected("bad_schema", f"SenML record {i} has no 'v'")
    return base_name, base_time, base_unit, base_value


# --- labels ---------------------------------------------------------------------------

def parse_label(payload: bytes, now_ms: int, limits: Limits) -> Label:
    """A ground-truth label ``{"start": ts, "end": ts, "kind": "spike", "metric": "temp", "magnitude": 3.0}``."""
    doc = load_json(payload, limits)
    if not isinstance(doc, dict) or "start" not in doc or "kind" not in doc:
        raise Rejected("bad_schema", "a label is {'start', 'end', 'kind', optional 'metric', 'magnitude'}")
    start_ms = normalize_ts(doc["start"], now_ms, limits, "start")
    end_ms = normalize_ts(doc.get("end", doc["start"]), now_ms, limits, "end")
    if end_ms < start_ms:
        raise Rejected("bad_ts", f"label end {end_ms} is before start {start_ms}")
    kind = doc["kind"]
    if not isinstance(kind, str) or not METRIC_RE.fullmatch(kind):
        raise Rejected("bad_schema", f"label kind {_show(kind)} must match {METRIC_RE.pattern}")
    metric = doc.get("metric") or ""
    if metric:
        check_metric(metric)
    magnitude = doc.get("magnitude", 0.0)
    magnitude = check_value(magnitude, "magnitude") if magnitude is not None else 0.0
    return Label(metric, start_ms, end_ms, kind, magnitude)


# --- encoding (simulator, replay, tests) ----------------------------------------------

def encode_reading(metric: str, ts_ms: int, value: float, unit: str = "") -> bytes:
    """A single-reading JSON payload."""
    doc = {"ts": ts_ms, "metric": metric, "value": value}
    if unit:
        doc["unit"] = unit
    return orjson.dumps(doc)


def encode_senml(readings: Iterable[tuple[str, int, float, str]]) -> bytes:
    """A SenML pack of (metric, ts_ms, value, unit) with the first time as base time, later ones relative."""
    records = []
    base_ms = None
    for metric, ts_ms, value, unit in readings:
        rec: dict[str, Any] = {"n": metric, "v": value}
        if base_ms is None:
            base_ms = ts_ms
            rec["bt"] = ts_ms / 1000
        elif ts_ms != base_ms:
            rec["t"] = (ts_ms - base_ms) / 1000
        if unit:
            rec["u"] = unit
        records.append(rec)
    return orjson.dumps(records)


def encode_label(metric: str, start_ms: int, end_ms: int, kind: str, magnitude: float) -> bytes:
    return orjson.dumps({"start": start_ms, "end": end_ms, "metric": metric, "kind": kind, "magnitude": magnitude})
