"""Rule semantics against hand-computed expectations: for, hysteresis, repeat, clear/re-raise, flapping,
selectors, replays, and hot reload that survives a bad file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aimass.rules import engine as engine_module
from aimass.rules import expr
from aimass.rules.alarms import AlarmStore, StateDB, should_notify
from aimass.rules.engine import Engine, RuleWatcher
from aimass.core import contract
from tests.fixtures_rules import POISON_VALUE, poisoned_sqrt, predictions, readings, ruleset, table, windows

REPO = Path(__file__).resolve().parent.parent


def run(engine: Engine, stream: str, table) -> list[tuple[str, int]]:
    return [(s.kind, s.ts_ms) for s in engine.process(stream, table)]


def window_rows(means: list[float], step_ms: int = 10_000, **extra) -> list[dict]:
    return [dict(window_end_ms=(i + 1) * step_ms, window_start_ms=i * step_ms, mean=m, **extra)
            for i, m in enumerate(means)]


def engine_for(tmp_path, rule_yaml: str) -> Engine:
    return Engine(ruleset(tmp_path, "rules:\n" + rule_yaml))


def test_for_n_windows_needs_consecutive_true_rows(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, for: 3 windows}
""")
    # true, true, false (reset), true, true, true -> fires on the 6th window (60 s) only
    assert run(engine, "windows", windows(*window_rows([85, 86, 70, 90, 91, 92]))) == [("fire", 60_000)]


# Run in a fresh interpreter: the other tests here compile the kernel too, which would hide a gap.
WARM_UP_CHECK = r"""
import sys
from pathlib import Path
from aimass.rules.engine import Engine, step_rule, warm_up
from tests.fixtures_rules import readings, ruleset, windows
warm_up()
compiled = list(step_rule.signatures)
engine = Engine(ruleset(Path(sys.argv[1]), "rules:\n"
                        "  - {name: hot, stream: windows, condition: mean > 80}\n"
                        "  - {name: spike, stream: readings, condition: value > 90}\n"))
assert engine.process("windows", windows(dict(window_end_ms=10_000, window_start_ms=0, mean=85.0)))
assert engine.process("readings", readings(dict(ts_ms=1000, value=95.0)))
assert step_rule.signatures == compiled, "a real batch compiled another signature"
"""


def test_warm_up_compiles_the_signature_real_batches_use(tmp_path):
    """The alerter warms the rule kernel at start; readings and windows must not compile it again."""
    r = subprocess.run([sys.executable, "-c", WARM_UP_CHECK, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_for_duration_in_event_time(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: readings, condition: value > 90, for: 30s}
""")
    rows = [dict(ts_ms=t * 1000, value=v) for t, v in [(0, 95), (10, 96), (20, 97), (29, 98), (30, 99), (40, 99)]]
    # pending since t=0; 29 s is not enough, 30 s is; already active at 40 s
    assert run(engine, "readings", readings(*rows)) == [("fire", 30_000)]


def test_no_for_fires_at_once_and_default_clear_is_not_condition(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80}
""")
    assert run(engine, "windows", windows(*window_rows([70, 81, 82, 79]))) == [("fire", 20_000), ("clear", 40_000)]


def test_hysteresis_clear_condition(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, clear: mean < 75}
""")
    means = [85, 78, 76, 74, 78, 82]
    # fire at 85; 78/76 are neither hot nor cool enough to clear; clear at 74; 78 nothing; 82 fires again
    assert run(engine, "windows", windows(*window_rows(means))) == [("fire", 10_000), ("clear", 40_000),
                                                                  ("fire", 60_000)]


def test_repeat_interval_suppresses_until_due(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, repeat: 25s}
""")
    got = run(engine, "windows", windows(*window_rows([90] * 7)))
    # fired at 10 s; repeats when 25 s have passed since the last notification: 40 s, then 70 s
    assert got == [("fire", 10_000), ("repeat", 40_000), ("repeat", 70_000)]


def test_batches_split_anywhere_give_the_same_signals(tmp_path):
    text = """
  - {name: hot, stream: windows, condition: mean > 80, for: 2 windows, clear: mean < 75, repeat: 20s}
"""
    means = [85, 86, 87, 90, 74, 81, 82, 60, 99, 99, 99, 99]
    rows = window_rows(means)
    whole = run(engine_for(tmp_path, text), "windows", windows(*rows))
    engine = engine_for(tmp_path, text)
    pieces = []
    for chunk in (rows[:1], rows[1:5], rows[5:6], rows[6:]):
        pieces += run(engine, "windows", windows(*chunk))
    assert whole == pieces
    assert whole == [("fire", 20_000), ("repeat", 40_000), ("clear", 50_000), ("fire", 70_000),
                     ("clear", 80_000), ("fire", 100_000), ("repeat", 120_000)]


