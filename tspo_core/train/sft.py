"""SFT warmup: an oracle agent's trajectories, produced by the real rollout engine and retriever, then
next-token loss on the policy's tokens only.

1. The oracle follows each training question's decomposition (`metadata["hops"]`): one `<search> query </search>`
   turn per hop, then `<answer> gold </answer>`. It runs *through the rollout engine* with the real retriever, so
   prompts, observations and masks are exactly what RL and evaluation will see.
2. A trajectory is kept only if every hop's answer appears in the observation of its search (the oracle must not
   teach answering without evidence). A share `sft.imperfect_share` is made imperfect on purpose (a wrong final
   answer taken from the evidence, or a redundant repeated search), so that RL has something to improve. A share
   `sft.premature_share` is a lazy teacher: it stops before the last hop and answers what it has (after k searches,
   hop k's entity; with no search, a guess: another question's answer of the same type), a habit only the reward
   can correct: the skipped search is what finds the answer.
3. Loss: cross-entropy on policy tokens (observations and the prompt are masked), length-bucketed batches,
   AdamW with linear warmup and cosine decay, stopped by `max_steps` or `max_minutes`, whichever comes first.
   `sft.obs_loss_weight > 0` adds a weighted next-token loss on observation tokens (for a model trained from
   scratch, which has never read a passage; the logged `loss` stays the policy-token loss). The LM head runs on
   the tokens of these losses alone (`tspo_core.train.logprobs`, the RL update's log-probs).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tspo_core.agent.backends import Generation, HFBackend
from tspo_core.agent.masks import build_masks
from tspo_core.agent.rollout import Rollout, RolloutEngine
from tspo_core.config import SFTConfig
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError
from tspo_core.metrics import contains_answer
from tspo_core.runinfo import environment
from tspo_core.train.logprobs import next_token_stats

log = logging.getLogger(__name__)


def oracle_turns(example: QAExample, rng: random.Random, imperfect: bool, premature: bool = False,
                 guess: str | None = None, verbose: bool = False) -> tuple[list[str], str]:
    """The oracle's turn texts for `example` and the kind of trajectory ("oracle", "near_miss", "redundant",
    "premature"). `premature` (wins over `imperfect`) stops after k < n hops and answers hop k's entity; k = 0
    (answering at once, with `guess`: a wrong answer of the right type) only when a guess is given. `verbose`
    wraps the final answer in a phrase (`VERBOSE`), which exact match scores 0: the teacher's habit, not its
    knowledge, is wrong."""
    hops = example.metadata.get("hops") or []
    queries = [h["query"] for h in hops]
    answer = example.golden_answers[0]
    kind = "oracle"
    first = 0 if guess is not None else 1
    if premature and len(hops) > first:
        k = rng.randrange(first, len(hops))  # searches made before the lazy answer
        turns = [f"<search> {q} </search>" for q in queries[:k]]
        return [*turns, _answer_turn(hops[k - 1]["answer"] if k else guess, verbose)], "premature"
    if imperfect and queries:
        kind = rng.choice(["near_miss", "redundant"])
        if kind == "redundant":
            k = rng.randrange(len(queries))
            queries = queries[:k + 1] + [queries[k]] + queries[k + 1:]
    turns = [f"<search> {q} </search>" for q in queries]
    turns.append(_answer_turn(NEAR_MISS if kind == "near_miss" else answer, verbose))
    return turns, kind


VERBOSE = "The answer is {}"
"""A verbose teacher's answer form: what an instruction-following model writes, and what exact match rejects."""


def _answer_turn(answer: str, verbose: bool) -> str:
    return f"<answer> {VERBOSE.format(answer) if verbose else answer} </answer>"


NEAR_MISS = "\x00near-miss\x00"
"""Placeholder answer: the backend substitutes a wrong title read from the last observation."""


def _wrong_title(context_text: str, golds: Sequence[str]) -> str | None:
    last_obs = context_text.rsplit("<information>", 1)[-1]
    titles = [t.split(")", 1)[0] for t in last_obs.split("(Title: ")[1:]]
    wrong = [t for t in titles if t and not contains_answer(t, golds)]
    return wrong[0] if wrong else None


