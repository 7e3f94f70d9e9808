"""Config: shipped YAML files load; typos and wrong types fail naming key and file; overrides; frozen models; every
field documented; tspo_core stays free of the orchestration/tracking packages."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from tspo_core.config import ConfigError, Params, dump_params, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def _write_yaml(tmp_path: Path, raw, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# shipped files
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shipped_configs_load(path):
    params = load_params(path)
    assert isinstance(params, Params)
    # the resolved dump is itself a valid config that loads to the same values
    assert params_from_dict(yaml.safe_load(dump_params(params)), "dump") == params


def test_params_yaml_is_shipped():
    assert SHIPPED[0].is_file()


# ----------------------------------------------------------------------------------------------------------------
# errors name the dotted key and the file
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, typo", [
    ((), "trian"),                                        # a top-level section
    (("train",), "stpes"),
    (("data", "synthetic"), "n_wrolds"),
    (("data", "synthetic", "splits", "nq"), "tarin"),
    (("model", "tiny"), "hidden_sise"),
])
def test_typo_key_names_dotted_key_and_file(tmp_path, section, typo):
    raw = _raw()
    node = raw
    for key in section:
        node = node[key]
    node[typo] = 1
    path = _write_yaml(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg
    assert ".".join((*section, typo)) + ": unknown key" in msg


@pytest.mark.parametrize("dotted, value", [
    ("train.steps", "many"),
    ("rollout.temperature", "hot"),
    ("optim.lr", [1, 2]),
    ("data.synthetic.splits.nq.train", "lots"),
    ("retrieval.top_k", 0),                               # out of range counts as a wrong value
    ("advantage.eps", -1.0),
    ("tracking.wandb_mode", "sometimes"),                 # not one of the literals
])
def test_wrong_type_names_key_and_file(tmp_path, dotted, value):
    raw = _raw()
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    path = _write_yaml(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert str(path) in msg and f"  {dotted}: " in msg, msg


def test_several_errors_reported_together(tmp_path):
    raw = _raw()
    raw["train"]["steps"] = "x"
    raw["optim"]["lrr"] = 1
    path = _write_yaml(tmp_path, raw)
    with pytest.raises(ConfigError, match="2 invalid setting") as info:
        load_params(path)
    assert "train.steps" in str(info.value) and "optim.lrr" in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_params(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(_write_yaml(tmp_path, [1, 2], "list.yaml"))
    with pytest.raises(ConfigError) as info:               # no data section
        load_params(_write_yaml(tmp_path, {"train": {"steps": 3}}, "nodata.yaml"))
    assert "data: " in str(info.value)


@pytest.mark.parametrize("content", ["", "- 1\n"])
def test_overrides_on_a_non_mapping_file_fail_cleanly(tmp_path, content):
    path = tmp_path / "odd.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_params(path, {"train.steps": 3})
    assert str(path) in str(info.value)


def test_source_needs_its_section(tmp_path):
    raw = _raw()
    raw["data"]["source"] = "files"
    raw["data"].pop("files", None)
    with pytest.raises(ConfigError, match="source = files needs a `files` section"):
        load_params(_write_yaml(tmp_path, raw))


# ----------------------------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------------------------
def test_overrides_apply():
    base = load_params(REPO / "params.yaml")
    params = load_params(REPO / "params.yaml", {"train.steps": 3, "optim.lr": 0.5, "data.seed": 11,
                                                "data.synthetic.splits.nq.test": 7, "model.tiny.hidden_size": 64})
    assert (params.train.steps, params.optim.lr, params.data.seed) == (3, 0.5, 11)
    assert params.data.synthetic.splits["nq"].test == 7
    assert params.model.tiny.hidden_size == 64
    assert params.train.prompts_per_step == base.train.prompts_per_step     # the rest unchanged
    assert load_params(REPO / "params.yaml") == base                         # the file is not modified


def test_override_into_absent_section_uses_defaults_for_the_rest(tmp_path):
    raw = _raw()
    raw.pop("sft", None)
    params = load_params(_write_yaml(tmp_path, raw), {"sft.seed": 5})
    assert params.sft.seed == 5 and params.sft.max_steps == Params.model_fields["sft"].default_factory().max_steps


@pytest.mark.parametrize("overrides, fragment", [
    ({"train.stepz": 3}, "train.stepz: unknown key"),
    ({"train.steps": "many"}, "train.steps: "),
    ({"train.steps.value": 3}, "'steps' is not a section"),
    ({"nosuchsection.x": 1}, "nosuchsection: unknown key"),
])
def test_bad_overrides_fail_naming_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_params(REPO / "params.yaml", overrides)
    assert fragment in str(info.value) and "params.yaml" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# the models: frozen, every field described
# ----------------------------------------------------------------------------------------------------------------
def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every pydantic model reachable from `root` through field annotations (Optional, dict, list, ...)."""
    found: list[type[BaseModel]] = []

    def visit(tp) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp not in found:
                found.append(tp)
                for f in tp.model_fields.values():
                    visit(f.annotation)
            return
        for arg in typing.get_args(tp):
            visit(arg)

    visit(root)
    return found


def test_model_walk_finds_the_sections():
    names = {m.__name__ for m in _models(Params)}
    assert {"Params", "DataConfig", "SyntheticConfig", "SplitSizes", "FilesConfig", "TinyModelConfig",
            "ModelConfig", "OptimConfig", "PathsConfig"} <= names


def test_every_field_has_a_description():
    missing = [f"{m.__name__}.{name}" for m in _models(Params) for name, f in m.model_fields.items()
               if not (f.description and f.description.strip())]
    assert not missing, f"fields without a description: {missing}"


def test_every_model_forbids_extra_keys_and_is_frozen():
    for m in _models(Params):
        assert m.model_config.get("extra") == "forbid", m.__name__
        assert m.model_config.get("frozen") is True, m.__name__


def test_models_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError):
        params.train.steps = 5
    with pytest.raises(ValidationError):
        params.data = params.data
    with pytest.raises(ValidationError):
        params.data.synthetic.splits["nq"].train = 1
    assert params.train.steps == load_params(REPO / "params.yaml").train.steps


# ----------------------------------------------------------------------------------------------------------------
# import walk: tspo_core never imports the orchestration / tracking packages
# ----------------------------------------------------------------------------------------------------------------
FORBIDDEN = {"prefect", "dvc", "wandb"}


def _imported_roots(source: str, filename: str = "<src>") -> set[str]:
    """Top-level package names a module imports: import/from statements (any nesting, including inside functions
    and `if TYPE_CHECKING`) and `importlib.import_module("x")` / `__import__("x")` with a literal name."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_import_detector_catches_every_form():
    src = ("import os\nimport wandb.sdk as w\nfrom prefect import flow\nfrom . import sibling\n"
           "def f():\n    import dvc.api\n    importlib.import_module('wandb')\n    __import__('prefect.tasks')\n")
    assert _imported_roots(src) == {"os", "wandb", "prefect", "dvc"}
    assert _imported_roots("importlib.import_module(name)\nfrom .x import y\n") == set()


def test_tspo_core_imports_no_orchestration_or_tracking():
    files = sorted((REPO / "tspo_core").rglob("*.py"))
    assert len(files) >= 5
    offenders = {}
    for path in files:
        bad = _imported_roots(path.read_text(encoding="utf-8"), str(path)) & FORBIDDEN
        if bad:
            offenders[path.relative_to(REPO).as_posix()] = sorted(bad)
    assert not offenders, f"tspo_core must not import {sorted(FORBIDDEN)}: {offenders}"