def test_replayed_batch_changes_nothing(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, for: 2 windows}
""")
    batch = windows(*window_rows([85, 86, 87]))
    assert run(engine, "windows", batch) == [("fire", 20_000)]
    assert run(engine, "windows", batch) == []


def test_selectors_globs_and_window_size(tmp_path):
    engine = engine_for(tmp_path, """
  - name: pumps
    stream: windows
    selector: {tenant: "ac*", device: "pump-*", metric: "temp*", window_s: 10}
    condition: mean > 80
""")
    rows = [
        dict(device_id="pump-1", window_end_ms=10_000, mean=90),                      # matches
        dict(device_id="fan-1", window_end_ms=10_000, mean=90),                       # device
        dict(device_id="pump-2", metric="pressure", window_end_ms=10_000, mean=90),   # metric
        dict(device_id="pump-3", window_s=60, window_end_ms=60_000, mean=90),         # window size
        dict(tenant="other", device_id="pump-4", window_end_ms=10_000, mean=90),      # tenant
        dict(device_id="pump-5", metric="temperature_2", window_end_ms=10_000, mean=90),  # matches
    ]
    fired = [s.series for s in engine.process("windows", windows(*rows))]
    assert fired == [("acme", "pump-1", "temperature", 10), ("acme", "pump-5", "temperature_2", 10)]


def test_series_are_independent_within_one_batch(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, for: 2 windows}
""")
    rows = []
    for i in range(3):
        rows.append(dict(device_id="a", window_end_ms=(i + 1) * 10_000, mean=90))
        rows.append(dict(device_id="b", window_end_ms=(i + 1) * 10_000, mean=90 if i != 1 else 10))
    fired = [(s.series[1], s.ts_ms) for s in engine.process("windows", windows(*rows))]
    assert fired == [("a", 20_000)]  # b was interrupted at 20 s


def test_message_template_and_value(tmp_path):
    engine = engine_for(tmp_path, """
  - name: hot
    stream: windows
    condition: mean > 80
    value: mean - 80
    labels: {team: ops}
    message: "{device_id} {metric} mean {mean:.1f} is {value:.1f} over ({team}, {rule}, {severity})"
""")
    [signal] = engine.process("windows", windows(dict(window_end_ms=10_000, mean=92.25, max_received_ms=9_500)))
    assert signal.message == "pump-1 temperature mean 92.2 is 12.2 over (ops, hot, warning)"
    assert signal.value == pytest.approx(12.25)
    assert signal.received_ms == 9_500


def test_clear_and_reraise_update_one_alarm(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, clear: mean < 75}
""")
    store = AlarmStore(StateDB(tmp_path / "state.sqlite"))
    events = store.apply(engine.process("windows", windows(*window_rows([85, 70, 90]))))
    assert [(e["transition"], e["state"], e["count"]) for e in events] == [
        ("raised", "active_unack", 1), ("cleared", "cleared_unack", 1), ("reraised", "active_unack", 2)]
    assert len({e["alarm_id"] for e in events}) == 1 and len(store.alarms) == 1
    assert len({e["event_id"] for e in events}) == 3


def test_flapping_is_detected_and_silences_notifications(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, flapping: {changes: 4, within: 60s}}
""")
    store = AlarmStore(StateDB(tmp_path / "state.sqlite"))
    events = store.apply(engine.process("windows", windows(*window_rows([90, 10, 90, 10, 90]))))
    got = [(e["transition"], e["flapping"], should_notify(e)) for e in events]
    # the 4th change within 60 s (clear at 40 s) starts flapping: one "flapping" event is notified,
    # raise/clear events while flapping are emitted but not notified
    assert got == [("raised", False, True), ("cleared", False, True), ("reraised", False, True),
                   ("cleared", True, False), ("flapping", True, True), ("reraised", True, False)]


