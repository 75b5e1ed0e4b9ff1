"""The rule engine: vectorized conditions over whole batches, then a compiled per-series state machine.

For each rule the selector and the condition (and the clear condition) are evaluated on the
whole Arrow batch with numpy (``aimass.rules.expr``). A numba kernel then walks the batch's rows in
order and advances the per-(rule, series) state machine, held in flat arrays indexed by a
dense series id (``SeriesRegistry``):

    idle --condition--> pending --held `for` long enough--> active --clear--> idle
                        pending --condition false--> idle         active --repeat interval--> (repeat)

Python only touches the rows where something happened. A series is (tenant, device_id, metric,
window_s) with window_s 0 for readings. The engine emits ``Signal``s (fire / clear / repeat);
``aimass.rules.alarms`` turns them into alarm lifecycle events. A row at or before the last event time a
tracked series has seen is a replay and is skipped. ``RuleWatcher`` reloads rule files while
running; a bad file is rejected with its errors and the previous rules keep running.

Failures are contained per rule. Before a file is accepted (``load_checked``, also what
``aimass rules check`` runs) each rule runs on a synthetic batch of its stream holding the awkward
values (zeros, extremes, NaN, nulls, empty strings) and renders its message for every row; a rule
that still raises on a live batch is suspended (``Suspension``) until its definition changes, and
the engine emits a ``rule_error`` alarm naming it (to the rule's receivers) while the other rules
run on; the alarm clears when the rule is changed or removed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from aimass.rules.expr import BOOL, NUM, compile_expr
from aimass.rules.model import (RULE_ERROR, STREAMS, Rule, RuleError, RuleSet, RulesInvalid, Selector,
                                load_rules, render, rule_files, template_fields)

log = logging.getLogger(__name__)

SeriesKey = tuple[str, str, str, int]  # tenant, device_id, metric, window_s


@dataclass(slots=True)
class Signal:
    """What the engine decided for one (rule, series) at one row."""

    kind: str            # fire | clear | repeat
    rule: Rule
    series: SeriesKey
    ts_ms: int           # event time of the row
    value: float
    received_ms: int     # bridge receive time of the row's data (latency), 0 if unknown
    columns: dict        # template field -> values of the batch's signalling rows, shared by its signals
    index: int           # this signal's position in ``columns``

    @property
    def message(self) -> str:
        """The rule's message for this row (rendered only when used: most signals are replays or repeats)."""
        row = {name: values[self.index] for name, values in self.columns.items()}
        return render(self.rule.message, {**row, **dict(self.rule.labels), "rule": self.rule.name,
                                          "severity": self.rule.severity, "value": self.value,
                                          "transition": self.kind})


KIND_NAMES = ("", "fire", "clear", "repeat")
REOPEN = 4  # step_rule's "the incident changed": the alarm is cleared and raised again at the row


@njit(cache=True, nogil=True)
def step_rule(series: np.ndarray, ts: np.ndarray, selected: np.ndarray, cond: np.ndarray, clear: np.ndarray,
              reopen: np.ndarray, for_windows: int, for_ms: float, clear_windows: int, repeat_ms: float,
              tracked: np.ndarray, since: np.ndarray, count: np.ndarray, active: np.ndarray, last_notify: np.ndarray,
              last_ts: np.ndarray) -> np.ndarray:
    """Advance one rule's state over a batch (rows in order); returns per row 0, or 1/2/3/4 =
    fire/clear/repeat/reopen. While active, ``count`` counts the consecutive rows that meet the clear."""
    kinds = np.zeros(series.size, np.int8)
    for i in range(series.size):
        if not selected[i]:
            continue
        g, t = series[i], ts[i]
        if not tracked[g]:
            if not cond[i]:
                continue
            tracked[g], count[g], active[g] = True, 0, False
        elif t <= last_ts[g]:
            continue  # a replayed or out-of-order row: already accounted for
        last_ts[g] = t
        if not active[g]:
            if not cond[i]:
                tracked[g] = False
                continue
            if count[g] == 0:
                since[g] = t
            count[g] += 1
            if (count[g] >= for_windows) if for_windows > 0 else (t - since[g] >= for_ms):
                active[g], last_notify[g], kinds[i], count[g] = True, t, 1, 0
        elif clear[i]:
            count[g] += 1
            if count[g] >= clear_windows:
                tracked[g], kinds[i] = False, 2
            elif reopen[i]:  # the incident changed while calming down: still one quiet row towards the clear
                last_notify[g], kinds[i] = t, 4
        else:
            count[g] = 0
            if reopen[i]:
                last_notify[g], kinds[i] = t, 4
            elif repeat_ms > 0 and t - last_notify[g] >= repeat_ms:
                last_notify[g], kinds[i] = t, 3
    return kinds


