"""How well does a from-scratch SFT read? Trains the tiny policy for a fixed number of steps on the oracle's
trajectories and reports teacher-forced token accuracy on dev trajectories (query tokens vs answer tokens) and
greedy dev EM. Used to size the embedded default (README, "What made the tiny model learn").

    python benchmarks/sft_probe.py --steps 1200 --obs-loss-weight 0.5 --set retrieval.top_k=1

Needs the `data` and `index` stages' outputs (paths from the params file). Step-bounded, so results do not depend
on the machine's speed; wall time is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch
import yaml

from tspo_core.agent.backends import HFBackend
from tspo_core.agent.masks import build_masks
from tspo_core.config import FAMILIES, load_params
from tspo_core.pipeline import init_policy, load_split, make_engine, open_retriever
from tspo_core.train.sft import make_oracle_trajectories, sft_train, validate_protocol


def token_accuracy(policy, tokenizer, rollouts) -> dict[str, float]:
    """Teacher-forced argmax accuracy on policy tokens, split into search-query words and answer words (the
    protocol tags and the closing tags are counted apart: they are trivially right)."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    tags = {"</search>", "</answer>", "\u2581"}
    for r in rollouts:
        t = build_masks([r.segments], pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            pred = policy(input_ids=t.input_ids).logits[0, :-1].argmax(-1)
        target = t.input_ids[0, 1:]
        pos = 0
        for ids, kind, _ in r.segments:
            if kind == "policy":
                toks = tokenizer.convert_ids_to_tokens(list(ids))
                role = "answer" if toks[0] == "<answer>" else "query"
                for j in range(1, len(ids)):
                    key = "tags" if toks[j] in tags else role
                    hits[key][0] += int(pred[pos + j - 1] == target[pos + j - 1])
                    hits[key][1] += 1
            pos += len(ids)
    return {f"{k}_token_acc": round(a / n, 3) for k, (a, n) in sorted(hits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--obs-loss-weight", type=float, default=None, help="default: sft.obs_loss_weight")
    ap.add_argument("--dev-per-family", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    params = load_params(args.params, overrides)
    update = {"max_steps": args.steps, "max_minutes": 1e6}
    if args.obs_loss_weight is not None:
        update["obs_loss_weight"] = args.obs_loss_weight
    cfg = params.sft.model_copy(update=update)

    policy, tok = init_policy(params.model, params.paths, seed=cfg.seed)
    engine = make_engine(policy, tok, open_retriever(params.retrieval, params.paths), params.rollout,
                         params.retrieval, params.model)
    train = [ex for f in FAMILIES for ex in load_split(params.paths.data_dir, f, "train") if ex.metadata.get("hops")]
    random.Random(cfg.seed).shuffle(train)
    t0 = time.monotonic()
    oracle = make_oracle_trajectories(train, engine, cfg.imperfect_share, cfg.seed)
    t_oracle = time.monotonic() - t0
    history = sft_train(policy, engine.pad_id, [r.segments for r in oracle.rollouts], cfg)
    policy.eval()
    dev = [ex for f in FAMILIES for ex in load_split(params.paths.data_dir, f, "dev")[:args.dev_per_family]]
    dev_oracle = make_oracle_trajectories(dev, engine, 0.0, cfg.seed)
    engine.backend = HFBackend(policy, tok)
    result = {"top_k": params.retrieval.top_k, "steps": len(history), "obs_loss_weight": cfg.obs_loss_weight,
              "trajectories": len(oracle.rollouts), "oracle_s": round(t_oracle, 1),
              "train_s": history[-1]["elapsed_s"],
              "final_loss": round(sum(h["loss"] for h in history[-50:]) / len(history[-50:]), 3),
              **token_accuracy(policy, tok, dev_oracle.rollouts), **validate_protocol(engine, dev)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
