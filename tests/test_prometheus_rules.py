"""The alerts on the pipeline itself (deploy/prometheus/): Prometheus's own tools check them, their
unit tests (alerts.test.yml) show each alert firing on its failure and quiet on a healthy pipeline,
every metric they name is one the stages export, and Alertmanager sends them to the alerter, which
routes them to the device alarms' destinations (tests/test_pipeline_alerts.py runs that path).

promtool and amtool come from Debian's packages, unpacked into .cache/tools by scripts/setup.sh;
without them these tests fail and say so.
"""
from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import REGISTRY

from aimass.core.config import Config
from aimass.rules.model import load_rules

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"
ALERTS = yaml.safe_load((PROM / "alerts.yml").read_text())
# Modules that define the stages' metrics (imported, their metrics registered in the default registry).
METRIC_MODULES = ("aimass.streams.kafka", "aimass.streams.bridge", "aimass.agents.clean", "aimass.agents.window",
                  "aimass.agents.predict", "aimass.agents.alert", "aimass.agents.sink", "aimass.models.triton_client")
# Metrics the rules may name before the code exports them, and who adds them.
ADDED_ELSEWHERE = {"aimass_consumer_lag": "issue 18 item 2: consumer lag per stage, group, topic, partition"}
PROMETHEUS_OWN = {"up"}


def tool(name: str) -> str:
    path = REPO / ".cache" / "tools" / "bin" / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: run scripts/setup.sh (unpacks Debian's prometheus and "
                    f"prometheus-alertmanager packages into .cache/tools)", pytrace=False)
    return found


def check(argv: list[str], cwd: Path = PROM) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def exported_names() -> set[str]:
    """Every series name the stages' metrics export (counters as *_total, histograms' parts)."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names = set()
    for metric in REGISTRY.collect():
        if metric.type == "counter":
            names.add(metric.name + "_total")
        elif metric.type == "histogram":
            names |= {metric.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(metric.name)
    return names


def rule_metric_names() -> dict[str, set[str]]:
    """Alert name -> the metric names its expression reads."""
    out = {}
    for group in ALERTS["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # label values are not metric names
            words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?=\s*[{\[)]|\s*(?:>|==|and|or|$))", expr))
            out[rule["alert"]] = {w for w in words if w.startswith("aimass_") or w in PROMETHEUS_OWN}
    return out


def test_rules_pass_promtool_check() -> None:
    assert "SUCCESS" in check([tool("promtool"), "check", "rules", "alerts.yml"])


def test_each_alert_fires_on_its_failure_and_not_on_a_healthy_pipeline() -> None:
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts.test.yml").read_text()))
    assert tested == {r["alert"] for g in ALERTS["groups"] for r in g["rules"]}, "every alert needs a unit test"
    assert "SUCCESS" in check([tool("promtool"), "test", "rules", "alerts.test.yml"])


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests are not vacuous: an alert that can never fire is caught."""
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text().replace(
        'up{job=~"bridge|worker|predict|alerter|sink|triton"} == 0', 'up{job=~"bridge|worker|predict|alerter|sink|triton"} == 2'))
    shutil.copy(PROM / "alerts.test.yml", tmp_path)
    proc = subprocess.run([tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "AimassStageDown" in proc.stdout + proc.stderr


def test_prometheus_config_loads_the_rules_and_sends_to_alertmanager(tmp_path: Path) -> None:
    conf = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert conf["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["prometheus"]["volumes"]
    assert "./prometheus/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in compose["alertmanager"]["volumes"]
    conf["rule_files"] = [str(PROM / "alerts.yml")]  # where the container mounts it -> this checkout
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    check([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])


def test_rules_read_only_metrics_the_stages_export() -> None:
    exported = exported_names()
    assert "aimass_sink_retries_total" in exported and "aimass_predict_breaker_open" in exported
    unknown = {alert: sorted(names - exported - PROMETHEUS_OWN - set(ADDED_ELSEWHERE))
               for alert, names in rule_metric_names().items()}
    assert not any(unknown.values()), f"metrics no stage exports: {unknown}"
    assert all(rule_metric_names().values()), "a rule reads no metric: the name extraction broke"


def routes(*labels: str) -> set[str]:
    """The Alertmanager receivers an alert with these labels goes to (amtool's route test)."""
    out = check([tool("amtool"), "config", "routes", "test", "--config.file=alertmanager.yml", *labels])
    return set(out.split()[-1].split(","))


def test_alertmanager_sends_every_alert_to_the_alerter_which_routes_it_to_the_device_alarm_receivers() -> None:
    check([tool("amtool"), "check-config", "alertmanager.yml"])
    am = yaml.safe_load((PROM / "alertmanager.yml").read_text())
    receivers = {r["name"]: r for r in am["receivers"]}
    [hook] = receivers[am["route"]["receiver"]]["webhook_configs"]
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())["services"]
    assert "alerter" in compose["alertmanager"]["depends_on"]
    url = urlsplit(hook["url"])
    assert (url.hostname, url.port, url.path) == ("alerter", Config().alert.api_port, "/pipeline-alerts")
    assert hook["send_resolved"] and "credentials_file" in hook["http_config"]["authorization"]  # never inline
    for alert in (r for g in ALERTS["groups"] for r in g["rules"]):
        labels = [f"alertname={alert['alert']}", f"severity={alert['labels']['severity']}", "job=sink"]
        assert "aimass-alerter" in routes(*labels), alert["alert"]
    # the alerter routes them like device alarms: the ops webhook, critical ones by email too
    route = load_rules(REPO / "rules" / "examples").pipeline
    assert route.receivers_for("warning") == ("ops-webhook",)
    assert route.receivers_for("critical") == ("ops-webhook", "ops-email")
    # what the alerter cannot deliver about itself also goes straight to the ops mailbox
    examples = yaml.safe_load((REPO / "rules" / "examples" / "receivers.yaml").read_text())["receivers"]
    mail = examples["ops-email"]
    assert routes("alertname=AimassStageDown", "job=alerter", "severity=critical") == {"aimass-alerter",
                                                                                       "ops-email-direct"}
    assert routes("alertname=AimassNotificationsFailing", "receiver=ops-webhook") == {"aimass-alerter",
                                                                                      "ops-email-direct"}
    assert [e["to"] for e in receivers["ops-email-direct"]["email_configs"]] == mail["to"]
    assert am["global"]["smtp_from"] == mail["from"] and "smtp_auth_password_file" in am["global"]
