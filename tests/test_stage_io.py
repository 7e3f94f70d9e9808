"""Issue 19 at unit level: outputs never overlap inputs (`tspo_core.io.check_disjoint`, `flows.common.stage_paths`),
files committed together with a directory (`pending_file` / `finish_pending`), settings that make training
numerically impossible or RL degenerate refused by name, checkpoints refused at load with a message that says what
is wrong, and the stage CLI's one-line failure (`flows.common.fail`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from flows.common import check_inputs, fail, one_line
from tspo_core.config import ModelConfig, RolloutConfig, check_rl_rollout, load_params, params_from_dict
from tspo_core.errors import ConfigError, DataError
from tspo_core.io import check_disjoint, finish_pending, pending_file, replace_dir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------------------------------------------
# check_disjoint
# ----------------------------------------------------------------------------------------------------------------
def test_disjoint_paths_pass(tmp_path):
    check_disjoint([("paths.data_dir", tmp_path / "data"), ("--params", tmp_path / "params.yaml")],
                   [("paths.index_dir", tmp_path / "artifacts" / "index"), ("paths.metrics_dir", tmp_path / "m.json"),
                    ("paths.sft_dir", tmp_path / "data2")])  # a shared name prefix is not containment


@pytest.mark.parametrize("out, inp, how", [
    ("data", "data", "is"), ("data", "data/corpus.jsonl", "contains"), ("data/index", "data", "lies inside")])
def test_an_output_overlapping_an_input_is_refused_naming_both(tmp_path, out, inp, how):
    with pytest.raises(ConfigError) as err:
        check_disjoint([("data.files.corpus", tmp_path / inp)], [("paths.index_dir", tmp_path / out)])
    msg = str(err.value)
    assert msg.startswith(f"output paths.index_dir ({tmp_path / out}) {how} input data.files.corpus "
                          f"({tmp_path / inp})") and "\n" not in msg


def test_overlap_through_a_symlink_and_a_relative_path(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"output paths.data_dir \(.*/real\) contains input data.files.train\[0\]"):
        check_disjoint([("data.files.train[0]", "link/train.jsonl")], [("paths.data_dir", "./real/")])


def test_two_outputs_overlapping_each_other_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="output paths.rl_dir .* contains output paths.metrics_dir"):
        check_disjoint([], [("paths.rl_dir", tmp_path / "rl" / "tspo"),
                            ("paths.metrics_dir", tmp_path / "rl" / "tspo" / "train_tspo.json")])


# ----------------------------------------------------------------------------------------------------------------
# each stage's paths, through the CLI pre-flight (flows.common.check_inputs)
# ----------------------------------------------------------------------------------------------------------------
def _params_file(tmp_path: Path, **paths: str) -> Path:
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    raw["paths"] = {k: str(tmp_path / v) for k, v in {
        "data_dir": "data", "index_dir": "artifacts/index", "sft_dir": "artifacts/sft", "rl_dir": "artifacts/rl",
        "metrics_dir": "metrics", "eval_dir": "artifacts/eval", "report_dir": "reports", **paths}.items()}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


STAGES = [("data", {}), ("index", {}), ("sft", {}), ("train", {"estimator": "grpo"}), ("evaluate", {"run": "sft"}),
          ("evaluate", {"run": "tspo", "checkpoint": None}), ("report", {})]


@pytest.mark.parametrize("stage, options", STAGES)
def test_the_default_layout_passes_every_stage(tmp_path, stage, options):
    check_inputs(_params_file(tmp_path), options, stage=stage)


@pytest.mark.parametrize("stage, options, paths, fragment", [
    ("index", {}, {"index_dir": "data"}, "output paths.index_dir"),
    ("index", {}, {"metrics_dir": "data"}, "output paths.metrics_dir"),
    ("sft", {}, {"sft_dir": "artifacts/index/sft"}, "output paths.sft_dir"),
    ("train", {"estimator": "grpo"}, {"metrics_dir": "artifacts/rl/grpo"}, "contains output paths.metrics_dir"),
    ("evaluate", {"run": "grpo"}, {"eval_dir": "artifacts/rl"}, "contains input paths.rl_dir"),
    ("evaluate", {"run": "sft"}, {"metrics_dir": "artifacts/eval/sft"}, "contains output paths.metrics_dir"),
    ("data", {}, {"data_dir": "."}, "contains input --params"),
])
def test_each_stage_refuses_its_overlaps(tmp_path, stage, options, paths, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_inputs(_params_file(tmp_path, **paths), options, stage=stage)


def test_report_beside_the_metrics_is_allowed_and_its_inputs_are_the_files_it_reads(tmp_path):
    params = _params_file(tmp_path, report_dir="metrics")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval_sft.json").write_text("{}")
    check_inputs(params, {}, stage="report")  # report.md and the figures beside eval_*.json: no file is shared


def test_data_from_files_refuses_a_data_dir_holding_them(tmp_path):
    raw = yaml.safe_load(_params_file(tmp_path, data_dir="inputs").read_text())
    raw["data"] = {"source": "files", "files": {"corpus": str(tmp_path / "inputs" / "corpus.jsonl"),
                                                "train": [str(tmp_path / "elsewhere.jsonl")],
                                                "eval": {"nq": str(tmp_path / "inputs" / "nq.jsonl")}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"contains input data.files.corpus \(.*/inputs/corpus.jsonl\)"):
        check_inputs(tmp_path / "params.yaml", {}, stage="data")


# ----------------------------------------------------------------------------------------------------------------
# a directory and its files committed together
# ----------------------------------------------------------------------------------------------------------------
def test_pending_files_follow_the_directory_swap_and_a_killed_commit_is_completed(tmp_path):
    out, metrics = tmp_path / "rl" / "tspo", tmp_path / "metrics"
    out.mkdir(parents=True)
    (out / "weights").write_text("old")
    metrics.mkdir()
    (metrics / "train.json").write_text("old")
    staged = tmp_path / "rl" / ".tspo.next"
    staged.mkdir()
    (staged / "weights").write_text("new")
    pending_file(staged, metrics / "train.json").write_text("new")
    assert pending_file(staged, metrics / "train.json") == pending_file(staged, metrics / "train.json")  # one entry
    assert (metrics / "train.json").read_text() == "old"  # nothing moves before the commit
    replace_dir(staged, out)
    # a kill here: the directory is new, the metrics file still old; the next run's finish_pending completes it
    assert (out / "weights").read_text() == "new" and (metrics / "train.json").read_text() == "old"
    assert finish_pending(out) == [(metrics / "train.json").resolve()]
    assert (metrics / "train.json").read_text() == "new" and not (out / ".pending").exists()
    assert finish_pending(out) == []  # idempotent


# ----------------------------------------------------------------------------------------------------------------
# settings refused at load, by name
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, key, value, fragment", [
    ("optim", "lr", float("inf"), "optim.lr: Value error, must be a finite number"),
    ("optim", "lr", float("nan"), "optim.lr: "),
    ("optim", "lr", 1e308, "optim.lr: Value error, overflows float32"),
    ("optim", "lr", 1e-50, "optim.lr: Value error, is below float32's smallest normal number"),
    ("sft", "lr", float("inf"), "sft.lr: Value error, must be a finite number"),
    ("optim", "betas", [0.9, 1.0], "optim.betas: Value error, AdamW betas must be within [0, 1)"),
    ("optim", "betas", [-0.1, 0.9], "optim.betas: "),
    ("optim", "grad_clip", float("inf"), "optim.grad_clip: Value error, must be a finite number"),
    ("optim", "clip_ratio", float("inf"), "optim.clip_ratio: "),
    ("optim", "kl_coef", float("inf"), "optim.kl_coef: "),
    ("reward", "folr_alpha", float("inf"), "reward.folr_alpha: "),
    ("train", "seed", 10**23, "train.seed: Value error, a seed must be within 0..2**63-1"),
    ("sft", "seed", -1, "sft.seed: "),
    ("data", "seed", 2**63, "data.seed: "),
])
def test_numerically_impossible_settings_fail_at_load_naming_the_key(tmp_path, section, key, value, fragment):
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    raw.setdefault(section, {})[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: 1 invalid setting(s)") and fragment in str(err.value)


def test_the_largest_seed_and_a_small_learning_rate_load():
    raw = yaml.safe_load(TINY.read_text(encoding="utf-8"))
    raw["train"] = {**raw.get("train", {}), "seed": 2**63 - 1}
    raw["optim"] = {**raw.get("optim", {}), "lr": 1e-30, "betas": [0.0, 0.999]}
    params = params_from_dict(raw)
    assert params.train.seed == 2**63 - 1


def test_rl_refuses_degenerate_groups_by_name_where_rl_starts():
    check_rl_rollout(RolloutConfig())
    with pytest.raises(ConfigError, match=r"^rollout.group_size = 1: RL needs at least 2 rollouts per question"):
        check_rl_rollout(RolloutConfig(group_size=1))
    with pytest.raises(ConfigError, match=r"^rollout.temperature = 0: RL samples its rollouts"):
        check_rl_rollout(RolloutConfig(temperature=0.0))
    RolloutConfig(group_size=1, temperature=0.0)  # still loads: SFT and evaluation never read these keys


# ----------------------------------------------------------------------------------------------------------------
# checkpoints refused at load
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    from fakes import tokenizer
    from tspo_core.config import TinyModelConfig
    from tspo_core.policy import build_tiny_model

    root = tmp_path_factory.mktemp("ckpt") / "model"
    tok = tokenizer()
    build_tiny_model(TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                     num_key_value_heads=2), tok).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _copy(src: Path, dest: Path, drop: str = "") -> Path:
    dest.mkdir()
    for f in src.iterdir():
        if not (drop and f.name.startswith(drop)):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_an_empty_or_tokenizerless_checkpoint_says_what_is_missing(tmp_path, saved_checkpoint):
    from tspo_core.policy import load_policy

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint: no model files") as err:
        load_policy(tmp_path / "empty", ModelConfig())
    assert "sentencepiece" not in str(err.value)
    no_tok = _copy(saved_checkpoint, tmp_path / "no-tok", drop="tokenizer")
    with pytest.raises(ConfigError, match=r"no-tok: not a complete checkpoint: no tokenizer files") as err:
        load_policy(no_tok, ModelConfig())
    assert "tokenizer is missing" in str(err.value) and "protocol tag" not in str(err.value)
    load_policy(saved_checkpoint, ModelConfig())  # the complete one loads


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_file(tmp_path, saved_checkpoint):
    from safetensors.torch import load_file, save_file

    from tspo_core.policy import load_policy
    from tspo_core.train.checkpoint import CheckpointError

    bad = _copy(saved_checkpoint, tmp_path / "nan")
    weights = load_file(str(bad / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_policy(bad, ModelConfig())
    assert str(err.value).startswith(f"{bad / 'model.safetensors'}: non-finite weights (NaN or inf) in 1 tensor(s)")


# ----------------------------------------------------------------------------------------------------------------
# the stage CLI's one line
# ----------------------------------------------------------------------------------------------------------------
def test_one_line_joins_a_multi_line_message_and_bounds_it():
    assert one_line("params.yaml: 2 invalid setting(s)\n  optim.lr: bad\n  train.seed: bad") == \
        "params.yaml: 2 invalid setting(s); optim.lr: bad; train.seed: bad"
    assert len(one_line("x" * 10_000)) == 2000


def test_fail_exits_2_for_bad_input_and_1_with_a_log_for_internal_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TSPO_LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        fail(DataError("no records", "x.jsonl"), "data")
    assert exited.value.code == 2 and capsys.readouterr().err == "error: x.jsonl: no records\n"
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError as err:
        with pytest.raises(SystemExit) as exited:
            fail(err, "train")
    out = capsys.readouterr().err
    assert exited.value.code == 1 and out.count("\n") == 1 and "Traceback" not in out
    assert out.startswith("error: internal error in stage train: ZeroDivisionError: division by zero at "
                          f"{__file__}:")
    logs = list(tmp_path.glob("train-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in out
    with pytest.raises(SystemExit) as exited:
        fail(KeyboardInterrupt(), "train")
    assert exited.value.code == 130 and capsys.readouterr().err == "error: interrupted\n"
    assert os.environ["TSPO_LOG_DIR"] == str(tmp_path)
