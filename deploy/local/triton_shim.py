#!/opt/python/bin/python
"""`tritonserver ARGS...` for the wheel build: the arguments NVIDIA's image takes, plus what the
wheel needs (aimass.core.stack's backend directory of symlinks, the venv's python3 on PATH, its
libpython on LD_LIBRARY_PATH), no pinned memory pool and no GPU metrics on a CPU-only host."""
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from aimass.core.stack import triton_backend_dir, triton_home

backends = triton_backend_dir(Path(tempfile.mkdtemp(prefix="triton-")))
env = dict(os.environ)
env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
env["LD_LIBRARY_PATH"] = f"{sysconfig.get_config_var('LIBDIR')}:{env.get('LD_LIBRARY_PATH', '')}"
binary = str(triton_home() / "bin" / "tritonserver")
os.execve(binary, [binary, *sys.argv[1:], f"--backend-directory={backends}", "--allow-gpu-metrics=false",
                   "--pinned-memory-pool-byte-size=0"], env)
