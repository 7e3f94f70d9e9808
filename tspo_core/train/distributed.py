"""Data parallelism for the RL stage on PyTorch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`).

- World size 1 trains the plain model (nothing is wrapped: the single-process run stays what it was).
- World size > 1 shards every decoder layer (the model's `_no_split_modules`) and the root over all ranks, gloo on
  the CPU and NCCL on GPUs (the process group set up by the caller, `flows.train`). Each rank then holds 1/N of
  the parameters, gradients and AdamW states; FSDP all-gathers a layer's parameters for its forward and backward
  and reduce-scatters its gradients. The reduction is a plain SUM (no division by the world size): the RL loss is
  already divided by the global token count (`rl_step.update`), so N ranks give the update of one process.
- bf16 (`model.dtype: bfloat16`, full-parameter): `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`:
  bf16 parameters for compute, gradients reduced in fp32, the sharded fp32 parameters stay the master weights.
- Rollouts (HF `generate`, a different number of forward calls on every rank) run on gathered parameters
  (`gathered`): one all-gather before, no collective during generation, the shards freed after.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Dist":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks in place (metrics, the loss denominator). NCCL reduces only CUDA tensors: a CPU
        tensor travels through the current GPU and back."""
        if self.world > 1:
            import torch.distributed as dist

            if not x.is_cuda and dist.get_backend() == "nccl":
                y = x.cuda()
                dist.all_reduce(y, op=dist.ReduceOp.SUM)
                x.copy_(y.cpu())
            else:
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        self.all_sum(torch.zeros(1))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of an HF model (or of the model under a peft wrapper): `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__}: no decoder layer found to shard (_no_split_modules = {names})")
    return layers


def shard(model, bf16: bool = False):
    """`fully_shard` every decoder layer and then the root of `model` (in place; returns it), gradients summed
    over ranks. A peft LoRA model is sharded after its adapters are injected: frozen base and trainable adapters
    are sharded alike, and the optimizer built afterwards over the trainable parameters holds adapter shards."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # SUM, not the default mean over ranks; gloo has no PREMUL_SUM, so the sum is forced explicitly
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Within: every FSDP module of `model` holds its full parameters and forwards without any collective, so
    the ranks may run different numbers of forwards (generation). Nothing to do for an unsharded model."""
    if model is None or not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU; under FSDP a collective (every rank must call it) whose result is
    on rank 0 alone (the other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
