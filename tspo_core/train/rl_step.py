"""One RL step for search agents, top to bottom: collect rollouts -> score -> advantages (registry) -> update.

Algorithm, per step (TSPO.md, REFERENCE.md "Reference training settings"):
1. Sample `prompts_per_step` training questions (a pure function of the seed and the step, so a resumed run sees
   the same questions); each rank takes its share. Group ids are global question indices, made before the G-fold
   repeat, so groups never merge across questions or ranks.
2. G rollouts per question with the rollout engine (temperature `rollout.temperature`); rollout log-probs kept,
   or (`rollout.recompute_logprobs`, the default with vLLM) recomputed with the trainer's model, the gap logged.
3. Rewards: outcome o = EM of the final answer (+ optional format bonus); FOLR first-occurrence turn f from the
   observation text only.
4. Advantages (B, T) from `advantage.estimator` (`grpo`, `grpo_folr`, `tspo`, ...), zero off the policy mask.
5. PPO-clip against the rollout log-probs + k3 KL to the `Reference` (the frozen SFT model; under LoRA the policy
   with its adapters disabled) + the entropy bonus, assembled once by `policy_loss`; token-mean by default,
   micro-batched with one global denominator (summed over ranks), so the update depends neither on the
   micro-batch size nor on the number of ranks. Log-probs (policy and reference) and the entropy are computed on
   policy tokens only, the LM head on those rows alone, and a group's shared prompt runs through the model once
   (`train.prefix_sharing`; `tspo_core.train.logprobs`).
6. A non-finite loss or gradient skips the optimizer step (`skipped_nonfinite`); parameters stay finite.

Plumbing (distribution, checkpoints, resume, dev evaluation, export, the stage driver) is the harness,
`tspo_core.train.rl`; gradients are reduced across ranks by the engine (FSDP2), never here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tspo_core.agent.advantages import get_advantage
from tspo_core.agent.losses import policy_loss
from tspo_core.agent.rewards import first_occurrence_turn, format_reward, outcome_reward
from tspo_core.agent.rollout import RolloutBatch, RolloutEngine
from tspo_core.config import AdvantageConfig, OptimConfig, RewardConfig, RolloutConfig, TrainConfig
from tspo_core.data.schema import QAExample
from tspo_core.metrics import DEFAULT_NORMALIZATION
from tspo_core.train.logprobs import token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLSettings:
    rollout: RolloutConfig
    reward: RewardConfig
    advantage: AdvantageConfig
    optim: OptimConfig
    train: TrainConfig
    answer_normalization: str = DEFAULT_NORMALIZATION  # `eval.answer_normalization`: the reward's EM and FOLR


@dataclass
class Experience:
    batch: RolloutBatch
    outcome: torch.Tensor  # (B,) float: EM (+ format bonus)
    em: torch.Tensor  # (B,) float: EM alone
    first_occurrence: torch.Tensor  # (B,) long, -1 = the answer never appeared in an observation
    advantages: torch.Tensor  # (B, T) float, 0 off the policy mask
    logprob_stats: dict[str, float] | None = None  # with `rollout.recompute_logprobs`: sampler vs trainer


# ----------------------------------------------------------------------------------------------------------------
# algorithm: 1-2 collect
# ----------------------------------------------------------------------------------------------------------------
def questions_for(questions: Sequence[QAExample], step: int, train: TrainConfig, rank: int = 0,
                  world: int = 1) -> tuple[list[QAExample], int]:
    """This rank's questions for `step` and the global index of its first one (its group-id offset)."""
    P = train.prompts_per_step
    rng = random.Random(train.seed * 1_000_003 + step)
    chosen = [questions[i] for i in rng.sample(range(len(questions)), min(P, len(questions)))]
    per_rank = math.ceil(len(chosen) / world)
    start = rank * per_rank
    return chosen[start:start + per_rank], step * P + start


def collect(policy, engine: RolloutEngine, questions: Sequence[QAExample], step: int, cfg: RLSettings,
            rank: int = 0, world: int = 1) -> Experience:
    mine, offset = questions_for(questions, step, cfg.train, rank, world)
    torch.manual_seed((cfg.train.seed * 7919 + step * 104_729 + rank) % 2**64)  # 64-bit seed
    policy.eval()
    batch = engine.run(mine, cfg.rollout.group_size, cfg.rollout.temperature, cfg.rollout.top_p,
                       group_offset=offset)
    stats = recompute_logprobs(policy, batch, cfg) if cfg.rollout.recomputes_logprobs else None
    exp = make_experience(batch, cfg.reward, cfg.advantage, cfg.answer_normalization)
    exp.logprob_stats = stats
    return exp


