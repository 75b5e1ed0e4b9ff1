"""Rule and receiver files (YAML): what a rule is, and a loader that points at every error.

A rule file holds ``rules:`` (a list), ``receivers:`` (a mapping name -> receiver) and/or, in one
file of the set, ``pipeline:`` (where the alerts on the pipeline itself go, ``aimass.rules.pipeline``)::

    receivers:
      ops-hook: {kind: webhook, url: "http://hooks.example/alerts", secret_env: AIMASS_WEBHOOK_SECRET}
    rules:
      - name: anomaly_high
        stream: predictions              # readings | windows | predictions | outcomes | rejects
        selector: {tenant: "*", device: "pump-*", metric: temperature, window_s: 10}
        condition: anomaly > 0.8
        for: 2 windows                   # or a duration: 30s, 5m; absent: fire at once
        clear: anomaly < 0.5             # hysteresis; default: not condition
        clear_for: 3 windows             # the clear must hold this many rows in a row (default 1)
        reopen: regime_change            # while active: the incident changed (cleared and raised again)
        severity: warning                # info | warning | critical
        message: "{device_id} {metric}: anomaly {value:.2f}"
        repeat: 10m                      # re-notify while active; absent: never
        receivers: [ops-hook]
    pipeline:                            # Alertmanager's alerts, posted to the alarm API
      receivers: [ops-hook]              # every one
      by_severity: {critical: [ops-sms]} # and these too, by the alert's severity label

``load_rules`` reads every file, checks every field and expression (``aimass.rules.expr``), and
returns a ``RuleSet`` or raises ``RulesInvalid`` listing ``file:line:col: message`` for
every error found, from the YAML node marks. Any file is either loaded or rejected with its
location: files over ``MAX_FILE_BYTES``, bytes that are not UTF-8, YAML nested deeper than
``MAX_YAML_DEPTH`` and anything the checks themselves trip over become errors, never exceptions.
Messages are bounded: format widths and precisions at most ``MAX_FORMAT``, a rendered message at
most ``MAX_MESSAGE`` characters, at most ``MAX_LABELS`` labels of ``MAX_LABEL_CHARS``, so an alarm
record stays small.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import yaml

from aimass.rules.expr import BOOL, NUM, STR, Compiled, ExprError, compile_expr
from aimass.core import contract

# stream -> (schema, event-time column, source receive-time column or "", default value expression)
STREAMS: dict[str, tuple[pa.Schema, str, str, str]] = {
    "readings": (contract.READINGS, "ts_ms", "received_ms", "value"),
    "windows": (contract.WINDOWS, "window_end_ms", "max_received_ms", "mean"),
    "predictions": (contract.PREDICTIONS, "window_end_ms", "max_received_ms", "anomaly"),
    "outcomes": (contract.OUTCOMES, "target_end_ms", "", "residual"),
    # dead letters: readings (and records) a stage refused, by the reading's time (the rejection
    # time for a record without one); ``reason`` says why
    "rejects": (contract.REJECTS, "ts_ms", "received_ms", "value"),
}
SEVERITIES = ("info", "warning", "critical")
RECEIVER_KINDS = ("webhook", "sms", "email")
PLAINTEXT_AUTH = ("tls: none with a username would send the SMTP password in clear text: use tls: starttls or ssl, "
                  "or set allow_plaintext_auth: true on the receiver")
# Names a message template may use besides the stream's columns.
TEMPLATE_EXTRAS = ("rule", "severity", "value", "state", "transition", "count")
RULE_ERROR = "rule_error"      # the alerter's own alarm for a rule that failed at evaluation (a reserved name)
MAX_FILE_BYTES = 1 << 20
MAX_YAML_DEPTH = 50
MAX_FORMAT = 64                # largest width or precision in a template's {field:spec}
MAX_MESSAGE = 1000             # characters of a rendered template (and of the template itself)
MAX_NAME_CHARS = 200           # a rule's name
MAX_LABELS, MAX_LABEL_CHARS = 20, 200


def stream_columns(stream: str) -> dict[str, str]:
    """Column name -> expression type (number/boolean/string) of a stream's rows."""
    schema = STREAMS[stream][0]
    return {f.name: STR if pa.types.is_string(f.type) else BOOL if pa.types.is_boolean(f.type) else NUM
            for f in schema}


