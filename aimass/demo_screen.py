"""What `aimass demo` shows: a live table of the stages while it runs, and aligned summary tables.

On a terminal the live table (one row per stage: rate over the last 10 s, total, backlog: readings
waiting or, for window / predict / alert, the consumer lag in Kafka records; rejected; alarms
active; elapsed / remaining) is redrawn in place, never wider than 100 columns.
Elsewhere (a log file, CI) one line is printed every 10 s instead. Rates are taken between counter
samples 10 s apart: stages count once per flush, so a rate over one 2 s tick jumps between 0 and
twice the real rate.
"""
from __future__ import annotations

import math
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, TextIO

RATE_WINDOW_S = 10.0
LOG_EVERY_S = 10.0
WIDTH = 100


def total(m: dict[str, float], *names: str) -> float:
    """The sum of these samples in a scrape (0 for a stage not serving yet)."""
    return sum(m.get(n, 0.0) for n in names)


def lag(m: dict[str, float], stage: str) -> float:
    """Kafka records the stage's consumers have not yet committed (``aimass_consumer_lag``)."""
    return sum(v for k, v in m.items() if k.startswith("aimass_consumer_lag{") and f'stage="{stage}"' in k)


@dataclass(frozen=True)
class Stage:
    """One row of the live table: what it counts, what waits for it, what it turned away."""

    name: str
    done: Callable[[dict[str, float]], float]
    backlog: Callable[[dict[str, float]], float] | None = None
    rejected: Callable[[dict[str, float]], str] | None = None
    backlog_unit: str = ""  # readings, or " rec" (Kafka records: the consumer lag of a windowed stage)


STORED = 'aimass_sink_rows_total{table="readings"}'
# ``m`` is a scrape of every stage plus "published" (readings the simulator has sent).
STAGES = (
    Stage("publish", lambda m: total(m, "published")),
    Stage("bridge", lambda m: total(m, "aimass_bridge_readings_produced_total"),
          lambda m: total(m, "published") - total(m, "aimass_bridge_readings_produced_total"),
          lambda m: f"{total(m, 'aimass_bridge_rejected_total'):,.0f} msgs"),
    Stage("clean", lambda m: total(m, "aimass_clean_readings_out_total"),
          lambda m: total(m, "aimass_bridge_readings_produced_total") - total(m, "aimass_clean_readings_in_total"),
          lambda m: f"{total(m, 'aimass_clean_rejected_total'):,.0f} +{total(m, 'aimass_clean_late_total'):,.0f} late"),
    Stage("window", lambda m: total(m, "aimass_window_rows_total"), lambda m: lag(m, "window"), backlog_unit=" rec"),
    Stage("predict", lambda m: total(m, "aimass_predict_rows_total"), lambda m: lag(m, "predict"),
          lambda m: f"{total(m, 'aimass_predict_degraded_rows_total'):,.0f} degraded", " rec"),
    Stage("alert", lambda m: total(m, "aimass_alert_events_total"), lambda m: lag(m, "alert"), backlog_unit=" rec"),
    Stage("sink", lambda m: total(m, STORED),
          lambda m: total(m, "aimass_clean_readings_out_total") - total(m, STORED),
          lambda m: f"{total(m, 'aimass_sink_dead_letter_total'):,.0f} records"),
)


class Rates:
    """Per-stage rates over the last ``window_s`` seconds of counter samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self.samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, t: float, m: dict[str, float]) -> None:
        self.samples.append((t, {s.name: s.done(m) for s in STAGES}))
        # Keep one sample at or beyond the window's start, so the rate always spans the window.
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()

    def rate(self, stage: str) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, old), (t1, new) = self.samples[0], self.samples[-1]
        return (new[stage] - old[stage]) / (t1 - t0) if t1 > t0 else 0.0


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def live_table(m: dict[str, float], rates: Rates, elapsed_s: float, remaining_s: float | None) -> list[str]:
    """The live table's lines (each at most ``WIDTH`` characters)."""
    phase = f"publishing, {clock(remaining_s)} left" if remaining_s is not None else "draining"
    lines = [f"AI Mass demo  elapsed {clock(elapsed_s)}  {phase}  |  alarms active {m.get('aimass_alarms_active', 0):,.0f}",
             f"{'stage':<9}{'rate/s (10 s)':>14}{'total':>14}{'backlog':>12}   rejected"]
    for s in STAGES:
        backlog = f"{max(0.0, s.backlog(m)):,.0f}{s.backlog_unit}" if s.backlog else "-"
        rejected = s.rejected(m) if s.rejected else "-"
        lines.append(f"{s.name:<9}{rates.rate(s.name):>14,.0f}{s.done(m):>14,.0f}{backlog:>12}   {rejected}")
    return [line[:WIDTH] for line in lines]


def short(n: float) -> str:
    """A count in at most 5 characters, 3 significant digits: ``999``, ``54.0k``, ``2.70M``."""
    for div, suffix in ((1, ""), (1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        v = float(f"{n / div:.3g}")
        if v < 1000:
            return f"{v:.0f}" if div == 1 else f"{v:.{max(0, 2 - math.floor(math.log10(v)))}f}{suffix}"
    return f"{n / 1e12:.0f}T"


def log_line(m: dict[str, float], rates: Rates, elapsed_s: float) -> str:
    """One progress line for a log, within ``WIDTH`` characters for any count and a run under
    1,000 minutes; the window rate is left to the terminal table."""
    r = rates.rate
    return (f"[{clock(elapsed_s)}] published {short(total(m, 'published'))} stored {short(total(m, STORED))}"
            f" alarms {short(m.get('aimass_alarms_active', 0))} | /s: bridge {short(r('bridge'))}"
            f" clean {short(r('clean'))} predict {short(r('predict'))}")


class LiveScreen:
    """Shows progress: the live table redrawn in place on a terminal, a line every 10 s elsewhere."""

    def __init__(self, out: TextIO = sys.stdout, terminal: bool | None = None):
        self.out = out
        self.terminal = out.isatty() if terminal is None else terminal
        self.rates = Rates()
        self.drawn = 0          # lines of the table on screen (terminal)
        self.logged_at = -math.inf

    @property
    def interval_s(self) -> float:
        """How often the caller should sample and call ``update``."""
        return 1.0 if self.terminal else 2.0

    def update(self, t: float, m: dict[str, float], elapsed_s: float, remaining_s: float | None) -> None:
        self.rates.add(t, m)
        if self.terminal:
            lines = live_table(m, self.rates, elapsed_s, remaining_s)
            # Back to the table's first line, then rewrite every line in place.
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self.drawn = len(lines)
        elif elapsed_s - self.logged_at >= LOG_EVERY_S:
            self.out.write(log_line(m, self.rates, elapsed_s) + "\n")
            self.logged_at = elapsed_s
        self.out.flush()


def aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """A table with a header, the first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), *(line(r) for r in rows)]


def number(value: float | None, fmt: str) -> str:
    """``value`` formatted, or "-" when there is none (None or NaN: nothing measured)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def detection_table(scores: list[dict]) -> list[str]:
    """Precision, recall and delay per rule and per model, aligned."""
    rows = [[f"{'rule' if s['rule'] else 'model'} {s['rule'] or s['model']}", number(s["precision"], ".2f"),
             number(s["recall"], ".2f"), number(s["mean_delay_s"], ".1f"), str(s["true_positives"]),
             str(s["false_positives"]), str(s["false_negatives"])] for s in scores]
    return aligned(["detection", "precision", "recall", "mean delay s", "TP", "FP", "FN"], rows)
