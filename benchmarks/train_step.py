"""RL step time: this project's trainer (GRPO estimator, HF backend) vs TRL's `GRPOTrainer`, same tiny model.

What is compared. Both frameworks train the same randomly initialized tiny Qwen2 (built with
`tspo_core.policy.build_tiny_model` over a small embedded lexicon, saved once to a temporary directory and loaded
by both, so both start from identical weights) on the same kind of batch:

- `--prompts` questions per step, `--group-size` completions each, at most `--max-new-tokens` generated tokens,
  temperature 1, top-p 1, no top-k, float32, `--threads` torch threads, the same prompt text
  (`build_prompt(q, "compact")`) and the same reward (exact match of the `<answer>` content against the gold
  answer, with the project's `parse_action` + `outcome_reward`);
- single turn: TRL cannot run our multi-turn search loop, so our engine runs with `max_turns=0` (its final,
  answer-only turn comes first; a retriever that raises if called proves no search happens);
- generation stops at EOS or at the first `</search>` / `</answer>`: our engine stops on these tags (single tokens
  in the tiny tokenizer); TRL gets the same stops by listing the two tag ids as extra EOS ids in the model's
  generation config (TRL cannot pass stop strings to `generate`, which would need the tokenizer);
- the same loss: GRPO advantages (group mean / sample std, eps 1e-4), PPO-clip (eps 0.2, both sides), k3 KL to a
  frozen reference (coefficient `--kl`), token-mean over the whole batch (TRL `loss_type="dapo"`), `--updates`
  optimizer updates per step (1: one AdamW step over the whole batch), `--micro-batch` rollouts per forward /
  backward, AdamW (torch), constant LR 1e-6, no weight decay, grad-norm clip 1.0, one PPO epoch.

Each framework runs in its own subprocess (clean imports, threads and memory), `--warmup` steps first (discarded),
then `--steps` timed steps. A step is everything from the end of the previous step to the end of this one:
sampling, scoring, advantages, reference log-probs, forward/backward, optimizer step and bookkeeping. "generation"
is the time inside the sampler only (ours: `HFBackend.generate`; TRL: `GRPOTrainer._generate_single_turn`, i.e.
`model.generate` on the padded batch); "rest" is step minus generation. Mismatches that could not be removed are
listed in the output (`MISMATCHES`).

    nice -n 19 python benchmarks/train_step.py --steps 5 --prompts 16 --group-size 8 --max-new-tokens 48

Needs the `bench` extra (`pip install -c constraints.txt -e '.[bench]'`, which installs TRL). Writes a markdown
report to benchmarks/results/train_step.md (and prints it). Nothing is downloaded (HF offline mode).
"""

from __future__ import annotations

import os

# Before torch is imported (the workers import this module too): no hub access, no telemetry, quiet tokenizers,
# and threads that sleep instead of spinning when they wait (spinning OpenMP threads collapse on a shared machine;
# the retrieval benchmark and server do the same).
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
               "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(_k, _v)

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


