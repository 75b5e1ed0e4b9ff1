"""Alerts on the pipeline itself through the alerter: Alertmanager's webhook JSON turned into alarms (pure
conversion, idempotency, late copies), the ``pipeline:`` route of the rule files, POST /pipeline-alerts on a
real aiohttp server (roles, 400 with the reason, 413, 503 where another alerter holds the partition), and
end to end: the real Alertmanager binary posting to a real `aimass alerter` on the Kafka fixture, whose
signed webhook reaches a verifying receiver once per alert state however often Alertmanager re-posts, also
with two alerters behind a per-connection balancer (as a Kubernetes Service) when the one holding the
pipeline alarms is SIGKILLed."""
from __future__ import annotations

import asyncio
import copy
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest

from aimass.core import contract
from aimass.core.procs import free_port, port_in_use, wait_until
from aimass.core.stack import create_topics
from aimass.receiver import WebhookReceiver
from aimass.rules.alarms import AlarmStore, StateDB
from aimass.rules.api import Unavailable
from aimass.rules.model import RulesInvalid, load_rules
from aimass.rules.pipeline import (MAX_KEY_CHARS, PIPELINE_DEVICE, PIPELINE_TENANT, PipelineAlert, apply_alerts,
                                   metric_key, parse_webhook)
from tests.conftest import make_config
from tests.fixtures_rules import offline_alerter
from tests.fixtures_stream import config_env
from tests.test_prometheus_rules import tool
from tests.test_rules_agent import ENV, start_alerter, write_config
from tests.test_rules_api import Api, raised_store

T0 = 1_795_000_000_000  # ms


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat().replace("+00:00", "Z")


def alert(status: str = "firing", starts: int = T0, ends: int | None = None, **labels: str) -> dict:
    """One alert as Alertmanager's webhook (version 4) carries it."""
    return {"status": status, "labels": {"alertname": "AimassStageDown", "job": "sink", "instance": "sink:9105",
                                         "severity": "critical", **labels},
            "annotations": {"summary": "sink sink:9105 is down", "description": "no scrape for 1 minute"},
            "startsAt": iso(starts), "endsAt": iso(ends) if ends else "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": "0123456789abcdef"}


def post(*alerts: dict) -> dict:
    return {"version": "4", "groupKey": "{}:{alertname=\"AimassStageDown\"}", "truncatedAlerts": 0,
            "status": alerts[0]["status"], "receiver": "aimass-alerter", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "alerts": list(alerts)}


# --- conversion ------------------------------------------------------------------------------------------

def test_an_alertmanager_post_becomes_alerts_with_their_times_labels_and_severity():
    [firing, resolved] = parse_webhook(post(alert(), alert("resolved", ends=T0 + 60_000, severity="page")))
    assert firing == PipelineAlert(True, alert()["labels"], alert()["annotations"], T0, 0)
    assert (resolved.firing, resolved.ends_ms, resolved.severity) == (False, T0 + 60_000, "critical")
    assert firing.severity == "critical" and firing.name == "AimassStageDown"
    no_severity = dict(alert(), labels={"alertname": "X"})
    assert parse_webhook(post(no_severity))[0].severity == "warning"
    # Alertmanager's times carry nanoseconds and offsets
    nanos = dict(alert(), startsAt="2026-12-03T15:49:27.123456789+01:00")
    assert parse_webhook(post(nanos))[0].starts_ms == 1796309367123


@pytest.mark.parametrize("body, reason", [
    ([], "webhook JSON object"),
    ({"alerts": [alert()]}, "version must be"),
    (post(alert()) | {"version": "3"}, "version must be"),
    (post(alert()) | {"alerts": []}, "non-empty list"),
    (post(alert()) | {"alerts": "x"}, "non-empty list"),
    (post(alert()) | {"alerts": [alert()] * 1001}, "at most 1000"),
    (post(alert(status="pending")), "alerts[0].status"),
    (post(alert(), alert() | {"labels": {"alertname": "A", "n": 1}}), "alerts[1].labels"),
    (post(alert() | {"labels": {"job": "sink"}}), "alertname"),
    (post(alert() | {"annotations": ["x"]}), "alerts[0].annotations"),
    (post(alert() | {"startsAt": "yesterday"}), "alerts[0].startsAt"),
    (post(alert("resolved") | {"endsAt": None}), "alerts[0].endsAt"),
])
def test_malformed_posts_are_refused_with_the_reason(body, reason):
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_webhook(body)