class OracleBackend:
    """Plays fixed turn texts per prompt (`scripts[prompt ids] = (turns, golds)`). The turn number is the count of
    searches already in the context; a near-miss answer is a wrong title taken from the last observation."""

    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], tuple[list[str], Sequence[str]]]):
        self.tok, self.scripts = tokenizer, scripts
        self.eos_token_id = tokenizer.eos_token_id
        self._prompt_lengths = sorted({len(k) for k in scripts})

    def _script(self, ctx: Sequence[int]) -> tuple[tuple[list[str], Sequence[str]], int]:
        for n in self._prompt_lengths:
            key = tuple(ctx[:n])
            if key in self.scripts:
                return self.scripts[key], n
        raise KeyError("OracleBackend: context matches no scripted prompt")

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        out = []
        for ctx, budget in zip(contexts, max_new_tokens):
            (script, golds), n = self._script(ctx)
            history = self.tok.decode(list(ctx[n:]))
            text = script[min(history.count("</search>"), len(script) - 1)]
            if NEAR_MISS in text:
                text = text.replace(NEAR_MISS, _wrong_title(history, golds) or golds[0])
            ids = self.tok.encode(text, add_special_tokens=False)[:max(budget, 0)]
            out.append(Generation(ids, [0.0] * len(ids), "stop"))
        return out


@dataclass
class OracleResult:
    rollouts: list[Rollout]
    kinds: list[str]
    verbose: list[bool]  # per kept trajectory: its answer is in the verbose form
    dropped: int  # oracle trajectories whose evidence did not contain a hop's answer


def make_oracle_trajectories(examples: Sequence[QAExample], engine: RolloutEngine, imperfect_share: float,
                             seed: int, batch_size: int = 256,
                             progress: Callable[[int], None] | None = None,
                             premature_share: float = 0.0, verbose_share: float = 0.0) -> OracleResult:
    """Run the oracle through `engine` (its retriever is the real index). Questions need `metadata["hops"]`.
    A trajectory is kept when every hop it searched for found that hop's answer in its observation."""
    rng = random.Random(seed)
    kept: list[Rollout] = []
    kinds: list[str] = []
    verbose_flags: list[bool] = []
    dropped = 0
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        scripts, chunk_kinds, chunk_verbose = {}, [], []
        for i, ex in enumerate(chunk):
            imperfect = rng.random() < imperfect_share
            premature = premature_share > 0 and rng.random() < premature_share
            guess = _guess(chunk, i, rng) if premature else None
            verbose = verbose_share > 0 and rng.random() < verbose_share
            turns, kind = oracle_turns(ex, rng, imperfect, premature, guess, verbose)
            scripts[tuple(engine.prompt_ids(ex.question))] = (turns, ex.golden_answers)
            chunk_kinds.append(kind)
            chunk_verbose.append(verbose)
        engine.backend = OracleBackend(engine.tokenizer, scripts)
        batch = engine.run(chunk, group_size=1, temperature=0.0)
        for r, kind, verbose in zip(batch.rollouts, chunk_kinds, chunk_verbose):
            hops = r.example.metadata.get("hops") or []
            if kind == "premature":
                hops = hops[:r.num_searches]
            found = all(any(o is not None and contains_answer(o, [h["answer"]]) for o in r.observations)
                        for h in hops)
            if not found or r.answer is None:
                dropped += 1
                continue
            kept.append(r)
            kinds.append(kind)
            verbose_flags.append(verbose)
        if progress:
            progress(len(chunk))
    return OracleResult(kept, kinds, verbose_flags, dropped)


def _guess(chunk: Sequence[QAExample], i: int, rng: random.Random) -> str | None:
    """A wrong answer of the right type for chunk[i]: the answer of another question that ends in the same
    relation (else of any other question); None when every candidate is also a gold answer of chunk[i]."""
    ex = chunk[i]
    relation = (ex.metadata.get("relations") or [None])[-1]
    golds = set(ex.golden_answers)
    others = [o for j, o in enumerate(chunk) if j != i and o.golden_answers[0] not in golds]
    same = [o for o in others if (o.metadata.get("relations") or [None])[-1] == relation]
    pool = [o.golden_answers[0] for o in same or others]
    return rng.choice(pool) if pool else None