@dataclass(frozen=True)
class RuleError:
    """One problem in a rule file, with its 1-based position."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class RulesInvalid(ValueError):
    """Rule files were rejected; ``errors`` lists every problem with its location."""

    def __init__(self, errors: list[RuleError]):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


@dataclass(frozen=True)
class Selector:
    """Glob patterns over a row's series; ``window_s`` 0 matches every window size."""

    tenant: str = "*"
    device: str = "*"
    metric: str = "*"
    window_s: int = 0

    def regexes(self) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
        return tuple(re.compile(fnmatch.translate(p)) for p in (self.tenant, self.device, self.metric))


@dataclass(frozen=True)
class Flapping:
    """An alarm flaps when it changes state ``changes`` times within ``within_s`` seconds."""

    changes: int = 4
    within_s: float = 600.0


@dataclass(frozen=True)
class Rule:
    """One compiled rule."""

    name: str
    stream: str
    selector: Selector
    condition: Compiled
    clear: Compiled | None          # None: clear as soon as the condition is false
    value: Compiled
    clear_windows: int = 1          # the clear must hold for this many consecutive rows of the series
    reopen: Compiled | None = None  # while active: true = the incident changed (cleared and raised again)
    for_s: float = 0.0              # condition must hold this long (event time) ...
    for_windows: int = 0            # ... or for this many consecutive rows of the series
    severity: str = "warning"
    labels: tuple[tuple[str, str], ...] = ()
    message: str = "{rule}: {tenant}/{device_id}/{metric} = {value}"
    repeat_s: float = 0.0           # 0: notify once per activation
    receivers: tuple[str, ...] = ()
    flapping: Flapping = Flapping()
    file: str = ""
    line: int = 0

    @property
    def time_field(self) -> str:
        return STREAMS[self.stream][1]

    @property
    def received_field(self) -> str:
        return STREAMS[self.stream][2]


@dataclass(frozen=True)
class ReceiverSpec:
    """A notification target; kind-specific settings stay in ``options`` (secrets by env var name)."""

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    rate_per_s: float = 0.0         # 0: unlimited
    burst: int = 1
    group_wait_s: float = 2.0       # wait this long to group a burst of events into one message
    group_max: int = 50


@dataclass(frozen=True)
class PipelineRoute:
    """Where alerts on the pipeline itself go: ``receivers`` for all, plus ``by_severity``'s for a severity."""

    receivers: tuple[str, ...] = ()
    by_severity: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def receivers_for(self, severity: str) -> tuple[str, ...]:
        extra = [r for sev, names in self.by_severity if sev == severity for r in names]
        return tuple(dict.fromkeys([*self.receivers, *extra]))


@dataclass
class RuleSet:
    """Every rule and receiver loaded from a set of files."""

    rules: list[Rule] = field(default_factory=list)
    receivers: dict[str, ReceiverSpec] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    pipeline: PipelineRoute | None = None  # None: no file routes the pipeline's alerts

    def for_stream(self, stream: str) -> list[Rule]:
        return [r for r in self.rules if r.stream == stream]


# --- values ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_WINDOWS = re.compile(r"^\s*(\d+)\s*(windows?|rows?)\s*$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TEMPLATE_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*))?\}")
# Python's format-spec mini-language: [[fill]align][sign][z][#][0][width][grouping][.precision][type]
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?",
                          re.DOTALL)


