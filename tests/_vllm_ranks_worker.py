"""Worker for test_vllm_rl's two-rank test (one process per rank, gloo, a file store):
`python _vllm_ranks_worker.py DIR START`. An FSDP2-sharded trainer whose rollouts each rank samples with its own
colocated vLLM engine (vLLM's external launcher, in the trainer's process group) fits 2 steps from the checkpoint
START; then each rank compares its engine's greedy continuations with HF's greedy of the gathered trained weights
and writes DIR/rank<r>.pt."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vllm_rl import TEXTS, greedy, load, rl_settings, rollout_engine  # noqa: E402
from tspo_core.agent.backends import HFBackend, VLLMBackend  # noqa: E402
from tspo_core.train.distributed import Dist, gathered  # noqa: E402
from tspo_core.train.rl import RLTrainer  # noqa: E402
from test_rl import QUESTIONS  # noqa: E402

out, start = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]))
rank, world = dist.get_rank(), dist.get_world_size()
engine = VLLMBackend.from_pretrained(str(start), dtype="float32", kv_cache_gb=0.0625, enforce_eager=True,
                                     seed=rank)
model, tok = load(start)
trainer = RLTrainer(model, load(start)[0], tok, rollout_engine(engine, tok), QUESTIONS, rl_settings(steps=2),
                    Dist(rank, world))
history = trainer.fit(out / "ck")
with gathered(trainer.model):
    same = greedy(engine, tok)[0] == greedy(HFBackend(trainer.model, tok), tok)[0]
torch.save({"history": history, "greedy_equal": same, "prompts": len(TEXTS)}, out / f"rank{rank}.pt")
dist.destroy_process_group()