def test_flapping_ends_when_changes_slow_down(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, flapping: {changes: 3, within: 30s}}
""")
    store = AlarmStore(StateDB(tmp_path / "state.sqlite"))
    fast = window_rows([90, 10, 90])  # 3 changes in 20 s: flapping
    slow = [dict(window_end_ms=200_000, mean=10)]  # next change long after
    events = store.apply(engine.process("windows", windows(*fast, *slow)))
    assert [(e["transition"], e["flapping"]) for e in events][-1] == ("cleared", False)


def test_bad_reload_keeps_previous_rules_running(tmp_path):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    good = rules_dir / "a.yaml"
    good.write_text("rules:\n  - {name: hot, stream: windows, condition: mean > 80}\n")
    engine = Engine()
    watcher = RuleWatcher(str(rules_dir), engine)
    assert watcher.poll() is True
    assert run(engine, "windows", windows(*window_rows([90]))) == [("fire", 10_000)]

    good.write_text("rules:\n  - {name: hot, stream: windows, condition: mean >> 80}\n")
    os.utime(good, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert watcher.poll() is False
    assert watcher.errors and watcher.errors[0].startswith(f"{good}:2:")
    # the previous rule still runs and its series state was kept: the alarm clears
    assert [r.name for r in engine.ruleset.rules] == ["hot"]
    assert run(engine, "windows", windows(dict(window_end_ms=20_000, mean=10))) == [("clear", 20_000)]

    good.write_text("rules:\n  - {name: cold, stream: windows, condition: mean < 0}\n")
    os.utime(good, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert watcher.poll() is True and watcher.errors == []
    assert run(engine, "windows", windows(dict(window_end_ms=30_000, mean=-1))) == [("fire", 30_000)]


def test_engine_state_snapshot_round_trip(tmp_path):
    text = "  - {name: hot, stream: windows, condition: mean > 80, for: 3 windows}\n"
    engine = engine_for(tmp_path, text)
    assert run(engine, "windows", windows(*window_rows([90, 90]))) == []
    restored = Engine(ruleset(tmp_path, "rules:\n" + text))  # a restart: rules loaded, then the partition's state
    restored.merge(json.loads(json.dumps(engine.snapshot())))
    # the third consecutive window fires only if the two before it survived the restart
    assert run(restored, "windows", windows(dict(window_end_ms=30_000, mean=90))) == [("fire", 30_000)]
    changed = Engine(ruleset(tmp_path, "rules:\n" + text.replace("mean > 80", "mean > 85")))
    changed.merge(engine.snapshot())
    assert changed.states == {}  # the rule changed while the alerter was down: its progress is void
    other = Engine(ruleset(tmp_path, "rules:\n" + text))  # a partition's share moves to another alerter
    other.merge(engine.snapshot(lambda key: key[1] == "elsewhere"))
    assert run(other, "windows", windows(dict(window_end_ms=30_000, mean=90))) == []
    engine.forget(lambda key: key[1] == "pump-1")  # handed over: the two hot windows are gone here
    assert run(engine, "windows", windows(dict(window_end_ms=30_000, mean=90))) == []


FRAGILE = """
receivers:
  ops: {kind: webhook, url: "http://127.0.0.1:1/hook", secret_env: TEST_HOOK_SECRET}
rules:
  - {name: hot, stream: windows, condition: mean > 80}
  - {name: fragile, stream: windows, condition: sqrt(mean) > 100, receivers: [ops]}
