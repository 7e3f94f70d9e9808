"""LoRA (peft) for the RL stage: `model.lora_r > 0` trains low-rank adapters instead of every parameter.

- `apply_lora` wraps the policy in a peft model with adapters on `model.lora_target_modules` (rank `lora_r`,
  scale `lora_alpha / lora_r`, `lora_dropout`); the base weights are frozen, so the trainer's optimizer (built over
  the trainable parameters) holds AdamW states for the adapters alone. peft injects the adapter layers into the
  model's own modules, so rollouts generate with the adapted model.
- The KL reference is the same model under peft's `disable_adapter()`: the starting weights, without a second
  copy of them in memory (`rl_step.Reference`). The full-parameter path keeps its separate frozen reference.
- Training checkpoints (DCP, `tspo_core.train.checkpoint`) hold the adapters and their optimizer states alone
  beside the scheduler and RNG states. `lora_settings` is stored with them and is part of the trainer's
  fingerprint: a checkpoint resumes only into a run with the same LoRA settings. With FSDP2 the adapters are
  injected before the model is sharded.
- `write_merged_model` writes the stage's final model: the adapters merged into the base weights (in fp32, on the
  CPU), a plain HF checkpoint in the layout the full-parameter path writes, which `load_policy`, evaluation and
  vLLM read without peft.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from tspo_core.config import ModelConfig
from tspo_core.errors import ConfigError
from tspo_core.train.checkpoint import copy_checkpoint_files

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")
"""What peft's `save_pretrained` writes into a checkpoint (README.md: its model card)."""


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the whole module name or a dotted suffix of it."""
    return module_name == target or module_name.endswith("." + target)


def apply_lora(model, cfg: ModelConfig, seed: int = 0):
    """`model` wrapped in a peft LoRA model per `cfg.lora_*`; only the adapters require gradients.

    The adapters are initialized from `seed` (identical on every rank) without touching the global RNG. Every
    name in `cfg.lora_target_modules` must match a module (peft itself ignores a name that matches nothing as
    long as another one matches), and no adapted weight may be shared with another module (a tied output head:
    merging into it would change the input embeddings too).
    """
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules() if n]
    unmatched = [t for t in cfg.lora_target_modules if not any(_matches(n, t) for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"model.lora_target_modules: {unmatched} match no module of the model; its linear "
                          f"layers are named {linear}")
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.nn.Parameter):
            owners.setdefault(id(w), []).append(n)
    shared = sorted({n for group in owners.values() if len(group) > 1 for n in group
                     if any(_matches(n, t) for t in cfg.lora_target_modules)})
    if shared:
        raise ConfigError(f"model.lora_target_modules: {shared} share their weight with another module (tied "
                          "embeddings); an adapter there cannot be merged into a plain checkpoint. Leave them out.")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # e.g. a name that matches only a module type LoRA cannot adapt
            raise ConfigError(f"model.lora_target_modules = {list(cfg.lora_target_modules)}: peft cannot adapt "
                              f"them: {str(err)[:300]}") from None


def lora_settings(model) -> dict[str, Any] | None:
    """The LoRA settings of a peft-wrapped policy (stored in checkpoints, part of the trainer's fingerprint);
    None for a plain model (full-parameter training)."""
    peft = sys.modules.get("peft")  # not imported: the model cannot be a peft model
    if peft is None or not isinstance(model, peft.PeftModel):
        return None
    c = model.peft_config[model.active_adapter]
    return {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "target_modules": sorted(c.target_modules)}


def describe(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "all parameters (model.lora_r = 0)"
    return (f"LoRA adapters (model.lora_r = {settings['r']}, lora_alpha = {settings['alpha']}, lora_dropout = "
            f"{settings['dropout']}, lora_target_modules = {settings['target_modules']})")


def write_merged_model(ckpt_dir: str | Path, model_dir: str | Path, base_dir: str | Path, cfg: ModelConfig) -> None:
    """Atomically write `model_dir`: the base checkpoint `base_dir` with the adapters in `ckpt_dir` (peft's
    `save_pretrained` layout, written by `rl.export_model`) merged in, saved as a plain HF model (fp32, like the full-parameter path's master weights), with the
    checkpoint's tokenizer and history files. The merge runs on the CPU (host memory: 4 bytes per parameter)."""
    from peft import PeftModel

    from tspo_core.io import atomic_dir
    from tspo_core.policy import load_policy

    ckpt_dir = Path(ckpt_dir)
    base, _ = load_policy(base_dir, cfg.model_copy(update={"dtype": "float32"}), "cpu")
    merged = PeftModel.from_pretrained(base, str(ckpt_dir)).merge_and_unload()
    with atomic_dir(model_dir) as tmp:
        copy_checkpoint_files(ckpt_dir, tmp, skip=ADAPTER_FILES)
        merged.save_pretrained(tmp)
