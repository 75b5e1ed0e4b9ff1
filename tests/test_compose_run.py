"""The shipped deployment started for real: deploy/compose.yaml in containers (podman-compose),
with deploy/compose.local.yaml for the roles no package provides here (deploy/local/README.md).

Simulated devices publish through the containerised Mosquitto, which reads the shipped
mosquitto.conf and ACL (a generated password file beside them) and logs each client in as the
compose file says; two bridges, two workers, Triton, predict, the alerter (webhook to a receiver
container) and the sink run from images built from deploy/docker/. Between two bursts of readings
one replica of every stage is SIGKILLed (bridge-1, worker 1 of 2, predict, the alerter, the sink:
the single-replica stages come back through compose's ``restart: unless-stopped``), and the
second burst is published while they restart. Then, by identity: every published reading is
stored exactly once (0 lost), every closed window has exactly one prediction, every alarm event
is stored once, and the receiver got exactly the two alarms the probe readings raise, once each.

A machine that cannot run containers fails this test (with what to install), never skips it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from aimass.core.config import Config
from aimass.core.stack import mosquitto_password_line
from aimass.streams.mqtt import Publisher
from aimass.streams.simulator import SimSpec, publish
from tests.accounting import (alarm_events, check_alarm_events, check_predictions, check_readings, check_windows,
                              eventually, read_ledger)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PODMAN_LOCAL = DEPLOY / "local" / "podman-local"
PROJECT = "aimass-ci"
TENANT = "ci"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
# One replica of every AI Mass stage, killed with SIGKILL mid-run.
KILLED = ("bridge-1_1", "worker_1", "predict_1", "alerter_1", "sink_1")
STAGES = ("bridge-1_1", "bridge-2_1", "worker_1", "worker_2", "predict_1", "alerter_1", "sink_1")
PROBE_RULE = {
    "receivers": {"ci-webhook": {"kind": "webhook", "url": "http://receiver:8099/aimass/alerts",
                                 "secret_env": "AIMASS_WEBHOOK_SECRET", "group_wait": "1s"}},
    "rules": [{"name": "probe_high", "stream": "readings", "selector": {"metric": "probe"},
               "condition": "value > 1000", "clear": "value < 10", "value": "value", "severity": "critical",
               "message": "{device_id} probe {value}", "receivers": ["ci-webhook"]}],
}


def require_containers() -> None:
    missing = [tool for tool in ("podman", "podman-compose", "debootstrap", "runc") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"this test runs the deployment in containers and needs {', '.join(missing)}: run "
                    f"scripts/setup.sh (apt-get install podman podman-compose debootstrap runc)", pytrace=False)
    for port in (1883, 8080, 9090):  # compose.yaml publishes Mosquitto, the alarm API, Prometheus there
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"host port {port} is taken: compose.yaml publishes it; stop what listens there",
                            pytrace=False)


def run(args: list[str], env: dict, timeout: float, check: bool = True, input: bytes | None = None
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(PODMAN_LOCAL), *args], env=env, capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman-local {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode(errors='replace')[-3000:]}\n{proc.stderr.decode(errors='replace')[-3000:]}")
    return proc


class Deployment:
    """The running compose project: podman commands, store queries through the sink, logs."""

    def __init__(self, env: dict):
        self.env = env

    def podman(self, *args: str, timeout: float = 60, check: bool = True, input: bytes | None = None) -> str:
        return run(["podman", *args], self.env, timeout, check, input).stdout.decode(errors="replace")

    def compose(self, *args: str, timeout: float = 300) -> str:
        # podman-compose 1.0.3 starts the dependencies of every service named again and reports the
        # ones already running as errors: success is judged by the containers' states instead.
        return run(["compose", *args], self.env, timeout, check=False).stdout.decode(errors="replace")

    def name(self, container: str) -> str:
        return f"{PROJECT}_{container}"

    def state(self, container: str) -> dict:
        return json.loads(self.podman("inspect", "--format", "{{json .State}}", self.name(container)))

    def wait_healthy(self, container: str, timeout: float = 180) -> None:
        """The compose healthcheck of ``container``, run until it passes."""
        deadline = time.monotonic() + timeout
        while run(["podman", "healthcheck", "run", self.name(container)], self.env, 30, check=False).returncode:
            assert time.monotonic() < deadline, f"{container} not healthy after {timeout}s:\n{self.logs(container)}"
            time.sleep(2)

    def logs(self, container: str, tail: int = 30) -> str:
        proc = run(["podman", "logs", "--tail", str(tail), self.name(container)], self.env, 30, check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")  # a container's stderr comes on stderr

    def all_logs(self) -> str:
        return "\n".join(f"--- {c}\n{self.logs(c, 15)}" for c in (*STAGES, "receiver_1"))

    def query(self, sql: str) -> pa.Table:
        """``sql`` ({db} = the database) on the sink's read-only SQL endpoint, inside its container."""
        script = ("import sys, pyarrow as pa\n"
                  "from aimass.core.config import load_config\n"
                  "from aimass.core.clickhouse import HttpReader, read_query_token\n"
                  "cfg = load_config(); ch = cfg.clickhouse\n"
                  "r = HttpReader(ch.query_port, ch.database, read_query_token(cfg))\n"
                  "sys.exit(3) if not r.alive() else None\n"
                  "t = r.query(sys.stdin.read().replace('{db}', ch.database))\n"
                  "w = pa.ipc.new_stream(sys.stdout.buffer, t.schema); w.write_table(t); w.close()\n")
        proc = run(["podman", "exec", "-i", self.name("sink_1"), "python", "-c", script], self.env, 60,
                   check=False, input=sql.encode())
        if proc.returncode:
            raise AssertionError(f"query failed ({proc.returncode}, the sink restarting?): "
                                 f"{proc.stderr.decode(errors='replace')[-800:]}")
        return pa.ipc.open_stream(proc.stdout).read_all()

    def kill(self, container: str) -> None:
        """SIGKILL the container's main process from the host, as a crash or the OOM killer would."""
        os.kill(int(self.state(container)["Pid"]), signal.SIGKILL)

    def delivered(self) -> list[dict]:
        """Alarm events the receiver verified, one JSON line each in its log."""
        out = run(["podman", "logs", self.name("receiver_1")], self.env, 30).stdout.decode(errors="replace")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def service_env(service: str) -> dict:
    return COMPOSE["services"][service]["environment"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    require_containers()
    tmp = tmp_path_factory.mktemp("compose")
    bridge_user = service_env("bridge-1")["AIMASS_MQTT_USERNAME"]
    simulator_user = service_env("simulate")["AIMASS_MQTT_USERNAME"]
    passwords = {name: secrets.token_hex(12) for name in
                 ("AIMASS_BRIDGE_MQTT_PASSWORD", "AIMASS_SIMULATOR_MQTT_PASSWORD", "AIMASS_CLICKHOUSE_PASSWORD",
                  "AIMASS_API_TOKEN", "AIMASS_WEBHOOK_SECRET", "AIMASS_SMTP_PASSWORD", "GRAFANA_ADMIN_PASSWORD")}
    # The shipped broker config and ACL, with a password file for the users compose logs in as.
    mq = tmp / "mosquitto"
    mq.mkdir()
    for name in ("mosquitto.conf", "acl"):
        shutil.copy(DEPLOY / "mosquitto" / name, mq / name)
    (mq / "passwd").write_text(
        mosquitto_password_line(bridge_user, passwords["AIMASS_BRIDGE_MQTT_PASSWORD"]) + "\n"
        + mosquitto_password_line(simulator_user, passwords["AIMASS_SIMULATOR_MQTT_PASSWORD"]) + "\n")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(yaml.safe_dump(PROBE_RULE))
    for d in (mq, rules):
        d.chmod(0o755)
        for f in d.iterdir():
            f.chmod(0o644)  # read by the containers' own users
    env = {**os.environ, **passwords, "PYTHON": sys.executable, "AIMASS_LOCAL_PROJECT": PROJECT,
           "AIMASS_API_TOKENS": f"ci:read:{secrets.token_hex(12)}",
           "AIMASS_LOCAL_MOSQUITTO_CONFIG": str(mq), "AIMASS_LOCAL_RULES": str(rules)}
    d = Deployment(env)
    t0 = time.monotonic()
    run(["images"], env, 600)
    print(f"images built in {time.monotonic() - t0:.0f}s")
    d.compose("down", "-v", "-t", "2", timeout=120)  # what an interrupted run left, volumes too
    try:
        d.compose("up", "-d", "models-init")  # seeds the model store before Triton reads it
        assert d.podman("wait", d.name("models-init_1"), timeout=120).strip() == "0", d.logs("models-init_1")
        d.compose("up", "-d", "kafka", "mosquitto", "triton", "receiver")
        d.wait_healthy("kafka_1")
        d.wait_healthy("triton_1")
        d.compose("up", "-d", "kafka-topics")
        assert d.podman("wait", d.name("kafka-topics_1"), timeout=120).strip() == "0", d.logs("kafka-topics_1")
        d.compose("up", "-d", *sorted({c.rsplit("_", 1)[0] for c in STAGES}))
        d.compose("up", "-d", "prometheus")
        for c in (*STAGES, "prometheus_1"):
            assert d.state(c)["Running"], f"{c} is not running:\n{d.logs(c)}"
        print(f"deployment up in {time.monotonic() - t0:.0f}s")
        os.environ["AIMASS_SIMULATOR_MQTT_PASSWORD"] = passwords["AIMASS_SIMULATOR_MQTT_PASSWORD"]
        yield d
    finally:
        os.environ.pop("AIMASS_SIMULATOR_MQTT_PASSWORD", None)
        d.compose("down", "-v", "-t", "2", timeout=180)
        # The images' anonymous VOLUMEs outlive `down -v` in podman-compose 1.0.3; the image store is
        # this checkout's own (deploy/local/podman-local), so pruning touches nothing else.
        d.podman("volume", "prune", "-f", timeout=120, check=False)


def publisher_config() -> Config:
    """The simulator's MQTT login from compose.yaml, against the published Mosquitto port."""
    cfg = Config()
    cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", 1883
    cfg.mqtt.username = service_env("simulate")["AIMASS_MQTT_USERNAME"]
    cfg.mqtt.password_env = "AIMASS_SIMULATOR_MQTT_PASSWORD"
    return cfg


def publish_probe(cfg: Config, device: str, value: float, sent: set) -> None:
    ts = int(time.time() * 1000)
    with Publisher(cfg, f"ci-probe-{device}-{ts}") as pub:
        pub.publish(cfg.mqtt.topic_pattern.format(tenant=TENANT, device_id=device),
                    json.dumps({"ts": ts, "metric": "probe", "value": value}).encode())
    sent.add((TENANT, device, "probe", ts))


def wait_flowing(d: Deployment, cfg: Config, timeout: float = 240) -> None:
    """Publish warm-up readings until one is stored: every stage between Mosquitto and the store is up."""
    deadline, unused = time.monotonic() + timeout, set()
    while True:
        with Publisher(cfg, f"ci-warmup-{time.time_ns()}") as pub:
            pub.publish(cfg.mqtt.topic_pattern.format(tenant="warmup", device_id="w"),
                        json.dumps({"ts": int(time.time() * 1000), "metric": "temp", "value": 20.0}).encode())
        try:
            if d.query("SELECT count() AS n FROM {db}.readings WHERE tenant = 'warmup'").column("n")[0].as_py():
                return
        except AssertionError:
            pass
        assert time.monotonic() < deadline, f"no reading reached the store in {timeout}s:\n{d.all_logs()}"
        time.sleep(3)


def test_shipped_compose_stores_every_reading_and_delivers_alarms_through_replica_kills(deployment):
    d, cfg, sent = deployment, publisher_config(), set()
    t0 = time.monotonic()
    wait_flowing(d, cfg)
    print(f"pipeline flowing after {time.monotonic() - t0:.0f}s")
    spec = dict(devices=4, metrics=["temp", "power"], rate_hz=5, duration_s=12, tenant=TENANT, format="senml")
    summary = publish(cfg, SimSpec(seed=1, **spec), sent=sent)
    assert summary["all_acked"]
    publish_probe(cfg, "probe-1", 5000.0, sent)
    time.sleep(3)

    pids = {c: d.state(c)["Pid"] for c in KILLED}
    for c in KILLED:
        d.kill(c)
    summary = publish(cfg, SimSpec(seed=2, **spec), sent=sent)  # while the killed stages restart
    assert summary["all_acked"]
    publish_probe(cfg, "probe-2", 5000.0, sent)
    for c in KILLED:
        eventually(lambda: _restarted(d, c, pids[c]), 120)
    print(f"kills survived, {len(sent)} readings published, {time.monotonic() - t0:.0f}s")

    # Every published reading stored exactly once (by identity), windows and predictions, alarm events.
    window_s = Config().predict.window_s
    lateness_ms = int(Config().clean.allowed_lateness_s * 1000)

    def stored() -> None:
        ledger = read_ledger(d.query, TENANT)
        check_readings(ledger, sent)
        check_predictions(d.query, TENANT, check_windows(d.query, TENANT, ledger, window_s, lateness_ms), window_s)
        check_alarm_events(alarm_events(d.query, TENANT))

    try:
        eventually(stored, 240, every_s=5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{d.all_logs()}") from None

    # The probe alarms stored and delivered: each raised exactly once, no other alarm.
    probes = [("probe_high", "probe-1", "probe"), ("probe_high", "probe-2", "probe")]
    stored_raises = [(e["rule"], e["device_id"], e["metric"]) for e in alarm_events(d.query, TENANT)
                     if e["transition"] in ("raised", "reraised")]
    assert sorted(stored_raises) == probes, stored_raises

    def delivered() -> None:
        raised = [(e["rule"], e["device_id"], e["metric"]) for e in d.delivered()
                  if e.get("tenant") == TENANT and e["transition"] in ("raised", "reraised")]
        assert sorted(raised) == probes, raised

    try:
        eventually(delivered, 120, every_s=5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{d.all_logs()}") from None
    print(f"accounted in {time.monotonic() - t0:.0f}s")


def test_model_loop_trains_versions_into_the_store_and_triton_loads_them(deployment):
    """compose's `train` job writes new versions into the model store Triton serves; `aimass models`
    lists them from there; a promoted version is loaded by the running Triton (explicit control).

    Trained on simulated history: in this local run the store is chDB inside the sink, which
    another container cannot open (with a ClickHouse server the job's --from-store reads it)."""
    d, t0 = deployment, time.monotonic()
    out = d.compose("run", "--rm", "train", "train", "--devices", "6", "--metrics", "2", "--duration-s", "3600",
                    "--anomalies", "20", "--seed", "5", timeout=300)
    assert "aimass models` lists the versions" in out, out[-3000:]
    live = models_live(d)
    assert set(live) == {"forecaster", "anomaly"} and all(3 in versions for versions, _ in live.values()), live
    assert served(d) == {name: live_version for name, (_, live_version) in live.items()}

    # Promoting by hand skips the gate: Triton must swap to it without a restart.
    d.compose("run", "--rm", "train", "models", "promote", "forecaster", "3", timeout=120)
    assert models_live(d)["forecaster"][1] == 3
    eventually(lambda: _assert_equal(served(d)["forecaster"], 3), 60)
    print(f"model loop in {time.monotonic() - t0:.0f}s")


def test_prometheus_scrapes_every_stage_and_loads_the_pipeline_alerts(deployment):
    """The shipped prometheus.yml reaches every stage's metrics port (both workers through DNS) and
    Triton's, and evaluates alerts.yml without an error."""
    def api(path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:9090/api/v1/{path}", timeout=10) as r:
            return json.loads(r.read())["data"]

    def scraped() -> None:
        targets = api("targets")["activeTargets"]
        up = sorted((t["labels"]["job"], t["health"]) for t in targets)
        assert up == sorted([("bridge", "up")] * 2 + [("worker", "up")] * 2 + [(job, "up") for job in
                            ("predict", "alerter", "sink", "triton")]), [(t["scrapeUrl"], t["health"],
                                                                         t["lastError"]) for t in targets]

    eventually(scraped, 90, every_s=3)
    groups = {g["name"]: g for g in api("rules")["groups"]}
    rules = groups["aimass-pipeline"]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for g in yaml.safe_load(
        (DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert all(r["health"] in ("ok", "unknown") and not r.get("lastError") for r in rules), rules
    firing = [a for a in api("alerts")["alerts"] if a["labels"]["alertname"] == "AimassStageDown"]
    assert not firing, firing
    for name in ("aimass_predict_breaker_open", "aimass_sink_retries_total", "aimass_bridge_messages_total"):
        assert api(f"query?query={name}")["result"], f"{name} is not scraped"


def models_live(d: Deployment) -> dict[str, tuple[list[int], int]]:
    """Model -> (versions in the store, live version), from `aimass models` in a train container."""
    out, found = d.compose("run", "--rm", "train", "models", timeout=120), {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("forecaster", "anomaly") and words[1].isdigit():
            versions, live = found.get(words[0], ([], None))
            found[words[0]] = (versions + [int(words[1])], int(words[1]) if words[2:3] == ["*"] else live)
    return found


def served(d: Deployment) -> dict[str, int]:
    """Model -> the version the running Triton has READY (its repository index)."""
    index = json.loads(d.podman("exec", d.name("triton_1"), "curl", "-sf", "-X", "POST",
                                "http://localhost:8000/v2/repository/index"))
    return {m["name"]: int(m["version"]) for m in index if m.get("state") == "READY" and m["name"] in
            ("forecaster", "anomaly")}


def _assert_equal(a, b) -> None:
    assert a == b, (a, b)


def _restarted(d: Deployment, container: str, old_pid: int) -> None:
    state = d.state(container)
    assert state["Running"] and state["Pid"] not in (0, old_pid), f"{container} has not come back: {state}"