def answer_reward(text: str, gold: str) -> float:
    """The shared reward: EM of the `<answer>` of one completion's text against the gold answer."""
    from tspo_core.agent.protocol import parse_action
    from tspo_core.agent.rewards import outcome_reward

    action = parse_action(text)
    return outcome_reward(action.content if action.kind == "answer" else None, [gold])


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
def run_ours(args, model_dir: Path) -> dict:
    import torch

    from tspo_core.agent.backends import HFBackend
    from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
    from tspo_core.config import AdvantageConfig, ModelConfig, OptimConfig, RewardConfig, RolloutConfig, \
        TrainConfig
    from tspo_core.data.schema import QAExample
    from tspo_core.policy import load_policy
    from tspo_core.train.rl import RLSettings, RLTrainer

    torch.set_num_threads(args.threads)
    policy, tok = load_policy(model_dir, ModelConfig(dtype="float32"))
    ref = load_policy(model_dir, ModelConfig(dtype="float32"))[0] if args.kl > 0 else None
    backend = HFBackend(policy, tok)
    timer = _Timer(backend.generate, lambda gens: sum(len(g.token_ids) for g in gens))
    backend.generate = timer
    settings = RolloutSettings(max_turns=0, max_new_tokens_per_turn=args.max_new_tokens,
                               max_context_tokens=4096, prompt_template=PROMPT_TEMPLATE)
    engine = RolloutEngine(backend, tok, _NoRetriever(), settings)
    B = args.prompts * args.group_size
    total = args.warmup + args.steps
    # The trainer reads group size, temperature and top-p from RolloutConfig; the engine's own settings above
    # (max_turns=0) make it single-turn (RolloutConfig.max_turns must be > 0 and is not used here).
    cfg = RLSettings(
        RolloutConfig(group_size=args.group_size, temperature=1.0, top_p=1.0, max_turns=1,
                      max_new_tokens_per_turn=args.max_new_tokens, prompt_template=PROMPT_TEMPLATE),
        RewardConfig(folr_alpha=0.5, format_bonus=0.0),
        AdvantageConfig(estimator="grpo", eps=ADV_EPS),
        OptimConfig(lr=LR, warmup_ratio=0.0, weight_decay=0.0, betas=(0.9, 0.999), grad_clip=1.0, clip_ratio=CLIP,
                    kl_coef=args.kl, entropy_coef=0.0, loss_agg="token-mean"),
        TrainConfig(steps=total, prompts_per_step=args.prompts, mini_batch_size=B // args.updates, ppo_epochs=1,
                    micro_batch_size=args.micro_batch, checkpoint_every=10**6, seed=args.seed))
    questions = [QAExample(f"q{i}", q, [a]) for i, (q, a) in enumerate(build_questions(args.questions, args.seed))]
    trainer = RLTrainer(policy, ref, tok, engine, questions, cfg)

    step_s, gen_s, gen_tok, reward, updates = [], [], [], [], []
    for _ in range(total):
        n_before = len(timer.calls)
        t0 = time.perf_counter()
        rec = trainer.train_step()
        step_s.append(time.perf_counter() - t0)
        calls = timer.calls[n_before:]
        gen_s.append(sum(c[0] for c in calls))
        gen_tok.append(sum(c[1] for c in calls))
        reward.append(rec["reward_mean"])
        updates.append(round(B / cfg.train.mini_batch_size) * cfg.train.ppo_epochs)
        assert rec["searches"] == 0 and rec["turns"] == 1, rec
    w = args.warmup
    return {"step_s": step_s[w:], "gen_s": gen_s[w:], "gen_tokens": gen_tok[w:], "reward": reward[w:],
            "updates_per_step": updates[w:], "threads": torch.get_num_threads(), "rollouts_per_step": B}