def parse_duration(text: Any) -> float:
    """Seconds in a duration such as ``30s``, ``5m``, ``500ms``, ``2h`` or a bare number."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 500ms, 5m, 2h)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_rate(text: Any) -> float:
    """Events per second in a rate such as ``30/min`` or ``2/s``."""
    m = _RATE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a rate (e.g. 10/s, 30/min, 100/h)")
    return float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)[0]]


def template_fields(template: str) -> list[str]:
    """Names a message template refers to."""
    return [m.group(1) for m in _TEMPLATE_FIELD.finditer(template) if m.group(1)]


def format_spec_error(spec: str) -> str | None:
    """Why ``spec`` cannot be used in a template (not a format spec, or wider / more precise than
    ``MAX_FORMAT``), or None."""
    m = _FORMAT_SPEC.fullmatch(spec)
    if m is None:
        return f"{spec!r} is not a format spec (e.g. .2f, >8, d)"
    if int(m.group("width") or 0) > MAX_FORMAT or int(m.group("precision") or 0) > MAX_FORMAT:
        return f"{spec!r}: widths and precisions are at most {MAX_FORMAT}"
    return None


def template_errors(template: str) -> list[str]:
    """What is wrong with a message template (too long, bad format specs)."""
    errors = [f"{{{m.group(1)}:{m.group(2)}}}: {error}" for m in _TEMPLATE_FIELD.finditer(template)
              if m.group(2) is not None and (error := format_spec_error(m.group(2)))]
    if len(template) > MAX_MESSAGE:
        errors.append(f"{len(template)} characters; at most {MAX_MESSAGE}")
    return errors


def render(template: str, values: dict[str, Any]) -> str:
    """Fill ``{name}`` / ``{name:spec}`` from ``values`` (no attribute access, no code); a spec that
    cannot be used prints the plain value, and the result is cut to ``MAX_MESSAGE`` characters."""
    def one(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        value = values.get(m.group(1), "")
        spec = m.group(2) or ""
        try:
            if format_spec_error(spec) is None:
                return format(value, spec)[:MAX_MESSAGE]
        except Exception:  # noqa: BLE001 - a value the spec does not fit is printed plainly
            pass
        return str(value)[:MAX_MESSAGE]
    text = _TEMPLATE_FIELD.sub(one, template[:MAX_MESSAGE])
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


# --- loader ---------------------------------------------------------------------------

def rule_files(path: str | Path) -> list[Path]:
    """The YAML files under a directory (sorted), or the file itself."""
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
    return [p]


class _DepthLimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing (at the offending node) to compose nodes nested deeper than
    ``MAX_YAML_DEPTH``: the composer recurses per level and would exhaust the stack."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _FileLoader:
    """Walks one file's YAML node tree, collecting errors with their marks."""

    def __init__(self, path: Path, errors: list[RuleError], declared_receivers: set[str]):
        self.path = path
        self.errors = errors
        self.declared_receivers = declared_receivers  # valid or not: a bad receiver is reported once
        self.lines: list[str] = []
        self.receiver_nodes: dict[str, tuple[tuple[str, yaml.Node], ...]] = {}  # "rule 'x'" -> its receiver refs
        self.rule_nodes: list[tuple[str, yaml.Node]] = []  # every rule's name node, valid or not

    def error(self, node: yaml.Node | None, message: str, line: int | None = None, col: int | None = None) -> None:
        if node is not None and line is None:
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
        self.errors.append(RuleError(str(self.path), line or 1, col or 1, message))

    def load(self, ruleset: RuleSet) -> None:
        """Check the file, adding what it defines to ``ruleset``; any failure becomes an error here."""
        try:
            self._load(ruleset)
        except Exception as exc:  # noqa: BLE001 - a file the checks trip over is rejected, never raised
            self.error(None, f"cannot check this file ({type(exc).__name__}: {str(exc)[:200]}); "
                             "please report it with the file")

    def guarded(self, node: yaml.Node, check: Callable[[yaml.Node], Any]) -> Any:
        """``check(node)``, or None with an error at ``node`` if the check itself fails."""
        try:
            return check(node)
        except Exception as exc:  # noqa: BLE001 - see load()
            self.error(node, f"cannot check this ({type(exc).__name__}: {str(exc)[:200]}); "
                             "please report it with the file")
            return None

    def _load(self, ruleset: RuleSet) -> None:
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                self.error(None, f"{self.path.stat().st_size} bytes; a rule file is at most {MAX_FILE_BYTES}")
                return
            data = self.path.read_bytes()
        except OSError as exc:
            self.error(None, f"cannot read: {exc.strerror or exc}")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            before = data[:exc.start]
            self.error(None, f"not UTF-8 text (byte {data[exc.start]:#04x}); rule files are UTF-8 YAML",
                       before.count(b"\n") + 1, exc.start - before.rfind(b"\n"))
            return
        self.lines = text.splitlines()
        try:
            root = yaml.compose(text, Loader=_DepthLimitedLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            self.error(None, f"YAML: {exc.problem or exc.context}", mark.line + 1 if mark else 1,
                       mark.column + 1 if mark else 1)
            return
        except yaml.reader.ReaderError as exc:  # a character YAML does not allow: no mark, a position
            before = text[:exc.position]
            self.error(None, f"YAML: character U+{int(exc.character):04X} is not allowed in YAML; remove it",
                       before.count("\n") + 1, exc.position - before.rfind("\n"))
            return
        if root is None:  # an editor's half-written save must not silently drop every rule
            self.error(None, "the file is empty; write `rules: []` to define no rules, or delete the file")
            return
        top = self.mapping(root, "a rule file", ("rules", "receivers", "pipeline"))
        if top is None:
            return
        if "receivers" in top:
            receivers = self.mapping(top["receivers"][1], "receivers", None)
            for name, (key_node, node) in (receivers or {}).items():
                if name in self.declared_receivers:
                    self.error(key_node, f"receiver {name!r} is defined twice")
                self.declared_receivers.add(name)
                spec = self.guarded(node, lambda n: self.receiver(name, n))
                if spec is not None:
                    ruleset.receivers[name] = spec
        if "pipeline" in top:
            key_node, node = top["pipeline"]
            if ruleset.pipeline is not None:
                self.error(key_node, "pipeline: is defined in another file already; define it once")
            else:
                ruleset.pipeline = self.guarded(node, self.pipeline)
        if "rules" in top:
            seq = top["rules"][1]
            if not isinstance(seq, yaml.SequenceNode):
                self.error(seq, "rules must be a list of rules")
                return
            for node in seq.value:
                rule = self.guarded(node, self.rule)
                if rule is not None:
                    ruleset.rules.append(rule)

    def mapping(self, node: yaml.Node, what: str,
                allowed: tuple[str, ...] | None) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """key -> (key node, value node) of a mapping node; errors for unknown or repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in out:
                self.error(key_node, f"key {key!r} appears twice in {what}")
            elif allowed is not None and key not in allowed:
                self.error(key_node, f"unknown key {key!r} in {what}; accepted: {', '.join(allowed)}")
            else:
                out[key] = (key_node, value_node)
        return out

    def scalar_node(self, fields: dict, key: str, required: bool, parent: yaml.Node | None,
                    what: str = "a single value") -> yaml.ScalarNode | None:
        """The scalar node of ``key``, or None (with an error when it is required or not a scalar)."""
        if key not in fields:
            if required:
                self.error(parent, f"missing required key {key!r}")
            return None
        node = fields[key][1]
        if not isinstance(node, yaml.ScalarNode):
            self.error(node, f"{key} must be {what}")
            return None
        return node

    def scalar(self, fields: dict, key: str, convert: Callable[[str], Any], default: Any,
               required: bool = False, parent: yaml.Node | None = None) -> Any:
        node = self.scalar_node(fields, key, required, parent)
        if node is None:
            return default
        try:
            return convert(node.value)
        except ValueError as exc:
            self.error(node, f"{key}: {exc}")
            return default

    def strings(self, fields: dict, key: str) -> tuple[tuple[str, yaml.Node], ...]:
        if key not in fields:
            return ()
        node = fields[key][1]
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out = []
        for item in items:
            if isinstance(item, yaml.ScalarNode):
                out.append((str(item.value), item))
            else:
                self.error(item, f"{key} must be a string or a list of strings")
        return tuple(out)

    def expression(self, fields: dict, key: str, columns: dict[str, str], want: str,
                   required: bool, parent: yaml.Node) -> Compiled | None:
        node = self.scalar_node(fields, key, required, parent, "an expression string")
        if node is None:
            return None
        try:
            return compile_expr(str(node.value), columns, want)
        except ExprError as exc:
            line, col = self.position_in(node, exc.offset)
            self.error(node, f"{key}: {exc.message}", line, col)
            return None

    def position_in(self, node: yaml.ScalarNode, offset: int) -> tuple[int, int]:
        """1-based (line, col) of character ``offset`` of a scalar's value in the file."""
        mark = node.start_mark
        if node.style in ("|", ">"):
            text = str(node.value)[:offset]
            line = mark.line + 1 + text.count("\n")
            source = self.lines[line] if line < len(self.lines) else ""
            indent = len(source) - len(source.lstrip())
            return line + 1, indent + len(text) - (text.rfind("\n") + 1) + 1
        return mark.line + 1, mark.column + 1 + offset + (1 if node.style in ("'", '"') else 0)

    def rule(self, node: yaml.Node) -> Rule | None:
        allowed = ("name", "stream", "selector", "condition", "for", "clear", "clear_for", "reopen", "value",
                   "severity", "labels",
                   "message", "repeat", "receivers", "flapping")
        fields = self.mapping(node, "a rule", allowed)
        if fields is None:
            return None
        before = len(self.errors)
        name = self.scalar(fields, "name", _name, "", required=True, parent=node)
        stream = self.scalar(fields, "stream", _choice("stream", tuple(STREAMS)), "", required=True, parent=node)
        columns = stream_columns(stream) if stream else {}
        selector = self.selector(fields)
        condition = clear = value = reopen = None
        if stream:
            condition = self.expression(fields, "condition", columns, BOOL, True, node)
            clear = self.expression(fields, "clear", columns, BOOL, False, node)
            reopen = self.expression(fields, "reopen", columns, BOOL, False, node)
            value = self.expression(fields, "value", columns, NUM, False, node)
            if value is None and "value" not in fields:
                value = compile_expr(STREAMS[stream][3], columns, NUM)
        for_s, for_windows = 0.0, 0
        if "for" in fields:
            for_node = fields["for"][1]
            text = str(getattr(for_node, "value", ""))
            if (m := _WINDOWS.match(text)) is not None:
                for_windows = int(m.group(1))
            else:
                for_s = self.scalar(fields, "for", parse_duration, 0.0)
        clear_windows = 1
        if "clear_for" in fields:
            text = str(getattr(fields["clear_for"][1], "value", ""))
            if (m := _WINDOWS.match(text)) is not None and int(m.group(1)) >= 1:
                clear_windows = int(m.group(1))
            else:
                self.error(fields["clear_for"][1], f"clear_for: expected 'N windows' (N >= 1), got {text[:50]!r}")
        severity = self.scalar(fields, "severity", _choice("severity", SEVERITIES), "warning")
        labels = self.labels(fields)
        message = self.scalar(fields, "message", str, Rule.message)
        for problem in template_errors(message):
            self.error(fields["message"][1], f"message: {problem}")
        if "message" in fields and stream:
            for ref in template_fields(message):
                if ref not in columns and ref not in TEMPLATE_EXTRAS and ref not in dict(labels):
                    self.error(fields["message"][1], f"message: unknown field {{{ref}}} in the template")
        repeat_s = self.scalar(fields, "repeat", parse_duration, 0.0)
        receivers = self.strings(fields, "receivers")
        flapping = self.flapping(fields)
        if name:
            self.rule_nodes.append((name, fields["name"][1]))
        if len(self.errors) > before or condition is None or value is None:
            return None
        rule = Rule(name=name, stream=stream, selector=selector, condition=condition, clear=clear, value=value,
                    clear_windows=clear_windows, reopen=reopen, for_s=for_s, for_windows=for_windows, severity=severity, labels=labels, message=message,
                    repeat_s=repeat_s, receivers=tuple(r for r, _ in receivers), flapping=flapping,
                    file=str(self.path), line=node.start_mark.line + 1)
        self.receiver_nodes[f"rule {rule.name!r}"] = receivers
        return rule

    def pipeline(self, node: yaml.Node) -> PipelineRoute | None:
        """The ``pipeline:`` section: ``receivers`` and ``by_severity`` (severity -> receivers)."""
        fields = self.mapping(node, "pipeline", ("receivers", "by_severity"))
        if fields is None:
            return None
        receivers = self.strings(fields, "receivers")
        per_severity = (self.mapping(fields["by_severity"][1], "by_severity", None) or {}) if "by_severity" in fields \
            else {}
        by_severity = {severity: self.strings(per_severity, severity) for severity in per_severity}
        for severity, (key_node, _) in per_severity.items():
            if severity not in SEVERITIES:
                self.error(key_node, f"by_severity: {severity!r} is not a severity; accepted: {', '.join(SEVERITIES)}")
        refs = receivers + tuple(ref for names in by_severity.values() for ref in names)
        if not refs:
            self.error(node, "pipeline: name at least one receiver (receivers: [...])")
        self.receiver_nodes["pipeline"] = refs
        return PipelineRoute(tuple(n for n, _ in receivers),
                             tuple((sev, tuple(n for n, _ in names)) for sev, names in by_severity.items()))

    def selector(self, fields: dict) -> Selector:
        if "selector" not in fields:
            return Selector()
        sel = self.mapping(fields["selector"][1], "selector", ("tenant", "device", "metric", "window_s"))
        if sel is None:
            return Selector()
        return Selector(tenant=self.scalar(sel, "tenant", str, "*"), device=self.scalar(sel, "device", str, "*"),
                        metric=self.scalar(sel, "metric", str, "*"),
                        window_s=self.scalar(sel, "window_s", _positive_int, 0))

    def labels(self, fields: dict) -> tuple[tuple[str, str], ...]:
        if "labels" not in fields:
            return ()
        labels = self.mapping(fields["labels"][1], "labels", None) or {}
        if len(labels) > MAX_LABELS:
            self.error(fields["labels"][1], f"{len(labels)} labels; at most {MAX_LABELS}")
        out = tuple((k, str(getattr(v, "value", ""))) for k, (_, v) in labels.items())
        for (key, value), (key_node, _) in zip(out, labels.values()):
            if len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
                self.error(key_node, f"label {key[:40]!r}: keys and values are at most {MAX_LABEL_CHARS} characters")
        return out

    def flapping(self, fields: dict) -> Flapping:
        if "flapping" not in fields:
            return Flapping()
        f = self.mapping(fields["flapping"][1], "flapping", ("changes", "within"))
        if f is None:
            return Flapping()
        return Flapping(changes=self.scalar(f, "changes", _positive_int, 4),
                        within_s=self.scalar(f, "within", parse_duration, 600.0))

    def receiver(self, name: str, node: yaml.Node) -> ReceiverSpec | None:
        common = ("kind", "rate_limit", "burst", "group_wait", "group_max")
        per_kind = {
            "webhook": ("url", "secret_env", "headers", "timeout", "follow_redirects"),
            "sms": ("url", "method", "to", "body", "headers", "token_env", "content_type", "timeout",
                    "follow_redirects"),
            "email": ("host", "port", "tls", "ca_file", "username", "password_env", "from", "to", "subject",
                      "timeout", "allow_plaintext_auth"),
        }
        fields = self.mapping(node, f"receiver {name!r}", None)
        if fields is None:
            return None
        before = len(self.errors)
        kind = self.scalar(fields, "kind", _choice("kind", RECEIVER_KINDS), "", required=True, parent=node)
        if not kind:
            return None
        allowed = common + per_kind[kind]
        for key, (key_node, _) in fields.items():
            if key not in allowed:
                self.error(key_node, f"unknown key {key!r} for a {kind} receiver; accepted: {', '.join(allowed)}")
        required = {"webhook": ("url", "secret_env"), "sms": ("url", "to"), "email": ("host", "from", "to")}[kind]
        for key in required:
            if key not in fields:
                self.error(node, f"receiver {name!r}: missing required key {key!r}")
        for key in ("secret_env", "token_env", "password_env"):
            if key in fields and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", str(getattr(fields[key][1], "value", ""))):
                self.error(fields[key][1], f"{key} names an environment variable (e.g. AIMASS_HOOK_SECRET), "
                                           "secrets never go in rule files")
        options = {k: yaml.safe_load(yaml.serialize(v)) for k, (_, v) in fields.items() if k not in common}
        if "to" in options and isinstance(options["to"], str):
            options["to"] = [options["to"]]
        if kind == "email" and "tls" in options and options["tls"] not in ("starttls", "ssl", "none"):
            self.error(fields["tls"][1], "tls: accepted: starttls, ssl, none")
        for flag in ("follow_redirects", "allow_plaintext_auth"):
            if flag in options and not isinstance(options[flag], bool):
                self.error(fields[flag][1], f"{flag} must be true or false")
        if (kind == "email" and options.get("tls") == "none" and options.get("username")
                and options.get("allow_plaintext_auth") is not True):
            self.error(fields["tls"][1], f"receiver {name!r}: {PLAINTEXT_AUTH}")
        if kind == "email" and "port" in options and not isinstance(options["port"], int):
            self.error(fields["port"][1], "port must be an integer")
        if kind == "sms" and "body" in options and not isinstance(options["body"], (str, dict)):
            self.error(fields["body"][1], "body must be a template string or a mapping of templates")
        for key in ("subject", "body"):
            for template in _strings_in(options.get(key)):
                for problem in template_errors(template):
                    self.error(fields[key][1], f"{key}: {problem}")
        spec = ReceiverSpec(
            name=name, kind=kind, options=options,
            rate_per_s=self.scalar(fields, "rate_limit", parse_rate, 0.0),
            burst=self.scalar(fields, "burst", _positive_int, 1),
            group_wait_s=self.scalar(fields, "group_wait", parse_duration, 2.0),
            group_max=self.scalar(fields, "group_max", _positive_int, 50),
        )
        return spec if len(self.errors) == before else None


def _strings_in(value: Any) -> list[str]:
    """Every string in a receiver option (a template, or a mapping / list of them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v)]
    return []


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise ValueError(f"{text[:40]!r}: use letters, digits, '_', '-', '.'")
    if len(text) > MAX_NAME_CHARS:
        raise ValueError(f"{len(text)} characters; at most {MAX_NAME_CHARS}")
    if text == RULE_ERROR:
        raise ValueError(f"{RULE_ERROR!r} is reserved for the alarm the alerter raises when a rule fails")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{value} must be positive")
    return value


def _choice(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not valid; accepted: {', '.join(choices)}")
        return text
    return convert


def load_rules(paths: list[str | Path] | str | Path) -> RuleSet:
    """Load and check every rule/receiver file; raises ``RulesInvalid`` with every error."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    files = [f for p in paths for f in rule_files(p)]
    errors: list[RuleError] = []
    ruleset = RuleSet(files=[str(f) for f in files])
    receiver_refs: list[tuple[_FileLoader, str, tuple[tuple[str, yaml.Node], ...]]] = []
    seen: dict[str, str] = {}
    declared: set[str] = set()
    for path in files:
        loader = _FileLoader(path, errors, declared)
        loader.load(ruleset)
        for name, node in loader.rule_nodes:
            if name in seen:
                loader.error(node, f"rule {name!r} is already defined in {seen[name]}")
            seen[name] = f"{path}:{node.start_mark.line + 1}"
        receiver_refs += [(loader, n, refs) for n, refs in loader.receiver_nodes.items()]
    for loader, owner, refs in receiver_refs:
        for ref, node in refs:
            if ref not in declared:
                loader.error(node, f"{owner}: unknown receiver {ref!r}; defined: "
                                   f"{', '.join(sorted(declared)) or 'none'}")
    if errors:
        raise RulesInvalid(sorted(errors, key=lambda e: (e.file, e.line, e.col)))
    return ruleset