"""


def test_a_rule_that_raises_is_suspended_with_a_rule_error_alarm(tmp_path, monkeypatch):
    """Evaluation errors are contained per rule: the failing rule is suspended and named by a
    rule_error alarm (to its receivers); the other rules alarm in the same batch and after."""
    monkeypatch.setitem(expr.FUNCTIONS, "sqrt", poisoned_sqrt())
    engine = Engine(ruleset(tmp_path, FRAGILE))
    store = AlarmStore(StateDB(tmp_path / "state.sqlite"))
    batch = windows(dict(device_id="d1", window_end_ms=10_000, mean=POISON_VALUE),
                    dict(device_id="d2", window_end_ms=10_000, mean=90.0))
    events = store.apply(engine.process("windows", batch))
    assert [(e["rule"], e["transition"], e["device_id"], e["metric"]) for e in events] == [
        ("hot", "raised", "d2", "temperature"), ("rule_error", "raised", "", "fragile")]
    error = events[1]
    assert (error["severity"], json.loads(error["labels_json"])["failed_rule"]) == ("critical", "fragile")
    assert "rule 'fragile' (" in error["message"] and "FloatingPointError: poisoned sqrt(13.0)" in error["message"]
    assert engine.receivers_of("rule_error", ("", "", "fragile", 0)) == ("ops",)
    assert set(engine.suspended) == {"fragile"}

    # suspended: not evaluated again (no second error), the other rule still runs
    again = engine.process("windows", windows(dict(device_id="d3", window_end_ms=20_000, mean=POISON_VALUE),
                                              dict(device_id="d3", window_end_ms=30_000, mean=95.0)))
    assert [(s.rule.name, s.kind, s.series[1]) for s in again] == [("hot", "fire", "d3")]

    # a restart keeps the suspension; reloading the same rule keeps it; changing the rule clears the alarm
    restored = Engine(ruleset(tmp_path, FRAGILE))
    restored.merge(json.loads(json.dumps(engine.snapshot())))
    restored.set_rules(ruleset(tmp_path, FRAGILE))
    assert set(restored.suspended) == {"fragile"} and restored.take_notices() == []
    changed_while_down = Engine(ruleset(tmp_path, FRAGILE.replace("sqrt(mean) > 100", "mean > 1000")))
    changed_while_down.merge(engine.snapshot())
    assert changed_while_down.suspended == {}
    assert [(n.rule.name, n.kind) for n in changed_while_down.take_notices()] == [("rule_error", "clear")]
    restored.set_rules(ruleset(tmp_path, FRAGILE.replace("sqrt(mean) > 100", "mean > 1000")))
    assert restored.suspended == {}
    cleared = store.apply(restored.take_notices())
    assert [(e["rule"], e["transition"], e["metric"], e["alarm_id"]) for e in cleared] == [
        ("rule_error", "cleared", "fragile", error["alarm_id"])]
    assert "runs again" in cleared[0]["message"]
    assert restored.process("windows", windows(dict(window_end_ms=40_000, mean=POISON_VALUE))) == []


def test_a_reload_that_raises_keeps_the_previous_rules(tmp_path, monkeypatch):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "a.yaml").write_text("rules:\n  - {name: hot, stream: windows, condition: mean > 80}\n")
    engine = Engine()
    watcher = RuleWatcher(str(rules_dir), engine)
    assert watcher.poll() is True

    def unlistable(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(engine_module, "rule_files", unlistable)
    assert watcher.poll() is False
    assert watcher.errors == [f"{rules_dir}: cannot load (PermissionError: [Errno 13] Permission denied: "
                              f"'{rules_dir}')"]
    assert run(engine, "windows", windows(*window_rows([90]))) == [("fire", 10_000)]


def test_clear_for_needs_consecutive_quiet_rows(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: hot, stream: windows, condition: mean > 80, clear: mean <= 80, clear_for: 3 windows}
""")
    means = [85, 70, 70, 85, 70, 70, 70, 70]
    # fires at 85; two quiet rows then hot again (the count restarts); clears on the third quiet row in a row
    assert run(engine, "windows", windows(*window_rows(means))) == [("fire", 10_000), ("clear", 70_000)]


def test_reopen_clears_and_raises_again_while_active(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: shifted, stream: predictions, condition: anomaly > 0.75, reopen: regime_change}
""")
    rows = [dict(window_end_ms=t, anomaly=a, regime_change=r) for t, a, r in
            [(10_000, 0.9, False), (20_000, 0.9, True), (30_000, 0.9, False), (40_000, 0.1, True), (50_000, 0.2, False)]]
    # a regime change of the open incident: cleared and raised at its row; after the clear it is ignored
    assert run(engine, "predictions", predictions(*rows)) == [("fire", 10_000), ("clear", 20_000), ("fire", 20_000),
                                                              ("clear", 40_000)]


def test_reopen_on_a_quiet_row_still_counts_towards_the_clear(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: shifted, stream: predictions, condition: anomaly > 0.75, clear_for: 3 windows, reopen: regime_change}
""")
    rows = [dict(window_end_ms=t, anomaly=a, regime_change=r) for t, a, r in
            [(10_000, 0.9, False), (20_000, 0.2, True), (30_000, 0.2, False), (40_000, 0.2, True)]]
    # the change at 20 s is reported although its row is quiet; the clear comes after 3 quiet rows in a
    # row, at 40 s, and wins over that row's change
    assert run(engine, "predictions", predictions(*rows)) == [("fire", 10_000), ("clear", 20_000), ("fire", 20_000),
                                                              ("clear", 40_000)]


def test_a_rule_on_rejected_readings(tmp_path):
    engine = engine_for(tmp_path, """
  - {name: invalid, stream: rejects, condition: stage == "clean" and reason == "out_of_range"}
""")
    rows = [dict(stage="clean", reason="out_of_range", tenant="acme", device_id="d1", metric="temp", ts_ms=1000,
                 value=900.0, rejected_ms=2000, detail="above 200"),
            dict(stage="predict", reason="non_finite_mean", tenant="acme", device_id="d2", metric="temp",
                 rejected_ms=3000, detail="")]
    got = [(s.kind, s.series[1], s.ts_ms) for s in engine.process("rejects", table(contract.REJECTS, {}, rows))]
    assert got == [("fire", "d1", 1000)]  # at the reading's time