def run_trl(args, model_dir: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tspo_core.agent.protocol import STOP_STRINGS, build_prompt
    from tspo_core.config import ModelConfig
    from tspo_core.policy import load_policy

    torch.set_num_threads(args.threads)
    policy, tok = load_policy(model_dir, ModelConfig(dtype="float32"))
    added = tok.get_added_vocab()
    stop_ids = [added[s] for s in STOP_STRINGS]  # single tokens in the tiny tokenizer (checked by the lookup)
    policy.generation_config.eos_token_id = [tok.eos_token_id, *stop_ids]
    B = args.prompts * args.group_size
    micro_steps = B // args.micro_batch
    total = args.warmup + args.steps
    pairs = build_questions(args.questions, args.seed)
    data = Dataset.from_dict({"prompt": [build_prompt(q, PROMPT_TEMPLATE) for q, _ in pairs],
                              "gold": [a for _, a in pairs]})

    def exact_match(completions, gold, **_):
        return [answer_reward(c, g) for c, g in zip(completions, gold)]

    out_dir = Path(tempfile.mkdtemp(prefix="trl_bench_"))
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=args.seed, data_seed=args.seed,
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
    timer = _Timer(trainer._generate_single_turn, lambda out: sum(len(c) for c in out[0]))
    trainer._generate_single_turn = timer
    rewards: list[float] = []
    real_calc = trainer._calculate_rewards

    def calc(*a, **kw):
        r = real_calc(*a, **kw)
        rewards.append(float(r.nanmean()))
        return r

    trainer._calculate_rewards = calc
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    k = args.updates
    if trainer.state.global_step != total * k or len(timer.calls) != total or len(marks) != total * k + 1:
        raise RuntimeError(f"unexpected TRL loop shape: {trainer.state.global_step} optimizer steps, "
                           f"{len(timer.calls)} generations, {len(marks) - 1} step ends (expected {total * k}, "
                           f"{total}, {total * k})")
    step_s = [marks[(i + 1) * k] - marks[i * k] for i in range(total)]
    w = args.warmup
    a = trainer.args
    effective = {"per_device_train_batch_size": a.per_device_train_batch_size,
                 "gradient_accumulation_steps": a.gradient_accumulation_steps,
                 "steps_per_generation": a.steps_per_generation, "generation_batch_size": a.generation_batch_size,
                 "num_generations": a.num_generations, "max_completion_length": a.max_completion_length,
                 "beta": a.beta, "loss_type": a.loss_type, "bf16": a.bf16, "gradient_checkpointing":
                 a.gradient_checkpointing, "optim": str(a.optim), "model_dtype": str(trainer.model.dtype),
                 "ref_model": trainer.ref_model is not None, "eos_token_ids": trainer.eos_token_ids}
    return {"step_s": step_s[w:], "gen_s": [c[0] for c in timer.calls][w:],
            "gen_tokens": [c[1] for c in timer.calls][w:], "reward": rewards[w:],
            "updates_per_step": [k] * args.steps, "threads": torch.get_num_threads(), "rollouts_per_step": B,
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
    "(`_generate_and_score_completions`), ours at the start of the update. Both are counted in \"rest\" here "
    "(\"generation\" is the sampler alone in both), so the split is comparable; both chunk it by the micro-batch.",
    "**Logits.** TRL patches the model with a fused LM head that projects only the completion positions, in tiles, "
    "straight to log-probs and entropy; ours computes the full logits over prompt and completion positions, then "
    "log-softmax (and entropy, logged only). An implementation difference, i.e. part of what is measured.",
    "**Padding.** Ours length-sorts each mini-batch and cuts every micro-batch to its own longest rollout; TRL pads "
    "the whole generation batch to its longest prompt and longest completion, shuffles it and splits it. Also part "
    "of what is measured.",
    "**Sampler.** Ours samples with its own KV-cached loop (multinomial over softmax(logits / T), id-matched stop "
    "tags, per-row budgets); TRL uses `model.generate` (do_sample, top_k=0, top_p=1, T=1, the tags as extra EOS "
    "ids). Same distribution, different random streams: completions and their lengths differ from step to step, "
    "so the table reports generated tokens per step for each side.",
    "**Questions per step.** Same count and the same question pool, but each framework draws its own (ours: a "
    "seeded sample per step; TRL: its shuffled `RepeatSampler`), so prompt lengths differ slightly.",
    "**Bookkeeping.** Ours also computes FOLR first occurrences (none: no observations), zero-variance group shares "
    "and trajectory categories, and guards against non-finite losses; TRL accumulates its own metrics every step "
    "even with logging off, and counts FLOPs and tokens. Both negligible next to the model work.",
    "**Advantage epsilon.** TRL's 1e-4 on the group std is fixed; ours was set to the same 1e-4 (the project "
    "default is 1e-6). No mismatch left, listed for completeness.",
    "**Weight decay.** TRL exempts biases and norm weights from decay, ours does not; irrelevant here because both "
    "use 0.",
    "**Process layout.** Each framework runs in its own subprocess, one after the other (`--repeats` alternates "
    "the order), so they never compete with each other, but background load can differ between the two runs.",
]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def summarize(res: dict) -> dict:
    rest = [s - g for s, g in zip(res["step_s"], res["gen_s"])]
    return {"median": statistics.median(res["step_s"]), "mean": statistics.fmean(res["step_s"]),
            "gen_median": statistics.median(res["gen_s"]), "gen_mean": statistics.fmean(res["gen_s"]),
            "rest_median": statistics.median(rest), "rest_mean": statistics.fmean(rest),
            "tokens": statistics.fmean(res["gen_tokens"]),
            "tok_per_s": sum(res["gen_tokens"]) / max(sum(res["gen_s"]), 1e-9),
            "reward": statistics.fmean(res["reward"]) if res["reward"] else float("nan"),
            "updates": statistics.fmean(res["updates_per_step"]), "n": len(res["step_s"])}


def render(args, model_info: dict, results: dict[str, list[dict]], errors: dict[str, str], load: tuple,
           wall: float) -> str:
    import torch

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    import transformers

    B = args.prompts * args.group_size
    cmd = "python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# RL step time: this trainer vs TRL GRPOTrainer (`benchmarks/train_step.py`)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, transformers {transformers.__version__}, TRL {trl_version}, Python "
        f"{platform.python_version()}; {args.threads} torch threads per framework, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}; load average before / after: {load[0]:.2f} / {load[1]:.2f}; "
        f"whole benchmark {wall:.0f} s.", "",
        f"Setup: tiny Qwen2 built from scratch ({model_info['params_m']:.2f}M parameters, {model_info['layers']} "
        f"layers, hidden {model_info['hidden']}, vocabulary {model_info['vocab']}), random init, float32, the same "
        f"weights for both. Single turn (no search: TRL cannot run the multi-turn search loop; our engine runs with "
        f"`max_turns=0`, its answer-only final turn). {args.prompts} prompts x {args.group_size} completions = {B} "
        f"rollouts per step, at most {args.max_new_tokens} new tokens, temperature 1, stop at EOS / `</search>` / "
        f"`</answer>`. Reward: exact match of the `<answer>` content with the gold answer (the same function for "
        f"both). GRPO advantages, PPO-clip 0.2, k3 KL to a frozen reference (coefficient {args.kl}), token-mean "
        f"loss over the batch (TRL `dapo`), {args.updates} optimizer update(s) per step, micro-batch "
        f"{args.micro_batch}, AdamW lr {LR:g} constant, grad clip 1.0. {args.warmup} warm-up step(s) discarded, "
        f"{args.steps} timed per run, {args.repeats} run(s) per framework.", "",
        "A step = sampling + scoring + advantages + reference log-probs + forward/backward + optimizer step. "
        "\"generation\" = time inside the sampler only (ours `HFBackend.generate`, TRL `_generate_single_turn` = "
        "`model.generate`); \"rest\" = step - generation.", "",
        "| framework | median s/step | mean s/step | generation s (median / mean) | rest s (median / mean) | "
        "generated tokens/step | sampler tokens/s | updates/step | mean reward | timed steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": "this project (`RLTrainer`, grpo, HF backend)", "trl": f"TRL `GRPOTrainer` {trl_version}"}
    summ = {}
    for fw in ("ours", "trl"):
        if fw in errors and not results.get(fw):
            lines.append(f"| {names[fw]} | failed | | | | | | | | |")
            continue
        pooled = {k: [x for r in results[fw] for x in r[k]] for k in
                  ("step_s", "gen_s", "gen_tokens", "reward", "updates_per_step")}
        s = summ[fw] = summarize(pooled)
        lines.append(f"| {names[fw]} | {_fmt(s['median'])} | {_fmt(s['mean'])} | {_fmt(s['gen_median'])} / "
                     f"{_fmt(s['gen_mean'])} | {_fmt(s['rest_median'])} / {_fmt(s['rest_mean'])} | "
                     f"{s['tokens']:.0f} | {s['tok_per_s']:.0f} | {s['updates']:g} | {s['reward']:.3f} | "
                     f"{s['n']} |")
    lines.append("")
    if len(summ) == 2:
        o, t = summ["ours"], summ["trl"]
        lines += [f"Ratio TRL / ours (above 1: ours is faster): step median **{t['median'] / o['median']:.2f}x**, "
                  f"step mean {t['mean'] / o['mean']:.2f}x, "
                  f"generation median {t['gen_median'] / o['gen_median']:.2f}x, "
                  f"rest median {t['rest_median'] / o['rest_median']:.2f}x; generation per token (sampler tokens/s, "
                  f"ours / TRL) {o['tok_per_s'] / t['tok_per_s']:.2f}x.", ""]
        for fw in ("ours", "trl"):
            for i, r in enumerate(results[fw]):
                lines.append(f"- {fw} run {i + 1}: steps (s) {[round(x, 2) for x in r['step_s']]}, generation (s) "
                             f"{[round(x, 2) for x in r['gen_s']]}, tokens {r['gen_tokens']}")
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
              "are noisy under contention: the two frameworks run one after the other, not at the same moment)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/train_step.md")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    B = args.prompts * args.group_size
    if args.group_size < 2:
        ap.error("--group-size must be at least 2 (GRPO needs a group)")
    if B % args.micro_batch or (B // args.micro_batch) % args.updates:
        ap.error(f"prompts x group size ({B}) must split into micro-batches of {args.micro_batch}, and their number "
                 f"into {args.updates} update(s)")
    return args


def worker(args) -> None:
    try:
        fn = run_ours if args.worker == "ours" else run_trl
        res = {"ok": True, **fn(args, Path(args.model_dir))}
    except Exception:  # reported, not hidden: the report shows the traceback
        res = {"ok": False, "error": traceback.format_exc()}
    Path(args.result).write_text(json.dumps(res), encoding="utf-8")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="train_step_bench_") as tmp:
        model_dir = Path(tmp) / "model"
        model_info = prepare_model(model_dir, args.seed)
        for rep in range(args.repeats):
            order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
            for fw in order:
                if fw in errors:
                    continue
                out = Path(tmp) / f"{fw}_{rep}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", fw, "--model-dir",
                       str(model_dir), "--result", str(out)]
                print(f"[{fw} run {rep + 1}] ...", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                res = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {
                    "ok": False, "error": f"worker exited {proc.returncode}\n{proc.stderr[-4000:]}"}
                if res["ok"]:
                    results[fw].append(res)
                    print(f"[{fw} run {rep + 1}] steps {[round(x, 2) for x in res['step_s']]}", file=sys.stderr)
                else:
                    errors[fw] = res["error"]
                    print(f"[{fw} run {rep + 1}] FAILED\n{res['error']}", file=sys.stderr)
    report = render(args, model_info, results, errors, (load0, os.getloadavg()[0]), time.perf_counter() - t_start)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
