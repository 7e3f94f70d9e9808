"""What a result depends on beyond its inputs: the machine's floating-point kernels, threads and library versions.

One pipeline run is bitwise deterministic on one machine (same CPU, threads and versions); on another CPU the
vectorized kernels round differently, SFT's 2,000 steps amplify that, and the numbers move within the seed band the
README states. Every metrics file records `environment()` under `meta` so that two results can be told apart.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

_PACKAGES = ("torch", "transformers", "faiss-cpu", "sentence-transformers", "numpy", "vllm")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """CPU capability as torch dispatches it (e.g. AVX512, AVX2), torch's thread count, the thread settings in the
    environment, the machine, Python and the versions of the numeric libraries (None when not installed)."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
        "thread_env": {k: os.environ[k] for k in _THREAD_VARS if k in os.environ},
    }
