"""The expression language (vectorized == row-by-row, safe, typed) and the rule-file loader's error
locations, through the library and through `aimass rules check`."""
from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aimass.core.config import Config
from aimass.rules import expr
from aimass.rules.cli import run_rules
from aimass.rules.engine import Engine, load_checked
from aimass.rules.expr import BOOL, NUM, ExprError, compile_expr
from aimass.rules.model import MAX_MESSAGE, RulesInvalid, load_rules, parse_duration, parse_rate, render, stream_columns
from tests.conftest import REPO
from tests.fixtures_rules import POISON_FILES, windows

WINDOW_COLUMNS = stream_columns("windows")


def evaluate_both(text: str, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, list]:
    types = {k: NUM if v.dtype.kind == "f" else BOOL if v.dtype.kind == "b" else "string" for k, v in columns.items()}
    compiled = compile_expr(text, types)
    n = len(next(iter(columns.values())))
    rows = [{k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in columns.items()} for i in range(n)]
    with np.errstate(all="ignore"):
        return compiled.evaluate(columns, n), [compiled.row(r) for r in rows]


def test_precedence_and_functions_hand_computed():
    cols = {"a": np.array([1.0, -4.0, 9.0]), "b": np.array([2.0, 2.0, 0.0])}
    vec, rows = evaluate_both("-a ** 2 + max(a, b, 3) * 2 - abs(b - 5) % 2", cols)
    # -(a**2) + 2*max(a, b, 3) - (|b-5| mod 2)
    expected = [-1 + 6 - 1, -16 + 6 - 1, -81 + 18 - 1]
    assert vec.tolist() == expected == rows


def test_boolean_logic_and_strings():
    cols = {"x": np.array([1.0, 5.0, np.nan]), "m": np.array(["t", "h", "t"], dtype=object),
            "d": np.array([False, True, False])}
    vec, rows = evaluate_both('(x > 2 or m == "t") and not d', cols)
    assert vec.tolist() == [True, False, True] == rows
    vec, rows = evaluate_both("isnan(x) or coalesce(x, 0) >= 5", cols)
    assert vec.tolist() == [False, True, True] == rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6) | st.just(float("nan")), st.floats(-1e6, 1e6)), min_size=1,
                max_size=20))
def test_vectorized_equals_row_by_row(pairs):
    cols = {"a": np.array([p[0] for p in pairs]), "b": np.array([p[1] for p in pairs])}
    text = "abs(a - b) / max(abs(b), 1) > 0.5 and not (min(a, b) < -100 or sqrt(abs(a)) > 900)"
    vec, rows = evaluate_both(text, cols)
    assert vec.tolist() == rows


def test_division_by_zero_is_inf_or_nan_not_an_exception():
    vec, rows = evaluate_both("a / b", {"a": np.array([1.0, 0.0, -2.0]), "b": np.zeros(3)})
    assert vec[0] == rows[0] == np.inf and vec[2] == rows[2] == -np.inf
    assert np.isnan(vec[1]) and np.isnan(rows[1])


@pytest.mark.parametrize("text, offset, fragment", [
    ('__import__("os").system("x")', 16, "unexpected character '.'"),
    ('__import__("os")', 0, "unknown function '__import__'"),
    ("mean.__class__", 4, "unexpected character '.'"),
    ("exec('1')", 0, "unknown function 'exec'"),
    ("mean > ", 7, "expected a value"),
    ("(mean > 1", 9, "expected ')'"),
    ("mean > 1 > 2", 9, "chained comparisons"),
    ("mean + metric", 5, "needs a number"),
    ("metric > 'a'", 7, "only be compared with == and !="),
    ("mean and 1", 5, "'and' needs a boolean"),
    ("abs(mean, std)", 0, "takes 1 arguments"),
    ("residual_x > 1", 0, "unknown field 'residual_x'"),
    ("forecast_residual() > 1", 0, "not available on this stream"),
])
def test_errors_point_at_the_offending_column(text, offset, fragment):
    with pytest.raises(ExprError) as err:
        compile_expr(text, WINDOW_COLUMNS, BOOL)
    assert err.value.offset == offset and fragment in err.value.message


