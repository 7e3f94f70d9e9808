"""The RL harness around the step (`tspo_core.train.rl_step`): distributed set-up, checkpoints and resume with
fingerprints, periodic dev evaluation, the export of the final model, and the stage driver `run_rl`.

- `RLTrainer` holds the run's state (policy, `Reference`, optimizer, scheduler, step, history) and calls the step's
  `collect` and `update`. With world size > 1 the policy (and the frozen reference) are sharded with FSDP2
  (`tspo_core.train.distributed`); rollouts run on gathered parameters.
- Optionally (`train.eval_every`), greedy EM on fixed dev subsets after the update, logged as `dev_em` (the
  unweighted mean over families, like the report's Avg.) and `dev_em_<family>`: learning measured the way the
  final evaluation measures it. It runs on rank 0 under a forked RNG, so it does not change the training run.
- Linear warmup (`optim.warmup_ratio`) then constant LR, as in Search-R1's verl setting; checkpoints with optimizer,
  scheduler and RNG states every `train.checkpoint_every` steps (atomic); `fit` resumes from the last one.
- `model.lora_r > 0` trains peft adapters instead of all parameters (`tspo_core.train.lora`): the optimizer holds
  the trainable parameters only, checkpoints hold the adapters, and the stage's final model has them merged in.
- `rollout.backend: vllm`: a vLLM engine in this process samples the rollouts (under torchrun one per rank, each a
  data-parallel replica inside the trainer's process group). The policy's weights are pushed
  into it in place when training starts (a name it cannot load fails there) and after every update, before the dev
  evaluation (`tspo_core.train.weight_sync`: LoRA merged on the fly, FSDP shards gathered); on a GPU its sleep mode
  frees the KV cache during the update. The old log-probs are recomputed with the trainer's model
  (`rollout.recompute_logprobs`) and the gap to vLLM's is logged (`logp_delta_mean`, `logp_delta_max`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from tspo_core.agent.diagnostics import category_shares, group_diagnostics
from tspo_core.agent.rollout import RolloutEngine
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError, TSPOError
from tspo_core.io import restore_interrupted_swap
from tspo_core.metrics import DEFAULT_NORMALIZATION, exact_match
from tspo_core.train import rl_step
from tspo_core.train.checkpoint import STATE_FILE, CheckpointError, copy_checkpoint_files, load_checkpoint, \
    load_trainer_state, save_checkpoint, save_history
from tspo_core.train.distributed import Dist, full_state_dict, gathered, shard
from tspo_core.train.logprobs import token_logprobs
from tspo_core.train.lora import describe, lora_settings
from tspo_core.train.rl_step import Experience, Reference, RLSettings
from tspo_core.train.weight_sync import policy_weights

__all__ = ["Dist", "Experience", "RLSettings", "RLTrainer", "TrainingError", "dev_subsets", "greedy_dev_em",
           "run_rl", "token_logprobs"]

log = logging.getLogger(__name__)


class TrainingError(TSPOError):
    """The run cannot go on (e.g. it would train zero steps, or every step was skipped)."""


class RLTrainer:
    """The RL loop over `model`. A peft LoRA model (`tspo_core.train.lora.apply_lora`) trains its adapters only
    and is its own KL reference with the adapters disabled: pass `ref_model=None` with it. With `dist.world > 1`
    (a process group set up) the policy and the reference are sharded with FSDP2 in place (`bf16`: a bf16
    mixed-precision policy), before the optimizer is built over the trainable parameters."""

    def __init__(self, model, ref_model, tokenizer, engine: RolloutEngine, questions: Sequence[QAExample],
                 cfg: RLSettings, dist: Dist = Dist(), start_id: str = "",
                 dev_sets: Mapping[str, Sequence[QAExample]] | None = None, bf16: bool = False):
        if not questions:
            raise TrainingError("RL training set is empty")
        self.dev_sets = {k: list(v) for k, v in (dev_sets or {}).items() if v}
        self.model, self.ref, self.tok, self.engine, self.cfg, self.dist = (model, ref_model, tokenizer, engine,
                                                                           cfg, dist)
        self.questions = list(questions)
        self.start_id = start_id  # identifies the starting checkpoint (part of the fingerprint)
        self.lora = lora_settings(model)  # None: all parameters train
        if self.lora and ref_model is not None:
            raise TrainingError("a LoRA policy is its own KL reference (its adapters disabled); pass ref_model=None "
                                "instead of a second copy of the base weights")
        if ref_model is not None:
            ref_model.eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
        if dist.world > 1:
            # every rank must run as many forwards as the others (FSDP gathers each layer): equal shares
            n = min(cfg.train.prompts_per_step, len(self.questions))
            if n % dist.world:
                raise ConfigError(f"train.prompts_per_step: {n} questions per step do not split evenly over "
                                  f"{dist.world} ranks")
            for m in (model, ref_model):
                if m is not None:
                    shard(m, bf16)
        self.reference = (Reference(ref_model, cfg) if ref_model is not None else
                          Reference(model, cfg, adapters_disabled=True) if self.lora else None)
        o = cfg.optim
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                     betas=tuple(o.betas), weight_decay=o.weight_decay)
        warmup = int(o.warmup_ratio * cfg.train.steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
        self.step = 0
        self.history: list[dict] = []

    # -- the step (tspo_core.train.rl_step) ---------------------------------------------------------------------
    def questions_for(self, step: int) -> tuple[list[QAExample], int]:
        return rl_step.questions_for(self.questions, step, self.cfg.train, self.dist.rank, self.dist.world)

    @property
    def pushes_weights(self) -> bool:
        """Whether rollouts come from an engine of its own (vLLM) that needs the policy's weights pushed in."""
        return hasattr(self.engine.backend, "push_weights")

    def collect(self, step: int) -> Experience:
        # the HF backend generates with the policy itself: on gathered parameters; a vLLM engine holds its own copy
        with contextlib.nullcontext() if self.pushes_weights else gathered(self.model):
            return rl_step.collect(self.model, self.engine, self.questions, step, self.cfg, self.dist.rank,
                                   self.dist.world)

    def sync_weights(self) -> float:
        """Push the policy's current weights into the rollout engine (vLLM; LoRA merged, FSDP shards gathered:
        `tspo_core.train.weight_sync`), waking it first; returns the seconds it took (0 for the HF backend)."""
        if not self.pushes_weights:
            return 0.0
        t0 = time.monotonic()
        with torch.no_grad():
            self.engine.backend.push_weights(policy_weights(self.model))
        return time.monotonic() - t0

    def update(self, exp: Experience) -> dict[str, float]:
        return rl_step.update(self.model, self.opt, self.sched, exp, self.reference, self.cfg, self.dist.all_sum,
                              self.dist.world, self.step)

    def reference_logprobs(self, exp: Experience) -> torch.Tensor | None:
        """(B, T) log-probs of the rollouts under the KL reference; None without KL."""
        if self.cfg.optim.kl_coef <= 0 or self.reference is None:
            return None
        return self.reference.logprobs(exp.batch)

    def dev_em(self, batch_size: int = 64) -> dict[str, float]:
        """`greedy_dev_em` of the current policy (rank 0 only; {} elsewhere; every rank must call it under FSDP).
        The RNG is forked, so evaluating does not change the training run."""
        if not self.dev_sets:
            return {}
        was_training = self.model.training
        self.model.eval()
        with gathered(self.model), torch.random.fork_rng(devices=[]):
            out = (greedy_dev_em(self.engine, self.dev_sets, batch_size, self.cfg.answer_normalization)
                   if self.dist.rank == 0 else {})
        self.model.train(was_training)
        return out

    def train_step(self) -> dict[str, float]:
        t0 = time.monotonic()
        exp = self.collect(self.step)
        t_roll = time.monotonic() - t0
        if self.pushes_weights:
            self.engine.backend.sleep()  # GPU sleep mode: its KV cache freed during the update
        metrics = self.update(exp)
        t_sync = self.sync_weights()  # before the dev evaluation, which samples with the engine
        stats = exp.batch.stats()
        diag = group_diagnostics(exp.outcome, exp.first_occurrence, exp.batch.group_ids, self.cfg.reward.folr_alpha)
        cats = category_shares(exp.first_occurrence, exp.em)
        rec = {"step": self.step + 1, "reward_mean": exp.outcome.mean().item(), "em": exp.em.mean().item(),
               "folr_share": (exp.first_occurrence >= 0).float().mean().item(), **diag, **cats,
               **{k: metrics[k] for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "lr",
                                          "skipped_nonfinite") if k in metrics},
               "response_tokens": stats["response_tokens_mean"], "turns": stats["turns_mean"],
               "searches": stats["searches_mean"], "invalid_rate": stats["invalid_action_rate"],
               **(exp.logprob_stats or {}), "rollout_s": round(t_roll, 3),
               **({"weight_sync_s": round(t_sync, 3)} if self.pushes_weights else {}),
               "step_s": round(time.monotonic() - t0, 3)}
        every = self.cfg.train.eval_every
        if self.dev_sets and every and ((self.step + 1) % every == 0 or self.step + 1 == self.cfg.train.steps):
            rec.update(self.dev_em())
        # JSON has no NaN: the loss of a skipped non-finite step is recorded as null (see skipped_nonfinite)
        rec = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}
        self.step += 1
        self.history.append(rec)
        return rec

    # -- checkpoints and the loop -----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Identifies the run's settings (and the starting weights' shapes); stored in every checkpoint."""
        blob = json.dumps({**{k: getattr(v, "model_dump", lambda **_: v)(mode="json")
                              for k, v in self.cfg.__dict__.items()},
                           "start": self.start_id, **({"lora": self.lora} if self.lora else {})}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state(self) -> dict:
        """What `trainer_state.pt` holds beside the DCP model/optimizer state and the per-rank RNG files."""
        state = {"step": self.step, "fingerprint": self.fingerprint, "scheduler": self.sched.state_dict()}
        if self.lora:  # a full-parameter checkpoint has no "lora" entry
            state["lora"] = self.lora
        return state

    def save(self, path: str | Path) -> None:
        """A DCP checkpoint (`tspo_core.train.checkpoint`); every rank must call it."""
        save_checkpoint(path, self.model, self.opt, self.tok, self.state(), self.history, self.dist,
                        trainable_only=bool(self.lora))

    def resume(self, path: str | Path) -> None:
        """Load model weights (a LoRA run: its adapters), optimizer, scheduler, RNG and history from a checkpoint
        written by `save`, by any number of ranks. A checkpoint of other settings fails, naming the LoRA settings
        when those differ."""
        path = Path(path)
        state, history = load_trainer_state(path)
        if state.get("lora") != self.lora:
            raise CheckpointError(f"{path}: the checkpoint trains {describe(state.get('lora'))} but this run trains "
                                  f"{describe(self.lora)}; it cannot resume from it (remove it to start afresh)")
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{path}: checkpoint of other settings (fingerprint {state.get('fingerprint')}, "
                                  f"this run {self.fingerprint}); it cannot resume from it")
        load_checkpoint(path, self.model, self.opt, self.dist, trainable_only=bool(self.lora))
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], history

    def fit(self, ckpt_dir: str | Path, on_step: Callable[[dict, list[dict]], None] | None = None) -> list[dict]:
        """Train to `train.steps`, resuming from `ckpt_dir` when it holds a checkpoint; returns the history.
        `on_step(record, history)` is called after every step with the full history so far (resumed steps too)."""
        ckpt_dir = Path(ckpt_dir)
        if self.dist.rank == 0 and restore_interrupted_swap(ckpt_dir):
            log.warning("%s: restored the checkpoint a crash left moved aside", ckpt_dir)
        self.dist.barrier()
        if (ckpt_dir / STATE_FILE).exists():
            stored_state = load_trainer_state(ckpt_dir)[0]
            if stored_state.get("fingerprint") != self.fingerprint:
                # a checkpoint of other settings is a different run, never a starting point; it stays in place
                # until this run's first checkpoint replaces it (the stage driver, `run_rl`, never trains over a
                # finished run: it trains beside it, see tspo_core.train.outputs)
                lora_change = ("" if stored_state.get("lora") == self.lora else
                               f" (it trains {describe(stored_state.get('lora'))}, this run {describe(self.lora)})")
                log.warning("%s holds a checkpoint of different settings%s; starting a fresh run", ckpt_dir,
                            lora_change)
            else:
                self.resume(ckpt_dir)
                log.info("resumed from %s at step %d", ckpt_dir, self.step)
        if self.pushes_weights:  # the engine starts from these weights (resumed, or LoRA merged); a name it cannot
            self.sync_weights()  # load fails here, before any rollout
        total = self.cfg.train.steps
        while self.step < total:
            rec = self.train_step()
            if on_step:
                on_step(rec, self.history)
            if self.step % self.cfg.train.checkpoint_every == 0 or self.step == total:
                self.save(ckpt_dir)
        trained = sum(1 for h in self.history if not h.get("skipped_nonfinite"))
        if trained == 0:
            raise TrainingError(f"no optimizer step succeeded in {total} steps (all skipped as non-finite)")
        return self.history


