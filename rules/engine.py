"""The rule engine: vectorized conditions over whole batches, then a small per-series state machine.

For each rule the selector and the condition are evaluated on the whole Arrow batch with numpy
(``rules.expr``). Only the rows that can change something (condition true, or a series the rule
is already tracking) go through the per-(rule, series) state machine in Python:

    idle --condition--> pending --held `for` long enough--> active --clear--> idle
                        pending --condition false--> idle         active --repeat interval--> (repeat)

A series is (tenant, device_id, metric, window_s) with window_s 0 for readings. The engine
emits ``Signal``s (fire / clear / repeat); ``rules.alarms`` turns them into alarm lifecycle
events. ``RuleWatcher`` reloads rule files while running; a bad file is rejected with its
errors and the previous rules keep running.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rules.model import Rule, RuleSet, RulesInvalid, load_rules, render, rule_files

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str, str, int]  # tenant, device_id, metric, window_s


@dataclass(frozen=True)
class Signal:
    """What the engine decided for one (rule, series) at one row."""

    kind: str            # fire | clear | repeat
    rule: Rule
    series: SeriesKey
    ts_ms: int           # event time of the row
    value: float
    message: str
    received_ms: int     # bridge receive time of the row's data (latency), 0 if unknown


@dataclass
class SeriesState:
    """Per-(rule, series) progress: consecutive true rows, since when, and whether it fired."""

    since_ms: int = 0
    count: int = 0
    active: bool = False
    last_notify_ms: int = 0
    last_ts_ms: int = -(2**62)


def rule_fingerprint(rule: Rule) -> str:
    """What a rule's series state depends on; states survive a reload (or restart) when it is unchanged."""
    return repr((rule.stream, rule.selector, rule.condition.source, rule.clear.source if rule.clear else None,
                 rule.for_s, rule.for_windows))


