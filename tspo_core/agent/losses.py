"""Policy losses on policy tokens (TSPO.md "Policy loss", following Search-R1 / GRPO practice).

All per-token inputs are (B, T) and aligned with `policy_mask` (token t's log-prob is read from logits t - 1 by the
caller). Every loss returns `(loss, metrics)`: a scalar tensor with gradient and a dict of python floats.

1. `ppo_clip` (registered policy-gradient loss): per token, with ratio = exp(logp - old_logp),
   l_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - eps_clip, 1 + eps_clip)).
2. `kl_k3_loss`: the low-variance k3 estimator of KL(pi || pi_ref), with d = ref_logp - logp,
   k3 = exp(d) - d - 1 >= 0 (0 iff the log-probs are equal), clamped per token to [-kl_clamp, kl_clamp] (default
   10, verl's `low_var_kl`): a token 30 nats from the reference would otherwise add e^30 = 1.1e13. As in verl, d is
   first clamped to [-20, 20] so that exp(d) stays finite: a clamped token then has a zero (not NaN) gradient.
3. `entropy_loss`: minus the aggregated per-token entropy (adding it with a positive coefficient is a bonus).
4. `aggregate`: the one shared aggregation, modes
   - "token-mean": sum over all policy tokens / number of policy tokens (every token weighs the same);
   - "seq-mean-token-mean": mean over each sequence's policy tokens, then mean over the sequences that have at
     least one policy token (every sequence weighs the same).
   An optional `denominator` replaces the local token (or sequence) count, so that micro-batches of one
   mini-batch can be summed into the mini-batch mean. No policy token at all gives 0 (not NaN).
5. `policy_loss` = pg + kl_coef * kl + entropy_coef * (-entropy), coefficients passed as arguments.

Log-probs are upcast to at least float32 before the exp (bf16 ratios are too coarse for the clip test).
Values at masked positions never matter: they are replaced by 0 *before* any arithmetic (`torch.where`), so a
-inf or NaN log-prob on padding changes neither the loss nor the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossOut = tuple[torch.Tensor, dict[str, float]]
PolicyLossFn = Callable[..., LossOut]
_POLICY_LOSSES: dict[str, PolicyLossFn] = {}
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy-gradient loss with the signature of `ppo_clip_loss`."""

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        _POLICY_LOSSES[name] = fn
        return fn

    return deco


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as `name`; unknown names fail with the list of known ones."""
    try:
        return _POLICY_LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown policy loss {name!r}; known: {sorted(_POLICY_LOSSES)}") from None


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


# ----------------------------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------------------------
def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on policy tokens, 0 elsewhere (also where x is NaN/inf, and with a zero gradient there)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 log-probs are too coarse for exp and the clip test); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _as_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tuple(mask.shape) != tuple(like.shape) or like.dim() != 2:
        raise ValueError(f"per-token tensors must be (B, T) and match the mask: {tuple(like.shape)} vs "
                         f"{tuple(mask.shape)}")
    return mask.bool()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              denominator: float | None = None) -> torch.Tensor:
    """Reduce per-token `values` (B, T) over the tokens where `mask` (B, T) is set; see the module docstring.

    >>> v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]); m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    >>> aggregate(v, m, "token-mean").item(), aggregate(v, m, "seq-mean-token-mean").item()
    (2.5, 3.0)
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; known: {list(AGG_MODES)}")
    m = _as_mask(mask, values)
    v = _masked(values, m)  # (B, T)
    if mode == "token-mean":
        total, count = v.sum(), m.sum()
    else:
        tokens = m.sum(dim=1)  # (B,)
        seq_mean = v.sum(dim=1) / tokens.clamp(min=1)  # (B,); 0 for a sequence without policy tokens
        total, count = seq_mean.sum(), (tokens > 0).sum()
    if denominator is not None:
        return total / denominator
    return total / count.clamp(min=1).to(v.dtype)


