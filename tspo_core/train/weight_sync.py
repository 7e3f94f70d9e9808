"""The trainer's weights as an inference engine loads them: `(HF name, full tensor)` pairs, one at a time.

`policy_weights(model)` walks the policy's state dict and yields each tensor under the name of the plain HF
checkpoint the stage exports (so vLLM's own loader maps it, e.g. q/k/v into its fused projection):

- a plain model: its state dict as it is;
- FSDP2 (world > 1): each sharded parameter gathered to a full tensor (`DTensor.full_tensor()`, an all-gather:
  every rank must iterate, in the same order) just before it is yielded, so at most one full tensor beyond the
  shards is alive at a time;
- a peft LoRA policy: the adapters merged on the fly, `W + scaling * B @ A` for each adapted linear layer (in fp32,
  then cast back to the base weight's dtype), under the base layer's name; adapter tensors themselves are not
  yielded. The model itself is never modified (no merge/unmerge round trip that would round the base weights).

Tensors stay on the device they are on; the consumer copies them into its own parameters (`VLLMBackend.push_weights`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from tspo_core.errors import ConfigError


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor from a DTensor shard (a collective), any other tensor as it is."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` for every entry of the plain HF checkpoint of `model` (see the module docstring)."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        yield from _merged_lora(model)
        return
    for name, tensor in model.state_dict().items():
        yield name, _full(tensor).detach()


def _merged_lora(model) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, m in layers.items():
        if getattr(m, "use_dora", {}).get(adapter, False) or adapter in getattr(m, "lora_embedding_A", {}):
            raise ConfigError(f"model.lora_target_modules: {name} is a DoRA or embedding adapter; merging it for "
                              "the inference engine is not implemented (adapt linear layers only)")
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:  # adapter weights: merged into their base layer below
            continue
        if ".base_layer." not in key:
            yield key, _full(tensor).detach()
            continue
        owner, _, leaf = key.partition(".base_layer.")
        weight = _full(tensor).detach()
        layer = layers.get(owner)
        if leaf == "weight" and layer is not None and adapter in layer.lora_A:
            a = _full(layer.lora_A[adapter].weight).detach().float()  # (r, in)
            b = _full(layer.lora_B[adapter].weight).detach().float()  # (out, r)
            delta = (b @ a) * layer.scaling[adapter]  # (out, in)
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            weight = (weight.float() + delta.to(weight.device)).to(weight.dtype)
        yield f"{owner}.{leaf}", weight