# ----------------------------------------------------------------------------------------------------------------
# stage driver
# ----------------------------------------------------------------------------------------------------------------
def run_rl(params, estimator: str, out_dir: str | Path, on_step: Callable[[dict, list[dict]], None] | None = None,
           dist: Dist = Dist(), metrics_dir: str | Path | None = None) -> list[dict]:
    """Stage `train@<estimator>`: RL from the SFT checkpoint (policy and frozen reference) on `rl_train.jsonl`.

    `out_dir/checkpoint` holds the finished run's last checkpoint, `out_dir/model` its final model; with
    `metrics_dir`, `train_<estimator>.{jsonl,csv,json}` there hold its history and summary. A run of other settings
    (or the first run) trains beside them in `.<out_dir name>.next/` and replaces all of them together only when it
    ends well (`tspo_core.train.outputs`); a run of the same settings resumes where its checkpoint stopped.
    With `model.lora_r > 0` the policy trains peft adapters (`tspo_core.train.lora`): the reference is the policy
    with its adapters disabled (no second model loaded), the frozen base stays in `model.dtype`, the checkpoint
    holds the adapters, and `out_dir/model` is a plain HF checkpoint with them merged into the base weights.
    """
    from tspo_core.config import AdvantageConfig, check_rl_rollout
    from tspo_core.data.loaders import load_flashrag_jsonl
    from tspo_core.pipeline import device, make_engine, open_retriever, prepare_for_training, training_precision
    from tspo_core.policy import load_policy
    from tspo_core.train import outputs
    from tspo_core.train.lora import apply_lora

    check_rl_rollout(params.rollout)
    out_dir = Path(out_dir)
    sft_dir = Path(params.paths.sft_dir)
    lora = params.model.lora_r > 0
    train_model, autocast = training_precision(params.model, lora=lora)
    policy, tokenizer = load_policy(sft_dir, train_model, device())
    prepare_for_training(policy, params.model)
    if lora:  # the reference is this policy with its adapters disabled
        policy, ref = apply_lora(policy, params.model, seed=params.train.seed), None
    else:
        ref = load_policy(sft_dir, params.model, device())[0] if params.optim.kl_coef > 0 else None
    questions = load_flashrag_jsonl(Path(params.paths.data_dir) / "rl_train.jsonl")
    retriever = open_retriever(params.retrieval, params.paths)
    engine = make_engine(policy, tokenizer, retriever, params.rollout, params.retrieval, params.model,
                         checkpoint=str(sft_dir), sleep_mode=True)
    adv = AdvantageConfig(**{**params.advantage.model_dump(), "estimator": estimator})
    cfg = RLSettings(params.rollout, params.reward, adv, params.optim, params.train, params.eval.answer_normalization)
    dev_sets = dev_subsets(params) if params.train.eval_every else None
    trainer = RLTrainer(policy, ref, tokenizer, engine, questions, cfg, dist, start_id=_dir_id(sft_dir),
                        dev_sets=dev_sets, bf16=params.model.dtype == "bfloat16")
    if dist.rank == 0:
        outputs.recover(out_dir)
    dist.barrier()  # every rank sees the recovered directory before it picks where to train
    run_dir = out_dir if _checkpoint_of(out_dir / "checkpoint", trainer.fingerprint) else outputs.staging_dir(out_dir)
    if dist.rank == 0 and run_dir != out_dir and not _checkpoint_of(run_dir / "checkpoint", trainer.fingerprint):
        outputs.discard_pending(run_dir)  # the history of an abandoned run of other settings

    def step_done(rec: dict, history: list[dict]) -> None:
        if dist.rank == 0 and metrics_dir is not None:  # the history so far, beside the checkpoint of this run
            outputs.stage_history(run_dir, metrics_dir, estimator, history)
        if on_step:
            on_step(rec, history)

    with autocast:
        history = trainer.fit(run_dir / "checkpoint", on_step=step_done)
    export_model(trainer, run_dir / "model", sft_dir, params.model)
    if dist.rank == 0:
        if metrics_dir is not None:
            outputs.stage_history(run_dir, metrics_dir, estimator, history, final=True)
        outputs.commit(run_dir, out_dir)
    dist.barrier()  # no rank returns before the outputs are in place
    return history