class Batch:
    """One Arrow batch with lazily converted numpy columns and dictionary-encoded series."""

    def __init__(self, table: pa.Table, time_field: str):
        self.table = table
        self.n = table.num_rows
        self.time_field = time_field
        self._columns: dict[str, np.ndarray] = {}
        self._codes: dict[str, tuple[np.ndarray, list[str]]] = {}
        self._selector_masks: dict[Any, np.ndarray] = {}
        self._series_ids: np.ndarray | None = None
        self._series_index: dict[SeriesKey, int] | None = None

    def column(self, name: str) -> np.ndarray:
        """The column as numpy: NaN for missing numbers, False / "" for missing booleans / strings."""
        if name not in self._columns:
            col = self.table.column(name)
            if pa.types.is_string(col.type):
                arr = col.fill_null("").to_numpy(zero_copy_only=False)
            elif pa.types.is_boolean(col.type):
                arr = col.fill_null(False).to_numpy(zero_copy_only=False)
            elif pa.types.is_floating(col.type):
                arr = col.fill_null(np.nan).to_numpy(zero_copy_only=False)
            else:
                arr = col.to_numpy(zero_copy_only=False)
            self._columns[name] = arr
        return self._columns[name]

    def columns(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {n: self.column(n) for n in names}

    def codes(self, name: str) -> tuple[np.ndarray, list[str]]:
        """Dictionary codes of a string column and its distinct values."""
        if name not in self._codes:
            enc = pc.dictionary_encode(self.table.column(name).fill_null("")).combine_chunks()
            self._codes[name] = (enc.indices.to_numpy(zero_copy_only=False), enc.dictionary.to_pylist())
        return self._codes[name]

    def window_sizes(self) -> np.ndarray:
        if "window_s" in self.table.column_names:
            return self.column("window_s").astype(np.int64)
        return np.zeros(self.n, dtype=np.int64)

    def selected(self, rule: Rule) -> np.ndarray:
        """Rows whose series matches the rule's selector (glob patterns matched once per distinct value)."""
        sel = rule.selector
        if sel not in self._selector_masks:
            mask = np.ones(self.n, dtype=bool)
            for column, (regex, pattern) in zip(("tenant", "device_id", "metric"),
                                                zip(sel.regexes(), (sel.tenant, sel.device, sel.metric))):
                if pattern == "*":
                    continue
                codes, values = self.codes(column)
                hits = np.fromiter((regex.match(v) is not None for v in values), dtype=bool, count=len(values))
                mask &= hits[codes]
            if sel.window_s:
                mask &= self.window_sizes() == sel.window_s
            self._selector_masks[sel] = mask
        return self._selector_masks[sel]

    def series_ids(self) -> np.ndarray:
        """A dense id per distinct series in the batch, per row."""
        if self._series_ids is None:
            parts = [self.codes(c)[0].astype(np.int64) for c in ("device_id", "metric")]
            parts.append(np.unique(self.window_sizes(), return_inverse=True)[1].reshape(-1))
            ids = self.codes("tenant")[0].astype(np.int64)
            for part in parts:  # re-densify after each step so the combined code never overflows
                ids = np.unique(ids * (int(part.max(initial=0)) + 1) + part, return_inverse=True)[1].reshape(-1)
            self._series_ids = ids
        return self._series_ids

    def series_key(self, row: int) -> SeriesKey:
        t, d, m = (self.codes(c) for c in ("tenant", "device_id", "metric"))
        return (t[1][t[0][row]], d[1][d[0][row]], m[1][m[0][row]], int(self.window_sizes()[row]))

    def rows_of(self, keys: Iterable[SeriesKey]) -> np.ndarray:
        """Mask of the rows that belong to any of ``keys``."""
        if self._series_index is None:
            ids = self.series_ids()
            first = np.unique(ids, return_index=True)[1]
            self._series_index = {self.series_key(int(r)): int(ids[r]) for r in first}
        wanted = [self._series_index[k] for k in keys if k in self._series_index]
        if not wanted:
            return np.zeros(self.n, dtype=bool)
        return np.isin(self.series_ids(), np.array(wanted))

    def row(self, i: int) -> dict[str, Any]:
        """One row as plain Python values (for message templates)."""
        return {name: _plain(self.column(name)[i]) for name in self.table.column_names}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class Engine:
    """Evaluates a RuleSet on batches of each stream and keeps per-(rule, series) state."""

    def __init__(self, ruleset: RuleSet | None = None):
        self.ruleset = ruleset or RuleSet()
        self.states: dict[str, dict[SeriesKey, SeriesState]] = {}
        self.fingerprints = {r.name: rule_fingerprint(r) for r in self.ruleset.rules}

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap in new rules; series state is kept for rules whose logic did not change."""
        new = {r.name: rule_fingerprint(r) for r in ruleset.rules}
        self.states = {name: s for name, s in self.states.items() if self.fingerprints.get(name) == new.get(name)}
        self.ruleset, self.fingerprints = ruleset, new

    def process(self, stream: str, table: pa.Table) -> list[Signal]:
        """Run every rule of ``stream`` over the batch (rows of each series in event-time order)."""
        rules = self.ruleset.for_stream(stream)
        if not rules or table.num_rows == 0:
            return []
        batch = Batch(table, rules[0].time_field)
        signals: list[Signal] = []
        for rule in rules:
            signals += self._process_rule(rule, batch)
        return signals

    def _process_rule(self, rule: Rule, batch: Batch) -> list[Signal]:
        states = self.states.setdefault(rule.name, {})
        selected = batch.selected(rule)
        cond = rule.condition.evaluate(batch.columns(rule.condition.fields), batch.n)
        cond = np.asarray(cond, dtype=bool) & selected
        if not cond.any() and not states:
            return []
        # Every row of a series that is tracked already or turns true in this batch can change state.
        ids = batch.series_ids()
        candidates = np.isin(ids, np.unique(ids[cond]))
        if states:
            candidates |= batch.rows_of(states)
        rows = np.flatnonzero(candidates & selected)
        if rows.size == 0:
            return []
        if rule.clear is not None:
            clear = np.asarray(rule.clear.evaluate(batch.columns(rule.clear.fields), batch.n), dtype=bool)
        else:
            clear = ~cond
        ts = batch.column(rule.time_field)
        out: list[Signal] = []
        values: np.ndarray | None = None
        for_ms, repeat_ms = rule.for_s * 1000.0, rule.repeat_s * 1000.0
        for i in rows.tolist():
            key = batch.series_key(i)
            t = int(ts[i])
            st = states.get(key)
            if st is None:
                if not cond[i]:
                    continue
                st = states[key] = SeriesState()
            elif t <= st.last_ts_ms:
                continue  # a replayed or out-of-order row: already accounted for
            st.last_ts_ms = t
            kind = ""
            if not st.active:
                if not cond[i]:
                    del states[key]
                    continue
                if st.count == 0:
                    st.since_ms = t
                st.count += 1
                held = st.count >= rule.for_windows if rule.for_windows else t - st.since_ms >= for_ms
                if held:
                    st.active, st.last_notify_ms, kind = True, t, "fire"
            elif clear[i]:
                del states[key]
                kind = "clear"
            elif repeat_ms and t - st.last_notify_ms >= repeat_ms:
                st.last_notify_ms, kind = t, "repeat"
            if kind:
                if values is None:
                    values = np.asarray(rule.value.evaluate(batch.columns(rule.value.fields), batch.n), dtype=float)
                out.append(self._signal(kind, rule, batch, i, key, t, float(values[i])))
        return out

    @staticmethod
    def _signal(kind: str, rule: Rule, batch: Batch, i: int, key: SeriesKey, t: int, value: float) -> Signal:
        row = batch.row(i)
        context = {**row, **dict(rule.labels), "rule": rule.name, "severity": rule.severity, "value": value,
                   "transition": kind}
        received = int(row.get(rule.received_field) or 0) if rule.received_field else 0
        return Signal(kind, rule, key, t, value, render(rule.message, context), received)

    def snapshot(self) -> dict:
        """JSON-able series state (persisted with the alarms so `for` progress survives a restart)."""
        states = {name: [[list(k), s.since_ms, s.count, s.active, s.last_notify_ms, s.last_ts_ms]
                         for k, s in series.items()] for name, series in self.states.items() if series}
        return {"fingerprints": self.fingerprints, "states": states}

    def restore(self, snap: dict) -> None:
        """Series state from ``snapshot``; ``set_rules`` then keeps it only for unchanged rules."""
        self.fingerprints = dict(snap["fingerprints"])
        self.states = {name: {(k[0], k[1], k[2], int(k[3])): SeriesState(*rest) for k, *rest in rows}
                       for name, rows in snap["states"].items()}


@dataclass
class RuleWatcher:
    """Reloads rule files when they change; keeps the last good rules when a change is bad."""

    path: str
    engine: Engine
    errors: list[str] = field(default_factory=list)
    _signature: tuple = ()

    def signature(self) -> tuple:
        files = rule_files(self.path) if Path(self.path).exists() else []
        out = []
        for f in files:
            try:
                st = f.stat()
                out.append((str(f), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(f), 0, 0))
        return tuple(out)

    def poll(self) -> bool:
        """Reload if the files changed; True when new rules were installed."""
        sig = self.signature()
        if sig == self._signature:
            return False
        self._signature = sig
        try:
            ruleset = load_rules(self.path)
        except RulesInvalid as exc:
            self.errors = [str(e) for e in exc.errors]
            log.error("rule files rejected, %d previous rules keep running:\n  %s",
                      len(self.engine.ruleset.rules), "\n  ".join(self.errors))
            return False
        self.errors = []
        self.engine.set_rules(ruleset)
        log.info("loaded %d rules and %d receivers from %s", len(ruleset.rules), len(ruleset.receivers), self.path)
        return True

