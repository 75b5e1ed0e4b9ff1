"""Stage: the models behind predictions. The online detectors (per series and per device), the
Triton client and model repository registry, feature scaling, training, ONNX export, detection
evaluation and `aimass train` / `aimass models`."""
