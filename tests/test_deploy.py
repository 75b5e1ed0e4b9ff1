"""deploy/ checked offline: compose against the Compose Specification schema, the Kubernetes
manifests against the Kubernetes OpenAPI schemas (strict), and both against the code
(subcommands, configuration keys, contract topics, GPU for Triton, no inline secrets)."""
from __future__ import annotations

import configparser
import copy
import dataclasses
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from aimass.cli import COMMANDS
from aimass.core.config import Config, describe, load_config
from aimass.rules.model import load_rules
from aimass.core import contract

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
K8S = [(path.name, doc) for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
       for doc in yaml.safe_load_all(path.read_text()) if doc]
AIMASS_STAGES = {"bridge", "worker", "predict", "alerter", "sink"}
SECRET_WORDS = re.compile(r"PASSWORD|TOKEN|SECRET", re.I)
INTERPOLATION = re.compile(r"^\$\{[A-Z0-9_]+(:?[-?][^}]*)?\}$")


def config_env_names() -> set[str]:
    """AIMASS_* names a stage reads: config keys, plus the secret variables that the config's and the
    example receivers' *_env keys name."""
    secrets = {getattr(getattr(Config(), s.name), f.name)
               for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(Config(), s.name))
               if f.name.endswith("_env")}
    receivers = load_rules(Path(__file__).resolve().parent.parent / "rules" / "examples").receivers.values()
    secrets |= {v for r in receivers for k, v in r.options.items() if k.endswith("_env")}
    return {row[1] for row in describe()} | secrets


def contract_topics(partitions: int) -> dict[str, int]:
    return {t.name("aimass"): contract.topic_partitions(t, partitions) for t in contract.ALL_TOPICS}


def topics_in_script(script: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r"(aimass\.[a-z.]+):(\d+)", script)}


# --- compose -----------------------------------------------------------------------

def aimass_services() -> dict[str, dict]:
    """Services that run an `aimass` command (not the image with another entrypoint, e.g. models-init)."""
    return {name: svc for name, svc in COMPOSE["services"].items()
            if svc.get("image", "").startswith("aimass:") and "entrypoint" not in svc}


def compose_validator() -> jsonschema.Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_matches_the_compose_spec() -> None:
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in compose_validator().iter_errors(COMPOSE)]
    assert errors == []


@pytest.mark.parametrize("path, key, value", [
    (("services", "worker", "deploy"), "replica", 3),
    (("services", "triton", "deploy", "resources", "reservations", "devices", 0), "capability", ["gpu"]),
    (("services", "kafka"), "restart", 5),
])
def test_compose_schema_check_rejects_a_broken_file(path: tuple, key: str, value: object) -> None:
    broken = copy.deepcopy(COMPOSE)
    node = broken
    for step in path:
        node = node[step]
    node[key] = value
    assert list(compose_validator().iter_errors(broken))


def test_compose_runs_every_stage_with_a_real_subcommand() -> None:
    services = aimass_services()
    commands = {name: svc["command"] for name, svc in services.items()}
    assert all(cmd[0] in COMMANDS for cmd in commands.values()), commands
    assert AIMASS_STAGES <= {cmd[0] for cmd in commands.values()}
    assert all(svc["build"]["dockerfile"] == "deploy/docker/Dockerfile" for svc in services.values())


def _resolve(value: str) -> str:
    """A stand-in for compose's `${VAR...}` interpolation, enough to type-check values."""
    return "x" if INTERPOLATION.match(str(value)) else str(value)


def test_compose_sets_only_real_config_keys_with_valid_values() -> None:
    valid = config_env_names()
    for name, svc in aimass_services().items():
        env = svc["environment"]
        assert set(env) <= valid, f"{name}: not configuration keys: {sorted(set(env) - valid)}"
        load_config(env={k: _resolve(v) for k, v in env.items()})  # raises ConfigError on a bad value


def test_compose_bridges_share_one_subscription_with_distinct_client_ids() -> None:
    bridges = [svc for svc in aimass_services().values() if svc["command"] == ["bridge"]]
    assert len(bridges) >= 2
    assert len({b["environment"]["AIMASS_BRIDGE_CLIENT_ID"] for b in bridges}) == len(bridges)
    assert len({b["environment"]["AIMASS_BRIDGE_SHARE_GROUP"] for b in bridges}) == 1


