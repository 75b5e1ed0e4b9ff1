"""Per-metric canonical units (SenML names), unit conversions and valid ranges.

The clean stage converts every reading of a known metric to the metric's canonical unit and
rejects readings outside the metric's valid range (in canonical units) or in a unit that cannot
be converted. Metrics not in the table pass unchanged. Defaults cover the simulator's metrics;
``clean.units_file`` (TOML) overrides or adds metrics::

    [metrics.temp]
    unit = "Cel"
    min = -60.0
    max = 150.0
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aimass.core.config import ConfigError


@dataclass(frozen=True)
class MetricSpec:
    """Canonical unit and valid range (inclusive, canonical units) of one metric."""

    unit: str
    min: float = -math.inf
    max: float = math.inf


DEFAULT_METRICS: dict[str, MetricSpec] = {
    "temp": MetricSpec("Cel", -60.0, 150.0),
    "humidity": MetricSpec("%RH", 0.0, 100.0),
    "power": MetricSpec("W", 0.0, 1e7),
    "pressure": MetricSpec("hPa", 300.0, 1200.0),
    "vibration": MetricSpec("m/s2", 0.0, 500.0),
    "voltage": MetricSpec("V", 0.0, 1000.0),
    "current": MetricSpec("A", 0.0, 1000.0),
    "co2": MetricSpec("ppm", 0.0, 50000.0),
    "flow": MetricSpec("l/s", 0.0, 1e5),
    "rpm": MetricSpec("1/min", 0.0, 1e5),
}

# (from unit, canonical unit) -> (scale, offset): canonical = value * scale + offset.
CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    ("K", "Cel"): (1.0, -273.15),
    ("Pa", "hPa"): (0.01, 0.0),
    ("kW", "W"): (1000.0, 0.0),
    ("mW", "W"): (0.001, 0.0),
    ("mV", "V"): (0.001, 0.0),
    ("mA", "A"): (0.001, 0.0),
    ("gravity", "m/s2"): (9.80665, 0.0),
    ("m3/s", "l/s"): (1000.0, 0.0),
    ("1/s", "1/min"): (60.0, 0.0),
    ("Hz", "1/min"): (60.0, 0.0),
    ("%", "%RH"): (1.0, 0.0),
}


class UnitTable:
    """Vectorised unit conversion and range checks for micro-batches."""

    def __init__(self, metrics: dict[str, MetricSpec] | None = None) -> None:
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self._cache: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[np.ndarray, pa.Array]] = {}

    @classmethod
    def load(cls, path: str = "") -> "UnitTable":
        """The defaults, overridden by the ``[metrics.NAME]`` tables of a TOML file when given."""
        table = cls()
        if not path:
            return table
        try:
            data = tomllib.loads(Path(path).read_text())
            for name, spec in data.get("metrics", {}).items():
                table.metrics[name] = MetricSpec(str(spec["unit"]), float(spec.get("min", -math.inf)),
                                                 float(spec.get("max", math.inf)))
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"config key clean.units_file: cannot use {path}: {exc!r}; expected "
                              f"[metrics.NAME] tables with unit = \"Cel\", min = ..., max = ...") from None
        return table

    def apply(self, metric: pa.Array, unit: pa.Array, value: np.ndarray
              ) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
        """(canonical values, canonical units, bad-unit mask, out-of-range mask) of a batch."""
        metrics, units = _dictionary(metric), _dictionary(pc.fill_null(unit, ""))
        key = (tuple(metrics.dictionary.to_pylist()), tuple(units.dictionary.to_pylist()))
        numbers, out_units = self._rules_of(key)
        codes = metrics.indices.to_numpy(zero_copy_only=False) * len(key[1]) \
            + units.indices.to_numpy(zero_copy_only=False)
        scale, offset, low, high, bad = numbers[codes].T
        out_unit = out_units.take(pa.array(codes))
        converted = value * scale + offset
        bad_unit = bad.astype(bool)
        with np.errstate(invalid="ignore"):
            out_of_range = ~bad_unit & np.isfinite(converted) & ((converted < low) | (converted > high))
        return converted, out_unit, bad_unit, out_of_range

    def _rules_of(self, key: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple[np.ndarray, pa.Array]:
        """Rules of every (metric, unit) pair of a batch's dictionaries, row ``m * len(units) + u``:
        (scale, offset, min, max, bad unit) as floats and the output units. Cached: a stream's batches
        mostly repeat the same dictionaries."""
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= 1024:
                self._cache.clear()
            rules = [self._rule(m, u) for m in key[0] for u in key[1]]
            found = self._cache[key] = (np.array([r[:5] for r in rules], dtype=float).reshape(-1, 5),
                                        pa.array([r[5] for r in rules], pa.string()))
        return found

    def _rule(self, metric: str, unit: str) -> tuple[float, float, float, float, float, str]:
        """(scale, offset, min, max, bad unit 0/1, output unit) for one (metric, unit) pair."""
        spec = self.metrics.get(metric)
        if spec is None:
            return 1.0, 0.0, -math.inf, math.inf, 0.0, unit
        if unit in ("", spec.unit):
            return 1.0, 0.0, spec.min, spec.max, 0.0, spec.unit
        conversion = CONVERSIONS.get((unit, spec.unit))
        if conversion is None:
            return 1.0, 0.0, spec.min, spec.max, 1.0, unit
        return conversion[0], conversion[1], spec.min, spec.max, 0.0, spec.unit


def _dictionary(column: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    """A string column as one dictionary array (distinct values + an index per row)."""
    encoded = pc.dictionary_encode(column)
    return encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
