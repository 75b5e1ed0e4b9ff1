"""Scale-out on one machine: two bridges behind one MQTT v5 shared subscription and three Faust
workers in one consumer group. The load spreads over every process and the totals do not change."""
from __future__ import annotations

import pytest

from aimass.core.procs import free_port
from aimass.core.supervisor import scrape
from aimass.streams.simulator import SimSpec, publish
from tests.pipeline_harness import TestPipeline, pipeline_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_bridges_three_workers_share_the_load(tmp_path, mosquitto, kafka, triton):
    port = free_port()
    pipeline = TestPipeline(pipeline_config(tmp_path, mosquitto, kafka, triton, port), workers=3, bridges=2,
                            webhook_port=port).start()
    try:
        spec = SimSpec(devices=24, metrics=["temp", "power"], rate_hz=4, duration_s=25, seed=2, tenant="scale",
                       format="json")
        summary = publish(pipeline.cfg, spec)
        assert summary["all_acked"]
        pipeline.wait_stored("scale", summary["readings"])
        per_process = {p.name: scrape(p.metrics_port) for p in pipeline.plans}
        stored = pipeline.count("SELECT count() FROM (SELECT * FROM {db}.readings FINAL WHERE tenant = 'scale')")
    finally:
        pipeline.stop()

    bridged = {n: m.get("aimass_bridge_messages_total", 0) for n, m in per_process.items() if n.startswith("bridge")}
    cleaned = {n: m.get("aimass_clean_readings_in_total", 0) for n, m in per_process.items() if n.startswith("worker")}
    assert len(bridged) == 2 and all(v > 0 for v in bridged.values()), bridged
    assert sum(bridged.values()) == summary["messages"], (bridged, summary)
    assert len(cleaned) == 3 and all(v > 0 for v in cleaned.values()), cleaned
    assert sum(cleaned.values()) >= summary["readings"], cleaned  # at-least-once: never fewer
    assert stored == summary["readings"]