def test_compose_triton_is_nvidia_image_on_a_gpu_with_the_repo_mounted() -> None:
    triton = COMPOSE["services"]["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert triton["volumes"] == ["triton-models:/models"]  # writable: the model loop adds versions
    assert "--model-control-mode=explicit" in triton["command"] and "--load-model=*" in triton["command"]
    dockerfile = DEPLOY / triton["build"]["context"] / triton["build"]["dockerfile"]
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:[\d.]+-py3$", dockerfile.read_text(), re.M)


def test_compose_model_loop_trains_into_the_store_triton_serves() -> None:
    svc = COMPOSE["services"]
    init, train = svc["models-init"], svc["train"]
    assert {"../triton_repo:/seed:ro", "triton-models:/models"} == set(init["volumes"])
    assert svc["triton"]["depends_on"]["models-init"]["condition"] == "service_completed_successfully"
    assert train["command"][0] in COMMANDS and train["command"] == ["train", "--from-store"]
    assert train["profiles"] == ["train"] and train["volumes"] == ["triton-models:/models"]
    assert train["environment"]["AIMASS_TRITON_MODEL_REPOSITORY"] == "/models"
    load_config(env={k: _resolve(str(v)) for k, v in train["environment"].items()})


def test_compose_wires_kafka_kraft_grafana_mosquitto_clickhouse() -> None:
    svc = COMPOSE["services"]
    assert svc["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in svc["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert "grafana-clickhouse-datasource" in svc["grafana"]["environment"]["GF_INSTALL_PLUGINS"]
    assert {"./grafana/provisioning:/etc/grafana/provisioning:ro",
            "./grafana/dashboards:/var/lib/grafana/dashboards:ro"} <= set(svc["grafana"]["volumes"])
    assert svc["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert "./mosquitto:/mosquitto/config:ro" in svc["mosquitto"]["volumes"]
    assert svc["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    url = next(iter(aimass_services().values()))["environment"]["AIMASS_CLICKHOUSE_URL"]
    assert url.startswith("clickhouse://") and ":" not in url.split("//")[1].split("@")[0]  # no password in URL


def test_compose_creates_exactly_the_contract_topics() -> None:
    partitions = int(COMPOSE["x-aimass-env"]["AIMASS_KAFKA_PARTITIONS"])
    assert topics_in_script(COMPOSE["services"]["kafka-topics"]["command"][0]) == contract_topics(partitions)


def test_compose_has_no_inline_secrets() -> None:
    for name, svc in COMPOSE["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_WORDS.search(key):
                assert INTERPOLATION.match(str(value)), f"{name}.{key} must come from ${{...}}, not inline"


def test_image_installs_every_package_and_runs_aimass() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert 'ENTRYPOINT ["aimass"]' in text
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    folders = [line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines()]
    assert sorted(folders) == ["agents", "aimass", "models", "rules", "streams"]
    assert all(f"COPY {f} ./{f}" in text for f in folders)


# --- kubernetes ----------------------------------------------------------------------

def kinds(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in K8S if doc["kind"] == kind}


def pod_specs() -> dict[str, dict]:
    """Pod specs of every workload, by workload name."""
    specs = {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for _, doc in K8S
             if doc["kind"] in ("Deployment", "StatefulSet", "Job")}
    specs.update({doc["metadata"]["name"]: doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] for _, doc in K8S
                  if doc["kind"] == "CronJob"})
    return specs


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("file, doc", K8S, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in K8S])
def test_k8s_manifest_is_valid_strict(file: str, doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_k8s_schema_check_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(kinds("Deployment")["worker"])
    broken["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_k8s_everything_in_the_aimass_namespace() -> None:
    assert "aimass" in kinds("Namespace")
    assert all(doc["metadata"].get("namespace") == "aimass" for _, doc in K8S if doc["kind"] != "Namespace")


def test_k8s_stages_run_real_subcommands_with_real_config_keys() -> None:
    valid = config_env_names()
    configmap = kinds("ConfigMap")["aimass-config"]["data"]
    assert set(configmap) <= valid, sorted(set(configmap) - valid)
    load_config(env=configmap)
    stages = set()
    for spec in pod_specs().values():
        for c in containers(spec):
            if c["image"].startswith("aimass:"):
                assert c["args"][0] in COMMANDS
                stages.add(c["args"][0])
                assert {e["name"] for e in c.get("env", [])} <= valid
                assert c["envFrom"] == [{"configMapRef": {"name": "aimass-config"}}]
    assert AIMASS_STAGES <= stages


def test_k8s_secrets_only_by_reference() -> None:
    assert "Secret" not in {doc["kind"] for _, doc in K8S}
    assert not any(SECRET_WORDS.search(k) for k in kinds("ConfigMap")["aimass-config"]["data"])
    for name, spec in pod_specs().items():
        for c in containers(spec):
            for env in c.get("env", []):
                if SECRET_WORDS.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is inline"


def test_k8s_triton_gets_a_gpu_and_the_model_volume() -> None:
    spec = pod_specs()["triton"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]  # writable: the model loop
    assert {"--model-repository=/models", "--model-control-mode=explicit", "--load-model=*"} <= set(c["args"])
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "triton-models"}} in spec["volumes"]
    assert kinds("PersistentVolumeClaim")["triton-models"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_k8s_train_cronjob_trains_from_the_store_into_the_model_store() -> None:
    cron = kinds("CronJob")["train"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_specs()["train"]
    (c,) = spec["containers"]
    assert c["args"] == ["train", "--from-store"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AIMASS_TRITON_MODEL_REPOSITORY"]["value"] == "/models"
    assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "triton-models"}} in spec["volumes"]


def test_k8s_scale_out_shape() -> None:
    deployments = kinds("Deployment")
    bridge = kinds("StatefulSet")["bridge"]  # stable pod names = stable MQTT client ids = resumable sessions
    assert bridge["spec"]["replicas"] >= 2
    bridge_env = {e["name"]: e for e in bridge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert bridge_env["AIMASS_BRIDGE_CLIENT_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    hpa = kinds("HorizontalPodAutoscaler")["worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "worker"
    partitions = int(kinds("ConfigMap")["aimass-config"]["data"]["AIMASS_KAFKA_PARTITIONS"])
    assert hpa["spec"]["maxReplicas"] <= partitions  # more workers than partitions sit idle
    clickhouse = kinds("StatefulSet")["clickhouse"]
    assert clickhouse["spec"]["volumeClaimTemplates"]
    assert {"predict", "alerter", "sink", "grafana", "mosquitto", "triton"} <= set(deployments)


def test_k8s_creates_exactly_the_contract_topics() -> None:
    partitions = int(kinds("ConfigMap")["aimass-config"]["data"]["AIMASS_KAFKA_PARTITIONS"])
    script = pod_specs()["kafka-topics"]["containers"][0]["args"][0]
    assert topics_in_script(script) == contract_topics(partitions)


def test_k8s_services_select_pods_and_claims_exist() -> None:
    pod_labels = [doc["spec"]["template"]["metadata"]["labels"] for _, doc in K8S
                  if doc["kind"] in ("Deployment", "StatefulSet")]
    for name, svc in kinds("Service").items():
        selector = svc["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), f"service {name} selects no pods"
    claims = set(kinds("PersistentVolumeClaim"))
    for name, spec in pod_specs().items():
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, name


def referenced_objects(node: object) -> set[str]:
    """Names of the ConfigMaps and Secrets a manifest refers to (env, envFrom, volumes)."""
    refs = {"configMapRef", "configMapKeyRef", "secretKeyRef", "secretRef", "configMap"}
    if isinstance(node, dict):
        found = {v["name"] for k, v in node.items() if k in refs and isinstance(v, dict)}
        found |= {node["secret"]["secretName"]} if isinstance(node.get("secret"), dict) else set()
        return found.union(*(referenced_objects(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(referenced_objects(v) for v in node))
    return set()


def test_k8s_objects_made_outside_the_manifests_are_documented() -> None:
    """ConfigMaps and Secrets used but not defined here are created by deploy/README.md's commands."""
    outside = referenced_objects([doc for _, doc in K8S]) - set(kinds("ConfigMap"))
    assert {"aimass-secrets", "mosquitto-config", "grafana-dashboards", "aimass-rules"} <= outside
    readme = (DEPLOY / "README.md").read_text()
    for name in outside:
        assert re.search(rf"kubectl -n aimass create (?:configmap|secret generic) {name}\b", readme), name


def test_alarm_api_is_published_on_loopback_or_inside_the_cluster_only() -> None:
    alerter = COMPOSE["services"]["alerter"]
    assert alerter["ports"] and all(str(p).startswith("127.0.0.1:") for p in alerter["ports"])
    assert "AIMASS_API_TOKENS" in alerter["environment"]
    service = kinds("Service")["alerter"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [policy] = [doc for _, doc in K8S if doc["kind"] == "NetworkPolicy" and doc["metadata"]["name"] == "alerter"]
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    api_rules = [r for r in policy["spec"]["ingress"] if {"port": 8080, "protocol": "TCP"} in r["ports"]]
    # this namespace's pods, and Alertmanager's (POST /pipeline-alerts): both selectors in one peer, so
    # no other pod of the monitoring namespace gets in
    alertmanager = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "alertmanager"}}}
    assert api_rules == [{"from": [{"podSelector": {}}, alertmanager], "ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_shipped_mosquitto_config_caps_packets_like_the_bridge() -> None:
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert re.findall(r"^max_packet_size (\d+)$", conf, re.M) == [str(Config().bridge.max_packet_bytes)]
    assert re.findall(r"^allow_anonymous (\w+)$", conf, re.M) == ["false"]


# --- MQTT users against the shipped ACL ---------------------------------------------------------

def acl_grants(acl: str, user: str, access: str, topic: str) -> bool:
    """True if Mosquitto's ``acl_file`` text lets ``user`` ``access`` (read / write) ``topic``.

    ``topic`` may be a subscription filter: an ACL ``+`` / ``#`` covers the same wildcard in it, as
    Mosquitto checks a SUBSCRIBE filter against the ACL patterns. ``pattern`` lines apply to
    every user with ``%u`` replaced."""
    current, grants = None, []
    for line in acl.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            current = words[1]
        elif words[0] in ("topic", "pattern"):
            mode, pattern = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            if words[0] == "pattern":
                grants.append((mode, pattern.replace("%u", user)))
            elif current == user:
                grants.append((mode, pattern))
    return any(access in mode and _covers(pattern, topic) for mode, pattern in grants)


def _covers(pattern: str, topic: str) -> bool:
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


def mqtt_logins() -> list[tuple[str, str, str]]:
    """(where, aimass command, MQTT username) of every container that logs in to Mosquitto, in
    every compose file and Kubernetes manifest under deploy/."""
    found = []
    for path in sorted(DEPLOY.glob("compose*.yaml")):
        for name, svc in (yaml.safe_load(path.read_text()).get("services") or {}).items():
            env, command = svc.get("environment") or {}, svc.get("command") or []
            if "AIMASS_MQTT_USERNAME" in env and command:
                found.append((f"{path.name}:{name}", command[0], _resolve(str(env["AIMASS_MQTT_USERNAME"]))))
    for name, spec in pod_specs().items():
        for c in containers(spec):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("AIMASS_MQTT_USERNAME"):
                found.append((f"k8s:{name}", c["args"][0], env["AIMASS_MQTT_USERNAME"]))
    return found


def needed_access(command: str) -> list[tuple[str, str]]:
    """(access, topic) an aimass command needs from the broker with the default topic patterns."""
    from aimass.streams.bridge import plain_filters

    if command == "bridge":
        return [("read", f) for f in plain_filters(Config())]
    if command in ("simulate", "replay"):
        device = {"tenant": "acme", "device_id": "pump-0042"}
        return [("write", Config().mqtt.topic_pattern.format(**device)),
                ("write", Config().mqtt.labels_pattern.format(**device))]
    raise AssertionError(f"unexpected MQTT client {command!r}: say what it needs in needed_access()")


def test_acl_check_reads_mosquitto_semantics() -> None:
    acl = "user a\ntopic read x/+/t\nuser b\ntopic write x/#\npattern write d/%u/t\n"
    assert acl_grants(acl, "a", "read", "x/+/t") and acl_grants(acl, "a", "read", "x/1/t")
    assert not acl_grants(acl, "a", "write", "x/1/t") and not acl_grants(acl, "a", "read", "x/1/t/u")
    assert acl_grants(acl, "b", "write", "x/1/t") and not acl_grants(acl, "b", "read", "x/1/t")
    assert acl_grants(acl, "z", "write", "d/z/t") and not acl_grants(acl, "z", "write", "d/y/t")


def test_every_mqtt_login_has_the_acl_entries_it_needs() -> None:
    """The bridge of compose and K8s reads telemetry and labels, the simulator publishes them, with
    the usernames the shipped ACL grants (else Mosquitto refuses the subscription silently)."""
    acl = (DEPLOY / "mosquitto" / "acl").read_text()
    logins = mqtt_logins()
    assert {cmd for _, cmd, _ in logins} >= {"bridge", "simulate"}
    assert any(where.startswith("k8s:") for where, _, _ in logins)
    refused = [f"{where} logs in as {user!r} for `aimass {cmd}` but the ACL does not grant {access} {topic}"
               for where, cmd, user in logins for access, topic in needed_access(cmd)
               if not acl_grants(acl, user, access, topic)]
    assert not refused, "\n".join(refused)
