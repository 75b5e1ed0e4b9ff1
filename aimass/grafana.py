"""`aimass grafana`: dashboards as code (grafana-foundation-sdk), provisioning files, push.

``aimass grafana build`` writes ``deploy/grafana/dashboards/*.json`` and the provisioning
files for the ClickHouse data source plugin (grafana-clickhouse-datasource) and the
dashboards; ``aimass grafana push --url URL --token TOKEN`` uploads the data source and the
dashboards to a running Grafana with grafana-client. The SDK has no ClickHouse query type,
so ``ClickHouseQuery`` below is one (editorType "sql", rawSql with the plugin's macros).

Every panel is a ``PanelSpec`` (title, kind, SQL, the columns it returns), so tests can
expand the macros (``expand_macros``) and run each panel's SQL against the real schema.
Grafana reads a ClickHouse *server*; the embedded chDB store is not reachable by Grafana.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from aimass.core.config import Config, ConfigError

PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_UID = "aimass-clickhouse"
PROMETHEUS_UID = "aimass-prometheus"
OUT_DIR = Path("deploy/grafana")
TIME_SERIES, TABLE = 0, 1  # the plugin's query "format" values


# --- a ClickHouse query for the SDK ---------------------------------------------------

class ClickHouseQueryModel(cogvariants.Dataquery):
    """A grafana-clickhouse-datasource query in SQL-editor mode."""

    def __init__(self, ref_id: str = "A", raw_sql: str = "", fmt: int = TIME_SERIES):
        self.ref_id = ref_id
        self.raw_sql = raw_sql
        self.format = fmt

    def to_json(self) -> dict[str, object]:
        return {
            "refId": self.ref_id,
            "datasource": {"type": PLUGIN, "uid": DATASOURCE_UID},
            "editorType": "sql",
            "queryType": "timeseries" if self.format == TIME_SERIES else "table",
            "format": self.format,
            "rawSql": self.raw_sql,
        }


class ClickHouseQuery(cogbuilder.Builder[ClickHouseQueryModel]):
    """Builder: ``ClickHouseQuery().raw_sql("SELECT ...").format_table()``."""

    def __init__(self) -> None:
        self._internal = ClickHouseQueryModel()

    def build(self) -> ClickHouseQueryModel:
        return self._internal

    def ref_id(self, ref_id: str) -> "ClickHouseQuery":
        self._internal.ref_id = ref_id
        return self

    def raw_sql(self, sql: str) -> "ClickHouseQuery":
        self._internal.raw_sql = sql
        return self

    def format_table(self) -> "ClickHouseQuery":
        self._internal.format = TABLE
        return self


class PrometheusQueryModel(cogvariants.Dataquery):
    """A Prometheus query (stage metrics that are not stored in ClickHouse)."""

    def __init__(self, expr: str, legend: str = ""):
        self.expr, self.legend = expr, legend

    def to_json(self) -> dict[str, object]:
        return {"refId": "A", "datasource": {"type": "prometheus", "uid": PROMETHEUS_UID}, "expr": self.expr,
                "legendFormat": self.legend, "range": True}


class PrometheusQuery(cogbuilder.Builder[PrometheusQueryModel]):
    def __init__(self, expr: str, legend: str = "") -> None:
        self._internal = PrometheusQueryModel(expr, legend)

    def build(self) -> PrometheusQueryModel:
        return self._internal


class ClickHouseAnnotation(cogbuilder.Builder[dm.AnnotationQuery]):
    """An annotation fed by a ClickHouse query returning time, text and tags columns."""

    def __init__(self, name: str, sql: str, color: str = "red") -> None:
        self.name, self.sql, self.color = name, sql, color

    def build(self) -> dm.AnnotationQuery:
        query = dm.AnnotationQuery(name=self.name, datasource=dm.DataSourceRef(PLUGIN, DATASOURCE_UID),
                                   enable=True, icon_color=self.color)
        query.target = ClickHouseQueryModel("Anno", self.sql, TABLE)
        return query


# --- panels ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PanelSpec:
    """One panel: what it shows and the columns its SQL returns (checked by the tests)."""

    title: str
    kind: str                    # timeseries | stat | table | prometheus
    sql: str                     # ClickHouse SQL with the plugin's macros; PromQL for kind "prometheus"
    columns: tuple[str, ...] = ()
    unit: str = ""
    width: int = 12
    height: int = 8
    description: str = ""


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    panels: tuple[PanelSpec, ...]
    variables: tuple[tuple[str, str], ...] = ()   # (name, SQL listing its values)
    annotations: tuple[tuple[str, str], ...] = ()  # (name, SQL returning time, text, tags)
    tags: tuple[str, ...] = field(default=("aimass",))


def alarm_state_sql(db: str) -> str:
    """Latest state of every alarm (rule, tenant, device, metric) within the time range."""
    return (f"SELECT rule, tenant, device_id, metric, argMax(state, event_at) AS state, argMax(severity, event_at) "
            f"AS severity, max(event_at) AS last_event, argMax(message, event_at) AS message "
            f"FROM {db}.alerts FINAL WHERE $__timeFilter(event_at) GROUP BY rule, tenant, device_id, metric")


def dashboards(db: str = "aimass") -> list[DashboardSpec]:
    """Every dashboard of AI Mass, with SQL against database ``db``."""
    device = "tenant = '${tenant}' AND device_id = '${device}'"
    fleet = DashboardSpec("aimass-fleet", "AI Mass / Fleet overview", "Ingest, lag, rejects and alarms across devices", (
        PanelSpec("Readings stored per second", "timeseries",
                  f"SELECT $__timeInterval(bucket) AS time, countMerge(n) / greatest($__interval_s, 60) AS readings_per_s "
                  f"FROM {db}.readings_1m WHERE $__timeFilter(bucket) GROUP BY time ORDER BY time",
                  ("time", "readings_per_s"), "reqps"),
        PanelSpec("Ingest lag (bridge receive -> stored)", "timeseries",
                  f"SELECT $__timeInterval(inserted_at) AS time, "
                  f"quantile(0.5)(dateDiff('millisecond', received_at, inserted_at)) / 1000 AS p50, "
                  f"quantile(0.99)(dateDiff('millisecond', received_at, inserted_at)) / 1000 AS p99 "
                  f"FROM {db}.readings WHERE $__timeFilter(inserted_at) GROUP BY time ORDER BY time",
                  ("time", "p50", "p99"), "s"),
        PanelSpec("Rejected and late readings by reason", "timeseries",
                  f"SELECT $__timeInterval(bucket) AS time, concat(stage, '/', reason) AS reason, countMerge(n) AS rejects "
                  f"FROM {db}.rejects_1m WHERE $__timeFilter(bucket) GROUP BY time, reason ORDER BY time",
                  ("time", "reason", "rejects"), "short"),
        PanelSpec("Active alarms", "stat",
                  f"SELECT countIf(state IN ('active_unack', 'active_ack')) AS active FROM ({alarm_state_sql(db)})",
                  ("active",), "short", width=6),
        PanelSpec("Devices reporting", "stat",
                  f"SELECT uniqExact(tenant, device_id) AS devices FROM {db}.readings_1m WHERE $__timeFilter(bucket)",
                  ("devices",), "short", width=6),
        PanelSpec("Most anomalous series", "table",
                  f"SELECT tenant, device_id, metric, max(anomaly) AS max_anomaly, avg(anomaly) AS mean_anomaly, "
                  f"count() AS windows FROM {db}.predictions FINAL WHERE $__timeFilter(target_end_at) "
                  f"GROUP BY tenant, device_id, metric ORDER BY max_anomaly DESC LIMIT 20",
                  ("tenant", "device_id", "metric", "max_anomaly", "mean_anomaly", "windows"), width=24),
    ))
    drill = DashboardSpec("aimass-device", "AI Mass / Device drill-down",
                          "One device: readings, windows, the predicted band and its alarms", (
        PanelSpec("Readings", "timeseries",
                  f"SELECT $__timeInterval(ts) AS time, metric, avg(value) AS value FROM {db}.readings FINAL "
                  f"WHERE {device} AND $__timeFilter(ts) GROUP BY time, metric ORDER BY time",
                  ("time", "metric", "value"), width=24),
        PanelSpec("Window mean, min and max", "timeseries",
                  f"SELECT window_end_at AS time, mean, min, max FROM {db}.windows FINAL "
                  f"WHERE {device} AND metric = '${{metric}}' AND window_s = ${{window_s}} "
                  f"AND $__timeFilter(window_end_at) ORDER BY time",
                  ("time", "mean", "min", "max")),
        # Nullable `actual`, not `SETTINGS join_use_nulls`: the read-only grafana user may not set settings.
        PanelSpec("Forecast and band vs actual", "timeseries",
                  f"SELECT p.target_end_at AS time, p.forecast AS forecast, p.band_low AS band_low, "
                  f"p.band_high AS band_high, o.actual AS actual FROM {db}.predictions AS p FINAL "
                  f"LEFT JOIN (SELECT tenant, device_id, metric, window_s, target_end_at, toNullable(actual) AS actual "
                  f"FROM {db}.outcomes FINAL WHERE {device} AND $__timeFilter(target_end_at)) AS o "
                  f"USING (tenant, device_id, metric, window_s, target_end_at) "
                  f"WHERE p.tenant = '${{tenant}}' AND p.device_id = '${{device}}' AND p.metric = '${{metric}}' "
                  f"AND p.window_s = ${{window_s}} AND $__timeFilter(p.target_end_at) ORDER BY time",
                  ("time", "forecast", "band_low", "band_high", "actual")),
        PanelSpec("Anomaly score", "timeseries",
                  f"SELECT target_end_at AS time, anomaly, anomaly_level, anomaly_spread, anomaly_change, anomaly_triton FROM {db}.predictions FINAL "
                  f"WHERE {device} AND metric = '${{metric}}' AND $__timeFilter(target_end_at) ORDER BY time",
                  ("time", "anomaly", "anomaly_level", "anomaly_spread", "anomaly_change", "anomaly_triton")),
        PanelSpec("Alarm transitions", "table",
                  f"SELECT event_at AS time, rule, severity, transition, state, value, message FROM {db}.alerts FINAL "
                  f"WHERE {device} AND $__timeFilter(event_at) ORDER BY time DESC LIMIT 200",
                  ("time", "rule", "severity", "transition", "state", "value", "message")),
    ), variables=(
        ("tenant", f"SELECT DISTINCT tenant FROM {db}.readings_1m ORDER BY tenant"),
        ("device", f"SELECT DISTINCT device_id FROM {db}.readings_1m WHERE tenant = '${{tenant}}' ORDER BY device_id"),
        ("metric", f"SELECT DISTINCT metric FROM {db}.readings_1m WHERE {device} ORDER BY metric"),
        ("window_s", f"SELECT DISTINCT window_s FROM {db}.windows FINAL WHERE {device} ORDER BY window_s"),
    ), annotations=(
        ("Alarms", f"SELECT event_at AS time, concat(rule, ': ', transition, ' (', severity, ')') AS text, "
                   f"state AS tags FROM {db}.alerts FINAL WHERE {device} AND $__timeFilter(event_at)"),
    ))
    models = DashboardSpec("aimass-models", "AI Mass / Models", "Forecast residuals, detector quality, drift, serving", (
        PanelSpec("Mean absolute residual per model", "timeseries",
                  f"SELECT $__timeInterval(bucket) AS time, forecaster_model, "
                  f"sumMerge(abs_residual_sum) / countMerge(n) AS mae FROM {db}.outcomes_1m "
                  f"WHERE $__timeFilter(bucket) GROUP BY time, forecaster_model ORDER BY time",
                  ("time", "forecaster_model", "mae")),
        PanelSpec("Actual inside the predicted band", "timeseries",
                  f"SELECT $__timeInterval(bucket) AS time, forecaster_model, "
                  f"sumMerge(in_band_n) / countMerge(n) AS in_band FROM {db}.outcomes_1m "
                  f"WHERE $__timeFilter(bucket) GROUP BY time, forecaster_model ORDER BY time",
                  ("time", "forecaster_model", "in_band"), "percentunit"),
        PanelSpec("Detector precision and recall", "timeseries",
                  f"SELECT computed_at AS time, concat(rule, ' ', model) AS detector, precision, recall "
                  f"FROM {db}.quality FINAL WHERE $__timeFilter(computed_at) ORDER BY time",
                  ("time", "detector", "precision", "recall"), "percentunit"),
        PanelSpec("Degraded predictions (Triton unavailable)", "timeseries",
                  f"SELECT $__timeInterval(bucket) AS time, sumMerge(degraded_n) / countMerge(n) AS degraded_share "
                  f"FROM {db}.predictions_1m WHERE $__timeFilter(bucket) GROUP BY time ORDER BY time",
                  ("time", "degraded_share"), "percentunit"),
        PanelSpec("Prediction latency (bridge receive -> predicted)", "timeseries",
                  f"SELECT $__timeInterval(predicted_at) AS time, "
                  f"quantile(0.5)(dateDiff('millisecond', max_received_at, predicted_at)) / 1000 AS p50, "
                  f"quantile(0.99)(dateDiff('millisecond', max_received_at, predicted_at)) / 1000 AS p99 "
                  f"FROM {db}.predictions WHERE $__timeFilter(predicted_at) GROUP BY time ORDER BY time",
                  ("time", "p50", "p99"), "s"),
        PanelSpec("Triton request latency p99 (Prometheus)", "prometheus",
                  "histogram_quantile(0.99, sum(rate(aimass_predict_triton_seconds_bucket[1m])) by (le))",
                  unit="s"),
        PanelSpec("Drift events", "table",
                  f"SELECT detected_at AS time, tenant, device_id, metric, detector, model, residual_mean_before, "
                  f"residual_mean_after FROM {db}.drift FINAL WHERE $__timeFilter(detected_at) "
                  f"ORDER BY time DESC LIMIT 200",
                  ("time", "tenant", "device_id", "metric", "detector", "model", "residual_mean_before",
                   "residual_mean_after"), width=24),
    ))
    alerts = DashboardSpec("aimass-alerts", "AI Mass / Alerts", "Alarm transitions, current alarms, notifications", (
        PanelSpec("Alarm transitions", "timeseries",
                  f"SELECT $__timeInterval(event_at) AS time, transition, count() AS transitions FROM {db}.alerts FINAL "
                  f"WHERE $__timeFilter(event_at) GROUP BY time, transition ORDER BY time",
                  ("time", "transition", "transitions")),
        PanelSpec("Notifications by status", "timeseries",
                  f"SELECT $__timeInterval(created_at) AS time, concat(kind, ' ', status) AS delivery, count() AS n "
                  f"FROM {db}.notifications FINAL WHERE $__timeFilter(created_at) GROUP BY time, delivery ORDER BY time",
                  ("time", "delivery", "n")),
        PanelSpec("Current alarms", "table",
                  f"SELECT * FROM ({alarm_state_sql(db)}) WHERE state != 'cleared' ORDER BY last_event DESC",
                  ("rule", "tenant", "device_id", "metric", "state", "severity", "last_event", "message"), width=24),
        PanelSpec("Notification delivery time", "timeseries",
                  f"SELECT $__timeInterval(created_at) AS time, "
                  f"quantile(0.99)(dateDiff('millisecond', created_at, finished_at)) / 1000 AS p99 "
                  f"FROM {db}.notifications FINAL WHERE $__timeFilter(created_at) AND status = 'delivered' "
                  f"GROUP BY time ORDER BY time",
                  ("time", "p99"), "s"),
    ))
    return [fleet, drill, models, alerts]


# --- building -------------------------------------------------------------------------

def _panel(spec: PanelSpec, panel_id: int) -> cogbuilder.Builder:
    if spec.kind == "prometheus":
        builder = timeseries.Panel().with_target(PrometheusQuery(spec.sql, "p99"))
        builder.datasource(dm.DataSourceRef("prometheus", PROMETHEUS_UID))
    else:
        query = ClickHouseQuery().raw_sql(spec.sql)
        kind = {"timeseries": timeseries.Panel, "stat": stat.Panel, "table": table.Panel}[spec.kind]
        builder = kind().with_target(query.format_table() if spec.kind != "timeseries" else query)
        builder.datasource(dm.DataSourceRef(PLUGIN, DATASOURCE_UID))
    builder.id(panel_id).title(spec.title).span(spec.width).height(spec.height)
    if spec.unit:
        builder.unit(spec.unit)
    if spec.description:
        builder.description(spec.description)
    return builder


def build_dashboard(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard JSON model (schemaVersion of the pinned SDK)."""
    builder = (dash.Dashboard(spec.title).uid(spec.uid).description(spec.description).tags(list(spec.tags))
               .time("now-1h", "now").refresh("10s").timezone("browser")
               .tooltip(dm.DashboardCursorSync.CROSSHAIR))
    for name, sql in spec.variables:
        builder.with_variable(dash.QueryVariable(name).label(name).query(sql)
                              .datasource(dm.DataSourceRef(PLUGIN, DATASOURCE_UID))
                              .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED))
    for name, sql in spec.annotations:
        builder.annotation(ClickHouseAnnotation(name, sql))
    for i, panel in enumerate(spec.panels, start=1):
        builder.with_panel(_panel(panel, i))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def datasource(cfg: Config) -> dict[str, Any]:
    """The ClickHouse data source as Grafana's API takes it (password from the environment)."""
    from aimass.core.clickhouse import parse_url

    url = cfg.clickhouse.url or "clickhouse://default@127.0.0.1:9000/aimass"
    p = parse_url(url, cfg.secret(cfg.clickhouse.password_env))
    return {
        "name": "AI Mass ClickHouse", "uid": DATASOURCE_UID, "type": PLUGIN, "access": "proxy",
        "jsonData": {"host": p["host"], "port": p["port"], "protocol": "native", "username": p["user"],
                     "defaultDatabase": p["database"] or cfg.clickhouse.database,
                     "secure": p["secure"] or cfg.clickhouse.secure},
        "secureJsonData": {"password": p["password"]},
    }