def _batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within windows of 50 batches, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def sft_train(model, pad_id: int, segments: Sequence[Sequence], cfg: SFTConfig,
              on_step: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` in place on trajectories given as segment lists; returns the per-step log."""
    if not segments:
        raise ValueError("sft_train: no trajectories")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = next(model.parameters()).device
    lengths = [sum(len(s[0]) for s in segs) for segs in segments]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    model.train()
    history: list[dict] = []
    t0 = time.monotonic()
    step = 0
    while step < cfg.max_steps:
        for idx in _batches(lengths, cfg.batch_size, rng):
            if step >= cfg.max_steps:
                return history
            if time.monotonic() - t0 > cfg.max_minutes * 60:
                log.warning("sft.max_minutes (%g) reached after %d of %d steps: this model depends on the machine's "
                            "speed and load; raise sft.max_minutes so that sft.max_steps decides", cfg.max_minutes,
                            step, cfg.max_steps)
                return history
            t = build_masks([segments[i] for i in idx], pad_id=pad_id)
            ids, attn = t.input_ids.to(device), t.attention_mask.to(device)
            policy = t.policy_mask.to(device).bool()  # (B, T): token t is predicted from position t - 1
            obs = t.obs_mask.to(device).bool() if cfg.obs_loss_weight > 0 else torch.zeros_like(policy)  # (B, T)
            read = (policy | obs)[:, 1:]  # (B, T-1): the tokens t >= 1 of the losses
            out = next_token_stats(model, ids, attn, policy | obs, with_argmax=True)  # (N,) each, N = read.sum()
            on_policy, targets = policy[:, 1:][read], ids[:, 1:][read]  # (N,) each
            nll = -out.logp  # (N,): each read token's cross-entropy
            loss = nll[on_policy].mean()
            obs_loss = None
            if bool((~on_policy).any()):
                obs_loss = nll[~on_policy].mean()
                loss = loss + cfg.obs_loss_weight * obs_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            acc = (out.argmax[on_policy] == targets[on_policy]).float().mean()
            policy_loss = loss.item() - (cfg.obs_loss_weight * obs_loss.item() if obs_loss is not None else 0.0)
            rec = {"step": step, "loss": policy_loss, "obs_loss": obs_loss.item() if obs_loss is not None else None,
                   "token_acc": acc.item(), "grad_norm": grad_norm.item(),
                   "lr": sched.get_last_lr()[0], "tokens": int(on_policy.sum()),
                   "elapsed_s": round(time.monotonic() - t0, 2)}
            history.append(rec)
            if on_step:
                on_step(rec)
            step += 1
    return history


# ----------------------------------------------------------------------------------------------------------------
# stage driver
# ----------------------------------------------------------------------------------------------------------------
def load_trajectories(path: str | Path, engine: RolloutEngine) -> list[list]:
    """User-supplied warmup trajectories: jsonl lines `{"question": str, "turns": [{"text": str, "kind":
    "policy" | "obs"}, ...]}`; each text is tokenized once and appended after the prompt (kind decides the mask)."""
    from tspo_core.agent.masks import Segment
    from tspo_core.data.loaders import iter_json_lines
    from tspo_core.errors import DataError

    out = []
    for line, obj in iter_json_lines(path):
        q, turns = obj.get("question"), obj.get("turns")
        if not isinstance(q, str) or not q.strip():
            raise DataError("missing or empty 'question'", str(path), line)
        if not isinstance(turns, list) or not turns:
            raise DataError("missing or empty 'turns' list", str(path), line)
        segs = [Segment(engine.prompt_ids(q), "prompt", 0)]
        k = 0
        for t in turns:
            if not isinstance(t, dict) or t.get("kind") not in ("policy", "obs") or not isinstance(t.get("text"), str):
                raise DataError("each turn needs 'text' (str) and 'kind' ('policy' or 'obs')", str(path), line)
            segs.append(Segment(engine.tokenizer.encode(t["text"], add_special_tokens=False), t["kind"], k))
            k += t["kind"] == "policy"
        out.append(segs)
    if not out:
        raise DataError("no trajectories", str(path))
    return out


def validate_protocol(engine: RolloutEngine, examples: Sequence[QAExample]) -> dict[str, float]:
    """Greedy rollouts on dev questions: does the model follow the protocol, and how often is it right?"""
    from tspo_core.metrics import exact_match

    if not examples:
        return {}
    batch = engine.run(list(examples), group_size=1, temperature=0.0)
    stats = batch.stats()
    em = sum(exact_match(r.answer, r.example.golden_answers) for r in batch.rollouts) / len(batch.rollouts)
    return {"dev_em": em, "dev_valid_action_rate": 1.0 - stats["invalid_action_rate"],
            "dev_answered_rate": stats["answered_rate"], "dev_searches_mean": stats["searches_mean"],
            "dev_questions": float(len(batch.rollouts))}


def compact_summary(summary: dict) -> dict:
    """The DVC metric `sft.json`: `steps`, `loss` (the mean of the last 20 steps) and `em` (greedy EM on dev
    questions after the warmup), those present; the whole summary is `detail/sft.json` (and `sft_summary.json` in
    the checkpoint).

    >>> compact_summary({"steps": 9, "final_loss": 0.5, "dev_em": 0.25, "train_seconds": 3.0})
    {'steps': 9, 'loss': 0.5, 'em': 0.25}
    """
    return {name: summary[key] for name, key in (("steps", "steps"), ("loss", "final_loss"), ("em", "dev_em"))
            if key in summary}


def run_sft(params, progress: Callable[[dict], None] | None = None) -> dict:
    """Stage `sft`: oracle (or user) trajectories -> SFT -> checkpoint in `paths.sft_dir`; returns the summary
    (also written as `sft_summary.json` in the checkpoint) and the loss history."""
    from tspo_core.config import FAMILIES
    from tspo_core.pipeline import init_policy, load_split, make_engine, open_retriever, prepare_for_training, \
        training_precision

    cfg: SFTConfig = params.sft
    if not cfg.enabled:
        return _skip_sft(params)
    train_model, autocast = training_precision(params.model)
    policy, tokenizer = init_policy(train_model, params.paths, seed=cfg.seed)
    prepare_for_training(policy, params.model)
    retriever = open_retriever(params.retrieval, params.paths)
    # the engine scripts the oracle's trajectories, then validates the policy being trained in this process:
    # always the HF backend (`rollout.backend` is the RL and evaluation stages' choice)
    engine = make_engine(policy, tokenizer, retriever, params.rollout.model_copy(update={"backend": "hf"}),
                         params.retrieval, params.model)
    t0 = time.monotonic()
    if cfg.trajectories:
        segments, kinds, verbose, dropped = load_trajectories(cfg.trajectories, engine), [], [], 0
    else:
        train = [ex for name in FAMILIES for ex in load_split(params.paths.data_dir, name, "train")
                 if ex.metadata.get("hops")]
        if not train:
            raise ValueError("sft: no training questions with a hop decomposition (metadata.hops); supply "
                             "sft.trajectories for real data")
        random.Random(cfg.seed).shuffle(train)
        oracle = make_oracle_trajectories(train, engine, cfg.imperfect_share, cfg.seed,
                                          premature_share=cfg.premature_share,
                                          verbose_share=cfg.verbose_share)
        segments, kinds, verbose, dropped = ([r.segments for r in oracle.rollouts], oracle.kinds, oracle.verbose,
                                             oracle.dropped)
    t_data = time.monotonic() - t0
    with autocast:
        history = sft_train(policy, engine.pad_id, segments, cfg, on_step=progress)
    policy.eval()
    engine.backend = HFBackend(policy, tokenizer)
    dev = [ex for name in FAMILIES for ex in load_split(params.paths.data_dir, name, "dev")[:cfg.validate_per_family]]
    summary = {"trajectories": len(segments), "dropped": dropped,
               "imperfect": sum(k != "oracle" for k in kinds),
               "premature": sum(k == "premature" for k in kinds),
               "verbose": sum(verbose), "trajectory_seconds": round(t_data, 1),
               "steps": len(history), "stopped_by_time_cap": len(history) < cfg.max_steps, "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
               "final_loss": sum(h["loss"] for h in history[-20:]) / max(len(history[-20:]), 1),
               "final_token_acc": sum(h["token_acc"] for h in history[-20:]) / max(len(history[-20:]), 1),
               **validate_protocol(engine, dev), "meta": {"environment": environment()}}
    _save_checkpoint(params, policy, tokenizer, summary)
    return {"summary": summary, "history": history}


def _skip_sft(params) -> dict:
    """`sft.enabled: false` (the paper setting: RL straight from the base model, as Search-R1 and TSPO do): the
    stage writes the `model.name_or_path` checkpoint unchanged to `paths.sft_dir`, so RL and evaluation read their
    starting point from one place either way."""
    from tspo_core.pipeline import init_policy

    if params.model.name_or_path is None:
        raise ConfigError("sft.enabled = false needs model.name_or_path (a pretrained checkpoint); the tiny model "
                          "is trained from scratch and cannot skip its warmup")
    policy, tokenizer = init_policy(params.model, params.paths, seed=params.sft.seed)
    summary = {"skipped": True, "checkpoint": params.model.name_or_path, "steps": 0}
    _save_checkpoint(params, policy, tokenizer, summary)
    return {"summary": summary, "history": []}


SUMMARY_VOLATILE = ("trajectory_seconds", "train_seconds", "meta")
"""Summary keys that differ between two identical SFT runs (the clock, the machine)."""


def _save_checkpoint(params, policy, tokenizer, summary: dict) -> None:
    """The stage's output: an HF checkpoint in `paths.sft_dir` with `sft_summary.json` (what the run produced) and
    the resolved params; its timings and environment go to the run record, outside the artifact's DVC hash."""
    from tspo_core.config import dump_params
    from tspo_core.io import atomic_dir
    from tspo_core.runinfo import split_record, write_run_record

    stable, record = split_record(summary, SUMMARY_VOLATILE)
    with atomic_dir(params.paths.sft_dir) as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_summary.json").write_text(json.dumps(stable, indent=2), encoding="utf-8")
        write_run_record(tmp, record)
        (tmp / "params.resolved.yaml").write_text(dump_params(params), encoding="utf-8")
