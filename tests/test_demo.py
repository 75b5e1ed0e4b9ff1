"""`aimass demo`, the README's main command, runs the whole pipeline and prints its summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aimass.core.procs import free_port, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_the_pipeline_and_summarizes(tmp_path):
    env = dict(os.environ, AIMASS_RUN_DIR=str(tmp_path), AIMASS_MQTT_PORT=str(free_port()),
               AIMASS_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", AIMASS_TRITON_HTTP_PORT=str(free_port()),
               AIMASS_TRITON_GRPC_PORT=str(free_port()), AIMASS_TRITON_METRICS_PORT=str(free_port()),
               **{f"AIMASS_{s}_METRICS_PORT": str(free_port()) for s in ("BRIDGE", "WORKER", "PREDICT", "ALERT",
                                                                          "CLICKHOUSE")},
               AIMASS_CLICKHOUSE_QUERY_PORT=str(free_port()), AIMASS_WORKER_WEB_PORT=str(free_port()),
               AIMASS_ALERT_API_PORT=str(free_port()))
    r = subprocess.run([sys.executable, "-m", "aimass.cli", "demo", "--minutes", "0.5", "--devices", "5",
                        "--anomalies", "2", "--workers", "1"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=420)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    assert "=== AI Mass demo summary ===" in out
    published = int(next(line for line in out.splitlines() if line.startswith("readings published")).split()[2]
                    .replace(",", ""))
    stored = int(next(line for line in out.splitlines() if line.startswith("readings stored")).split()[2]
                 .replace(",", ""))
    assert published > 0 and stored == published
    assert "publish->stored p50" in out and "stages stopped: " in out
    summary = json.loads((tmp_path / "demo-summary.json").read_text())   # the same summary, for scripts
    assert summary["published"]["readings"] == published and summary["stored"] == stored
    assert summary["predictions"] > 0 and summary["degraded"] < summary["predictions"]   # the demo's Triton served
    assert {"rejects", "windows", "predictions", "alert_events", "detection", "latency_alert_p99_s"} <= set(summary)
    assert all({"precision", "recall", "mean_delay_s"} <= set(row) for row in summary["detection"])
    assert any(line.split()[:3] == ["detection", "precision", "recall"] for line in out.splitlines())
    progress = [line for line in out.splitlines() if line.startswith("[")]   # not a terminal: a line every 10 s
    assert len(progress) >= 3 and all(len(line) <= 100 and "\x1b" not in line for line in progress), progress
    assert not (tmp_path / "stack.json").exists()  # the stack was stopped
    stages = (tmp_path / "stages.json").read_text() if (tmp_path / "stages.json").exists() else '{"servers": []}'
    assert not any(pid_alive(s["pid"]) for s in json.loads(stages)["servers"])  # no stage left running
    # the data stays for `aimass query`
    q = subprocess.run([sys.executable, "-m", "aimass.cli", "query", "summary"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 0 and "readings" in q.stdout, q.stdout + q.stderr