def test_the_same_alert_state_posted_again_never_pages_twice_and_late_copies_change_nothing(tmp_path):
    store = AlarmStore(StateDB(tmp_path / "s.sqlite"))

    def transitions(*alerts: dict) -> list[str]:
        return [e["transition"] for e in apply_alerts(store, parse_webhook(post(*alerts)))]

    assert transitions(alert()) == ["raised"]
    assert transitions(alert()) == [] and transitions(alert(), alert()) == []  # re-posts, repeat_interval
    assert transitions(alert("resolved", ends=T0 + 60_000)) == ["cleared"]
    assert transitions(alert("resolved", ends=T0 + 60_000)) == []
    assert transitions(alert()) == []  # a late copy of the resolved incident does not reopen it
    assert transitions(alert(starts=T0 + 900_000)) == ["reraised"]  # a new incident (15 min later: not flapping)
    assert transitions(alert("resolved", ends=T0 + 60_000)) == []  # the old one's resolution: this one goes on
    assert transitions(alert("resolved", starts=T0 + 900_000, ends=T0 + 960_000)) == ["cleared"]
    # another label set is another alarm; every alarm is of the pipeline series
    assert transitions(alert(instance="sink-2:9105")) == ["raised"]
    assert len(store.alarms) == 2
    assert {(a.tenant, a.device_id) for a in store.alarms.values()} == {(PIPELINE_TENANT, PIPELINE_DEVICE)}
    [event] = apply_alerts(store, parse_webhook(post(alert("resolved", ends=T0 + 200_000, instance="sink-2:9105"))))
    assert event["message"] == "[resolved] sink sink:9105 is down - no scrape for 1 minute"
    assert (event["rule"], event["severity"], event["metric"]) == (
        "AimassStageDown", "critical", "instance=sink-2:9105,job=sink,severity=critical")
    assert json.loads(event["labels_json"])["job"] == "sink"


def test_long_label_sets_keep_distinct_bounded_keys():
    a, b = ({"alertname": "A", "topic": "t" * 300 + x} for x in "12")
    assert len(metric_key(a)) == MAX_KEY_CHARS and metric_key(a) != metric_key(b)
    assert metric_key({"alertname": "A", "job": "x"}) == "job=x"
    # label values may hold the separators: distinct label sets stay distinct alarms
    assert metric_key({"a": "1,b=2"}) != metric_key({"a": "1", "b": "2"})


# --- routing ---------------------------------------------------------------------------------------------

RECEIVERS = """
receivers:
  hook: {kind: webhook, url: "http://127.0.0.1:9/hook", secret_env: TEST_HOOK_SECRET, group_wait: 0s}
  mail: {kind: email, host: 127.0.0.1, from: a@example.com, to: [b@example.com]}
"""


def test_the_rule_files_route_pipeline_alerts_by_severity_and_point_at_mistakes(tmp_path):
    (tmp_path / "r.yaml").write_text(RECEIVERS + "pipeline: {receivers: [hook], by_severity: {critical: [mail, hook]}}\n")
    route = load_rules(tmp_path).pipeline
    assert route.receivers_for("warning") == ("hook",) and route.receivers_for("critical") == ("hook", "mail")
    for text, error in [("pipeline: {receivers: [nope]}", "pipeline: unknown receiver 'nope'"),
                        ("pipeline: {receivers: [hook], by_severity: {page: [mail]}}", "'page' is not a severity"),
                        ("pipeline: {receivers: []}", "name at least one receiver"),
                        ("pipeline: {receiver: [hook]}", "unknown key 'receiver'")]:
        (tmp_path / "r.yaml").write_text(RECEIVERS + text + "\n")
        with pytest.raises(RulesInvalid, match=error):
            load_rules(tmp_path)
    (tmp_path / "r.yaml").write_text(RECEIVERS + "pipeline: {receivers: [hook]}\n")
    (tmp_path / "s.yaml").write_text("pipeline: {receivers: [mail]}\n")
    with pytest.raises(RulesInvalid, match="defined in another file"):
        load_rules(tmp_path)


def test_the_alerter_applies_a_post_only_where_it_holds_the_pipeline_partition(tmp_path):
    alerter = offline_alerter(tmp_path, RECEIVERS)
    cfg = alerter.cfg
    everything = set(range(cfg.kafka.partitions))
    mine = alerter.part_of(PIPELINE_TENANT, PIPELINE_DEVICE)
    alerts = parse_webhook(post(alert(), alert(instance="x:1", severity="warning")))
    try:
        with pytest.raises(Unavailable, match="routes alerts on the pipeline"):
            alerter.take_pipeline_alerts(alerts, everything)
        (tmp_path / "rules.yaml").write_text(RECEIVERS + "pipeline: {receivers: [hook], by_severity: {critical: [mail]}}")
        alerter.reload_rules()
        with pytest.raises(Unavailable, match=f"partition {mine}"):
            alerter.take_pipeline_alerts(alerts, everything - {mine})
        assert not alerter.store.alarms
        assert len(alerter.take_pipeline_alerts(alerts, {mine})) == 2
        assert alerter.take_pipeline_alerts(alerts, {mine}) == []
        assert {key: n for key, (n, _) in alerter.outbox.waiting().items()} == {("hook", mine): 2, ("mail", mine): 1}
        # the alarms are the partition's: its checkpoint carries them to the next owner
        assert len(json.loads(alerter.partition_states([mine])[mine])["alarms"]) == 2
    finally:
        alerter.close()


