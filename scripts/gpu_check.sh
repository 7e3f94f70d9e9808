#!/usr/bin/env bash
# The prepared GPU check (issue 15, item 7). Never part of CI. For a bare single-GPU box: a checkout of this
# repository and a Python with PyTorch (CUDA build), transformers and peft installed; no network, no pip, none of
# the project's other dependencies (prefect, dvc, wandb, faiss, bm25s, fastapi are never imported).
#
#   bash scripts/gpu_check.sh                                 # on the GPU box: ~2-4 min expected, 8 min at most
#   bash scripts/gpu_check.sh --device cpu --steps 2 --small  # smoke test of the script on a CPU machine
#
# 1. the `gpu`-marked tests that can run there (tests/test_gpu_paths.py, tests/test_vllm_backend.py: bf16 loading
#    on cuda, one RL step on cuda in fp32 and bf16; the faiss-gpu, packaged-encoder and vLLM tests skip with their
#    reason), when pytest is installed; otherwise skipped with a message;
# 2. scripts/gpu_check.py: 20 bf16 RL steps of a ~63M-parameter Qwen2 built from a config on the embedded
#    synthetic world, sharded with FSDP2 on a 1-rank process group; prints step time, tokens/s and peak GPU memory.
# Arguments go to scripts/gpu_check.py (`--help`). Environment: PYTHON (default python). Exit status: 0 when every
# part that ran passed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    WANDB_MODE=disabled PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "yaml", "pydantic", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)} (torch, transformers and peft install the rest)")
import peft, torch, transformers
cuda = torch.cuda.is_available()
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}; "
      + (f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name()}" if cuda else "no CUDA device"))
EOF

status=0
echo "== 1. gpu-marked tests"
if "$PY" -c "import pytest" 2>/dev/null; then
    "$PY" -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_vllm_backend.py || status=1
else
    echo "gpu_check: pytest is not installed here: the gpu-marked tests are skipped (pip install pytest to run them)"
fi

echo "== 2. 20-step bf16 RL run (FSDP2, world size 1)"
timeout 600 "$PY" scripts/gpu_check.py "$@"
rc=$?
if [ $rc -eq 124 ]; then
    echo "gpu_check: the RL run was stopped after 600 s (the budget is 480 s)"
fi
[ $rc -eq 0 ] || status=1

if [ $status -eq 0 ]; then echo "gpu_check: PASSED"; else echo "gpu_check: FAILED"; fi
exit $status
