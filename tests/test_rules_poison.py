"""Rules that cannot take the alerter down, on a real `aimass alerter` process and the real Kafka
broker fixture: every poison rule file (tests/fixtures_rules.POISON_FILES) pushed while it runs is
rejected with its location and the previous rules keep raising alarms; a rule that fails on live
data (a fault injected into sqrt(), which the check's synthetic batch does not trigger) is
suspended, a rule_error alarm names it (to its receivers, counted in aimass_rule_errors_total)
while the other rules alarm in the same batch, and the alarm clears once the rule is changed."""
from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest

from aimass.core import contract
from aimass.core.procs import free_port, wait_until
from tests.fixtures_rules import POISON_FILES, POISON_VALUE, windows
from tests.test_rules_agent import RULES as AGENT_RULES
from tests.test_rules_agent import Hook, Reader, hook_server, produce, start_alerter, write_config  # noqa: F401

pytestmark = pytest.mark.integration

RULES = AGENT_RULES + """\
  - name: fragile
    stream: windows
    condition: sqrt(mean) > 100
    receivers: [hook]
"""
# `aimass alerter` with the test fault in sqrt() (python -c CODE --config FILE alerter)
POISONED = ("-c", "import sys; from aimass.rules import expr; from tests.fixtures_rules import poisoned_sqrt; "
                  "expr.FUNCTIONS['sqrt'] = poisoned_sqrt(); from aimass.cli import main; sys.exit(main(sys.argv[1:]))")


def raised(rows: list[dict], rule: str, device: str = "", metric: str = "") -> list[dict]:
    return [r for r in rows if (r["rule"], r["transition"]) == (rule, "raised") and r["device_id"] == device
            and (not metric or r["metric"] == metric)]


def replace_rules(path, content: str | bytes, step: int) -> None:
    """Rewrite the rule file with a distinct mtime, so the watcher sees every change."""
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    ns = time.time_ns() + step * 10**9
    os.utime(path, ns=(ns, ns))


def hot(device: str, mean: float = 90.0) -> list[dict]:
    """Two windows of ``device``: enough for the hot rule (mean > 80 for 2 windows)."""
    return [dict(device_id=device, window_end_ms=end, mean=mean) for end in (10_000, 20_000)]


def test_poison_rules_never_take_the_alerter_down(cfg, tmp_path, hook_server):
    metrics_port = free_port()
    config = write_config(cfg, tmp_path, hook_server.server_address[1], rules_text=RULES, metrics_port=metrics_port)
    rules_file = tmp_path / "rules" / "rules.yaml"
    log = tmp_path / "alerter.log"
    alerts = Reader(cfg, contract.ALERT_EVENTS)
    proc = start_alerter(config, log, cfg.alert.api_port, POISONED)
    try:
        # the fragile rule fails on live data: suspended, named by a rule_error alarm; hot alarms in the same batch
        produce(cfg, contract.WINDOW_ROWS, windows(dict(device_id="d1", window_end_ms=10_000, mean=POISON_VALUE),
                                                   *hot("d2")))
        rows = alerts.until(lambda rs: raised(rs, "hot", "d2") and raised(rs, "rule_error", metric="fragile"))
        [error] = raised(rows, "rule_error", metric="fragile")
        assert error["severity"] == "critical"
        assert "rule 'fragile'" in error["message"] and "FloatingPointError: poisoned sqrt(13.0)" in error["message"]
        wait_until(lambda: any(e["event_id"] == error["event_id"] for h in Hook.received for e in h["events"]),
                   30, "the rule_error notification to the failed rule's receiver", proc, log)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'aimass_rule_errors_total{rule="fragile"} 1.0' in metrics

        # every poison file is rejected with its location; the previous rules keep raising alarms
        for step, (case, (content, want)) in enumerate(sorted(POISON_FILES.items()), start=1):
            replace_rules(rules_file, content, step)
            wait_until(lambda: f"{rules_file}:{want}" in log.read_text(errors="replace"), 30,
                       f"{case}: the rejected reload in the log", proc, log)
            produce(cfg, contract.WINDOW_ROWS, windows(*hot(case)))
            alerts.until(lambda rs: raised(rs, "hot", case))
            assert proc.poll() is None, f"{case}: the alerter exited"

        # the suspended rule stayed suspended (one error); changed, it runs again and its alarm clears
        replace_rules(rules_file, RULES.format(port=hook_server.server_address[1]).replace(
            "sqrt(mean) > 100", "mean > 1000"), len(POISON_FILES) + 1)
        rows = alerts.until(lambda rs: ("rule_error", "cleared") in [(r["rule"], r["transition"]) for r in rs])
        [cleared] = [r for r in rows if r["rule"] == "rule_error" and r["transition"] == "cleared"]
        assert (cleared["metric"], cleared["first_ms"]) == ("fragile", error["first_ms"])  # the same alarm
        assert len(raised(rows, "rule_error", metric="fragile")) == 1
        produce(cfg, contract.WINDOW_ROWS, windows(*hot("last", 2000.0)))
        alerts.until(lambda rs: raised(rs, "hot", "last") and raised(rs, "fragile", "last"))
        assert "Traceback" not in log.read_text(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        alerts.close()