def warm_up() -> None:
    """Compile ``step_rule`` (or load it from numba's cache) now: that takes a second or two, and a
    stream whose conditions are all false never calls it, so otherwise the first alarm pays for it."""
    ints, flags = np.zeros(1, np.int64), np.zeros(1, np.bool_)
    arrow_ts = ints.copy()
    arrow_ts.setflags(write=False)  # times usually come zero-copy (read-only) from Arrow, else converted
    for ts in (arrow_ts, ints.copy()):
        step_rule(ints, ts, flags, flags.copy(), flags.copy(), flags.copy(), 0, 0.0, 1, 0.0, flags.copy(),
                  ints.copy(), ints.copy(), flags.copy(), ints.copy(), ints.copy())


class RuleState:
    """One rule's state machine per series: flat arrays indexed by series id, grown on demand."""

    FIELDS = ("since", "count", "active", "last_notify", "last_ts")

    def __init__(self, size: int = 1024):
        self.tracked = np.zeros(size, np.bool_)
        self.since = np.zeros(size, np.int64)
        self.count = np.zeros(size, np.int64)
        self.active = np.zeros(size, np.bool_)
        self.last_notify = np.zeros(size, np.int64)
        self.last_ts = np.zeros(size, np.int64)

    def ensure(self, size: int) -> None:
        if size <= self.tracked.size:
            return
        grown = max(size, 2 * self.tracked.size)
        for name in ("tracked", *self.FIELDS):
            old = getattr(self, name)
            new = np.zeros(grown, old.dtype)
            new[:old.size] = old
            setattr(self, name, new)

    def any_tracked(self) -> bool:
        return bool(self.tracked.any())


class SeriesRegistry:
    """Dense int ids for series keys, stable for the engine's lifetime."""

    def __init__(self):
        self.ids: dict[SeriesKey, int] = {}
        self.keys: list[SeriesKey] = []

    def id_of(self, key: SeriesKey) -> int:
        sid = self.ids.get(key)
        if sid is None:
            sid = self.ids[key] = len(self.keys)
            self.keys.append(key)
        return sid


def rule_fingerprint(rule: Rule) -> str:
    """What a rule's series state depends on; states survive a reload (or restart) when it is unchanged."""
    return repr((rule.stream, rule.selector, rule.condition.source, rule.clear.source if rule.clear else None,
                 rule.clear_windows, rule.reopen.source if rule.reopen else None,
                 rule.for_s, rule.for_windows))


