"""A small process supervisor for pipeline stages (the demo and the fault tests use it).

Each stage is one child process (usually ``aimass <command>``) with its own log file
``<run dir>/logs/<name>.log`` and its own environment overrides. PIDs are recorded in
``<run dir>/stages.json`` in the same shape as ``stack.json`` so ``aimass down`` can stop
them too. Crashed stages (non-zero exit or killed by a signal) can be restarted
automatically with exponential backoff; a stage that exits 0 has finished and stays down.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from aimass.core.files import private_dir
from aimass.core.procs import Server, StackError, check_priority, spawn
from aimass.core.stack import STAGES_FILE



def aimass_argv(*args: str) -> list[str]:
    """The argv that runs ``aimass ARGS...`` with this interpreter (no console script needed)."""
    return [sys.executable, "-m", "aimass.cli", *args]


@dataclass
class Stage:
    """One supervised process: how to start it, the running process and its restart history."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0  # automatic restarts after crashes
    crashes_in_a_row: int = 0
    restart_due: float | None = None  # monotonic time of the next automatic restart
    exit_codes: list[int] = field(default_factory=list)
    priority: str = "normal"  # CPU priority (aimass.core.procs.set_priority)


class Supervisor:
    """Start, kill, restart and stop named stage processes; optionally restart crashed ones."""

    def __init__(self, run_dir: str | os.PathLike, *, auto_restart: bool = False, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 10.0, stable_after_s: float = 10.0, poll_s: float = 0.2) -> None:
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / "logs"
        self.auto_restart = auto_restart
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s  # a stage up this long has its backoff reset
        self.poll_s = poll_s
        self.stages: dict[str, Stage] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    # -- starting and stopping -------------------------------------------------------------

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, priority: str = "normal") -> int:
        """Start stage ``name`` running ``argv`` with ``env`` over this process's environment at CPU
        ``priority`` (restarts too: ``aimass.core.procs.set_priority``); returns its PID."""
        check_priority(priority)
        with self._lock:
            if name in self.stages and self.alive(name):
                raise StackError(f"stage {name} is already running (pid {self.stages[name].proc.pid}); "
                                 f"kill or restart it instead")
            stage = Stage(name, list(argv), dict(env or {}), self.log_dir / f"{name}.log", priority=priority)
            self.stages[name] = stage
            self._launch(stage)
            if self.auto_restart and (self._monitor is None or not self._monitor.is_alive()):
                self._stopping.clear()  # a start after stop_all() supervises again
                self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
                self._monitor.start()
            return stage.proc.pid

    def _launch(self, stage: Stage) -> None:
        stage.log.parent.mkdir(parents=True, exist_ok=True)
        with open(stage.log, "a") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {stage.name}: {' '.join(stage.argv)}\n")
        stage.proc = spawn(stage.name, stage.argv, stage.log, env={**os.environ, **stage.env},
                           priority=stage.priority)
        stage.started_at = time.monotonic()
        stage.restart_due = None
        self._write_stages()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the stage (SIGKILL by default: the fault tests' crash)."""
        with self._lock:
            proc = self._stage(name).proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)

    def restart(self, name: str, timeout: float = 10.0) -> int:
        """Stop the stage (SIGTERM, then SIGKILL after ``timeout``) and start it again; returns the new PID."""
        with self._lock:
            stage = self._stage(name)
            self._terminate([stage], timeout)
            self._launch(stage)
            return stage.proc.pid

    def stop_all(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM every stage, wait up to ``timeout`` s, SIGKILL what is left; returns exit codes by name."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        with self._lock:
            self._terminate(list(self.stages.values()), timeout)
            self._write_stages()
            return {s.name: s.proc.returncode for s in self.stages.values() if s.proc is not None}

    @staticmethod
    def _terminate(stages: list[Stage], timeout: float) -> None:
        running = [s.proc for s in stages if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # -- state -----------------------------------------------------------------------------

    def alive(self, name: str) -> bool:
        """True while the stage's current process runs."""
        proc = self._stage(name).proc
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self._stage(name).proc.pid

    def restarts(self, name: str) -> int:
        """How many times the stage was restarted automatically after a crash."""
        return self._stage(name).restarts

    def _stage(self, name: str) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise StackError(f"no stage named {name!r}; started: {', '.join(self.stages) or 'none'}") from None

    def _write_stages(self) -> None:
        """Record PIDs in stages.json (same shape as stack.json: a list of procs.Server)."""
        servers = [Server(s.name, s.proc.pid, log=str(s.log), argv=s.argv).to_dict()
                   for s in self.stages.values() if s.proc is not None and s.proc.poll() is None]
        private_dir(self.run_dir)
        tmp = self.run_dir / (STAGES_FILE + ".tmp")
        tmp.write_text(json.dumps({"started": time.time(), "servers": servers}, indent=2))
        tmp.replace(self.run_dir / STAGES_FILE)

    # -- automatic restart -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            with self._lock:
                for stage in self.stages.values():
                    self._check(stage, time.monotonic())

    def _check(self, stage: Stage, now: float) -> None:
        """Schedule a restart for a crashed stage and carry it out when its backoff has passed."""
        code = stage.proc.poll() if stage.proc is not None else None
        if code is None or code == 0:  # running, or finished on purpose
            return
        if stage.restart_due is None:
            stage.exit_codes.append(code)
            ran_s = now - stage.started_at
            stage.crashes_in_a_row = 1 if ran_s >= self.stable_after_s else stage.crashes_in_a_row + 1
            stage.restart_due = now + backoff_s(stage.crashes_in_a_row, self.backoff_initial_s, self.backoff_max_s)
            with open(stage.log, "a") as f:
                f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.name} exited with {code}; "
                        f"restarting in {stage.restart_due - now:.1f}s\n")
        elif now >= stage.restart_due:
            stage.restarts += 1
            self._launch(stage)


def backoff_s(crashes_in_a_row: int, initial_s: float, max_s: float) -> float:
    """Delay before restart number ``crashes_in_a_row``: doubles from ``initial_s`` up to ``max_s``."""
    return min(max_s, initial_s * 2 ** max(0, crashes_in_a_row - 1))


def scrape(*ports: int, host: str = "127.0.0.1", timeout: float = 2.0) -> dict[str, float]:
    """Read Prometheus text endpoints and sum samples over all ``ports``.

    Keys are sample names (summed over labels) and ``name{k="v",...}`` per label set
    (labels sorted). An endpoint that cannot be reached (stage starting or restarting)
    contributes nothing.
    """
    totals: dict[str, float] = {}
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation timestamps: summing them means nothing
                    continue
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                if sample.labels:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    key = f"{sample.name}{{{labels}}}"
                    totals[key] = totals.get(key, 0.0) + sample.value
    return totals