def test_helpers_expand_per_stream():
    c = compile_expr("abs(forecast_residual()) > 3", stream_columns("outcomes"), BOOL)
    assert c.fields == {"actual", "forecast"}
    assert compile_expr("spread() > 1", WINDOW_COLUMNS, BOOL).fields == {"max", "min"}


def test_durations_rates_templates():
    assert [parse_duration(x) for x in ("30s", "500ms", "5m", "2h", "1d", "7")] == [30, 0.5, 300, 7200, 86400, 7]
    assert parse_rate("30/min") == 0.5 and parse_rate("2/s") == 2
    assert render("{a:.1f} {b} {{x}} {missing}|", {"a": 1.25, "b": "z"}) == "1.2 z {x} |"
    assert render("{a.__class__}", {"a": 1}) == "{a.__class__}"  # attribute access is not template syntax


BAD = """\
receivers:
  hook: {kind: webhook, url: "http://x", secret_env: "not a var"}
  mail: {kind: email, host: h, to: [a@b], port: abc}
rules:
  - name: r1
    stream: windows
    condition: mean > > 3
    for: 3 weeks
    severity: huge
  - name: r2
    stream: predictions
    condition: |
      anomaly > 0.5 and
      foo < 3
    bogus: 1
  - name: r3
    stream: windows
    condition: "mean + 'x' > 1"
    message: "{nosuch} {mean}"
  - name: r4
    stream: sideways
  - name: r5
    stream: windows
    condition: mean > 1
    receivers: [hook, nope]
"""


def test_every_error_is_reported_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(RulesInvalid) as err:
        load_rules(path)
    got = [(e.line, e.col, e.message.split(";")[0]) for e in err.value.errors]
    assert got == [
        (2, 54, "secret_env names an environment variable (e.g. AIMASS_HOOK_SECRET), secrets never go in rule files"),
        (3, 9, "receiver 'mail': missing required key 'from'"),
        (3, 49, "port must be an integer"),
        (7, 23, "condition: expected a value, found '>'"),
        (8, 10, "for: '3 weeks' is not a duration (e.g. 30s, 500ms, 5m, 2h)"),
        (9, 15, "severity: 'huge' is not valid"),
        (14, 7, "condition: unknown field 'foo'"),
        (15, 5, "unknown key 'bogus' in a rule"),
        (18, 22, "condition: '+' needs a number, got a string"),
        (19, 14, "message: unknown field {nosuch} in the template"),
        (21, 13, "stream: 'sideways' is not valid"),
        (25, 23, "rule 'r5': unknown receiver 'nope'"),
    ]
    assert all(e.file == str(path) for e in err.value.errors)


def test_yaml_syntax_error_and_duplicates(tmp_path):
    (tmp_path / "a.yaml").write_text("rules:\n  - name: x\n    stream: windows\n    condition: [unclosed\n")
    (tmp_path / "b.yaml").write_text(
        "rules:\n  - {name: dup, stream: windows, condition: mean > 1}\n"
        "  - {name: dup, stream: windows, condition: mean > 2, condition: mean > 3}\n")
    with pytest.raises(RulesInvalid) as err:
        load_rules(tmp_path)
    got = [(e.file.rsplit("/", 1)[1], e.line, e.message.split(" ")[0]) for e in err.value.errors]
    assert got[0][:2] == ("a.yaml", 5) and got[0][2] == "YAML:"
    assert ("b.yaml", 3, "key") in got          # condition twice in one rule
    assert ("b.yaml", 3, "rule") in got         # rule 'dup' defined twice


