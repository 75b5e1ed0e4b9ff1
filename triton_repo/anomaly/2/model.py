"""Triton Python-backend model that runs the ``model.onnx`` next to it with onnxruntime.

This file is the single source of every ``triton_repo/<model>/<version>/model.py`` (the
registry copies it into each version it writes), so a version folder is self-contained and
serves on a CPU tritonserver or a GPU Triton alike: the CUDA execution provider is chosen when
Triton placed this instance on a GPU and onnxruntime has CUDA, the CPU provider otherwise.
Requests that dynamic batching groups together run as ONE onnxruntime call.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _providers(kind: str, device_id: str) -> list:
    """Execution providers for this instance: CUDA on a GPU instance when available, else CPU."""
    if kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(device_id or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TritonPythonModel:
    """One ONNX graph: the config's first input in, every configured output out."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # Triton scales with instances; one thread avoids oversubscription
        self.session = ort.InferenceSession(path, options, providers=_providers(
            args.get("model_instance_kind", "CPU"), args.get("model_instance_device_id", "0")))

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(x) for x in inputs]
        outputs = self.session.run(self.output_names, {self.input_name: np.concatenate(inputs)})
        bounds = np.cumsum(sizes)[:-1]
        per_request = [np.split(out, bounds) for out in outputs]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(name, parts[i])
                                            for name, parts in zip(self.output_names, per_request)])
                for i in range(len(requests))]

    def finalize(self):
        self.session = None