class Batch:
    """One Arrow batch with lazily converted numpy columns and dictionary-encoded series."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.n = table.num_rows
        self.names = frozenset(table.column_names)
        self._columns: dict[str, np.ndarray] = {}
        self._codes: dict[str, tuple[np.ndarray, list[str]]] = {}
        self._selector_masks: dict[Selector, np.ndarray] = {}
        self._series_ids: np.ndarray | None = None
        self._global_ids: np.ndarray | None = None
        self._window_sizes: np.ndarray | None = None

    def column(self, name: str) -> np.ndarray:
        """The column as numpy: NaN / 0 / False / "" for missing floats / integers / booleans / strings."""
        if name not in self._columns:
            col = self.table.column(name)
            if pa.types.is_string(col.type):
                arr = col.fill_null("").to_numpy(zero_copy_only=False)
            elif pa.types.is_boolean(col.type):
                arr = col.fill_null(False).to_numpy(zero_copy_only=False)
            elif pa.types.is_floating(col.type):
                arr = col.fill_null(np.nan).to_numpy(zero_copy_only=False)
            else:
                arr = col.fill_null(0).to_numpy(zero_copy_only=False)
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
        """Window size per row (0 for readings)."""
        if self._window_sizes is None:
            self._window_sizes = (self.column("window_s").astype(np.int64) if "window_s" in self.names
                                  else np.zeros(self.n, dtype=np.int64))
        return self._window_sizes

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
            parts = [self.codes(c)[0].astype(np.int64) for c in ("tenant", "device_id", "metric")]
            parts.append(np.unique(self.window_sizes(), return_inverse=True)[1].reshape(-1))
            combined = np.zeros(self.n, np.int64)
            for part in parts:  # mixed radix; re-densify first whenever the product could overflow
                radix = int(part.max(initial=0)) + 1
                if int(combined.max(initial=0)) + 1 > (2**62) // radix:
                    combined = np.unique(combined, return_inverse=True)[1].reshape(-1)
                combined = combined * radix + part
            self._series_ids = np.unique(combined, return_inverse=True)[1].reshape(-1)
        return self._series_ids

    def series_keys(self, rows: np.ndarray) -> list[SeriesKey]:
        """The series of each of ``rows``."""
        parts = []
        for column in ("tenant", "device_id", "metric"):
            codes, values = self.codes(column)
            parts.append(np.array(values, dtype=object)[codes[rows]].tolist())
        return list(zip(*parts, self.window_sizes()[rows].tolist()))

    def global_ids(self, registry: SeriesRegistry) -> np.ndarray:
        """The registry's series id of every row."""
        if self._global_ids is None:
            ids = self.series_ids()
            first = np.unique(ids, return_index=True)[1]
            lookup = np.array([registry.id_of(k) for k in self.series_keys(first)], dtype=np.int64)
            self._global_ids = lookup[ids]
        return self._global_ids


def rule_definition(rule: Rule) -> str:
    """Everything a rule does, as text: a suspended rule runs again once this changes."""
    return repr((rule_fingerprint(rule), rule.value.source, rule.message, rule.labels, rule.severity,
                 rule.repeat_s, rule.receivers))


_ALWAYS, _ZERO = compile_expr("true", {}, BOOL), compile_expr("0", {}, NUM)


@dataclass
class Suspension:
    """A rule taken out of evaluation after it raised, until its definition changes (JSON-able)."""

    rule: str
    definition: str
    error: str               # "ValueError: ..."
    where: str               # file:line of the rule
    receivers: list[str]

    def signal(self, kind: str) -> Signal:
        """The ``rule_error`` alarm's fire (the rule failed) or clear (it was changed or removed)."""
        text = (f"rule {self.rule!r} ({self.where}) was changed or removed and runs again" if kind == "clear" else
                f"rule {self.rule!r} ({self.where}) failed and is suspended until it is changed: {self.error}")
        return notice(kind, RULE_ERROR, "critical", (("failed_rule", self.rule), ("file", self.where)), text,
                      ("", "", self.rule, 0), int(time.time() * 1000), tuple(self.receivers))


def notice(kind: str, name: str, severity: str, labels: tuple[tuple[str, str], ...], text: str, series: SeriesKey,
           ts_ms: int, receivers: tuple[str, ...] = ()) -> Signal:
    """A signal no batch row produced (a ``rule_error``, an alert on the pipeline): its message is ``text``."""
    rule = Rule(name=name, stream="", selector=Selector(), condition=_ALWAYS, clear=None, value=_ZERO,
                severity=severity, labels=labels, message=text.replace("{", "{{").replace("}", "}}"),
                receivers=receivers)
    return Signal(kind, rule, series, ts_ms, 0.0, 0, {}, 0)


