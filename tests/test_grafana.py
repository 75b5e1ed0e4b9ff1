"""Dashboards as code: committed JSON is current, every panel's SQL runs on the real schema, push."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aimass import grafana
from aimass.core.clickhouse import ChdbStore, HttpReader, QueryServer
from aimass.core.config import Config
from aimass.core.db import migrate
from aimass.core.procs import free_port
from tests.fixtures_store import NOW_MS, chdb_config, chdb_run_dir, seed_report_data  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, chdb_run_dir) -> ChdbStore:  # noqa: F811
    cfg = chdb_config(Config(), chdb_run_dir)
    store = ChdbStore(cfg.run_dir / "chdb", cfg.clickhouse.database)
    migrate(store, cfg)
    seed_report_data(store)
    return store


@pytest.fixture(scope="module")
def read_only(seeded) -> HttpReader:
    """The seeded store through read-only sessions (like Grafana's read-only user: no writes, no SETTINGS)."""
    server = QueryServer(seeded, free_port(), token="t").start()
    yield HttpReader(server.port, seeded.database, token="t")
    server.stop()


def all_queries(db: str):
    """(dashboard, what, SQL, expected columns) for every ClickHouse query of every dashboard."""
    for d in grafana.dashboards(db):
        for p in d.panels:
            if p.kind != "prometheus":
                yield d.uid, p.title, p.sql, p.columns
        for name, sql in d.variables:
            yield d.uid, f"variable {name}", sql, ()
        for name, sql in d.annotations:
            yield d.uid, f"annotation {name}", sql, ("time", "text", "tags")


VARIABLES = {"tenant": "acme", "device": "wild", "metric": "temp", "window_s": "10"}


def test_committed_dashboards_and_provisioning_are_what_build_writes(tmp_path):
    written = grafana.build(tmp_path)
    assert len(written) == 6
    for path in written:
        committed = REPO / "deploy" / "grafana" / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `aimass grafana build`"


def test_dashboard_json_is_a_grafana_11_model_with_clickhouse_sql_targets():
    for spec in grafana.dashboards():
        model = grafana.build_dashboard(spec)
        assert model["schemaVersion"] == 41 and model["uid"] == spec.uid
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)) == len(spec.panels)
        for panel in model["panels"]:
            target = panel["targets"][0]
            if target["datasource"]["type"] == grafana.PLUGIN:
                assert target["editorType"] == "sql" and target["rawSql"].startswith("SELECT")
                assert target["format"] == (grafana.TIME_SERIES if panel["type"] == "timeseries" else grafana.TABLE)
            else:
                assert target["datasource"]["uid"] == grafana.PROMETHEUS_UID and "aimass_" in target["expr"]
    device = grafana.build_dashboard(grafana.dashboards()[1])
    assert [v["name"] for v in device["templating"]["list"]] == ["tenant", "device", "metric", "window_s"]
    assert device["annotations"]["list"][0]["target"]["rawSql"].startswith("SELECT event_at AS time")


@pytest.mark.parametrize("uid,what,sql,columns", list(all_queries("aimass")), ids=lambda v: str(v)[:40])
def test_every_panel_sql_with_macros_expanded_runs_on_the_schema(read_only, uid, what, sql, columns):
    db_sql = sql.replace("aimass.", f"{read_only.database}.")
    now_ms = int(time.time() * 1000)
    expanded = grafana.expand_macros(db_sql, NOW_MS - 3_600_000, now_ms + 60_000, 60, VARIABLES)
    result = read_only.query(expanded)
    if columns:
        assert tuple(result.column_names) == columns
    assert result.num_rows > 0, f"{uid} / {what} returned no rows on the seeded data"


def test_expand_macros_matches_the_plugin_and_rejects_leftovers():
    sql = grafana.expand_macros("SELECT $__timeInterval(ts) AS t WHERE $__timeFilter(ts) AND d = '${device}'",
                                1_700_000_000_123, 1_700_000_360_999, 30, {"device": "d1"})
    assert sql == ("SELECT toStartOfInterval(toDateTime(ts), INTERVAL 30 second) AS t WHERE ts >= "
                   "toDateTime(1700000000) AND ts <= toDateTime(1700000360) AND d = 'd1'")
    with pytest.raises(ValueError, match="unexpanded"):
        grafana.expand_macros("SELECT '${nope}'", 0, 1, 1, {})


class FakeGrafana(BaseHTTPRequestHandler):
    """Records API calls; answers like Grafana's HTTP API for the calls `push` makes."""

    calls: list = []

    def log_message(self, *args):
        pass

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.calls.append((self.command, self.path, self.headers.get("Authorization"), body))
        return body

    def do_GET(self):
        self._record()
        self._answer(404, {"message": "not found"})

    def do_POST(self):
        body = self._record()
        self._answer(200, {"status": "success", "uid": (body or {}).get("uid", "x"), "id": 1})


def test_push_uploads_datasource_folder_and_dashboards_with_the_token(monkeypatch):
    """No Grafana can be installed here: a recording HTTP server stands in for its API."""
    FakeGrafana.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AIMASS_CLICKHOUSE_PASSWORD", "ch-secret")
    cfg = Config()
    cfg.clickhouse.url = "clickhouse://reader@ch.example:9440/aimass"
    cfg.clickhouse.secure = True
    try:
        grafana.push(cfg, f"http://127.0.0.1:{server.server_address[1]}", "glsa_token", "aimass", "AI Mass",
                     say=lambda _m: None)
    finally:
        server.shutdown()
    assert all(auth == "Bearer glsa_token" for _, _, auth, _ in FakeGrafana.calls)
    posts = {(m, p): b for m, p, _, b in FakeGrafana.calls if m == "POST"}
    ds = posts[("POST", "/api/datasources")]
    assert ds["type"] == grafana.PLUGIN and ds["jsonData"]["host"] == "ch.example" and ds["jsonData"]["secure"]
    assert ds["secureJsonData"]["password"] == "ch-secret"
    assert posts[("POST", "/api/folders")]["uid"] == "aimass"
    pushed = [b["dashboard"]["uid"] for m, p, _, b in FakeGrafana.calls if p == "/api/dashboards/db"]
    assert pushed == [d.uid for d in grafana.dashboards()]