def _mean_on(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Token mean of a detached metric (0 without tokens)."""
    return aggregate(values.detach().float(), mask, "token-mean").item()


# ----------------------------------------------------------------------------------------------------------------
# losses (algorithm)
# ----------------------------------------------------------------------------------------------------------------
@register_policy_loss("ppo_clip")
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                  clip_ratio: float = 0.2, agg: str = "token-mean", denominator: float | None = None) -> LossOut:
    """PPO clipped surrogate; all inputs (B, T). Metrics: pg_loss, clip_frac (share of tokens where the clipped term is
    the active, strictly larger one), approx_kl (k1 estimate, mean of old_logp - logp), ratio_mean, ratio_max."""
    m = _as_mask(mask, logp)
    _as_mask(mask, old_logp), _as_mask(mask, advantages)
    logp = _upcast(logp)
    log_ratio = _masked(logp - _upcast(old_logp.detach()), m)  # (B, T), 0 off-policy-mask
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = _masked(advantages.detach().to(logp.dtype), m)  # (B, T)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    loss = aggregate(per_token, m, agg, denominator)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.item(),
            "clip_frac": _mean_on((clipped > unclipped).float(), m),
            "approx_kl": _mean_on(-log_ratio, m),
            "ratio_mean": _mean_on(ratio, m),
            "ratio_max": ratio[m].max().item() if bool(m.any()) else 1.0,
        }
    return loss, metrics


KL_LOG_RATIO_BOUND = 20.0
"""|ref_logp - logp| is clamped to this before the exp (verl's low_var_kl): exp(20) = 4.9e8 is finite in fp32."""


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), clamp(exp(d) - d - 1, -clamp, clamp) with d = ref - logp clamped
    to +-`KL_LOG_RATIO_BOUND`; same shape as inputs.

    >>> kl_k3(torch.tensor([-1.0]), torch.tensor([-1.0])).item()
    0.0
    >>> kl_k3(torch.tensor([-31.0]), torch.tensor([-1.0])).item()  # d = 30: exp(30) - 31 = 1.1e13 -> 10
    10.0
    """
    d = torch.clamp(ref_logp - logp, -KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(d) - d - 1.0, -clamp, clamp)


def kl_k3_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, agg: str = "token-mean",
               denominator: float | None = None, clamp: float = 10.0) -> LossOut:
    """Aggregated k3 KL (clamped per token to +-`clamp`) to the frozen reference on policy tokens. Metrics: kl."""
    m = _as_mask(mask, logp)
    _as_mask(mask, ref_logp)
    per_token = kl_k3(_masked(_upcast(logp), m), _masked(_upcast(ref_logp.detach()), m), clamp)  # (B, T), 0 off
    loss = aggregate(per_token, m, agg, denominator)
    return loss, {"kl": loss.item()}


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, *, agg: str = "token-mean",
                 denominator: float | None = None) -> LossOut:
    """Minus the aggregated per-token entropy (B, T). Metrics: entropy (the aggregated entropy, positive)."""
    m = _as_mask(mask, entropy)
    ent = aggregate(entropy, m, agg, denominator)
    return -ent, {"entropy": ent.item()}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                clip_ratio: float = 0.2, kl_coef: float = 0.001, entropy_coef: float = 0.0,
                agg: str = "token-mean", loss_name: str = "ppo_clip",
                denominator: float | None = None, kl_clamp: float = 10.0) -> LossOut:
    """Total loss = pg + kl_coef * kl_k3 (clamped per token to +-kl_clamp) + entropy_coef * (-entropy), all on
    policy tokens (B, T).

    `ref_logp` is required when kl_coef > 0 and `entropy` when entropy_coef > 0. When given, they are always
    reported (kl, entropy) even with a coefficient of 0, for monitoring (REFERENCE.md pitfall 9), but only enter
    the loss with a nonzero coefficient. Metrics: the pg metrics, kl and entropy when given, and loss.
    """
    pg, metrics = get_policy_loss(loss_name)(logp, old_logp, advantages, mask, clip_ratio=clip_ratio, agg=agg,
                                             denominator=denominator)
    total = pg
    if kl_coef and ref_logp is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logp")
    if entropy_coef and entropy is None:
        raise ValueError("policy_loss: entropy_coef > 0 needs entropy")
    if ref_logp is not None:
        kl, kl_metrics = kl_k3_loss(logp, ref_logp, mask, agg=agg, denominator=denominator, clamp=kl_clamp)
        metrics.update(kl_metrics)
        if kl_coef:
            total = total + kl_coef * kl
    if entropy is not None:
        ent, ent_metrics = entropy_loss(entropy, mask, agg=agg, denominator=denominator)
        metrics.update(ent_metrics)
        if entropy_coef:
            total = total + entropy_coef * ent
    metrics["loss"] = total.item()
    return total, metrics