class Engine:
    """Evaluates a RuleSet on batches of each stream and keeps per-(rule, series) state."""

    def __init__(self, ruleset: RuleSet | None = None):
        self.ruleset = ruleset or RuleSet()
        self.registry = SeriesRegistry()
        self.states: dict[str, RuleState] = {}
        self.fingerprints = {r.name: rule_fingerprint(r) for r in self.ruleset.rules}
        self.receivers = {r.name: r.receivers for r in self.ruleset.rules}
        self.suspended: dict[str, Suspension] = {}
        self.notices: list[Signal] = []  # rule_error clears from set_rules, taken by the next batch

    def set_rules(self, ruleset: RuleSet) -> None:
        """Swap in new rules; series state is kept for rules whose logic did not change, a suspended
        rule stays suspended while its definition is the same."""
        new = {r.name: rule_fingerprint(r) for r in ruleset.rules}
        self.states = {name: s for name, s in self.states.items() if self.fingerprints.get(name) == new.get(name)}
        self.ruleset, self.fingerprints = ruleset, new
        self.receivers = {r.name: r.receivers for r in ruleset.rules}
        definitions = {r.name: rule_definition(r) for r in ruleset.rules}
        for name, suspension in list(self.suspended.items()):
            if definitions.get(name) != suspension.definition:
                del self.suspended[name]
                self.notices.append(suspension.signal("clear"))

    def take_notices(self) -> list[Signal]:
        """Signals not tied to a batch (``rule_error`` clears) since the last call."""
        notices, self.notices = self.notices, []
        return notices

    def receivers_of(self, rule_name: str, series: SeriesKey) -> tuple[str, ...]:
        """Who an alarm's events go to: its rule's receivers; a ``rule_error`` alarm's, the failed rule's."""
        if rule_name == RULE_ERROR:
            failed = series[2]
            if failed in self.suspended:
                return tuple(self.suspended[failed].receivers)
            rule_name = failed  # cleared: the rule as it is now
        return self.receivers.get(rule_name, ())

    def process(self, stream: str, table: pa.Table) -> list[Signal]:
        """Run every rule of ``stream`` over the batch (rows of each series in event-time order); a rule
        that raises is suspended and gives a ``rule_error`` signal instead."""
        rules = [r for r in self.ruleset.for_stream(stream) if r.name not in self.suspended]
        if not rules or table.num_rows == 0:
            return []
        batch = Batch(table)
        signals: list[Signal] = []
        with np.errstate(all="ignore"):
            for rule in rules:
                try:
                    signals += self._process_rule(rule, batch)
                except Exception as exc:  # noqa: BLE001 - one rule's failure must not stop the others
                    signals.append(self._suspend(rule, exc))
        return signals

    def _suspend(self, rule: Rule, exc: Exception) -> Signal:
        suspension = self.suspended[rule.name] = Suspension(
            rule.name, rule_definition(rule), f"{type(exc).__name__}: {str(exc)[:300]}", f"{rule.file}:{rule.line}",
            list(rule.receivers))
        self.states.pop(rule.name, None)
        log.error("rule %r (%s) failed on a %s batch and is suspended until it is changed: %s",
                  rule.name, suspension.where, rule.stream, suspension.error)
        return suspension.signal("fire")

    def _process_rule(self, rule: Rule, batch: Batch) -> list[Signal]:
        state = self.states.get(rule.name)
        selected = batch.selected(rule)
        cond = np.asarray(rule.condition.evaluate(batch.columns(rule.condition.fields), batch.n), dtype=bool)
        if not (cond & selected).any() and (state is None or not state.any_tracked()):
            return []
        if state is None:
            state = self.states[rule.name] = RuleState()
        series = batch.global_ids(self.registry)
        state.ensure(len(self.registry.keys))
        if rule.clear is not None:
            clear = np.asarray(rule.clear.evaluate(batch.columns(rule.clear.fields), batch.n), dtype=bool)
        else:
            clear = ~cond
        if rule.reopen is not None:
            reopen = np.asarray(rule.reopen.evaluate(batch.columns(rule.reopen.fields), batch.n), dtype=bool)
        else:
            reopen = np.zeros(batch.n, dtype=bool)
        ts = batch.column(rule.time_field).astype(np.int64, copy=False)
        kinds = step_rule(series, ts, selected, cond, clear, reopen, rule.for_windows, rule.for_s * 1000.0,
                          max(rule.clear_windows, 1), rule.repeat_s * 1000.0, state.tracked, state.since,
                          state.count, state.active, state.last_notify, state.last_ts)
        rows = np.flatnonzero(kinds)
        if rows.size == 0:
            return []
        values = np.asarray(rule.value.evaluate(batch.columns(rule.value.fields), batch.n), dtype=float)
        columns = {n: batch.column(n)[rows].tolist() for n in template_fields(rule.message) if n in batch.names}
        received = (batch.column(rule.received_field)[rows].tolist() if rule.received_field
                    else [0] * rows.size)
        keys = self.registry.keys
        signals = []
        for j, (k, g, t, v, r) in enumerate(zip(kinds[rows].tolist(), series[rows].tolist(), ts[rows].tolist(),
                                                values[rows].tolist(), received)):
            if k == REOPEN:  # the open incident changed: its alarm ends and a new one starts here
                signals.append(Signal("clear", rule, keys[g], t, v, r, columns, j))
                k = 1
            signals.append(Signal(KIND_NAMES[k], rule, keys[g], t, v, r, columns, j))
        return signals

    def snapshot(self, keep: Callable[[SeriesKey], bool] | None = None) -> dict:
        """JSON-able series state (of the series ``keep`` selects, default all), checkpointed with the alarms
        so `for` progress survives a restart or a handover."""
        states = {}
        for name, st in self.states.items():
            tracked = [g for g in np.flatnonzero(st.tracked).tolist() if keep is None or keep(self.registry.keys[g])]
            if tracked:
                states[name] = [[list(self.registry.keys[g]), *(getattr(st, f)[g].item() for f in RuleState.FIELDS)]
                                for g in tracked]
        return {"fingerprints": self.fingerprints, "states": states,
                "suspended": {name: asdict(s) for name, s in self.suspended.items()}}

    def merge(self, snap: dict) -> None:
        """Add the series state of another partition's ``snapshot``, for the rules whose logic it was made with,
        and its suspensions (one whose rule changed meanwhile clears its ``rule_error`` alarm instead)."""
        self._add_states({name: rows for name, rows in snap["states"].items()
                          if snap["fingerprints"].get(name) == self.fingerprints.get(name)})
        definitions = {r.name: rule_definition(r) for r in self.ruleset.rules}
        for name, doc in snap.get("suspended", {}).items():
            suspension = Suspension(**doc)
            if definitions.get(name) == suspension.definition:
                self.suspended.setdefault(name, suspension)
            elif name not in self.suspended:
                self.notices.append(suspension.signal("clear"))

    def forget(self, drop: Callable[[SeriesKey], bool]) -> None:
        """Drop the state of the series ``drop`` selects (their partition went to another alerter)."""
        gone = np.array([drop(key) for key in self.registry.keys], dtype=bool)
        for st in self.states.values():
            st.tracked[:gone.size] &= ~gone[:st.tracked.size]

    def _add_states(self, states: dict[str, list]) -> None:
        for name, rows in states.items():
            st = self.states.setdefault(name, RuleState())
            for key, *values in rows:
                g = self.registry.id_of((key[0], key[1], key[2], int(key[3])))
                st.ensure(g + 1)
                st.tracked[g] = True
                for f, v in zip(RuleState.FIELDS, values):
                    getattr(st, f)[g] = v


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

    def poll(self, force: bool = False) -> bool:
        """Reload if the files changed (or ``force``); True when new rules were installed. Whatever
        the files hold (or a directory that cannot be listed), the previous rules keep running."""
        try:
            sig = self.signature()
            if sig == self._signature and not force:
                return False
            self._signature = sig
            ruleset = load_checked(self.path)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            errors = ([str(e) for e in exc.errors] if isinstance(exc, RulesInvalid)
                      else [f"{self.path}: cannot load ({type(exc).__name__}: {str(exc)[:200]})"])
            if errors != self.errors:  # an unlistable directory fails every poll: say it once
                log.error("rule files rejected, %d previous rules keep running:\n  %s",
                          len(self.engine.ruleset.rules), "\n  ".join(errors))
            self.errors = errors
            return False
        self.errors = []
        self.engine.set_rules(ruleset)
        log.info("loaded %d rules and %d receivers from %s", len(ruleset.rules), len(ruleset.receivers), self.path)
        return True