def export_model(trainer: RLTrainer, model_dir: str | Path, base_dir: str | Path, model_cfg) -> None:
    """Write the stage's final model, once: the full state dict gathered from the ranks (a collective), saved by
    rank 0 as a plain HF checkpoint (fp32 master weights) with the tokenizer and the history; under LoRA the
    adapters merged into the base weights of `base_dir` (`tspo_core.train.lora.write_merged_model`)."""
    import tempfile

    from tspo_core.io import atomic_dir
    from tspo_core.train.lora import write_merged_model

    full = full_state_dict(trainer.model)
    if trainer.dist.rank != 0:
        return
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix=f".{model_dir.name}.export.", dir=model_dir.parent) as d:
        trainer.model.save_pretrained(d, state_dict=full)  # under LoRA: peft writes the adapters alone
        trainer.tok.save_pretrained(d)
        save_history(d, trainer.history)
        if trainer.lora:
            write_merged_model(d, model_dir, base_dir, model_cfg)
        else:
            with atomic_dir(model_dir) as tmp:
                copy_checkpoint_files(d, tmp)


def _checkpoint_of(ckpt_dir: Path, fingerprint: str) -> bool:
    """Whether `ckpt_dir` holds a checkpoint of the run with `fingerprint` (a broken one raises CheckpointError)."""
    return (ckpt_dir / STATE_FILE).exists() and load_trainer_state(ckpt_dir)[0].get("fingerprint") == fingerprint