# --- the API ---------------------------------------------------------------------------------------------

INGEST = "i" * 20
TOKENS = f"reader:read:{'r' * 20},operator:operate:{'o' * 20},administrator:admin:{'a' * 20},alertmanager:ingest:{INGEST}"


def test_post_pipeline_alerts_checks_role_body_and_size_and_says_when_to_retry(tmp_path):
    store, _ = raised_store(tmp_path)
    taken: list[list[PipelineAlert]] = []
    busy = [False]

    async def pipeline(alerts: list[PipelineAlert]) -> dict:
        if busy[0]:
            raise Unavailable("another alerter holds the partition")
        taken.append(alerts)
        return {"alerts": len(alerts)}

    async def scenario(api: Api) -> dict:
        got = {}
        async with api, aiohttp.ClientSession() as s:
            async def call(name: str, token: str, body: bytes, path: str = "/pipeline-alerts", method: str = "POST"):
                async with s.request(method, api.base + path, data=body,
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    got[name] = (r.status, await r.text(), r.headers)
            good = json.dumps(post(alert())).encode()
            for role, secret in (("read", "r"), ("operate", "o"), ("admin", "a")):
                await call(role, secret * 20, good)
            await call("ingest", INGEST, good)
            await call("ingest reads alarms", INGEST, b"", "/alarms", "GET")
            await call("not json", INGEST, b"{")
            await call("wrong version", INGEST, json.dumps(post(alert()) | {"version": "2"}).encode())
            await call("too big", INGEST, json.dumps(post(*[alert(i=str(i)) for i in range(200)])).encode())
            busy[0] = True
            await call("busy", INGEST, good)
        return got

    got = asyncio.run(scenario(Api(store, tokens_env=TOKENS, pipeline=pipeline, pipeline_max_body_bytes=32768)))
    assert {k: v[0] for k, v in got.items()} == {
        "read": 403, "operate": 403, "admin": 200, "ingest": 200, "ingest reads alarms": 403, "not json": 400,
        "wrong version": 400, "too big": 413, "busy": 503}
    assert "version must be" in json.loads(got["wrong version"][1])["error"]
    assert got["busy"][2]["Retry-After"] == "1" and got["busy"][2]["Connection"] == "close"
    assert [len(a) for a in taken] == [1, 1]


# --- end to end: the real Alertmanager -> the real alerter -> a verifying receiver ------------------------

RULES = """
receivers:
  hook: {{kind: webhook, url: "http://127.0.0.1:{port}/aimass/alerts", secret_env: TEST_HOOK_SECRET, group_wait: 0s}}
pipeline:
  receivers: [hook]
rules: []
"""

ALERTMANAGER = """
route:
  receiver: alerter
  group_by: [alertname]
  group_wait: 200ms
  group_interval: 1s
  repeat_interval: 2s
receivers:
  - name: alerter
    webhook_configs:
      - url: {url}
        send_resolved: true
        max_alerts: 50
        http_config:
          authorization:
            credentials_file: {token_file}
"""


def http_json(url: str, body: object | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read()
    return json.loads(text) if text.strip() else None


def webhook_posts(am_port: int, metric: str = "alertmanager_notifications_total") -> float:
    """How many webhook notifications Alertmanager has sent (or, with the failed counter, had refused)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{am_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(metric + '{integration="webhook"}'):
                return float(line.split()[-1])
    return 0.0


def start_alertmanager(tmp_path: Path, url: str) -> tuple[subprocess.Popen, int, Path]:
    """Debian's Alertmanager posting every group to ``url`` (with the ingest token); (process, port, log)."""
    token_file = tmp_path / "alerter-token"
    token_file.write_text(INGEST)
    am_port = free_port()
    (tmp_path / "alertmanager.yml").write_text(ALERTMANAGER.format(url=url, token_file=token_file))
    log = tmp_path / "alertmanager.log"
    am = subprocess.Popen([tool("alertmanager"), f"--config.file={tmp_path / 'alertmanager.yml'}",
                           f"--storage.path={tmp_path / 'am-data'}", f"--web.listen-address=127.0.0.1:{am_port}",
                           "--cluster.listen-address="], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{am_port}/-/ready", timeout=2).status == 200,
               30, "alertmanager", am, log)
    return am, am_port, log


def fire(am_port: int, labels: dict, starts: str, ends: str | None = None) -> None:
    """Post one alert to Alertmanager's API (as Prometheus does); with ``ends`` in the past it is resolved."""
    doc = {"labels": labels, "annotations": {"summary": "sink down"}, "startsAt": starts}
    http_json(f"http://127.0.0.1:{am_port}/api/v2/alerts", [doc | ({"endsAt": ends} if ends else {})])


@pytest.mark.integration
def test_alertmanager_posts_reach_a_signed_webhook_once_per_alert_state(cfg, tmp_path):
    receiver = WebhookReceiver("hook-secret", free_port()).start()
    config = write_config(cfg, tmp_path, receiver.port, rules_text=RULES)
    env = {**ENV, "AIMASS_API_TOKENS": f"alertmanager:ingest:{INGEST}"}
    alerter = start_alerter(config, tmp_path / "alerter.log", cfg.alert.api_port, env=env)
    am = None
    labels = {"alertname": "AimassStageDown", "job": "sink", "instance": "sink:9105", "severity": "critical"}
    started = iso(int(time.time() * 1000))

    def arrived(transition: str) -> list[dict]:
        return [e for e in receiver.events if e["transition"] == transition]

    try:
        am, am_port, am_log = start_alertmanager(tmp_path, f"http://127.0.0.1:{cfg.alert.api_port}/pipeline-alerts")
        fire(am_port, labels, started)
        wait_until(lambda: arrived("raised"), 30, "the raised alarm at the webhook receiver", alerter,
                   tmp_path / "alerter.log")
        # Alertmanager re-posts the firing group every repeat_interval, and with the new alert of the group
        posts = webhook_posts(am_port)
        fire(am_port, {**labels, "instance": "sink-2:9105"}, started)
        wait_until(lambda: webhook_posts(am_port) >= posts + 3 and len(arrived("raised")) >= 2, 30,
                   "three more Alertmanager posts and the second alert's alarm")
        assert len(arrived("raised")) == 2, receiver.events
        fire(am_port, labels, started, ends=iso(int(time.time() * 1000)))
        wait_until(lambda: arrived("cleared"), 30, "the cleared alarm at the webhook receiver", alerter,
                   tmp_path / "alerter.log")
        posts = webhook_posts(am_port)
        wait_until(lambda: webhook_posts(am_port) >= posts + 2, 30, "two more Alertmanager posts")
        raised, cleared = arrived("raised"), arrived("cleared")
        assert sorted(e["metric"] for e in raised) == ["instance=sink-2:9105,job=sink,severity=critical",
                                                        "instance=sink:9105,job=sink,severity=critical"]
        assert [(e["rule"], e["severity"], e["metric"], e["message"]) for e in cleared] == [
            ("AimassStageDown", "critical", "instance=sink:9105,job=sink,severity=critical", "[resolved] sink down")]
        assert len(receiver.events) == 3  # every alert state once, however often Alertmanager posted it
        assert receiver.bad_signatures == 0 and receiver.duplicates == 0
        assert webhook_posts(am_port, "alertmanager_notifications_failed_total") == 0  # each post answered 2xx
        alarms = http_json_authorized(cfg.alert.api_port, "/alarms")["alarms"]
        assert sorted(a["state"] for a in alarms if a["device_id"] == PIPELINE_DEVICE) == [
            "active_unack", "cleared_unack"]
    finally:
        if am is not None:
            am.terminate()
            am.wait(10)
        alerter.terminate()
        alerter.wait(30)
        receiver.stop()


def http_json_authorized(port: int, path: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {ENV['AIMASS_API_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


class Balancer:
    """A TCP balancer on 127.0.0.1 that, like a Kubernetes Service, picks a backend per connection (round robin,
    skipping a backend that refuses); ``picked`` counts connections per backend port."""

    def __init__(self, backends: list[int]):
        self.backends, self.turn = backends, 0
        self.picked: dict[int, int] = {port: 0 for port in backends}
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.connect, args=(client,), daemon=True).start()

    def connect(self, client: socket.socket) -> None:
        for _ in self.backends:
            port = self.backends[self.turn % len(self.backends)]
            self.turn += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue
            upstream.settimeout(None)
            self.picked[port] += 1
            threading.Thread(target=self.pipe, args=(upstream, client), daemon=True).start()
            self.pipe(client, upstream)
            return
        client.close()

    @staticmethod
    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def assigned(log: Path) -> list[int]:
    """The partitions an alerter's last assignment (in its log) gave it."""
    found = re.findall(r"assigned partitions \[([\d, ]*)\]", log.read_text() if log.exists() else "")
    return [int(p) for p in found[-1].split(",") if p.strip()] if found else []


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_with_two_alerters_the_one_holding_the_pipeline_alarms_pages_once_and_a_kill_hands_them_over(tmp_path,
                                                                                                    kafka):
    cfg = make_config(tmp_path, kafka=kafka)
    cfg.state.store = "kafka"
    create_topics(cfg)
    receiver = WebhookReceiver("hook-secret", free_port()).start()
    (tmp_path / "rules.yaml").write_text(RULES.format(port=receiver.port))
    secrets = {"AIMASS_STATE_KEY": "pipeline-alerts-test-key", "TEST_HOOK_SECRET": "hook-secret",
               "AIMASS_API_TOKENS": f"alertmanager:ingest:{INGEST}"}
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    ports: dict[str, int] = {}
    for name in ("alert-a", "alert-b"):
        c = copy.deepcopy(cfg)
        c.run.dir = str(tmp_path / name)  # nothing shared on disk: state moves through Kafka
        c.alert.rules_path, c.alert.api_port = str(tmp_path / "rules.yaml"), free_port()
        c.alert.backoff_initial_s = 0.1
        ports[name], logs[name] = c.alert.api_port, tmp_path / f"{name}.log"
        procs[name] = subprocess.Popen([sys.executable, "-m", "aimass.cli", "alerter"],
                                       env={**config_env(c), **secrets}, stdout=logs[name].open("ab"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
    balancer = None
    am = None
    pipeline_part = contract.partition_for(PIPELINE_TENANT, PIPELINE_DEVICE, cfg.kafka.partitions)
    labels = {"alertname": "AimassStageDown", "job": "sink", "instance": "sink:9105", "severity": "critical"}
    started = iso(int(time.time() * 1000))

    def arrived(transition: str) -> list[dict]:
        return [e for e in receiver.events if e["transition"] == transition]

    try:
        for name, proc in procs.items():
            wait_until(lambda: assigned(logs[name]) and port_in_use(ports[name]), 90, f"{name} owning partitions",
                       proc, logs[name])
        [owner] = [name for name in procs if pipeline_part in assigned(logs[name])]
        [survivor] = [name for name in procs if name != owner]
        # Alertmanager's first connection reaches the alerter without the partition: 503, closed, retried
        balancer = Balancer([ports[survivor], ports[owner]])
        am, am_port, am_log = start_alertmanager(tmp_path, f"http://127.0.0.1:{balancer.port}/pipeline-alerts")
        fire(am_port, labels, started)
        fire(am_port, {**labels, "instance": "sink-2:9105"}, started)  # still firing at the end: posts go on
        wait_until(lambda: len(arrived("raised")) >= 2, 60, "the raised alarms at the webhook receiver")
        assert balancer.picked[ports[survivor]] >= 1 and balancer.picked[ports[owner]] >= 1  # 503, then the owner
        procs[owner].send_signal(signal.SIGKILL)
        procs[owner].wait(10)
        # Alertmanager goes on re-posting the firing alert (repeat_interval); once the survivor holds the
        # partition it answers them 2xx from the alarm state it took over: nothing is raised again
        wait_until(lambda: pipeline_part in assigned(logs[survivor]), 60, f"{survivor} taking the partition over",
                   procs[survivor], logs[survivor])
        posts = webhook_posts(am_port)
        wait_until(lambda: webhook_posts(am_port) >= posts + 2, 60, "two Alertmanager posts to the survivor")
        fire(am_port, labels, started, ends=iso(int(time.time() * 1000)))
        wait_until(lambda: arrived("cleared"), 60, "the cleared alarm at the webhook receiver", procs[survivor],
                   logs[survivor])
        posts = webhook_posts(am_port)
        wait_until(lambda: webhook_posts(am_port) >= posts + 2, 30, "two more Alertmanager posts")
        assert sorted(e["transition"] for e in receiver.events) == ["cleared", "raised", "raised"], receiver.events
        assert receiver.bad_signatures == 0
        assert balancer.picked[ports[survivor]] >= 2  # it answered again after the owner died
    finally:
        if am is not None:
            am.terminate()
            am.wait(10)
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        if balancer is not None:
            balancer.close()
        receiver.stop()