# --- trial run --------------------------------------------------------------------------

def _awkward_values(typ: pa.DataType) -> list:
    """Values of one column type that expressions and templates trip over."""
    if pa.types.is_string(typ):
        return ["", "acme", "pump-1", "température", None]
    if pa.types.is_boolean(typ):
        return [True, False, None]
    if pa.types.is_binary(typ):
        return [b"", b"\xff\x00{", None]
    if pa.types.is_integer(typ):
        top = 2 ** (typ.bit_width - 1) - 1
        return [0, 1, -1, 7, top, -top - 1, None]
    return [0.0, 1.0, -1.0, 2.5, -0.0, 5e-324, 1e300, -1e300, math.nan, math.inf, -math.inf, None]


def synthetic_batch(stream: str, rows: int = 24) -> pa.Table:
    """``rows`` rows of ``stream``'s contract schema, each column cycling through its awkward values."""
    schema = STREAMS[stream][0]
    columns = {}
    for f in schema:
        values = _awkward_values(f.type)
        columns[f.name] = [values[i % len(values)] for i in range(rows)]
    return pa.Table.from_pydict(columns, schema=schema)


def trial_run(rule: Rule) -> None:
    """Run ``rule`` the way the engine does on a synthetic batch of its stream (every row selected)
    and render its message for every row; raises whatever the rule would raise on live data."""
    batch = Batch(synthetic_batch(rule.stream))
    trial = replace(rule, selector=Selector(), for_s=0.0, for_windows=0)  # fire at once: values, messages too
    with np.errstate(all="ignore"):
        Engine(RuleSet(rules=[trial]))._process_rule(trial, batch)
        values = np.asarray(rule.value.evaluate(batch.columns(rule.value.fields), batch.n), dtype=float)
    columns = {n: batch.column(n).tolist() for n in template_fields(rule.message) if n in batch.names}
    for i, value in enumerate(values.tolist()):
        Signal("fire", rule, ("", "", "", 0), 0, value, 0, columns, i).message  # noqa: B018 - rendering is the test


def load_checked(paths: list[str | Path] | str | Path) -> RuleSet:
    """``load_rules``, then ``trial_run`` of every rule: a rule that would fail on data is rejected
    at its line like any other error (``RulesInvalid``)."""
    ruleset = load_rules(paths)
    errors = []
    for rule in ruleset.rules:
        try:
            trial_run(rule)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            errors.append(RuleError(rule.file, rule.line, 1, f"rule {rule.name!r} fails on a synthetic "
                                                             f"{rule.stream} batch: {type(exc).__name__}: {str(exc)[:200]}"))
    if errors:
        raise RulesInvalid(errors)
    return ruleset