DATASOURCE_PROVISIONING = f"""# Grafana provisioning: the ClickHouse data source (plugin {PLUGIN}) and Prometheus.
# Generated by `aimass grafana build`. Host and user match deploy/compose.yaml; the password
# comes from the Grafana process's environment. Edit host/user for other deployments.
apiVersion: 1
datasources:
  - name: AI Mass ClickHouse
    uid: {DATASOURCE_UID}
    type: {PLUGIN}
    jsonData:
      host: clickhouse
      port: 9000
      protocol: native
      username: aimass
      defaultDatabase: aimass
      secure: false
    secureJsonData:
      password: $AIMASS_CLICKHOUSE_PASSWORD
  - name: AI Mass Prometheus
    uid: {PROMETHEUS_UID}
    type: prometheus
    access: proxy
    url: http://prometheus:9090
"""

DASHBOARD_PROVISIONING = """# Grafana provisioning: load the AI Mass dashboards from files.
# Generated by `aimass grafana build`; deploy/grafana/dashboards is mounted at the path below.
apiVersion: 1
providers:
  - name: aimass
    folder: AI Mass
    type: file
    disableDeletion: false
    allowUiUpdates: false
    options:
      path: /var/lib/grafana/dashboards
"""


def build(out_dir: Path, db: str = "aimass") -> list[Path]:
    """Write the dashboards and provisioning files under ``out_dir``; returns the paths written."""
    written = []
    (out_dir / "dashboards").mkdir(parents=True, exist_ok=True)
    for spec in dashboards(db):
        path = out_dir / "dashboards" / f"{spec.uid.removeprefix('aimass-')}.json"
        path.write_text(json.dumps(build_dashboard(spec), indent=2, sort_keys=True) + "\n")
        written.append(path)
    for sub, name, text in (("datasources", "clickhouse.yaml", DATASOURCE_PROVISIONING),
                            ("dashboards", "aimass.yaml", DASHBOARD_PROVISIONING)):
        path = out_dir / "provisioning" / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


