"""Store outage under load: the whole pipeline running, its ClickHouse server stopped for a while,
then started again on the same data; every reading, window, prediction and alarm event is then
stored exactly once (``tests.accounting``, by identity), and the drill is shown to fail when the
sink drops one reading (``AIMASS_TEST_FAULT``).

The store is a real server (Debian's clickhouse-server 18.16, the legacy dialect) rather than the
embedded chDB: chDB lives inside the sink's process, so it has no outage of its own to drill. The
server is stopped gracefully (SIGTERM): an old server has no insert deduplication tokens, so a
crash between writing a block and acknowledging it could store that block twice on re-insert;
with a current server (>= 22.3) the sink's tokens drop such a block, as the sink-kill drill shows
on chDB.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from aimass.agents.sink import TEST_FAULT_ENV
from aimass.core.procs import Server, free_port, stop_pid
from tests.fixtures_store import start_clickhouse_server
from tests.pipeline_harness import (SeriesTraffic, TestPipeline, check_every_series_produced, pipeline_config,
                                    wait_rising)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "outage-drill"


class StoreServer:
    """A clickhouse-server that can be stopped and started again on the same ports and data."""

    def __init__(self, d: Path):
        self.dir, self.ports = d, (free_port(), free_port())
        self.server: Server | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"clickhouse://aimass:{PASSWORD}@127.0.0.1:{self.ports[0]}/"

    def start(self) -> None:
        self.server = start_clickhouse_server(self.dir, *self.ports, PASSWORD)

    def stop(self) -> None:
        assert stop_pid(self.server.pid, timeout=20), "clickhouse-server did not stop"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = StoreServer(tmp_path_factory.mktemp("outage-clickhouse"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mosquitto, kafka, triton, store):
    port = free_port()
    cfg = pipeline_config(tmp_path_factory.mktemp("store-outage"), mosquitto, kafka, triton, port)
    cfg.clickhouse.url = store.url
    cfg.clickhouse.retry_initial_s, cfg.clickhouse.retry_max_s = 0.2, 1.0  # back within a second of the store
    p = TestPipeline(cfg, webhook_port=port).start()
    yield p
    p.stop()


def outage_drill(pipeline: TestPipeline, store: StoreServer, tenant: str, seconds: float, down_s: float,
                 **account) -> None:
    """Traffic for ``seconds``; the store stopped for ``down_s`` while the sink is storing it (the
    sink retrying a batch its journal names: evidence that the outage hit work in flight); then
    every output accounted by identity and produced for every series after the store is back."""
    traffic = SeriesTraffic(pipeline.cfg, tenant, {f"dev-s{i}": 0.0 for i in range(4)}, seconds=seconds)
    wait_rising(pipeline.ports("sink"), "aimass_sink_rows_total")
    journal = pipeline.cfg.run_dir / "sink" / f"{pipeline.cfg.clickhouse.group_id}.journal.json"
    stopped = time.monotonic()
    store.stop()
    try:
        wait_rising(pipeline.ports("sink"), "aimass_sink_retries_total", timeout_s=down_s)
        assert journal.exists(), "the sink retries, but no batch of its is in flight"
        time.sleep(max(0.0, stopped + down_s - time.monotonic()))
    finally:
        store.start()
    back_ms = int(time.time() * 1000)
    traffic.stick()
    published = traffic.join()
    pipeline.account(tenant, published, **account)
    check_every_series_produced(pipeline, tenant, {(d, m) for _, d, m, _ in published}, since_ms=back_ms)
    assert pipeline.sup.restarts("sink") == 0 and pipeline.sup.alive("sink"), pipeline.log_of("sink")[-3000:]


def test_store_stopped_under_load_then_back_stores_everything_once(pipeline, store):
    outage_drill(pipeline, store, "so-outage", seconds=40, down_s=20)


def test_the_drill_fails_when_the_sink_drops_one_reading(pipeline, store):
    sink = pipeline.sup.stages["sink"]
    sink.env[TEST_FAULT_ENV] = "drop_one_reading"
    pipeline.sup.restart("sink")
    try:
        with pytest.raises(AssertionError, match="neither stored nor rejected"):
            outage_drill(pipeline, store, "so-defect", seconds=20, down_s=8, timeout_s=6, wait_s=25)
    finally:
        del sink.env[TEST_FAULT_ENV]
