"""The stage supervisor, tested with real child processes (sleepers, a Prometheus exporter)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from aimass.core.config import Config
from aimass.demo import stage_plans
from aimass.core.procs import StackError, free_port, pid_alive, port_in_use, wait_until
from aimass.core.supervisor import STAGES_FILE, Supervisor, aimass_argv, backoff_s, scrape

# A stage that says it is ready, then sleeps; it prints an env var so overrides can be checked.
SLEEPER = [sys.executable, "-c", "import os,time; print('ready', os.environ.get('STAGE_COLOR'), flush=True); "
           "time.sleep(120)"]
# A stage that exits 0 on SIGTERM (a clean shutdown, like every aimass stage).
GRACEFUL = [sys.executable, "-c", "import signal,sys,time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "print('ready', flush=True); time.sleep(120)"]
# A stage that ignores SIGTERM: stop_all must SIGKILL it.
STUBBORN = [sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)"]


def _ready_lines(sup: Supervisor, name: str) -> int:
    """How many times the stage's process said it was ready (the log's header lines quote argv)."""
    return sum(line.startswith("ready") for line in sup.stages[name].log.read_text().splitlines())


def _ready(sup: Supervisor, name: str) -> None:
    wait_until(lambda: _ready_lines(sup, name) >= 1, 15, f"stage {name}")


@pytest.fixture
def sup(tmp_path: Path):
    supervisor = Supervisor(tmp_path / "run")
    yield supervisor
    supervisor.stop_all(timeout=2)


def test_start_records_pid_log_and_env(sup: Supervisor) -> None:
    pid = sup.start("blue", SLEEPER, env={"STAGE_COLOR": "blue", "AIMASS_API_TOKEN": "s3cr3t-t0ken"})
    sup.start("red", SLEEPER, env={"STAGE_COLOR": "red"})
    _ready(sup, "blue")
    _ready(sup, "red")
    assert sup.alive("blue") and pid_alive(pid) and sup.pid("blue") == pid
    assert "\nready blue\n" in (sup.run_dir / "logs" / "blue.log").read_text()
    assert "\nready red\n" in (sup.run_dir / "logs" / "red.log").read_text()
    recorded = json.loads((sup.run_dir / STAGES_FILE).read_text())["servers"]
    assert {s["name"]: s["pid"] for s in recorded} == {"blue": pid, "red": sup.pid("red")}
    assert all(s["argv"] == SLEEPER and s["log"].endswith(f"{s['name']}.log") for s in recorded)
    assert "s3cr3t-t0ken" not in (sup.run_dir / STAGES_FILE).read_text()  # env values (secrets) never written


def test_start_twice_and_unknown_name_are_clear_errors(sup: Supervisor) -> None:
    sup.start("one", SLEEPER)
    with pytest.raises(StackError, match="already running"):
        sup.start("one", SLEEPER)
    with pytest.raises(StackError, match="no stage named 'two'; started: one"):
        sup.kill("two")


def test_kill_then_restart_gives_a_new_process(sup: Supervisor) -> None:
    old = sup.start("worker", SLEEPER)
    _ready(sup, "worker")
    sup.kill("worker", signal.SIGKILL)
    wait_until(lambda: not sup.alive("worker"), 10, "killed stage to die")
    assert sup.stages["worker"].proc.returncode == -signal.SIGKILL
    assert sup.restarts("worker") == 0  # no automatic restart unless asked for
    new = sup.restart("worker")
    assert new != old and sup.alive("worker") and not pid_alive(old)
    wait_until(lambda: _ready_lines(sup, "worker") == 2, 15, "restarted stage")
    assert json.loads((sup.run_dir / STAGES_FILE).read_text())["servers"][0]["pid"] == new


def test_background_stage_keeps_its_priority_across_restarts(sup: Supervisor) -> None:
    """Predict and sink on one machine run at SCHED_IDLE (or 10 nice steps lower), restarted too."""
    normal = sup.start("bridge", SLEEPER)
    idle = sup.start("predict", SLEEPER, priority="idle")
    low = sup.start("sink", SLEEPER, priority="low")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.sched_getscheduler(normal) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, normal) == base
    assert os.sched_getscheduler(idle) == os.SCHED_IDLE
    assert os.sched_getscheduler(low) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, low) == min(19, base + 10)
    _ready(sup, "predict")
    sup.kill("predict")
    wait_until(lambda: not sup.alive("predict"), 10, "killed stage to die")
    restarted = sup.restart("predict")
    assert restarted != idle and os.sched_getscheduler(restarted) == os.SCHED_IDLE
    with pytest.raises(ValueError, match="priority must be one of normal, low, idle"):
        sup.start("typo", SLEEPER, priority="lowest")


def test_stage_plans_put_predict_and_sink_below_the_alert_path() -> None:
    cfg = Config()
    assert cfg.run.background_priority == "idle"
    cfg.run.background_priority = "low"
    assert {p.name: p.priority for p in stage_plans(cfg, workers=2)} == {
        "sink": "low", "predict": "low", "alerter": "normal", "worker-1": "normal", "worker-2": "normal",
        "bridge": "normal"}


def test_stop_all_terms_then_kills(sup: Supervisor) -> None:
    for name, argv in (("graceful", GRACEFUL), ("stubborn", STUBBORN)):
        sup.start(name, argv)
        _ready(sup, name)
    t0 = time.monotonic()
    codes = sup.stop_all(timeout=1.0)
    assert codes == {"graceful": 0, "stubborn": -signal.SIGKILL}
    assert time.monotonic() - t0 < 10
    assert json.loads((sup.run_dir / STAGES_FILE).read_text())["servers"] == []


def test_auto_restart_after_crash_but_not_after_clean_exit(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, auto_restart=True, backoff_initial_s=0.2, backoff_max_s=1.0, poll_s=0.05)
    try:
        old = sup.start("worker", SLEEPER)
        sup.start("help", aimass_argv("--help"))  # a real `aimass` run that finishes with exit 0
        _ready(sup, "worker")
        sup.kill("worker")  # SIGKILL, as in the fault tests
        wait_until(lambda: sup.restarts("worker") == 1 and sup.alive("worker"), 15, "automatic restart")
        assert sup.pid("worker") != old
        wait_until(lambda: _ready_lines(sup, "worker") == 2, 15, "restarted stage")
        assert f"exited with {-signal.SIGKILL}; restarting" in sup.stages["worker"].log.read_text()
        wait_until(lambda: not sup.alive("help"), 30, "aimass --help to finish")
        time.sleep(0.5)
        assert sup.stages["help"].proc.returncode == 0 and sup.restarts("help") == 0
        assert "commands:" in sup.stages["help"].log.read_text()
        assert sup.stop_all(timeout=2)["worker"] == -signal.SIGTERM
        sup.start("worker", SLEEPER)  # supervised again after stop_all()
        sup.kill("worker")
        wait_until(lambda: sup.restarts("worker") == 1 and sup.alive("worker"), 15, "restart after stop_all")
    finally:
        sup.stop_all(timeout=2)


def test_crash_loop_backs_off(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, auto_restart=True, backoff_initial_s=0.2, backoff_max_s=5.0, poll_s=0.05)
    try:
        sup.start("broken", [sys.executable, "-c", "raise SystemExit(3)"])
        time.sleep(2.5)
        # Delays 0.2, 0.4, 0.8, 1.6 s (plus interpreter start-ups): at most 3 restarts in 2.5 s.
        assert 2 <= sup.restarts("broken") <= 3
        assert set(sup.stages["broken"].exit_codes) == {3}
    finally:
        sup.stop_all(timeout=2)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


EXPORTER = """
import sys, time
from prometheus_client import Counter, Histogram, start_http_server
rejected = Counter("aimass_bridge_rejected_total", "rejects", ["reason"])
batch = Histogram("aimass_bridge_batch_readings", "batch size", buckets=[10, 100])
rejected.labels("bad_json").inc(int(sys.argv[2]))
rejected.labels("too_big").inc(1)
batch.observe(50)
start_http_server(int(sys.argv[1]), addr="127.0.0.1")
time.sleep(120)
"""


def test_scrape_sums_samples_by_name_and_labels(sup: Supervisor) -> None:
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        sup.start(f"exporter{i}", [sys.executable, "-c", EXPORTER, str(port), str(10 * (i + 1))])
    for port in ports:
        wait_until(lambda: port_in_use(port), 15, "exporter")
    got = scrape(*ports, free_port())  # a third port where nothing listens contributes nothing
    assert got["aimass_bridge_rejected_total"] == 10 + 20 + 2
    assert got['aimass_bridge_rejected_total{reason="bad_json"}'] == 30
    assert got['aimass_bridge_rejected_total{reason="too_big"}'] == 2
    assert got["aimass_bridge_batch_readings_count"] == 2
    assert got["aimass_bridge_batch_readings_sum"] == 100
    assert got['aimass_bridge_batch_readings_bucket{le="100.0"}'] == 2
    assert not any(k.endswith("_created") for k in got)
    assert scrape(free_port()) == {}
