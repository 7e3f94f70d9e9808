"""Next-token log-probs of the tokens a loss reads, without ever materializing (B, T, V) logits.

The decoder body runs over every position (attention needs them all); the LM head runs only on the rows whose next
token is read: policy tokens for the RL update and its KL reference, policy and observation tokens for SFT. TRL's
GRPOTrainer likewise computes completion positions only (`logits_to_keep`, then a row-chunked log-softmax).

1. `next_token_stats`: the model's own forward runs (FSDP2 and peft behave as usual); hooks on its LM head keep the
   body's output (B, T, H), after the final norm, and put step 2-3 in place of the head's (B, T, V) logits.
2. The hidden state at position t - 1 is gathered for every read token t >= 1 (token 0 has no context).
3. `head_logprobs` on those N rows: z = head(h) / temperature in float32 and
   log p(target) = z[target] - logsumexp(z); entropy H = logsumexp(z) - sum softmax(z) * z (the same as
   -sum p log p); computed over chunks of at most `CHUNK_ELEMENTS` logits, so the peak is bounded for any
   vocabulary (V = 151,936 for Qwen2.5: 441 rows a chunk). With more than one chunk under autograd each chunk is
   recomputed in the backward (activation checkpointing), so what autograd keeps is the gathered hidden rows, not
   N x V logits.
4. `token_logprobs`: the trainer's contract, the rows scattered back into (B, T), 0 where nothing was read.

Shared prompts (`groups`): the G rollouts of one question begin with the same prompt, and the body's work on it is
the same for all G. Given each row's group, `shared_prefixes` finds the prefix the rows of a group have in common
(ending at least one token before the first token read, so every read token's hidden state lies after it); the
body runs once over each group's prefix (`use_cache`), its keys and values are indexed out to the group's rows, and
the rows' suffixes run on top of them (their positions continue the prefix; a 2-D mask hides the padding between a
shorter prefix and its suffix). Gradients reach the prefix through the shared keys and values, so the loss and its
gradients equal the full forward's within float rounding, for a fraction of the compute when prompts are long
(`tests/test_logprobs.py`). Not used where the model's forward cannot return a cache with gradients: gradient
checkpointing, sliding-window attention, and the backward of an FSDP2-sharded model (FSDP2 gathers a layer's weights
for the backward when the gradient reaches the layer's output; a cached key has no such path, so it is not used
there). Without gradients (the reference, recomputed old log-probs) it applies under FSDP2 as well.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 2**26
"""At most this many logits (256 MiB in float32) per chunk of rows."""


class HeadOut(NamedTuple):
    logp: torch.Tensor  # (N,) float32: log p(target) at the temperature
    entropy: torch.Tensor | None  # (N,) float32, with a gradient only when asked for
    argmax: torch.Tensor | None  # (N,) long: the most likely token (first on ties, as `argmax`)


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0, *,
                  with_entropy: bool = False, entropy_grad: bool = False, with_argmax: bool = False,
                  chunk_elements: int = CHUNK_ELEMENTS) -> HeadOut:
    """Step 3 of the module docstring on rows `hidden` (N, H) with `targets` (N,); temperature 0 (greedy) reads
    the logits at temperature 1, as the rollout backends do."""
    vocab = head.weight.shape[0]
    rows = max(1, chunk_elements // vocab)
    fn = functools.partial(_chunk, head, temperature, with_entropy, entropy_grad, with_argmax)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and len(hidden) > rows
    outs = [checkpoint(fn, hidden[i:i + rows], targets[i:i + rows], use_reentrant=False) if recompute
            else fn(hidden[i:i + rows], targets[i:i + rows]) for i in range(0, len(hidden), rows)]
    if not outs:  # no row at all
        outs = [fn(hidden[:0], targets[:0])]
    return HeadOut(*(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs)))


def _chunk(head, temperature: float, with_entropy: bool, entropy_grad: bool, with_argmax: bool,
           h: torch.Tensor, y: torch.Tensor) -> HeadOut:
    z = head.forward(h).float()  # (n, V); `forward`, not a call: this runs inside the head's own forward hook
    if temperature > 0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z.gather(-1, y[:, None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return HeadOut(logp, entropy, z.argmax(-1) if with_argmax else None)


def _read(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens read, never column 0 (no context)."""
    read = mask.bool().clone()
    read[:, 0] = False
    return read