def greedy_dev_em(engine: RolloutEngine, dev_sets: Mapping[str, Sequence[QAExample]],
                  batch_size: int = 64, normalization: str = DEFAULT_NORMALIZATION) -> dict[str, float]:
    """Greedy EM per dataset (`dev_em_<name>`) and their unweighted mean (`dev_em`)."""
    out: dict[str, float] = {}
    for name, examples in dev_sets.items():
        hits = 0.0
        for lo in range(0, len(examples), batch_size):
            batch = engine.run(list(examples[lo:lo + batch_size]), group_size=1, temperature=0.0)
            hits += sum(exact_match(r.answer, list(r.example.golden_answers), normalization)
                        for r in batch.rollouts)
        out[f"dev_em_{name}"] = hits / len(examples)
    return {"dev_em": sum(out.values()) / len(out), **out}


def dev_subsets(params) -> dict[str, list[QAExample]]:
    """`train.eval_questions` fixed-seed dev questions of each of `eval.datasets` that has a dev split (the test
    split is never looked at during training); a warning names the datasets without one."""
    from tspo_core.data.subsets import subset
    from tspo_core.pipeline import load_split

    out, missing = {}, []
    for name in params.eval.datasets:
        path = Path(params.paths.data_dir) / name / "dev.jsonl"
        examples = load_split(params.paths.data_dir, name, "dev") if path.is_file() else []
        if examples:
            out[name] = subset(examples, params.train.eval_questions, params.eval.seed)
        else:
            missing.append(name)
    if missing:
        log.warning("train.eval_every: no dev split for %s; dev EM averages the others", ", ".join(missing))
    if not out:
        raise ConfigError(f"train.eval_every = {params.train.eval_every} but no dataset in eval.datasets has a dev "
                          f"split under {params.paths.data_dir}; set train.eval_every: 0")
    return out


def _dir_id(path: Path) -> str:
    """Cheap identity of a checkpoint directory: its small files' contents and its large files' sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.stat().st_size < 1_000_000 else str(f.stat().st_size).encode())
    return h.hexdigest()[:16]
