"""The `aimass` console command: one entry point, one subcommand per stage or task.

Each subcommand lives in the module that does the work and exposes two functions,
``configure(parser)`` (its options) and ``run(args, cfg) -> exit code``. Modules are
imported only for the subcommand that runs, so `aimass --help` stays fast.

A command whose stdout reader has gone (`aimass query ... | head`) stops quietly with 141, the
status a Unix tool killed by SIGPIPE leaves, so `set -o pipefail` scripts see what `cat | head`
gives them; SIGPIPE itself stays ignored (Python's default), so a stage writing to a socket whose
peer left gets an error it can handle instead of dying. A BrokenPipeError from anything but
stdout still propagates.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys

from aimass.core.config import ConfigError, load_config
from aimass.core.procs import StackError

# name -> (module, configure function, run function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "up": ("aimass.core.stack", "configure_up", "run_up", "start the embedded stack (mosquitto, kafka broker, tritonserver)"),
    "status": ("aimass.core.stack", "configure_none", "run_status", "show what the embedded stack runs and where"),
    "down": ("aimass.core.stack", "configure_none", "run_down", "stop exactly what `aimass up` started"),
    "bridge": ("aimass.streams.bridge", "configure", "run", "run the MQTT -> Kafka bridge"),
    "simulate": ("aimass.streams.simulator", "configure", "run", "publish simulated device telemetry with injected anomalies"),
    "replay": ("aimass.streams.history_replay", "configure", "run", "publish a CSV/Parquet history through MQTT in event-time order"),
    "worker": ("aimass.agents.worker", "configure", "run", "run a Faust worker (clean + window agents)"),
    "predict": ("aimass.agents.predict", "configure", "run", "run the predict stage (online detectors + Triton)"),
    "alerter": ("aimass.agents.alert", "configure", "run", "run the rule engine, alarms, notifications and the alarm API"),
    "sink": ("aimass.agents.sink", "configure", "run", "store every result topic in ClickHouse / chDB"),
    "rules": ("aimass.rules.cli", "configure_rules", "run_rules", "validate rule files (`aimass rules check FILE...`)"),
    "alerts": ("aimass.rules.cli", "configure_alerts", "run_alerts", "list and acknowledge alarms"),
    "train": ("aimass.models.cli", "configure_train", "run_train", "train the forecaster and anomaly models, gated promotion"),
    "models": ("aimass.models.cli", "configure_models", "run_models", "list model versions, metrics and which one serves"),
    "db": ("aimass.core.db", "configure", "run", "database tasks (`aimass db migrate`)"),
    "query": ("aimass.query", "configure", "run", "run a named report against the store; --plot draws it"),
    "grafana": ("aimass.grafana", "configure", "run", "build dashboards as code, push them to a Grafana"),
    "demo": ("aimass.demo", "configure", "run", "run the whole pipeline on the embedded stack with live progress"),
    "backtest": ("aimass.backtest", "configure", "run", "replay a history file through the pipeline, score the detectors"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:10s} {spec[3]}" for name, spec in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="aimass",
        description="AI Mass: streaming real-time IoT analytics engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{lines}\n\n`aimass COMMAND --help` shows a command's options.\n"
               "Configuration: --config FILE (TOML) or AIMASS_CONFIG, overridden by AIMASS_<SECTION>_<KEY> "
               "environment variables (see README, 'Configuration').",
    )
    p.add_argument("--config", help="TOML configuration file (default: $AIMASS_CONFIG, else built-in defaults)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override run.log_level")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND", help="what to run")
    return p


STDOUT_CLOSED_EXIT = 128 + 13  # 128 + SIGPIPE


def stdout_closed() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a descriptor
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def quiet_stdout() -> int:
    """Point stdout at /dev/null (the interpreter's last flush would fail again); the exit status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return STDOUT_CLOSED_EXIT


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    # Split global options from the command and its own options.
    idx = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if idx is None:
        top.parse_args(argv)
        top.print_help()
        return 0 if not argv or set(argv) & {"-h", "--help"} else 2
    gargs = top.parse_args(argv[:idx + 1])
    name = argv[idx]
    module_name, configure_name, run_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"aimass {name}", description=help_text,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    getattr(module, configure_name)(sub)
    args = sub.parse_args(argv[idx + 1:])
    try:
        cfg = load_config(gargs.config)
    except ConfigError as exc:
        print(f"aimass: configuration error: {exc}", file=sys.stderr)
        return 2
    if gargs.log_level:
        cfg.run.log_level = gargs.log_level
    logging.basicConfig(level=cfg.run.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(getattr(module, run_name)(args, cfg) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except (StackError, ConfigError) as exc:
        print(f"aimass {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if stdout_closed():
            return quiet_stdout()
        raise


if __name__ == "__main__":
    sys.exit(main())
