"""Building blocks shared by the stage drivers: the retriever, the policy, the rollout engine, dataset files.

Each takes the config sections it needs; the stage drivers (`train.sft.run_sft`, `train.rl.run_rl`, ...) compose
them, and the Prefect flows only call the drivers.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tspo_core.agent.backends import HFBackend, VLLMBackend
from tspo_core.agent.protocol import INVALID_ACTION_MESSAGE, PROMPT_TEMPLATES
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import ModelConfig, PathsConfig, RetrievalConfig, RolloutConfig
from tspo_core.data.loaders import load_flashrag_jsonl
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError, DataError
from tspo_core.policy import build_tiny_model, build_tokenizer, load_policy


def open_retriever(retrieval: RetrievalConfig, paths: PathsConfig):
    """In-process search over the built index, or the HTTP client for a running server (`retrieval.mode`)."""
    if retrieval.mode == "http":
        from tspo_core.retrieval.client import HttpRetriever

        return HttpRetriever(retrieval.url, timeout=retrieval.timeout_s, retries=retrieval.retries,
                             backoff=retrieval.backoff_s)
    from tspo_core.retrieval.retriever import load_retriever

    return load_retriever(paths.index_dir)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_policy(model: ModelConfig, paths: PathsConfig, seed: int = 0):
    """(model, tokenizer) to start SFT from: the tiny Qwen2 with a tokenizer over the world's lexicon when
    `model.name_or_path` is null, else the named checkpoint."""
    if model.name_or_path is not None:
        return load_policy(model.name_or_path, model, device())
    lexicon_file = Path(paths.data_dir) / "lexicon.json"
    if not lexicon_file.is_file():
        raise ConfigError(f"{lexicon_file}: missing; the tiny model (model.name_or_path: null) needs the synthetic "
                          "world's lexicon. Set model.name_or_path to a checkpoint to train on real data.")
    lexicon = json.loads(lexicon_file.read_text(encoding="utf-8"))
    protocol_text = [*PROMPT_TEMPLATES.values(), INVALID_ACTION_MESSAGE, "Doc Title information"]
    tokenizer = build_tokenizer(lexicon["words"] + protocol_text, lexicon["syllables"])
    return build_tiny_model(model.tiny, tokenizer, seed=seed).to(device()), tokenizer


def training_precision(model: ModelConfig, lora: bool = False):
    """(the ModelConfig to load a policy that will be trained, the autocast context to train it in).

    `model.dtype: bfloat16` trains fp32 master weights under bf16 autocast: AdamW on bf16 weights rounds most
    updates away at the paper's lr 1e-6 (a bf16 weight near 0.02 moves in steps of about 1e-4). With `lora` (RL
    with `model.lora_r > 0`) the base weights are frozen, so nothing rounds them: they stay in bf16 (half the
    memory) and only the adapters, which peft keeps in fp32, are trained. float16 training would need loss
    scaling, which is not implemented: it fails here, by name, instead of training something else than asked.
    """
    if model.dtype == "float16":
        raise ConfigError("model.dtype = float16: training in fp16 needs loss scaling, which is not implemented; "
                          "use bfloat16 (GPUs) or float32")
    if model.dtype == "bfloat16":
        if lora:
            return model, torch.autocast(device_type=device(), dtype=torch.bfloat16)
        return (model.model_copy(update={"dtype": "float32"}),
                torch.autocast(device_type=device(), dtype=torch.bfloat16))
    return model, contextlib.nullcontext()


def prepare_for_training(policy, model: ModelConfig):
    """Apply `model.gradient_checkpointing` to a policy about to be trained; returns it."""
    if model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    return policy


def rollout_settings(rollout: RolloutConfig, retrieval: RetrievalConfig, model: ModelConfig) -> RolloutSettings:
    return RolloutSettings(max_turns=rollout.max_turns, max_new_tokens_per_turn=rollout.max_new_tokens_per_turn,
                           max_obs_tokens=rollout.max_obs_tokens, max_context_tokens=rollout.max_context_tokens,
                           top_k=retrieval.top_k, use_chat_template=model.use_chat_template,
                           prompt_template=rollout.prompt_template)


def make_backend(policy, tokenizer, rollout: RolloutConfig, model: ModelConfig, checkpoint: str | None = None,
                 sleep_mode: bool = False, seed: int = 0) -> HFBackend | VLLMBackend:
    """The configured generation backend (`rollout.backend`): hf over `policy`, or a vLLM engine loaded from
    `checkpoint` with the `rollout.vllm_*` settings (`sleep_mode`: an RL engine that sleeps during updates when
    `rollout.vllm_sleep`, GPU only)."""
    if rollout.backend != "vllm":
        return HFBackend(policy, tokenizer)
    if checkpoint is None:
        raise ConfigError("rollout.backend = vllm needs a saved checkpoint directory to load")
    return VLLMBackend.from_pretrained(checkpoint, dtype=model.dtype, seed=seed,
                                       gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                                       kv_cache_gb=rollout.vllm_kv_cache_gb, enforce_eager=rollout.vllm_enforce_eager,
                                       sleep_mode=rollout.vllm_sleep and sleep_mode)


def make_engine(policy, tokenizer, retriever, rollout: RolloutConfig, retrieval: RetrievalConfig,
                model: ModelConfig, checkpoint: str | None = None, sleep_mode: bool = False) -> RolloutEngine:
    """The rollout engine over the configured backend (`make_backend`)."""
    backend = make_backend(policy, tokenizer, rollout, model, checkpoint, sleep_mode)
    return RolloutEngine(backend, tokenizer, retriever, rollout_settings(rollout, retrieval, model))


def load_split(data_dir: str | Path, name: str, split: str) -> list[QAExample]:
    """`data_dir/<name>/<split>.jsonl`; an absent or empty file gives []."""
    path = Path(data_dir) / name / f"{split}.jsonl"
    if not path.is_file() or path.stat().st_size == 0:
        return []
    try:
        return load_flashrag_jsonl(path)
    except DataError as err:
        if "no records" in str(err):
            return []
        raise
