"""What a result depends on beyond its inputs: the machine's floating-point kernels, threads and library versions.

One pipeline run is bitwise deterministic on one machine (same CPU, threads and versions); on another CPU the
vectorized kernels round differently, SFT's 2,000 steps amplify that, and the numbers move within the seed band the
README states. Every metrics file records `environment()` under `meta` so that two results can be told apart.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tspo_core.io import write_json

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


# ----------------------------------------------------------------------------------------------------------------
# run records: what varies between two identical runs, kept beside an artifact but out of its DVC hash
# ----------------------------------------------------------------------------------------------------------------
RUN_RECORD = "run_record.json"
"""In an artifact directory: what two identical runs write differently (timings, dates, absolute paths). DVC ignores
files of this name (`.dvcignore`), so an artifact's hash in dvc.lock, and what the stages after it see, depends on
its content alone: rerunning a stage with the same inputs leaves dvc.lock unchanged."""


def split_record(data: dict[str, Any], volatile: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stable, record): `data` without the keys at the dotted paths `volatile` ("encoding.encode_seconds"), and
    those keys alone, nested the same way; paths that are absent are skipped. `data` is not changed."""
    stable = json.loads(json.dumps(data))
    record: dict[str, Any] = {}
    for dotted in volatile:
        *parents, key = dotted.split(".")
        src, dst = stable, record
        for p in parents:
            if not isinstance(src.get(p), dict):
                break
            src, dst = src[p], dst.setdefault(p, {})
        else:
            if key in src:
                dst[key] = src.pop(key)
    return stable, _prune(record)


def merge_record(stable: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """`stable` with `record`'s keys put back at their places (the inverse of `split_record`)."""
    out = dict(stable)
    for k, v in record.items():
        out[k] = merge_record(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    return {k: p for k, v in d.items() if (p := _prune(v) if isinstance(v, dict) else v) != {}}


TIMING_SUFFIX = "_s"
"""Per-step history keys that are wall-clock seconds (`step_s`, `rollout_s`, `weight_sync_s`, `elapsed_s`)."""


def split_history(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows without their timing keys, the timing keys of each row): a training history's content and its clock."""
    rows = [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIX)} for r in history]
    timings = [{k: v for k, v in r.items() if k.endswith(TIMING_SUFFIX)} for r in history]
    return rows, timings


def merge_history(rows: list[dict[str, Any]], timings: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The inverse of `split_history`; rows without a recorded timing stay without one."""
    timings = timings or []
    return [{**r, **(timings[i] if i < len(timings) else {})} for i, r in enumerate(rows)]


def write_run_record(directory: str | Path, record: dict[str, Any]) -> None:
    """`record` as the run record of the artifact directory `directory`."""
    write_json(Path(directory) / RUN_RECORD, record)


def read_run_record(directory: str | Path) -> dict[str, Any]:
    """The run record of an artifact directory; {} when there is none (e.g. the artifact came from a DVC cache,
    which does not keep it) or it cannot be read (it only ever holds informational fields)."""
    try:
        return json.loads((Path(directory) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
