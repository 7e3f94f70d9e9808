"""Worker for test_rl's two-process tests (one process per rank, gloo): `python _rl_ddp_worker.py DIR KIND`.

For each setting in DIR/single.pt (plain, lora):
- a fresh FSDP2-sharded trainer takes, at each step, this rank's half of the rollouts the single process used,
  updates, and writes the per-step metrics and the gathered full parameters to DIR/<setting>_rank<r>.pt; after
  the first step it writes a DCP checkpoint, DIR/ck2_<setting> (resumed on one process by the test);
- a trainer resumes from the one-process checkpoint DIR/ck1_<setting> and makes the second update:
  DIR/<setting>_from1_rank<r>.pt;
then (plain only) a 2-step `fit` with rollouts, checkpoints and the final model export: DIR/fit_*.
"""

import copy
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rl import LORA_SETTINGS, RANKS_LR, make_trainer  # noqa: E402
from tspo_core.train.distributed import full_state_dict  # noqa: E402
from tspo_core.train.rl import export_model  # noqa: E402
from tspo_core.train.weight_sync import policy_weights  # noqa: E402


def half(exp, rank, world):
    """The rollouts rank `rank` would hold: its contiguous share of the batch (a copy)."""
    exp = copy.deepcopy(exp)
    B = len(exp.batch.rollouts)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    t = exp.batch.tensors
    exp.batch.rollouts = exp.batch.rollouts[rows]
    exp.batch.tensors = type(t)(**{f.name: getattr(t, f.name)[rows] for f in dataclasses.fields(t)})
    exp.batch.logprobs, exp.batch.group_ids = exp.batch.logprobs[rows], exp.batch.group_ids[rows]
    exp.outcome, exp.em, exp.first_occurrence = exp.outcome[rows], exp.em[rows], exp.first_occurrence[rows]
    exp.advantages = exp.advantages[rows]
    return exp


out = Path(sys.argv[1])
# a file store: the ranks meet through a file, no TCP store listens on a port
dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]))
rank, world = dist.get_rank(), dist.get_world_size()
single = torch.load(out / "single.pt", weights_only=False)
for name, run in single.items():
    trainer = make_trainer(world=world, rank=rank, lora=LORA_SETTINGS[name], lr=RANKS_LR)
    metrics = []
    for exp in run["experiences"]:
        metrics.append(trainer.update(half(exp, rank, world)))
        trainer.step += 1
        if trainer.step == 1:
            trainer.save(out / f"ck2_{name}")
    torch.save({"metrics": metrics, "params": full_state_dict(trainer.model),
                # what the colocated vLLM engine of every rank receives (gathered from the shards, LoRA merged)
                "pushed": {k: v.clone() for k, v in policy_weights(trainer.model)}},
               out / f"{name}_rank{rank}.pt")

    resumed = make_trainer(world=world, rank=rank, lora=LORA_SETTINGS[name], lr=RANKS_LR)
    resumed.resume(out / f"ck1_{name}")
    m = resumed.update(half(run["experiences"][1], rank, world))
    torch.save({"step": resumed.step, "metrics": [m], "params": full_state_dict(resumed.model)},
               out / f"{name}_from1_rank{rank}.pt")

fitted = make_trainer(world=world, rank=rank, steps=2, lr=RANKS_LR)
fitted.fit(out / "fit_ck")
export_model(fitted, out / "fit_model", None, None)
torch.save({"history": fitted.history, "params": full_state_dict(fitted.model)}, out / f"fit_rank{rank}.pt")
dist.destroy_process_group()