# --- the plugin's macros (for tests and `aimass grafana check`) ------------------------

def expand_macros(sql: str, from_ms: int, to_ms: int, interval_s: int, variables: dict[str, str]) -> str:
    """The SQL the ClickHouse plugin sends for this time range, interval and variable values."""
    from_s, to_s = from_ms // 1000, to_ms // 1000
    replacements = [
        (r"\$__timeFilter_ms\(([^)]+)\)", lambda m: f"{m[1]} >= fromUnixTimestamp64Milli({from_ms}) "
                                                      f"AND {m[1]} <= fromUnixTimestamp64Milli({to_ms})"),
        (r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m[1]} >= toDateTime({from_s}) AND {m[1]} <= toDateTime({to_s})"),
        (r"\$__timeInterval_ms\(([^)]+)\)",
         lambda m: f"toStartOfInterval(toDateTime64({m[1]}, 3), INTERVAL {interval_s * 1000} millisecond)"),
        (r"\$__timeInterval\(([^)]+)\)",
         lambda m: f"toStartOfInterval(toDateTime({m[1]}), INTERVAL {interval_s} second)"),
        (r"\$__interval_s\b", lambda m: str(interval_s)),
        (r"\$__fromTime\b", lambda m: f"toDateTime({from_s})"),
        (r"\$__toTime\b", lambda m: f"toDateTime({to_s})"),
    ]
    for pattern, repl in replacements:
        sql = re.sub(pattern, repl, sql)
    for name, value in variables.items():
        sql = sql.replace(f"${{{name}}}", value)
    if "$" in sql:
        raise ValueError(f"unexpanded macro or variable in: {sql[sql.index('$'):][:60]}")
    return sql


