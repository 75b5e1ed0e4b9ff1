"""`aimass rules check FILE...` (validate rule files) and `aimass alerts [list|ack ID|silence ID]` (the alarm API)."""
from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

from aimass.core.config import Config
from aimass.core.procs import StackError
from aimass.rules.engine import load_checked
from aimass.rules.model import RulesInvalid


def configure_rules(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate rule/receiver files and run each rule on a synthetic batch of "
                                         "its stream; errors as FILE:LINE:COL: message")
    check.add_argument("files", nargs="+", metavar="FILE", help="rule files or directories of *.yaml")


def run_rules(args: argparse.Namespace, cfg: Config) -> int:
    """Exit 0 when every file is valid (what the alerter would load), 1 otherwise (each error printed with its location)."""
    try:
        ruleset = load_checked(args.files)
    except RulesInvalid as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{len(exc.errors)} error(s); the files were not accepted", file=sys.stderr)
        return 1
    print(f"OK: {len(ruleset.rules)} rules, {len(ruleset.receivers)} receivers in {len(ruleset.files)} file(s)")
    return 0


def configure_alerts(p: argparse.ArgumentParser) -> None:
    p.description = ("List, acknowledge and silence alarms through the alerter's API (alert.api_host:"
                     "alert.api_port), authenticated with the token in the env var named by alert.api_token_env "
                     "(listing needs the read role, ack and silence the operate role).")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    lst = sub.add_parser("list", help="active and cleared-unacknowledged alarms (default action)")
    lst.add_argument("--all", action="store_true", help="include cleared and acknowledged alarms")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ack = sub.add_parser("ack", help="acknowledge an alarm")
    ack.add_argument("id", help="alarm id (first column of `aimass alerts list`)")
    ack.add_argument("--by", default="cli", help="who acknowledges (recorded on the alarm next to the token's name)")
    silence = sub.add_parser("silence", help="hold back an alarm's notifications for a while")
    silence.add_argument("id", help="alarm id (first column of `aimass alerts list`)")
    silence.add_argument("--for", dest="for_s", type=float, default=3600.0,
                         help="seconds to silence it (default 3600; 0 lifts a silence)")
    p.add_argument("--url", help="API base URL (default: http(s)://<alert.api_host>:<alert.api_port>, https when "
                                 "alert.api_tls_cert_file is set)")
    p.add_argument("--ca-file", help="CA certificate that signed the API's (default: alert.api_tls_ca_file, "
                                     "else the system's)")


def _request(cfg: Config, base: str, method: str, path: str, body: dict | None = None,
             ca_file: str = "") -> tuple[int, dict]:
    token = Config.secret(cfg.alert.api_token_env)
    if not token:
        raise StackError(f"set {cfg.alert.api_token_env} to the alerter's API token")
    req = urllib.request.Request(base.rstrip("/") + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    context = ssl.create_default_context(cafile=ca_file or None) if base.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except urllib.error.URLError as exc:
        raise StackError(f"cannot reach the alarm API at {base}: {exc.reason}; is `aimass alerter` running?") from None


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def alarm_text(alarm: dict) -> str:
    """The latest message, and the raising one where it differs: a cleared alarm still says why it was raised."""
    raised = alarm.get("raised_message", "")
    return alarm["message"] if not raised or raised == alarm["message"] else f"{alarm['message']} (raised: {raised})"


def run_alerts(args: argparse.Namespace, cfg: Config) -> int:
    a = cfg.alert
    base = args.url or f"{'https' if a.api_tls_cert_file else 'http'}://{a.api_host}:{a.api_port}"
    ca_file = args.ca_file or a.api_tls_ca_file
    if args.action in ("ack", "silence"):
        body = {"by": args.by} if args.action == "ack" else {"for_s": args.for_s}
        status, doc = _request(cfg, base, "POST", f"/alarms/{args.id}/{args.action}", body, ca_file)
        if status != 200:
            print(f"aimass alerts {args.action}: {doc.get('error', status)}", file=sys.stderr)
            return 1
        if args.action == "ack":
            print(f"{doc['alarm_id']} {doc['state']} (acknowledged by {doc['acked_by']})")
        else:
            print(f"{doc['alarm_id']} notifications held back until {_when(doc['silenced_until_ms'])} UTC")
        return 0
    status, doc = _request(cfg, base, "GET", "/alarms?all=1" if getattr(args, "all", False) else "/alarms",
                           ca_file=ca_file)
    if status != 200:
        print(f"aimass alerts: {doc.get('error', status)}", file=sys.stderr)
        return 1
    alarms = doc["alarms"]
    if doc.get("unreachable"):  # several alerters, some of which did not answer: the list is partial
        print(f"aimass alerts: alerters {', '.join(doc['unreachable'])} did not answer; their alarms are missing",
              file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps(alarms, indent=2))
        return 0
    print(f"{'ID':16}  {'STATE':13}  {'SEVERITY':8}  {'RULE':24}  {'SERIES':40}  {'SINCE (UTC)':19}  MESSAGE")
    for a in alarms:
        series = f"{a['tenant']}/{a['device_id']}/{a['metric']}" + (f"@{a['window_s']}s" if a["window_s"] else "")
        print(f"{a['alarm_id']:16}  {a['state']:13}  {a['severity']:8}  {a['rule'][:24]:24}  {series[:40]:40}  "
              f"{_when(a['first_ms']):19}  {alarm_text(a)}")
    print(f"{len(alarms)} alarm(s)")
    return 0
