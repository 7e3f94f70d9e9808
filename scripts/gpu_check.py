"""A 20-step bf16 RL run through FSDP2 on one GPU, for a bare GPU box (issue 15, item 7; run by gpu_check.sh).

Needs only PyTorch, transformers and peft (and what they install: numpy, pyyaml, pydantic via typer), no network:
no index, no retrieval server, no prefect/dvc/wandb/faiss/bm25s. What runs is the trainer of the `train` stage:

1. the embedded world: `configs/tiny.yaml`'s synthetic world written by the data stage's own
   `tspo_core.data.build.build_datasets` into a temporary directory (corpus, lexicon, `rl_train.jsonl`);
2. the policy: the tiny Qwen2 of `tspo_core.pipeline.init_policy` built from `model.tiny` (default 768 hidden,
   10 layers: about 63M parameters, printed), saved as the SFT checkpoint and loaded back as `run_rl` does
   (`training_precision`: fp32 master weights under bf16 autocast; the frozen reference in bf16);
3. retrieval: `TitleRetriever`, a dict over the corpus's passage titles (a name in the query returns its passage),
   standing in for the FAISS/BM25 index, which needs packages the bare box lacks;
4. FSDP2 at world size 1: the trainer shards only when the world size is above 1 (at 1 it trains the plain model),
   so this script opens a 1-rank process group (NCCL on cuda, gloo on cpu) and shards the policy and the reference
   with the trainer's own `tspo_core.train.distributed.shard(bf16=True)`, the path every rank takes on 8 GPUs
   (bf16 `MixedPrecisionPolicy`, fp32 reduction, rollouts on gathered parameters), then `RLTrainer.fit` with a DCP
   checkpoint at the end and `export_model` (the full state dict gathered into a plain HF checkpoint).
   `--no-fsdp` trains the plain model instead (what `torchrun`-less world size 1 does).

Prints per step and in total: step time (median of the steps after the first), tokens/s (generated tokens per
second of step; trained tokens, prompt + response, per second of update) and peak GPU memory
(`torch.cuda.max_memory_allocated`). Exit status 1 when the run takes longer than `--budget-s` (480).

    python scripts/gpu_check.py                               # the GPU check (cuda, 20 steps)
    python scripts/gpu_check.py --device cpu --steps 2 --small  # CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_MODEL = {"num_hidden_layers": 10, "hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
             "num_key_value_heads": 4, "max_position_embeddings": 1024}
SMALL_MODEL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 1024}


class TitleRetriever:
    """Top-k passages whose title occurs in the query (longest titles first); no index, no extra package."""

    def __init__(self, passages):
        self.by_title: dict[str, list] = {}
        for p in passages:
            self.by_title.setdefault(p.title.lower(), []).append(p)
        self.titles = sorted(self.by_title, key=len, reverse=True)

    def search(self, queries, top_k):
        out = []
        for q in queries:
            q = q.lower()
            hits = [p for t in self.titles if t in q for p in self.by_title[t]]
            out.append(hits[:top_k])
        return out


def overrides(args) -> dict:
    return {"model.tiny": SMALL_MODEL if args.small else GPU_MODEL, "model.dtype": args.dtype,
            "model.gradient_checkpointing": args.gradient_checkpointing,
            "rollout.group_size": args.group_size, "rollout.max_turns": 2, "rollout.max_new_tokens_per_turn":
            args.max_new_tokens, "rollout.max_context_tokens": 512, "optim.lr": 1e-5, "optim.kl_coef": 0.001,
            "train.steps": args.steps, "train.prompts_per_step": args.prompts,
            "train.mini_batch_size": args.prompts * args.group_size, "train.micro_batch_size": args.micro_batch,
            "train.checkpoint_every": args.steps, "train.eval_every": 0}


def init_process_group(device: str) -> None:
    import torch.distributed as dist

    store = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "store"  # a file store: no TCP store on any port
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, help="questions per step (16; --small: 4)")
    ap.add_argument("--group-size", type=int, help="rollouts per question (5; --small: 2)")
    ap.add_argument("--max-new-tokens", type=int, help="per turn, 2 turns (48; --small: 16)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--no-fsdp", action="store_true", help="train the plain model (no 1-rank FSDP2)")
    ap.add_argument("--small", action="store_true", help="a 2-layer 64-wide model, 4 x 2 rollouts (CPU smoke test)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    args = ap.parse_args()
    for key, full, small in (("prompts", 16, 4), ("group_size", 5, 2), ("max_new_tokens", 48, 16)):
        if getattr(args, key) is None:
            setattr(args, key, small if args.small else full)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: pipeline.device() then says "cpu"
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    t_start = time.monotonic()

    import torch

    from tspo_core.config import load_params
    from tspo_core.data.build import build_datasets
    from tspo_core.data.loaders import load_corpus, load_flashrag_jsonl
    from tspo_core.pipeline import device, init_policy, make_engine, prepare_for_training, training_precision
    from tspo_core.policy import load_policy
    from tspo_core.train.distributed import Dist, shard
    from tspo_core.train.rl import RLSettings, RLTrainer, export_model

    if device() != args.device:
        print(f"gpu_check: --device {args.device} but torch sees {device()} "
              f"(torch.cuda.is_available() = {torch.cuda.is_available()})")
        return 2
    cuda = args.device == "cuda"
    params = load_params(ROOT / "configs" / "tiny.yaml", overrides(args))
    fsdp = not args.no_fsdp
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        tmp = Path(tmp)
        paths = params.paths.model_copy(update={"data_dir": str(tmp / "data"), "sft_dir": str(tmp / "sft")})
        build_datasets(params.data, paths.data_dir)
        questions = load_flashrag_jsonl(Path(paths.data_dir) / "rl_train.jsonl")
        retriever = TitleRetriever(load_corpus(Path(paths.data_dir) / "corpus.jsonl"))
        start, tok = init_policy(params.model, paths, seed=0)  # the tiny Qwen2 from model.tiny, on device()
        n_params = sum(p.numel() for p in start.parameters())
        start.save_pretrained(paths.sft_dir)
        tok.save_pretrained(paths.sft_dir)
        del start
        # as run_rl: the trained policy in fp32 (master weights) under bf16 autocast, the reference in model.dtype
        train_model, autocast = training_precision(params.model)
        policy, tok = load_policy(paths.sft_dir, train_model, device())
        prepare_for_training(policy, params.model)
        ref = load_policy(paths.sft_dir, params.model, device())[0]
        if fsdp:
            init_process_group(args.device)
            shard(policy, bf16=params.model.dtype == "bfloat16")
            shard(ref, bf16=params.model.dtype == "bfloat16")
        engine = make_engine(policy, tok, retriever, params.rollout, params.retrieval, params.model)
        cfg = RLSettings(params.rollout, params.reward, params.advantage, params.optim, params.train,
                         params.eval.answer_normalization)
        trainer = RLTrainer(policy, ref, tok, engine, questions, cfg, Dist.from_env() if fsdp else Dist(),
                            bf16=params.model.dtype == "bfloat16")
        trained_tokens: list[int] = []
        collect = trainer.collect

        def counting_collect(step):
            exp = collect(step)
            trained_tokens.append(int(exp.batch.tensors.attention_mask.sum()))
            return exp

        trainer.collect = counting_collect
        n_rollouts = min(params.train.prompts_per_step, len(questions)) * params.rollout.group_size
        print(f"gpu_check: {args.device} ({torch.cuda.get_device_name() if cuda else 'CPU'}), torch "
              f"{torch.__version__}, Qwen2 from model.tiny {params.model.tiny.model_dump()}: {n_params:,} "
              f"parameters, {params.model.dtype}, {'FSDP2 (1 rank)' if fsdp else 'plain model'}, gradient "
              f"checkpointing {params.model.gradient_checkpointing}; {params.train.steps} steps of "
              f"{n_rollouts} rollouts ({params.train.prompts_per_step} questions x G={params.rollout.group_size}, "
              f"{len(questions)} training questions, {params.rollout.max_turns} turns x "
              f"{params.rollout.max_new_tokens_per_turn} new tokens), micro-batch {params.train.micro_batch_size}",
              flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def on_step(rec, _history):
            gen = rec["response_tokens"] * n_rollouts
            upd = max(rec["step_s"] - rec["rollout_s"], 1e-9)
            print(f"step {rec['step']:3d}: {rec['step_s']:6.2f} s (rollout {rec['rollout_s']:.2f} s), "
                  f"generated {gen / rec['step_s']:8.0f} tok/s, trained {trained_tokens[-1] / upd:8.0f} tok/s, "
                  f"loss {rec['loss'] if rec['loss'] is not None else float('nan'):.4f}, kl {rec.get('kl', 0):.2e}, "
                  f"reward {rec['reward_mean']:.3f}"
                  + (f", peak GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""), flush=True)

        t_train = time.monotonic()
        with autocast:
            history = trainer.fit(tmp / "checkpoint", on_step=on_step)
        train_s = time.monotonic() - t_train
        export_model(trainer, tmp / "model", paths.sft_dir, params.model)
        assert (tmp / "model" / "config.json").is_file()
        if fsdp:
            import torch.distributed as dist

            dist.destroy_process_group()

    steps = sorted(h["step_s"] for h in history[1:]) or [history[0]["step_s"]]
    median = steps[len(steps) // 2]
    gen = sum(h["response_tokens"] * n_rollouts for h in history) / sum(h["step_s"] for h in history)
    upd = sum(trained_tokens) / sum(h["step_s"] - h["rollout_s"] for h in history)
    total = time.monotonic() - t_start
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "n/a (cpu)"
    print(f"gpu_check: {len(history)} steps in {train_s:.1f} s (total with set-up and export {total:.1f} s); median "
          f"step {median:.2f} s; generated {gen:.0f} tokens/s; trained {upd:.0f} tokens/s; peak GPU memory "
          f"(max_memory_allocated) {peak}; DCP checkpoint and HF export written")
    if total > args.budget_s:
        print(f"gpu_check: FAILED: {total:.0f} s is over the budget of {args.budget_s:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
