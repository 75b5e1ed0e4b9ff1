"""`aimass sink` killed with SIGKILL mid-batch and restarted stores every row exactly once."""
from __future__ import annotations

import signal
import subprocess
import urllib.request

import pytest

from aimass.core.clickhouse import HttpReader, ensure_query_token
from aimass.core.procs import free_port
from aimass.core.supervisor import aimass_argv
from aimass.core import contract
from tests.fixtures_store import counts, expected_counts, produce, readings, run_sink_process, sample_tables, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def write_config(cfg, path, query_port: int, metrics_port: int = 0) -> None:
    path.write_text(f"""
[run]
dir = "{cfg.run.dir}"
log_level = "DEBUG"
[kafka]
bootstrap = "{cfg.kafka.bootstrap}"
topic_prefix = "{cfg.kafka.topic_prefix}"
partitions = {cfg.kafka.partitions}
[clickhouse]
query_port = {query_port}
flush_rows = 4000
flush_ms = 300
metrics_port = {metrics_port}
retry_initial_s = 0.1
""")


def test_sigkill_mid_batch_then_restart_leaves_every_row_exactly_once(cfg, tmp_path):
    batches = [sample_tables(seed, n=200) for seed in range(20)]
    big = [(contract.CLEAN, readings(3000, device=f"bulk-{i}")) for i in range(40)]
    produce(cfg, [item for b in batches for item in b.items()] + big)
    want = expected_counts(batches)
    want["readings"] += 40 * 3000
    conf, port = tmp_path / "aimass.toml", free_port()
    write_config(cfg, conf, port)
    reader = HttpReader(port, cfg.clickhouse.database, ensure_query_token(cfg))  # the sink reuses it

    kills = 0
    for kill_at in (0.2, 0.6):  # kill twice, at about 20% and 60% of the rows stored
        proc = run_sink_process(conf, tmp_path / f"sink-{kills}.log")
        wait_for(reader.alive, 60, "the sink's query endpoint")
        wait_for(lambda: sum(counts(reader, cfg.clickhouse.database, final=False).values())
                 >= kill_at * sum(want.values()), 120, f"{kill_at:.0%} of the rows stored")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        wait_for(lambda: not reader.alive(), 10, "the killed sink's endpoint to go away")

    metrics_port = free_port()
    write_config(cfg, conf, port, metrics_port)
    proc = run_sink_process(conf, tmp_path / "sink-final.log")
    try:
        wait_for(reader.alive, 60, "the sink's query endpoint")
        wait_for(lambda: counts(reader, cfg.clickhouse.database) == want or None, 120, f"counts {want}")
        assert counts(reader, cfg.clickhouse.database, final=False) == want  # no duplicate even before merges
        db = cfg.clickhouse.database
        dupes = reader.query(f"SELECT count() - uniqExact(tenant, device_id, metric, ts) AS d FROM `{db}`.readings")
        assert dupes.column("d")[0].as_py() == 0
        roll = reader.query(f"SELECT countMerge(n) AS n FROM `{db}`.readings_1m")
        assert roll.column("n")[0].as_py() == want["readings"]  # the rollup is exact too (dedup tokens)
        # `aimass query` in another process reads through the running sink's endpoint.
        out = subprocess.run(aimass_argv("--config", str(conf), "query", "summary", "--format", "csv"),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"readings,{want['readings']}," in out.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        # The restarted sink may have had nothing new to insert, so its counters can still be unlabelled.
        assert "# TYPE aimass_sink_rows_total counter" in metrics and "aimass_sink_insert_seconds" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "sink-final.log").read_text()[-3000:]
