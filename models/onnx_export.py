"""ONNX graphs built from numpy weights with ``onnx.helper`` (no deep-learning framework).

Both graphs take ``FEATURES`` float32 [batch, K] (see models/features.py):
- forecaster: ``FORECAST`` [batch, 1] = FEATURES @ w + b, the next window's normalized mean;
- anomaly: a linear autoencoder, ``SCORE`` [batch, 1] = 1 - 0.5 ** (err / err_ref) where err is
  the mean squared reconstruction error and err_ref the training error at the 99th
  percentile: 0 = perfectly normal, 0.5 = as odd as the rarest 1% of training data, -> 1.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT = "FEATURES"
FORECAST = "FORECAST"
SCORE = "SCORE"


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(nodes: list, inits: list, k: int, output: str, name: str, doc: str) -> bytes:
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], doc_string=doc,
                              producer_name="aimass")
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def forecaster_onnx(weights: np.ndarray, bias: float) -> bytes:
    """A linear (ridge/AR) forecaster: weights [K], bias scalar."""
    k = len(weights)
    nodes = [helper.make_node("MatMul", [INPUT, "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], [FORECAST])]
    inits = [_const("w", np.reshape(weights, (k, 1))), _const("b", [bias])]
    return _model(nodes, inits, k, FORECAST, "forecaster", "next normalized window mean = x @ w + b")


def anomaly_onnx(center: np.ndarray, encoder: np.ndarray, decoder: np.ndarray, err_ref: float) -> bytes:
    """A linear autoencoder scorer: center [K], encoder [K, r], decoder [r, K], err_ref > 0."""
    k = len(center)
    nodes = [
        helper.make_node("Sub", [INPUT, "center"], ["xc"]),
        helper.make_node("MatMul", ["xc", "enc"], ["code"]),
        helper.make_node("MatMul", ["code", "dec"], ["recon"]),
        helper.make_node("Sub", ["xc", "recon"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("MatMul", ["sq", "mean_k"], ["err"]),          # mean over K as a matmul
        helper.make_node("Mul", ["err", "neg_rate"], ["log_keep"]),     # -ln2 * err / err_ref
        helper.make_node("Exp", ["log_keep"], ["keep"]),
        helper.make_node("Sub", ["one", "keep"], [SCORE]),
    ]
    inits = [_const("center", center), _const("enc", encoder), _const("dec", decoder),
             _const("mean_k", np.full((k, 1), 1.0 / k)), _const("neg_rate", [-np.log(2.0) / err_ref]),
             _const("one", [1.0])]
    return _model(nodes, inits, k, SCORE, "anomaly", "1 - 0.5 ** (reconstruction mse / err_ref)")