# --- CLI ------------------------------------------------------------------------------

def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="write dashboards and provisioning files (default under deploy/grafana/)")
    b.add_argument("--out", default=str(OUT_DIR), help="output directory (default deploy/grafana)")
    b.add_argument("--database", help="ClickHouse database the SQL reads (default clickhouse.database)")
    push = sub.add_parser("push", help="upload the data source and dashboards to a Grafana")
    push.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
    push.add_argument("--token", help="service account token (default: $AIMASS_GRAFANA_TOKEN)")
    push.add_argument("--token-env", default="AIMASS_GRAFANA_TOKEN", help="env var holding the token")
    push.add_argument("--database", help="ClickHouse database the SQL reads (default clickhouse.database)")
    push.add_argument("--folder", default="AI Mass", help="Grafana folder for the dashboards")


def push(cfg: Config, url: str, token: str, db: str, folder: str, say=print) -> None:
    """Create or update the data source, the folder and every dashboard."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url, credential=token, timeout=10)
    ds = datasource(cfg)
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, ds)
        say(f"updated data source {DATASOURCE_UID}")
    except GrafanaClientError as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        api.datasource.create_datasource(ds)
        say(f"created data source {DATASOURCE_UID}")
    folder_uid = "aimass"
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        api.folder.create_folder(folder, uid=folder_uid)
    for spec in dashboards(db):
        api.dashboard.update_dashboard({"dashboard": build_dashboard(spec), "folderUid": folder_uid,
                                        "overwrite": True, "message": "aimass grafana push"})
        say(f"pushed dashboard {spec.uid} ({spec.title})")


def run(args: argparse.Namespace, cfg: Config) -> int:
    db = args.database or cfg.clickhouse.database
    if args.action == "build":
        for path in build(Path(args.out), db):
            print(f"wrote {path}")
        return 0
    token = args.token or cfg.secret(args.token_env)
    if not token:
        raise ConfigError(f"no Grafana token: pass --token or set ${args.token_env}")
    push(cfg, args.url.rstrip("/"), token, db, args.folder)
    return 0
