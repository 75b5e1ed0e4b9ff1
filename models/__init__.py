"""Stage: the models behind predictions. Online River models, the Triton client and model
repository registry, feature scaling, training, ONNX export and `aimass train` / `aimass models`."""