def shared_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, read: torch.Tensor,
                    groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For right-padded rows `input_ids` / `attention_mask` (b, T), the tokens `read` (b, T) and each row's group
    label `groups` (b,): (row_group (b,) long, the index of each row's group in 0..g-1; prefix (g,) long, the
    number of leading tokens all rows of the group share, at most the group's shortest row and at most its earliest
    read token's position minus one, so that no hidden state a read token needs lies inside it)."""
    _, row_group = torch.unique(groups, return_inverse=True)
    lengths = attention_mask.sum(1)  # (b,)
    first = torch.where(read.any(1), read.long().argmax(1), lengths)  # (b,) first read position
    prefix = []
    for g in range(int(row_group.max()) + 1 if len(groups) else 0):
        rows = (row_group == g).nonzero().squeeze(1)
        ids = input_ids[rows]
        common = int((ids == ids[:1]).all(0).long().cumprod(0).sum())  # leading columns equal in every row
        prefix.append(min(common, int(lengths[rows].min()), int(first[rows].min()) - 1))
    return row_group, torch.tensor(prefix, dtype=torch.long)


def _shares_prefix(model) -> bool:
    """Whether this model's forward can run on a prefix's cached keys and values here (module docstring)."""
    config = getattr(model, "config", None)
    if getattr(model, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
        return False
    if config is not None and getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", 0):
        return False
    if torch.is_grad_enabled():
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return False
    return True


def _prefix_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, read: torch.Tensor,
                    groups: torch.Tensor) -> dict | None:
    """The suffix pass's inputs after running each group's shared prefix once (module docstring), or None where
    sharing saves nothing or does not apply (a group without a prefix of at least one token)."""
    row_group, prefix = shared_prefixes(input_ids, attention_mask, read, groups)
    if not len(prefix) or int(prefix.min()) < 1:
        return None
    sizes = torch.bincount(row_group, minlength=len(prefix))
    if int(((sizes - 1) * prefix).sum()) <= 0:  # no token is computed fewer times
        return None
    if not _shares_prefix(model):
        return None
    P, T = int(prefix.max()), input_ids.shape[1]
    first_row = torch.stack([(row_group == g).nonzero()[0, 0] for g in range(len(prefix))])
    cols = torch.arange(P, device=input_ids.device)
    pre_mask = (cols[None, :] < prefix.to(input_ids.device)[:, None]).to(attention_mask.dtype)  # (g, P)
    head = model.get_output_embeddings()
    no_rows = head.register_forward_pre_hook(lambda _m, args: (args[0][:, :0],))  # the prefix needs no logits
    try:
        cache = model(input_ids=input_ids[first_row, :P], attention_mask=pre_mask, use_cache=True).past_key_values
    finally:
        no_rows.remove()
    if cache is None:
        return None
    cache.batch_select_indices(row_group.to(input_ids.device))  # (g, ...) -> (b, ...), differentiable
    start = prefix.to(input_ids.device)[row_group]  # (b,)
    lengths = attention_mask.sum(1)
    S = int((lengths - start).max())
    pos = start[:, None] + torch.arange(S, device=input_ids.device)  # (b, S) positions in the full rows
    inside = pos < lengths[:, None]
    at = pos.clamp(max=T - 1)
    return {"input_ids": input_ids.gather(1, at), "read": read.gather(1, at) & inside,
            "attention_mask": torch.cat([pre_mask[row_group], inside.to(attention_mask.dtype)], 1),
            "position_ids": pos, "past_key_values": cache}


def next_token_stats(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0, groups: torch.Tensor | None = None, **kw) -> HeadOut:
    """`head_logprobs` for every token t >= 1 where `mask` (B, T) is set, in the order of `input_ids[mask]`:
    log p(ids[t] | ids[<t]) read from position t - 1. `model`: an HF causal LM, possibly peft-wrapped or
    FSDP2-sharded; `groups` (b,): rows with equal labels may share their common prefix (module docstring;
    the result is the same); `kw`: `head_logprobs`'s options.

    The model's own forward runs, so FSDP2 gathers (and reshards) the weights and peft's adapters, or its
    `disable_adapter()`, apply as usual. Two hooks on its LM head replace what the head computes: the pre-hook keeps
    the body's output (B, T, H) and hands the head no position; the forward hook returns `head_logprobs` on the
    read rows in place of the logits. They are computed inside the forward and leave it as its output, so FSDP2's
    backward hooks gather the head's weight again before its gradient is computed."""
    read = _read(mask)
    extra = {}
    if groups is not None:
        suffix = _prefix_forward(model, input_ids, attention_mask, read, groups)
        if suffix is not None:  # the suffixes, read in the same order (each row's read tokens lie inside its own)
            input_ids, read, attention_mask = suffix.pop("input_ids"), suffix.pop("read"), suffix.pop("attention_mask")
            extra = suffix
    read = read[:, 1:]  # (B, T-1): position t - 1 predicts token t
    targets = input_ids[:, 1:][read]  # (N,)
    head = model.get_output_embeddings()
    hidden, stats = [], []

    def keep_hidden(_module, args):
        hidden.append(args[0])  # (B, T, H)
        return (args[0][:, :0],)

    def read_rows(_module, _args, _empty_logits):  # what has a gradient leaves as the forward's output
        stats.append(head_logprobs(hidden[0][:, :-1][read], head, targets, temperature, **kw))
        stats.append(torch.stack([stats[0].logp] + ([stats[0].entropy] if _has_grad(stats[0].entropy) else []), -1))
        return stats[1]

    pre, post = head.register_forward_pre_hook(keep_hidden), head.register_forward_hook(read_rows)
    try:
        packed = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       **extra).logits  # (N, 1 or 2)
    finally:
        pre.remove()
        post.remove()
    if packed is not stats[1]:
        raise TypeError(f"{type(model).__name__}: its forward changes the LM head's output, so the log-probs of "
                        f"selected tokens cannot be read from it")
    out = stats[0]
    return HeadOut(packed[:, 0], packed[:, 1] if packed.shape[1] == 2 else out.entropy, out.argmax)


def _has_grad(x: torch.Tensor | None) -> bool:
    return x is not None and x.requires_grad


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, mask: torch.Tensor | None = None,
                   entropy_grad: bool = True, groups: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy), each (B, T) float32: logp[:, t] = log p(ids[t] | ids[<t]) at the sampling temperature on
    the tokens of `mask` (default: all), 0 elsewhere and in column 0; the entropy of the same distributions when
    `with_entropy` (differentiable when `entropy_grad`); `groups`: see `next_token_stats`."""
    read = _read(torch.ones_like(input_ids) if mask is None else mask)  # (B, T)
    out = next_token_stats(model, input_ids, attention_mask, read, temperature, groups, with_entropy=with_entropy,
                           entropy_grad=entropy_grad)
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return (zeros.masked_scatter(read, out.logp),
            None if out.entropy is None else zeros.masked_scatter(read, out.entropy))
