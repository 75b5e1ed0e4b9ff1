"""Small helpers to run local servers: free ports, readiness waits, start and stop by PID."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


class StackError(RuntimeError):
    """A local server could not be started; the message says what to do next."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on host:port."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Poll ``check`` until true; fail with the log tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting{_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise StackError(f"{what} was not ready after {timeout:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if not log or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n  " + "\n  ".join(text)


@dataclass
class Server:
    """A started server process: what it is, its PID, ports and log file."""

    name: str
    pid: int
    ports: dict[str, int] = field(default_factory=dict)
    log: str = ""
    argv: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def to_dict(self) -> dict:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def spawn(name: str, argv: list[str], log: Path, env: dict | None = None, cwd: str | None = None,
          new_session: bool = True, priority: str = "normal") -> subprocess.Popen:
    """Start ``argv`` with stdout/stderr into ``log`` at CPU ``priority`` (see ``set_priority``);
    a missing binary raises StackError."""
    check_priority(priority)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=new_session)
    except FileNotFoundError:
        raise StackError(f"cannot start {name}: {argv[0]} not found") from None
    set_priority(proc.pid, priority)  # before the interpreter has started its threads, which inherit it
    return proc


PRIORITIES = ("normal", "low", "idle")


def check_priority(priority: str) -> None:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")


def set_priority(pid: int, priority: str) -> None:
    """CPU priority of ``pid``: "normal" leaves it; "low" is 10 nice steps below this process;
    "idle" is Linux's SCHED_IDLE (CPU time only when nothing else wants it; nice 19 elsewhere)."""
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    elif priority in ("low", "idle"):
        steps = 10 if priority == "low" else 19
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + steps))


def stop_pid(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig``, wait, then SIGKILL. True if the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
