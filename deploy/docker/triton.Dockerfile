# NVIDIA's Triton Inference Server with what AI Mass's Python-backend models import
# (they run ONNX graphs through onnxruntime). The model repository is mounted, not copied:
#   docker build -f deploy/docker/triton.Dockerfile -t aimass-triton:24.10 deploy/docker
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# numpy<2: the Python backend stub of this release is built against numpy 1.x.
RUN pip install --no-cache-dir "numpy<2" "onnxruntime-gpu>=1.18,<2"
