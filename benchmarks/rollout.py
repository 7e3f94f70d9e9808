"""Multi-turn rollout speed: this engine (stop strings, token-in/token-out) vs a Search-R1-style loop.

The Search-R1-style loop generates each turn's full token budget without stop strings, decodes, cuts the text at
the first `</search>` / `</answer>`, and re-tokenizes the whole history for the next turn. Both use the same
sampler (`HFBackend`), model, questions, batch and retriever, so the difference is the loop alone.

    python benchmarks/rollout.py --model artifacts/sft --index artifacts/index --data data --n 64

Writes a markdown table to benchmarks/results/rollout.md (and prints it).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from tspo_core.agent.backends import HFBackend
from tspo_core.agent.protocol import STOP_STRINGS, build_prompt, format_observation, parse_action
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import ModelConfig
from tspo_core.data.loaders import load_flashrag_jsonl
from tspo_core.policy import load_policy
from tspo_core.retrieval.retriever import load_retriever


def search_r1_style(backend: HFBackend, tok, retriever, questions, s: RolloutSettings, temperature: float):
    """Returns (rollouts done, policy tokens kept, tokens sampled)."""
    texts = [build_prompt(q.question, s.prompt_template) for q in questions]
    active = list(range(len(questions)))
    kept = sampled = 0
    for turn in range(s.max_turns + 1):
        if not active:
            break
        ctx = [tok.encode(texts[i], add_special_tokens=False) for i in active]  # re-tokenized every turn
        gens = backend.generate(ctx, [s.max_new_tokens_per_turn] * len(active), temperature, 1.0, stop=())
        searching = []
        for i, g in zip(active, gens):
            sampled += len(g.token_ids)
            text = tok.decode(g.token_ids)
            cut = min((text.find(t) + len(t) for t in STOP_STRINGS if t in text), default=len(text))
            text = text[:cut]
            kept += len(tok.encode(text, add_special_tokens=False))
            texts[i] += text
            a = parse_action(text)
            if a.kind == "search" and turn < s.max_turns:
                searching.append((i, a.content))
        if searching:
            results = retriever.search([q for _, q in searching], s.top_k)
            for (i, _), passages in zip(searching, results):
                texts[i] += format_observation(passages)
        active = [i for i, _ in searching]
    return len(questions), kept, sampled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="artifacts/sft")
    ap.add_argument("--index", default="artifacts/index")
    ap.add_argument("--data", default="data")
    ap.add_argument("--n", type=int, default=64, help="questions (the batch)")
    ap.add_argument("--budget", type=int, default=500, help="max new tokens per turn (Search-R1: 500)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompt-template", default="compact")
    ap.add_argument("--out", default="benchmarks/results/rollout.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_policy(args.model, ModelConfig())
    model.eval()
    retriever = load_retriever(args.index)
    questions = []
    for name in ("nq", "hotpotqa"):
        questions += load_flashrag_jsonl(Path(args.data) / name / "dev.jsonl")[: args.n // 2]
    s = RolloutSettings(max_turns=args.turns, max_new_tokens_per_turn=args.budget, max_obs_tokens=500,
                        max_context_tokens=4096, top_k=3, prompt_template=args.prompt_template)
    backend = HFBackend(model, tok)
    engine = RolloutEngine(backend, tok, retriever, s)

    rows = []
    t0 = time.perf_counter()
    batch = engine.run(questions, group_size=1, temperature=args.temperature)
    dt = time.perf_counter() - t0
    kept = sum(r.num_policy_tokens for r in batch.rollouts)
    rows.append(("this engine (stop strings, token-in/token-out)", len(questions) / dt, kept / dt, kept, dt))
    t0 = time.perf_counter()
    n, kept_b, sampled_b = search_r1_style(backend, tok, retriever, questions, s, args.temperature)
    dt_b = time.perf_counter() - t0
    rows.append(("Search-R1-style (full budget, cut, re-tokenize)", n / dt_b, kept_b / dt_b, kept_b, dt_b))

    lines = [f"Model `{args.model}` ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
             f"{len(questions)} questions (nq + hotpotqa dev), budget {args.budget} tokens/turn, {args.turns} "
             f"turns, top-3, temperature {args.temperature}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
             "| loop | rollouts/s | kept policy tokens/s | kept tokens | wall s |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]} | {r[4]:.1f} |" for r in rows]
    lines += ["", f"Speed-up (rollouts/s): **{rows[0][1] / rows[1][1]:.1f}x**; the Search-R1-style loop sampled "
              f"{sampled_b} tokens to keep {kept_b}."]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
