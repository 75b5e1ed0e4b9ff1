"""Shared fixtures: real servers (Mosquitto, the Kafka-protocol broker, tritonserver) on free
127.0.0.1 ports, started by the same code as `aimass up`, and a Config pointing at them.

Servers are session-scoped (starting them costs seconds); tests isolate themselves with a
fresh Kafka topic prefix (`cfg` fixture) and their own MQTT tenant names.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from aimass.core.config import Config
from aimass.core.procs import Server, free_port
from aimass.core.stack import create_topics, start_kafka, start_mosquitto, start_triton, stop_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def run_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aimass-run")


@pytest.fixture(scope="session")
def mosquitto(run_root) -> Server:
    server = start_mosquitto(run_root, free_port())
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def kafka(run_root) -> Server:
    server = start_kafka(run_root, free_port())
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def triton(run_root) -> Server:
    """tritonserver (CPU path here; GPU where present) serving the repository's triton_repo/."""
    server = start_triton(run_root, free_port(), free_port(), free_port(), REPO / "triton_repo")
    yield server
    stop_server(server)


def make_config(run_dir: Path, mosquitto: Server | None = None, kafka: Server | None = None,
                triton: Server | None = None) -> Config:
    """A Config for the given fixture servers with a unique topic prefix."""
    cfg = Config()
    cfg.run.dir = str(run_dir)
    cfg.kafka.topic_prefix = f"t{uuid.uuid4().hex[:10]}"
    if mosquitto:
        cfg.mqtt.port = mosquitto.ports["mqtt"]
    if kafka:
        cfg.kafka.bootstrap = f"127.0.0.1:{kafka.ports['kafka']}"
    if triton:
        cfg.triton.http_port = triton.ports["http"]
        cfg.triton.grpc_port = triton.ports["grpc"]
        cfg.triton.metrics_port = triton.ports["metrics"]
    for name in ("bridge", "worker", "predict", "alert", "clickhouse"):
        getattr(cfg, name).metrics_port = 0  # 0: no metrics server in tests unless asked
    cfg.worker.web_port = free_port()
    cfg.alert.api_port = free_port()
    return cfg


@pytest.fixture
def cfg(tmp_path, mosquitto, kafka) -> Config:
    """Config for MQTT + Kafka with this test's own topics already created."""
    config = make_config(tmp_path, mosquitto, kafka)
    create_topics(config)
    return config
