"""Worker for test_rl.test_two_processes_match_one_process (run as a separate process per rank)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_rl import make_trainer, params_of  # noqa: E402


out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
trainer = make_trainer(world=world, rank=rank)
exp = torch.load(out / "exp.pt", weights_only=False)
B = len(exp.batch.rollouts)
half = slice(rank * B // world, (rank + 1) * B // world)
exp.batch.rollouts = exp.batch.rollouts[half]
exp.batch.tensors = type(exp.batch.tensors)(*(getattr(exp.batch.tensors, f)[half] for f in
                                               ("input_ids", "attention_mask", "policy_mask", "obs_mask", "turn_index")))
exp.batch.logprobs, exp.batch.group_ids = exp.batch.logprobs[half], exp.batch.group_ids[half]
exp.outcome, exp.em, exp.first_occurrence = exp.outcome[half], exp.em[half], exp.first_occurrence[half]
exp.advantages = exp.advantages[half]
trainer.update(exp)
torch.save(params_of(trainer), out / f"rank{rank}.pt")
dist.destroy_process_group()