def test_examples_are_valid_and_cli_reports_errors(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "aimass.cli", "rules", "check", str(REPO / "rules" / "examples")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: 5 rules, 3 receivers")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    res = subprocess.run([sys.executable, "-m", "aimass.cli", "rules", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{bad}:7:23: condition: expected a value, found '>'" in res.stderr.splitlines()
    assert "12 error(s)" in res.stderr


# --- files and expressions that must be rejected, never raised; what passes the check runs ----------

@pytest.mark.parametrize("case", sorted(POISON_FILES))
def test_a_poison_file_is_rejected_with_its_location(tmp_path, capsys, case):
    content, want = POISON_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RulesInvalid) as err:
        load_checked(path)
    assert str(err.value.errors[0]).startswith(f"{path}:{want}")
    # `aimass rules check` (its function, in-process; the command itself is run above): exit 1, the same line
    assert run_rules(argparse.Namespace(files=[str(path)]), Config()) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"{path}:{want}") and lines[-1].endswith("the files were not accepted")


def test_string_escapes_are_decoded_exactly():
    cols = {"m": np.array(["é", "A\\", 'q"', "x"], dtype=object)}
    for text in ('m == "é"', 'm == "\\u00e9"', 'm == "\\x41\\\\"', "m == 'q\"'", "m == \"q\\\"\""):
        vec, rows = evaluate_both(text, cols)
        assert vec.tolist() == rows and sum(rows) == 1, text


def test_integer_columns_are_floats_in_arithmetic():
    cols = {"count": np.array([0, 1, 2, 2**62], dtype=np.int64)}
    with np.errstate(all="ignore"):
        powered = compile_expr("count ** -count", {"count": NUM}).evaluate(cols, 4)
        cubed = compile_expr("count * count * count > 0", {"count": NUM}).evaluate(cols, 4)
    assert powered.tolist() == [1.0, 1.0, 0.25, 0.0]  # no ValueError for integers to negative powers
    assert cubed.tolist() == [False, True, True, True]  # 2**186, not a wrapped-around int64


def test_templates_are_capped_when_rendered():
    assert render("{v:>2000000000}|{v:.999f}|{v:>8}", {"v": 1}) == "1|1|       1"
    long = render("{v} {v}", {"v": "x" * 900})
    assert len(long) == MAX_MESSAGE and long.endswith("x…")
    assert len(render("{v}" * 2000, {"v": "ab"})) <= MAX_MESSAGE


def test_what_passes_the_check_runs(tmp_path):
    path = tmp_path / "edgy.yaml"
    path.write_text("rules:\n"
                    "  - {name: intpow, stream: windows, condition: count ** -count > 0}\n"
                    "  - {name: divzero, stream: windows, condition: mean / (count - count) > 1e308}\n"
                    "  - {name: wide, stream: windows, condition: window_end_ms * window_end_ms > 0,\n"
                    "     message: '{device_id:>64} {mean:.64f} {count:,d} {zscore:e}'}\n")
    engine = Engine(load_checked(path))
    signals = engine.process("windows", windows(dict(count=10, mean=5.0, window_end_ms=10**10)))
    assert sorted(s.rule.name for s in signals) == ["divzero", "intpow", "wide"]
    assert len([s.message for s in signals][2]) <= MAX_MESSAGE


def test_the_check_runs_each_rule_on_a_synthetic_batch(tmp_path, monkeypatch):
    """An evaluation error the type check cannot see is an error at the rule's line, not a crash later."""
    def sqrt(x):  # a numpy-level failure on infinite input, which the synthetic batch holds
        if np.isinf(x).any():
            raise FloatingPointError("overflow in sqrt")
        return np.sqrt(x)
    monkeypatch.setitem(expr.FUNCTIONS, "sqrt", (1, sqrt, abs))
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - name: ok\n    stream: windows\n    condition: mean > 1\n"
                    "  - name: fragile\n    stream: windows\n    condition: sqrt(mean) > 1\n")
    assert [r.name for r in load_rules(path).rules] == ["ok", "fragile"]  # the type check passes it
    with pytest.raises(RulesInvalid) as err:
        load_checked(path)
    [error] = err.value.errors
    assert str(error).startswith(f"{path}:5:1: rule 'fragile' fails on a synthetic windows batch: FloatingPointError")