# ----------------------------------------------------------------------------------------------------------------
# algorithm: 3-4 score -> advantages
# ----------------------------------------------------------------------------------------------------------------
def score(batch: RolloutBatch, reward: RewardConfig,
          normalization: str = DEFAULT_NORMALIZATION) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outcome, em, first_occurrence) per rollout, from the final answer and the observation text only, answers
    matched under `normalization` (`eval.answer_normalization`)."""
    em, outcome, first = [], [], []
    for r in batch.rollouts:
        golds = r.example.golden_answers
        o = outcome_reward(r.answer, golds, normalization)
        em.append(o)
        outcome.append(o + (format_reward(r.turns, reward.format_bonus) if reward.format_bonus else 0.0))
        f = first_occurrence_turn(r.observations, golds, normalization)
        first.append(-1 if f is None else f)
    return (torch.tensor(outcome, dtype=torch.float32), torch.tensor(em, dtype=torch.float32),
            torch.tensor(first, dtype=torch.long))


def make_experience(batch: RolloutBatch, reward: RewardConfig, advantage: AdvantageConfig,
                    normalization: str = DEFAULT_NORMALIZATION) -> Experience:
    outcome, em, first = score(batch, reward, normalization)
    t = batch.tensors
    adv = get_advantage(advantage.estimator)(outcome=outcome, first_occurrence=first, group_ids=batch.group_ids,
                                             turn_index=t.turn_index, policy_mask=t.policy_mask,
                                             alpha=reward.folr_alpha, eps=advantage.eps)  # (B, T)
    return Experience(batch, outcome, em, first, adv)


# ----------------------------------------------------------------------------------------------------------------
# algorithm: 5-6 update
# ----------------------------------------------------------------------------------------------------------------
class Reference:
    """The KL reference policy, one method: `logprobs(batch)`, (B, T) log-probs of the rollouts under it.

    `model` is the frozen reference; with `adapters_disabled` it is the LoRA policy itself under peft's
    `disable_adapter()` (in eval mode): the starting weights, with no second copy of them loaded."""

    def __init__(self, model, cfg: RLSettings, adapters_disabled: bool = False):
        self.model, self.cfg, self.adapters_disabled = model, cfg, adapters_disabled

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        off = self.model.disable_adapter() if self.adapters_disabled else contextlib.nullcontext()
        with off:
            return policy_token_logprobs(self.model, batch, self.cfg)


def policy_token_logprobs(model, batch: RolloutBatch, cfg: RLSettings) -> torch.Tensor:
    """(B, T) log-probs of the rollouts' policy tokens under `model` at `rollout.temperature` (0 elsewhere), in
    eval mode, without gradients, micro-batched like the update."""
    t, lengths = batch.tensors, batch.tensors.attention_mask.sum(1)  # lengths (B,)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros_like(batch.logprobs)  # (B, T)
    with torch.no_grad():
        groups = batch.group_ids if cfg.train.prefix_sharing else None  # sharing a group's prompt
        for rows in micro_batches(range(len(batch.rollouts)), lengths, cfg.train.micro_batch_size, groups):
            lp = token_logprobs(model, take(t.input_ids, rows, lengths, device),
                               take(t.attention_mask, rows, lengths, device), cfg.rollout.temperature,
                               mask=take(t.policy_mask, rows, lengths, device),
                               groups=None if groups is None else groups[rows])[0]  # 0 off policy tokens
            out[rows, :lp.shape[1]] = lp.cpu()
    model.train(was_training)
    return out


def recompute_logprobs(policy, batch: RolloutBatch, cfg: RLSettings) -> dict[str, float]:
    """Replace the sampler's log-probs in `batch` with the trainer's (PPO's old log-probs; `rollout.
    recompute_logprobs`) and return how far apart they were on policy tokens: `logp_delta_mean`, `logp_delta_max`
    (|sampler - trainer|, nats). Under FSDP every rank must call it (it runs the sharded forward)."""
    mine = policy_token_logprobs(policy, batch, cfg)  # (B, T)
    mask = batch.tensors.policy_mask.bool()
    delta = (batch.logprobs - mine).abs()[mask]
    batch.logprobs = mine
    return {"logp_delta_mean": float(delta.mean()) if delta.numel() else 0.0,
            "logp_delta_max": float(delta.max()) if delta.numel() else 0.0}


LOGGED = ("loss", "pg_loss", "kl", "entropy")
"""Loss metrics divided by the global denominator: summed over micro-batches and ranks they give the mini-batch's."""


def update(policy, opt: torch.optim.Optimizer, sched, exp: Experience, reference: Reference | None,
           cfg: RLSettings, all_sum=lambda x: x, world: int = 1, step: int = 0) -> dict[str, float]:
    """PPO epochs over mini-batches of `exp`; returns the loss metrics (means over the optimizer steps, each the
    global mini-batch value over all ranks), grad_norm, lr and skipped_nonfinite. `all_sum` sums a tensor over
    ranks (identity on one process): the loss denominator and the metrics, never the gradients."""
    o, tcfg = cfg.optim, cfg.train
    t, B = exp.batch.tensors, len(exp.batch.rollouts)
    device = next(policy.parameters()).device
    n_mini = max(1, round(B * world / tcfg.mini_batch_size))
    bounds = [round(i * B / n_mini) for i in range(n_mini + 1)]
    lengths = t.attention_mask.sum(1)  # (B,)
    ref_logp = reference.logprobs(exp.batch) if reference is not None and o.kl_coef > 0 else None  # (B, T)
    keys = [k for k in LOGGED if k != "kl" or ref_logp is not None]
    groups = exp.batch.group_ids if cfg.train.prefix_sharing else None  # sharing a group's prompt
    sums: dict[str, float] = {}
    skipped = 0
    policy.train()
    for _ in range(tcfg.ppo_epochs):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mask = t.policy_mask[lo:hi]  # (b, T)
            local = (mask.sum() if o.loss_agg == "token-mean" else (mask.sum(1) > 0).sum()).double()
            denom = float(all_sum(local.clone()).clamp(min=1))
            opt.zero_grad(set_to_none=True)
            acc = torch.zeros(len(keys) + 2, dtype=torch.float64)  # keys, clip_frac * tokens, tokens
            for rows in micro_batches(range(lo, hi), lengths, tcfg.micro_batch_size, groups):
                policy_mask = take(t.policy_mask, rows, lengths, device)  # (b, T')
                logp, ent = token_logprobs(policy, take(t.input_ids, rows, lengths, device),
                                           take(t.attention_mask, rows, lengths, device), cfg.rollout.temperature,
                                           with_entropy=True, mask=policy_mask, entropy_grad=bool(o.entropy_coef),
                                           groups=None if groups is None else groups[rows])  # (b, T') each
                loss, m = policy_loss(
                    logp, take(exp.batch.logprobs, rows, lengths, device), take(exp.advantages, rows, lengths,
                                                                                 device), policy_mask,
                    ref_logp=None if ref_logp is None else take(ref_logp, rows, lengths, device),
                    entropy=ent, clip_ratio=o.clip_ratio, kl_coef=o.kl_coef,
                    entropy_coef=o.entropy_coef, agg=o.loss_agg, denominator=denom, kl_clamp=o.kl_clamp)
                loss.backward()
                tokens = float(policy_mask.sum())
                acc += torch.tensor([m[k] for k in keys] + [m["clip_frac"] * tokens, tokens], dtype=torch.float64)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), o.grad_clip)
            grad_norm = float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())  # a DTensor under FSDP
            acc = all_sum(acc)  # NaN/inf on any rank makes the sum non-finite
            if math.isfinite(grad_norm) and bool(torch.isfinite(acc).all()):
                opt.step()
            else:
                skipped += 1
                log.warning("step %d: non-finite loss or gradient, optimizer step skipped", step)
                opt.zero_grad(set_to_none=True)
            metrics = {**dict(zip(keys, acc.tolist())), "clip_frac": float(acc[-2] / acc[-1].clamp(min=1)),
                       "grad_norm": grad_norm}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / (n_mini * tcfg.ppo_epochs)
    if skipped < n_mini * tcfg.ppo_epochs:  # a fully skipped step does not advance the schedule
        sched.step()
    return {**sums, "skipped_nonfinite": float(skipped), "lr": sched.get_last_lr()[0]}


def micro_batches(rows: Sequence[int], lengths: torch.Tensor, size: int,
                  groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Micro-batches of `rows`, sorted by length so each is padded only to its own longest rollout; with `groups`
    (B,) whole groups, sorted by their longest rollout (a group's rows share their prompt's forward)."""
    order = sorted(rows, key=lambda r: int(lengths[r]))
    if groups is not None:
        longest = {int(groups[r]): int(lengths[r]) for r in order}  # ascending: the last one written is the longest
        order = sorted(order, key=lambda r: (longest[int(groups[r])], int(groups[r])))  # stable: by length within
    return [torch.tensor(order[i:i + size]) for i in range(0, len(order), size)]


def take(x: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, device) -> torch.Tensor:
    """Rows of a micro-batch, cut to its longest rollout (length-sorted micro-batches pad little)."""
    return x[rows, :int(lengths[rows].max())].to(device)
