"""The committed triton_repo/ on a real tritonserver: same numbers as onnxruntime in-process, clean errors."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from aimass.models import onnx_export, registry, train
from aimass.models.triton_client import TritonModels

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent / "triton_repo"
K = registry.read_metadata(REPO, "forecaster", registry.live_version(REPO, "forecaster"))["k"]


def _live_onnx(name: str) -> Path:
    return registry.version_dir(REPO, name, registry.live_version(REPO, name)) / "model.onnx"


def _client(triton, **kw) -> TritonModels:
    return TritonModels(f"127.0.0.1:{triton.ports['grpc']}", **kw)


def test_outputs_equal_in_process_onnxruntime(triton):
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((n, K)).astype(np.float32) * 3 for n in (1, 7, 5000)]

    async def infer_all():
        client = _client(triton, max_rows_per_request=4096)  # 5000 rows -> two requests
        try:
            return await asyncio.gather(*(client.infer(x) for x in batches))  # concurrent: dynamic batching
        finally:
            await client.close()

    for x, out in zip(batches, asyncio.run(infer_all())):
        assert out.served.all()
        assert out.forecaster_model == f"forecaster:{registry.live_version(REPO, 'forecaster')}"
        assert out.anomaly_model == f"anomaly:{registry.live_version(REPO, 'anomaly')}"
        np.testing.assert_allclose(out.forecast, train.run_onnx(_live_onnx("forecaster"), x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.score, train.run_onnx(_live_onnx("anomaly"), x), rtol=1e-6, atol=1e-6)
        assert ((out.score >= 0) & (out.score <= 1)).all()


@pytest.mark.parametrize("shape,dtype,message", [((4, K + 1), "FP32", "unexpected shape"),
                                                 ((4, K), "FP64", "data-type")])
def test_bad_shapes_and_dtypes_give_clean_errors(triton, shape, dtype, message):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.ports['grpc']}")
    inp = grpcclient.InferInput(onnx_export.INPUT, list(shape), dtype)
    inp.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if dtype == "FP32" else np.float64))
    for model in registry.MODELS:
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, [inp])
        assert message in str(err.value)
    assert client.is_server_live() and client.is_model_ready("forecaster")  # the server survived it


def test_client_degrades_instead_of_raising_on_bad_input(triton):
    async def run():
        client = _client(triton, breaker_failures=1, breaker_reset_s=60)
        try:
            bad = await client.infer(np.zeros((3, K + 2), np.float32))
            after = await client.infer(np.zeros((3, K), np.float32))  # breaker open: not even sent
            return bad, after, client.breaker.state
        finally:
            await client.close()

    bad, after, state = asyncio.run(run())
    assert not bad.served.any() and np.isnan(bad.forecast).all()
    assert not after.served.any() and state == "open"


def test_models_run_on_gpus_where_triton_has_them_else_on_cpu(triton):
    """KIND_AUTO in the committed configs: Triton resolves it to GPU instances when it sees a GPU and
    to one CPU instance otherwise (this machine's kind decides which the served config must show)."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.ports['grpc']}")
    gpus = shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU ") > 0
    for name in registry.MODELS:
        groups = client.get_model_config(name, as_json=True)["config"]["instance_group"]
        assert [g["kind"] for g in groups] == ["KIND_GPU" if gpus else "KIND_CPU"], groups
