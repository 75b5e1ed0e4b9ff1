"""Model versions on a real tritonserver in explicit model-control mode (a temp copy of triton_repo/)."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from aimass.cli import main
from aimass.core.procs import free_port
from aimass.core.stack import start_triton, stop_server
from aimass.models import cli, onnx_export, registry, train
from aimass.models.triton_client import TritonModels
from tests.fixtures_predict import synthetic_windows

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent / "triton_repo"


@pytest.fixture(scope="module")
def explicit_triton(tmp_path_factory):
    """(server, repo copy) with only the forecaster and anomaly models, live version 1 each."""
    root = tmp_path_factory.mktemp("triton-explicit")
    repo = root / "repo"
    for name in registry.MODELS:
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        for v in registry.versions(repo, name):
            if v != 1:
                shutil.rmtree(registry.version_dir(repo, name, v))
        registry.set_live(repo, name, 1)
    server = start_triton(root, free_port(), free_port(), free_port(), repo, explicit=True)
    yield server, repo
    stop_server(server)


def _http(server) -> str:
    return f"127.0.0.1:{server.ports['http']}"


def test_version_rollover_under_load_fails_no_request(explicit_triton):
    server, repo = explicit_triton
    k = registry.read_metadata(repo, "forecaster", 1)["k"]
    rng = np.random.default_rng(3)
    v2 = registry.write_version(repo, "forecaster", onnx_export.forecaster_onnx(rng.standard_normal(k), 1.5),
                                {"model": "forecaster", "k": k})
    assert registry.live_version(repo, "forecaster") == 1  # written, not live
    x = rng.standard_normal((256, k)).astype(np.float32)
    expected = {f"forecaster:{v}": train.run_onnx(registry.version_dir(repo, "forecaster", v) / "model.onnx", x)
                for v in (1, v2)}

    async def load_while_promoting():
        client = TritonModels(f"127.0.0.1:{server.ports['grpc']}", timeout_s=10, breaker_failures=1)
        results, done = [], asyncio.Event()

        async def load():
            while not done.is_set():
                results.append(await client.infer(x))
            for _ in range(5):  # answered after the swap completed
                results.append(await client.infer(x))

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(registry.promote, repo, "forecaster", v2, _http(server))
        done.set()
        await loader
        await client.close()
        return results

    results = asyncio.run(load_while_promoting())
    assert all(r.served.all() for r in results), "a request failed during the version swap"
    seen = [r.forecaster_model for r in results]
    assert len(results) >= 20  # requests kept flowing while Triton loaded v2 and unloaded v1
    assert seen[0] == "forecaster:1" and seen[-1] == f"forecaster:{v2}"
    for r in results:  # every answer is exactly the version it claims to be
        np.testing.assert_allclose(r.forecast, expected[r.forecaster_model], rtol=1e-6, atol=1e-6)
    assert registry.live_version(repo, "forecaster") == v2
    registry.promote(repo, "forecaster", 1, _http(server))  # leave v1 live for the next test


def test_worse_candidate_is_not_promoted_and_triton_keeps_serving_live(explicit_triton, tmp_path):
    server, repo = explicit_triton
    k = registry.read_metadata(repo, "forecaster", 1)["k"]
    windows, labels = synthetic_windows(30, 200, spike_every=29, seed=11)
    ds = train.dataset(windows, k, 10, labels)
    before = registry.versions(repo, "forecaster")
    lines = []
    result = train.train(repo, ds, k, "test", http_url=_http(server), ridge=1e7, say=lines.append)
    fc = result["forecaster"]
    assert fc["promoted"] is False and fc["version"] == max(before) + 1
    assert fc["metrics"]["mae_norm"] > fc["gate"]["against_metrics"]["mae_norm"]
    assert registry.live_version(repo, "forecaster") == 1
    assert any("kept v1" in line for line in lines)

    async def ask():
        client = TritonModels(f"127.0.0.1:{server.ports['grpc']}")
        try:
            return await client.infer(np.zeros((2, k), np.float32))
        finally:
            await client.close()

    assert asyncio.run(ask()).forecaster_model == "forecaster:1"
    listing = "\n".join(cli.version_lines(repo))
    assert f"forecaster  {fc['version']:>4d}" in listing and "*" in listing


def test_promotion_that_triton_refuses_keeps_the_old_version_on_disk(explicit_triton):
    server, repo = explicit_triton
    k = registry.read_metadata(repo, "anomaly", 1)["k"]
    broken = registry.write_version(repo, "anomaly", b"not an onnx graph", {"model": "anomaly", "k": k})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="could not load anomaly"):
        registry.promote(repo, "anomaly", broken, _http(server))
    assert time.monotonic() - t0 < 60
    assert registry.live_version(repo, "anomaly") == 1


def test_train_and_models_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIMASS_TRITON_HTTP_PORT", str(free_port()))  # no Triton there: disk-only promotion
    windows, labels = synthetic_windows(20, 150, spike_every=23, seed=5)
    pq.write_table(windows, tmp_path / "windows.parquet")
    pq.write_table(labels, tmp_path / "labels.parquet")
    repo = tmp_path / "repo"
    train_args = ["train", "--repo", str(repo), "--windows", str(tmp_path / "windows.parquet"),
                  "--labels", str(tmp_path / "labels.parquet")]
    assert main(train_args) == 0
    assert main(train_args + ["--ridge", "1e7"]) == 0  # a worse forecaster: written, not promoted
    out = capsys.readouterr().out
    assert "forecaster v1" in out and "PROMOTED" in out and "forecaster v2" in out and "kept v1" in out
    assert main(["models", "--repo", str(repo)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listing if line.startswith("forecaster")] == [
        ["forecaster", "1", "*"], ["forecaster", "2", "mae_norm"]]
    assert main(["models", "show", "forecaster", "2", "--repo", str(repo)]) == 0
    assert '"promoted": false' in capsys.readouterr().out
    assert main(["models", "promote", "forecaster", "2", "--repo", str(repo)]) == 0  # by hand: no gate
    assert registry.live_version(repo, "forecaster") == 2
    assert main(["models", "promote", "forecaster", "9", "--repo", str(repo)]) == 1
    assert "no version 9" in capsys.readouterr().err
    assert main(["train", "--repo", str(repo), "--windows", str(tmp_path / "missing.parquet")]) == 1
