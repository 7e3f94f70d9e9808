"""Checkpoints that survive crashes: written to a temporary directory and renamed into place, so the previous
checkpoint stays loadable if the process dies, the disk fills or the directory is unwritable mid-write.

A checkpoint directory holds the HF model (`save_pretrained`) and tokenizer, `trainer_state.pt` (optimizer,
scheduler, RNG states, step) and `history.json` (per-step metrics so far). Nothing with a non-finite parameter is
ever written. For a peft LoRA policy `save_pretrained` writes the adapters alone (`adapter_model.safetensors`,
`adapter_config.json`): the frozen base weights are the run's starting checkpoint (`tspo_core.train.lora`).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from tspo_core.errors import TSPOError
from tspo_core.io import atomic_dir

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"


class CheckpointError(TSPOError):
    """A checkpoint that cannot be written or loaded (the message names the directory)."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: str | Path, model, tokenizer, state: dict[str, Any], history: list[dict]) -> None:
    """Atomically replace `path` with a checkpoint of `model` and the trainer `state` (refuses NaN/inf weights)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{path}: refusing to checkpoint non-finite parameters ({bad[:3]} ...)")
    try:
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)
            (tmp / HISTORY_FILE).write_text(json.dumps(history), encoding="utf-8")
    except (OSError, RuntimeError, SafetensorError) as err:
        # a full disk surfaces as OSError from plain writes, RuntimeError from torch.save's zip writer and
        # SafetensorError from save_pretrained
        raise CheckpointError(f"{path}: cannot write checkpoint ({err}); the previous one is intact") from err


def copy_checkpoint_files(ckpt_dir: str | Path, dest: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the files of checkpoint `ckpt_dir` into the directory `dest`, except the trainer state and `skip`:
    what a stage's final model keeps of its last training checkpoint (weights, tokenizer, history)."""
    for f in Path(ckpt_dir).iterdir():
        if f.is_file() and f.name not in (STATE_FILE, *skip):
            shutil.copy2(f, Path(dest) / f.name)


def load_trainer_state(path: str | Path) -> tuple[dict[str, Any], list[dict]]:
    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
        history = json.loads((path / HISTORY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {err}") from err
    return state, history
