"""W&B tracking (flows/tracking.py): the stage -> artifact table against dvc.yaml, the lineage chain, mode
resolution, the call sequence (a recording fake of `wandb`), failures as warnings, and real offline runs read back
from their `.wandb` transaction log. No network: online mode is only checked to fall back to offline in bounded
time."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from flows import tracking
from flows.tracking import ArtifactSpec, dvc_stages, resolve_mode, stage_io, stage_name
from tspo_core.config import FAMILIES, PathsConfig

REPO = Path(__file__).resolve().parents[1]
DVC = dvc_stages(REPO)
PATHS = PathsConfig()


def _covered(path: str, by: list[str]) -> bool:
    """`path` is one of `by`, inside one, or contains one (a directory)."""
    p = Path(path)
    return any(p == Path(b) or Path(b) in p.parents or p in Path(b).parents for b in by)


# ----------------------------------------------------------------------------------------------------------------
# the table (pure)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flow", "options", "stage"), [
    ("data", {}, "data"), ("index", {}, "index"), ("sft", {}, "sft"), ("report", {}, "report"),
    ("train", {"estimator": "tspo"}, "train@tspo"), ("train", {"estimator": "grpo"}, "train@grpo"),
    ("evaluate", {"run": "sft", "checkpoint": None}, "evaluate@sft"), ("evaluate_flow", {"run": "grpo"}, "evaluate@grpo"),
    ("evaluate", {"run": "mine", "checkpoint": "/m"}, "evaluate@mine"), ("pipeline", {}, None),
])
def test_stage_name(flow: str, options: dict, stage: str | None) -> None:
    assert stage_name(flow, options, DVC) == stage


def test_dvc_yaml_expansion() -> None:
    assert set(DVC) == {"data", "index", "sft", "train@grpo", "train@tspo", "evaluate@sft", "evaluate@grpo",
                        "evaluate@tspo", "report"}
    assert "artifacts/rl/grpo" in DVC["evaluate@grpo"]["deps"] and "artifacts/sft" in DVC["evaluate@sft"]["deps"]
    assert "metrics/train_tspo.jsonl" in DVC["train@tspo"]["outs"]
    assert "metrics/eval_sft.json" in DVC["evaluate@sft"]["metrics"]


def test_the_graph_is_dvcs_own(tmp_path: Path) -> None:
    """A stage added to a workspace's dvc.yaml (foreach over a mapping) is tracked with no table to update."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "foreach": {"a": {"ckpt": "artifacts/rl/a"}}, "do": {
            "cmd": "python -m flows.evaluate --params params.yaml --run ${key}",
            "deps": ["data/nq", "${item.ckpt}"], "outs": ["artifacts/eval/${key}"],
            "metrics": ["metrics/eval_${key}.json"]}}}}))
    stages = dvc_stages(tmp_path)
    assert list(stages) == ["evaluate@a"] and stage_name("evaluate", {"run": "a"}, stages) == "evaluate@a"
    io = stage_io("evaluate@a", PATHS, stages)
    assert [(a.name, a.paths) for a in io.inputs] == [("tspo-data", ("data",)),
                                                      ("tspo-rl-a", ("artifacts/rl/a",))]
    assert [(a.name, a.paths) for a in io.outputs] == [
        ("tspo-eval-a", ("artifacts/eval/a", "metrics/eval_a.json"))]


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_dvc_stage_maps_to_its_declared_files(stage: str) -> None:
    io = stage_io(stage, PATHS, DVC)
    assert io.outputs, stage
    declared = DVC[stage]["outs"] + DVC[stage]["metrics"] + DVC[stage]["plots"]
    for a in io.outputs:  # every output path is a declared out/metric/plot of the stage
        assert all(_covered(p, declared) for p in a.paths), (stage, a)
    for a in io.inputs:  # an input artifact is used as a whole: one of its paths is (in, around) a dep
        assert any(_covered(p, DVC[stage]["deps"]) for p in a.paths), (stage, a)
    for path in io.metrics:  # the summary files are the stage's declared metrics/outs
        assert path in DVC[stage]["metrics"] + DVC[stage]["outs"]


def _producers() -> dict[str, str]:
    out: dict[str, str] = {}
    for stage in DVC:
        for a in stage_io(stage, PATHS, DVC).outputs:
            assert a.name not in out, f"{a.name} produced by {out.get(a.name)} and {stage}"
            out[a.name] = stage
    return out


def test_inputs_are_outputs_of_upstream_stages() -> None:
    producers = _producers()
    for stage in DVC:
        for a in stage_io(stage, PATHS, DVC).inputs:
            up = producers[a.name]  # every input is some stage's output
            up_outs = DVC[up]["outs"] + DVC[up]["metrics"]
            # ...and that stage is upstream in dvc.yaml: one of its outputs is (inside / around) one of our deps
            assert any(_covered(d, up_outs) for d in DVC[stage]["deps"]), (stage, a.name, up)


def test_lineage_chain() -> None:
    producers = _producers()
    inputs = {s: {a.name for a in stage_io(s, PATHS, DVC).inputs} for s in DVC}
    assert producers["tspo-data"] == "data" and inputs["index"] == {"tspo-data"}
    assert "tspo-index" in inputs["sft"] and "tspo-sft" in inputs["train@tspo"]
    assert "tspo-rl-tspo" in inputs["evaluate@tspo"] and "tspo-sft" in inputs["evaluate@sft"]
    assert {"tspo-eval-sft", "tspo-eval-grpo", "tspo-eval-tspo"} <= inputs["report"]
    types_ = {a.name: a.type for s in DVC for a in stage_io(s, PATHS, DVC).outputs}
    assert types_["tspo-data"] == "dataset" and types_["tspo-index"] == "index" and types_["tspo-sft"] == "model"
    assert types_["tspo-rl-grpo"] == "model" and types_["tspo-eval-tspo"] == "eval"
    assert types_["tspo-report"] == "report"


def test_params_paths_win_over_dvc_yaml_literals() -> None:
    paths = PathsConfig(data_dir="runs/t/data", index_dir="runs/t/index", sft_dir="runs/t/sft", rl_dir="runs/t/rl",
                        metrics_dir="runs/t/metrics", eval_dir="runs/t/eval", report_dir="runs/t/reports")
    io = stage_io("evaluate@grpo", paths, DVC)
    assert [a.paths for a in io.inputs] == [("runs/t/data",), ("runs/t/index",), ("runs/t/rl/grpo",)]
    assert set(io.outputs[0].paths) == {"runs/t/eval/grpo", "runs/t/metrics/eval_grpo.json",
                                        "runs/t/metrics/detail/eval_grpo.json"}
    assert io.metrics == ("runs/t/metrics/detail/eval_grpo.json",)
    io = stage_io("evaluate@x", paths, DVC, checkpoint="/models/x")  # `evaluate --run x --checkpoint /models/x`
    assert io.inputs[-1] == ArtifactSpec("tspo-checkpoint-x", "model", ("/models/x",))
    assert set(io.outputs[0].paths) == {"runs/t/eval/x", "runs/t/metrics/eval_x.json",
                                        "runs/t/metrics/detail/eval_x.json"}


@pytest.mark.parametrize(("env", "config", "mode"), [
    ({}, "offline", "offline"), ({"WANDB_MODE": "disabled"}, "online", "disabled"),
    ({"WANDB_MODE": "offline"}, "disabled", "offline"), ({"WANDB_MODE": "dryrun"}, "online", "offline"),
    ({"WANDB_DISABLED": "true"}, "offline", "disabled"), ({"WANDB_MODE": ""}, "online", "online"),
])
def test_resolve_mode(env: dict, config: str, mode: str) -> None:
    assert resolve_mode(config, env) == mode


# ----------------------------------------------------------------------------------------------------------------
# a fake project
# ----------------------------------------------------------------------------------------------------------------
def _params(root: Path, mode: str = "offline", **tracking_kw: object) -> Path:
    splits = {f: {"train": 1, "dev": 1, "test": 1} for f in FAMILIES}
    raw = {"data": {"source": "synthetic", "synthetic": {"splits": splits}},
           "tracking": {"wandb_mode": mode, **tracking_kw}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _project(root: Path) -> None:
    """Small stand-ins for every stage's outputs (default paths)."""
    files = {
        "data/corpus.jsonl": "{}\n", "data/nq/test.jsonl": "{}\n", "data/rl_train.jsonl": "{}\n",
        "artifacts/index/index.bm25": "x", "artifacts/sft/model.safetensors": "sft",
        "artifacts/rl/tspo/model/model.safetensors": "rl", "artifacts/eval/tspo/nq.jsonl": "{}\n",
        "metrics/index.json": json.dumps({"passages": 3}),
        "metrics/detail/index.json": json.dumps({"passages": 3, "build_seconds": 0.1}),
        "metrics/train_tspo.json": json.dumps({"steps": 3, "em": 0.5}),
        "metrics/detail/train_tspo.json": json.dumps({"estimator": "tspo", "steps": 3, "em_last20pct": 0.5}),
        "metrics/train_tspo.jsonl": "".join(json.dumps({"step": s, "em": s / 10, "reward_mean": 0.1 * s,
                                                        "per_family": {"nq": 0.2}, "tags": ["a"]}) + "\n"
                                            for s in (1, 2, 3)),
        "metrics/eval_tspo.json": json.dumps({"em": 0.25, "nq": 0.5, "popqa": 0.0}),
        "metrics/detail/eval_tspo.json": json.dumps({"datasets": {"nq": {"n": 2, "em": 0.5},
                                                                  "popqa": {"n": 2, "em": 0.0}},
                                                     "average": {"n": 4, "em": 0.25}, "meta": {"skipped": []}}),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B's own config/cache/data dirs under tmp; quiet; no key."""
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "wdata"),
                     ("WANDB_ARTIFACT_DIR", "adir")):
        monkeypatch.setenv(var, str(tmp_path / ".w" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / ".w" / "netrc"))  # no key from the user's ~/.netrc
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_MODE", "WANDB_BASE_URL", "RANK"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "proj"
    root.mkdir()
    monkeypatch.chdir(root)
    return root


def test_disabled_does_nothing(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(wandb_env)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the env wins over tracking.wandb_mode: offline
    assert tracking.track_stage("index", _params(wandb_env, "offline"), {}) is None
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.track_stage("index", _params(wandb_env, "disabled"), {}) is None
    assert tracking.track_stage("pipeline", _params(wandb_env, "offline"), {}) is None  # not a stage
    assert not (wandb_env / "wandb").exists()


# ----------------------------------------------------------------------------------------------------------------
# the call sequence, with a recording fake of the wandb module
# ----------------------------------------------------------------------------------------------------------------
class _Rec:
    def __init__(self) -> None:
        self.calls: list[tuple] = []


def _fake_wandb(rec: _Rec, fail: set[str] = frozenset()) -> types.ModuleType:
    m = types.ModuleType("wandb")

    class Artifact:
        def __init__(self, name: str, type: str, metadata: dict | None = None) -> None:  # noqa: A002
            self.name, self.type, self.metadata, self.refs = name, type, metadata, []

        def add_reference(self, uri: str, name: str | None = None, checksum: bool = True) -> None:
            self.refs.append((uri, name, checksum))

    class Summary(dict):
        pass

    class Run:
        def __init__(self, mode: str, dir: str) -> None:  # noqa: A002
            self.summary = Summary()
            self.config = types.SimpleNamespace(update=lambda d, **kw: rec.calls.append(("config", d)))
            self.settings = types.SimpleNamespace(_offline=mode == "offline", sync_dir=f"{dir}/wandb/offline-run-x")

        def log(self, data: dict, step: int | None = None) -> None:
            rec.calls.append(("log", data, step))

        def use_artifact(self, art: Artifact) -> None:
            rec.calls.append(("use", art.name, art.type))

        def _log_artifact(self, art: Artifact, **kw: object) -> None:
            assert kw.get("use_after_commit") is True
            rec.calls.append(("use", art.name, art.type))

        def log_artifact(self, art: Artifact) -> None:
            if "log_artifact" in fail:
                raise RuntimeError("disk full")
            rec.calls.append(("log_artifact", art.name, art.type, art.refs))

        def finish(self, exit_code: int = 0) -> None:
            rec.calls.append(("finish", exit_code))

    def init(**kw: object) -> Run:
        if "init" in fail:
            raise RuntimeError("no service")
        rec.calls.append(("init", kw))
        return Run(str(kw["mode"]), str(kw["dir"]))

    m.Artifact, m.init = Artifact, init
    m.Settings = lambda **kw: kw
    m.Table = lambda columns, data: ("table", columns, data)
    m.Image = lambda path: ("image", path)
    return m


def test_call_sequence_train(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    _project(wandb_env)
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec))
    run = tracking.track_stage("train", _params(wandb_env), {"estimator": "tspo"})
    assert run is not None
    init = rec.calls[0][1]
    assert (init["project"], init["job_type"], init["name"], init["mode"]) == ("tspo", "train", "train@tspo", "offline")
    assert init["dir"] == str(wandb_env) and init["config"]["tracking"]["wandb_mode"] == "offline"
    assert init["config"]["stage"] == "train@tspo" and init["config"]["options"] == {"estimator": "tspo"}
    assert init["settings"]["init_timeout"] == 30.0
    uses = [c[1] for c in rec.calls if c[0] == "use"]
    assert uses == ["tspo-data", "tspo-index", "tspo-sft"]
    logged = {c[1]: c for c in rec.calls if c[0] == "log_artifact"}
    assert set(logged) == {"tspo-rl-tspo", "tspo-history-tspo"}
    uri, name, checksum = logged["tspo-rl-tspo"][3][0]
    assert uri == (wandb_env / "artifacts/rl/tspo").resolve().as_uri() and name == "artifacts/rl/tspo" and checksum
    history = [c for c in rec.calls if c[0] == "log"]
    assert [c[2] for c in history] == [1, 2, 3]
    assert history[0][1] == {"step": 1, "em": 0.1, "reward_mean": 0.1, "per_family/nq": 0.2}  # scalars only
    assert run.summary["metrics"]["em_last20pct"] == 0.5 and run.summary["stage_status"] == "ok"
    assert rec.calls[-1] == ("finish", 0)
    assert "wandb sync" in capsys.readouterr().err


def test_call_sequence_evaluate_table(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(wandb_env)
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec))
    tracking.track_stage("evaluate", _params(wandb_env), {"run": "tspo", "checkpoint": None})
    assert [c[1] for c in rec.calls if c[0] == "use"] == ["tspo-data", "tspo-index", "tspo-rl-tspo"]
    (table,) = [c[1]["eval/per_dataset"] for c in rec.calls if c[0] == "log"]
    assert table == ("table", ["dataset", "n", "em"], [["nq", 2, 0.5], ["popqa", 2, 0.0], ["average", 4, 0.25]])
    (art,) = [c for c in rec.calls if c[0] == "log_artifact"]
    assert art[1:3] == ("tspo-eval-tspo", "eval") and sorted(r[1] for r in art[3]) == [
        "artifacts/eval/tspo", "metrics/detail/eval_tspo.json", "metrics/eval_tspo.json"]


def test_failures_are_warnings(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    _project(wandb_env)
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec, fail={"log_artifact"}))
    run = tracking.track_stage("index", _params(wandb_env), {})
    err = capsys.readouterr().err
    assert "index: log_artifact tspo-index failed (RuntimeError: disk full)" in err
    assert run.summary["stage_status"] == "ok (tracking incomplete)" and rec.calls[-1] == ("finish", 0)
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(_Rec(), fail={"init"}))
    assert tracking.track_stage("index", _params(wandb_env), {}) is None
    assert "index: tracking failed (RuntimeError: no service)" in capsys.readouterr().err
    (wandb_env / "metrics/index.json").unlink()
    import shutil
    shutil.rmtree(wandb_env / "artifacts/index")
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec := _Rec()))
    tracking.track_stage("index", _params(wandb_env), {})  # a missing output: warned, the rest still logged
    assert "tspo-index: none of ['artifacts/index'] exists" in capsys.readouterr().err
    assert [c[1] for c in rec.calls if c[0] == "use"] == ["tspo-data"]


def test_failed_stage_is_marked_failed(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(wandb_env)
    rec = _Rec()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(rec))
    run = tracking.track_stage("train", _params(wandb_env), {"estimator": "tspo"}, failed=True)
    assert run.summary["stage_status"] == "failed" and rec.calls[-1] == ("finish", 1)
    assert not [c for c in rec.calls if c[0] in ("log_artifact", "log")]


def test_main_tracks_after_the_flow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flows import common

    seen: list[tuple] = []
    monkeypatch.setattr(tracking, "track_stage", lambda name, path, opts, failed=False: seen.append(
        (name, str(path), dict(opts), failed)))
    monkeypatch.setattr(common, "check_inputs", lambda path, opts, stage=None: None)

    def ok(params_path: str, estimator: str) -> None:
        seen.append(("ran", estimator))

    ok.name = "train"  # type: ignore[attr-defined] - as a Prefect Flow has
    monkeypatch.setattr(sys, "argv", ["x", "--params", "p.yaml", "--estimator", "grpo"])
    common.main(ok, "d", {"--estimator": {"default": "tspo"}})
    assert seen == [("ran", "grpo"), ("train", "p.yaml", {"estimator": "grpo"}, False)]

    def bad(params_path: str) -> None:
        raise RuntimeError("boom")

    bad.name = "index"  # type: ignore[attr-defined]
    seen.clear()
    monkeypatch.setattr(sys, "argv", ["x", "--params", "p.yaml"])
    monkeypatch.setenv("TSPO_LOG_DIR", str(tmp_path / "logs"))
    with pytest.raises(SystemExit) as exited:  # an internal error: one line, exit 1
        common.main(bad, "d")
    assert exited.value.code == 1
    assert seen == [("index", "p.yaml", {}, True)]


# ----------------------------------------------------------------------------------------------------------------
# real offline runs, read back from the run's transaction log
# ----------------------------------------------------------------------------------------------------------------
def _records(path: Path) -> list:
    """The records of a `.wandb` file: a 7-byte header (`:W&B`, magic, version), then LevelDB-log style 32 KiB
    blocks of chunks (crc32 4 bytes, length 2, type 1: full=1, first=2, middle=3, last=4) holding protobuf
    `Record`s."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):
            break  # the end, or a chunk still being written
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            try:
                rec.ParseFromString(buf)
            except DecodeError:  # still being written
                break
            out.append(rec)
            buf = b""
    return out


def _offline_run(root: Path) -> dict:
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 10  # the service may still be flushing the log when finish() returns
    recs = _records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in recs):
        assert time.monotonic() < deadline, f"no exit record in {log}"
        time.sleep(0.2)
        recs = _records(log)
    arts = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
    summary = {u.key: json.loads(u.value_json) for r in recs if r.WhichOneof("record_type") == "summary"
               for u in r.summary.update if u.key}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in recs
               if r.WhichOneof("record_type") == "history"]
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    return {"dir": run_dir, "run": run, "artifacts": arts, "used": [(a.name, a.type) for a in arts if a.use_after_commit],
            "logged": {a.name: a for a in arts if not a.use_after_commit}, "summary": summary, "history": history}


def test_offline_run_records_lineage(wandb_env: Path, capsys: pytest.CaptureFixture) -> None:
    _project(wandb_env)
    run = tracking.track_stage("train", _params(wandb_env), {"estimator": "tspo"})
    assert run is not None
    got = _offline_run(wandb_env)
    assert got["run"].job_type == "train" and got["run"].display_name == "train@tspo"
    assert got["used"] == [("tspo-data", "dataset"), ("tspo-index", "index"), ("tspo-sft", "model")]
    assert set(got["logged"]) == {"tspo-rl-tspo", "tspo-history-tspo"}
    model = got["logged"]["tspo-rl-tspo"]
    (entry,) = model.manifest.contents
    assert entry.path == "artifacts/rl/tspo/model/model.safetensors"
    assert entry.ref == (wandb_env / entry.path).resolve().as_uri()  # a reference: nothing copied
    assert got["summary"]["metrics"]["em_last20pct"] == 0.5 and got["summary"]["stage_status"] == "ok"
    steps = [h["_step"] for h in got["history"]]
    assert steps == [1, 2, 3] and got["history"][2]["em"] == pytest.approx(0.3)
    assert f"wandb sync {got['dir']}" in capsys.readouterr().err

    # the downstream stage declares the same artifact as input: same content digest -> the same W&B version
    (wandb_env / "wandb").rename(wandb_env / "wandb_train")
    tracking.track_stage("evaluate", _params(wandb_env), {"run": "tspo", "checkpoint": None})
    ev = _offline_run(wandb_env)
    assert ev["used"] == [("tspo-data", "dataset"), ("tspo-index", "index"), ("tspo-rl-tspo", "model")]
    (used_model,) = [a for a in ev["artifacts"] if a.name == "tspo-rl-tspo"]
    assert used_model.digest == model.digest
    assert "tspo-eval-tspo" in ev["logged"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_without_key_falls_back_to_offline(wandb_env: Path, capsys: pytest.CaptureFixture) -> None:
    _project(wandb_env)
    t0 = time.monotonic()
    assert tracking.track_stage("index", _params(wandb_env, "online"), {}) is not None
    assert time.monotonic() - t0 < 20
    assert "no API key" in capsys.readouterr().err
    assert _offline_run(wandb_env)["logged"].keys() == {"tspo-index"}


def test_online_unreachable_server_falls_back_in_bounded_time(wandb_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    _project(wandb_env)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    run = tracking.track_stage("index", _params(wandb_env, "online", timeout_s=3), {})
    assert time.monotonic() - t0 < 25
    err = capsys.readouterr().err
    assert run is not None and "online init failed within 3 s" in err and "logging offline instead" in err
    assert _offline_run(wandb_env)["logged"].keys() == {"tspo-index"}


@pytest.mark.parametrize(("path", "name"), [
    ("artifacts/rl/tspo", "artifacts/rl/tspo"), ("metrics/eval_x.json", "metrics/eval_x.json"),
    ("/models/x", "external/models/x"), ("../outside/ckpt", None), ("{root}/artifacts/sft", "artifacts/sft"),
])
def test_entry_names_are_relative(tmp_path: Path, path: str, name: str | None) -> None:
    from wandb.sdk.lib.paths import validate_relpath  # what W&B checks: "Invalid artifact path" otherwise

    root = tmp_path / "proj"
    got = tracking.entry_name(path.format(root=root), root)
    assert got == (name or "external/" + (tmp_path / "outside/ckpt").relative_to("/").as_posix())
    assert validate_relpath(got) == got


def test_offline_absolute_paths_and_the_printed_sync_command(wandb_env: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A checkpoint outside the project (`evaluate --checkpoint /abs/dir`) and absolute params paths are logged
    without a warning; the printed `wandb sync` commands are accepted by the installed wandb CLI (dry run, no
    network) and find the run."""
    import subprocess

    _project(wandb_env)
    ckpt = tmp_path / "elsewhere" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_text("m")
    params = _params(wandb_env)
    raw = yaml.safe_load(params.read_text())
    raw["paths"] = {"data_dir": str(wandb_env / "data"), "index_dir": str(wandb_env / "artifacts/index"),
                    "eval_dir": str(wandb_env / "artifacts/eval"), "metrics_dir": str(wandb_env / "metrics")}
    params.write_text(yaml.safe_dump(raw))
    run = tracking.track_stage("evaluate", params, {"run": "tspo", "checkpoint": str(ckpt)})
    assert run is not None
    err = capsys.readouterr().err
    assert "warning" not in err and "Invalid" not in err, err
    got = _offline_run(wandb_env)
    assert [n for n, _ in got["used"]] == ["tspo-data", "tspo-index", "tspo-checkpoint-tspo"]
    (ck,) = [a for a in got["artifacts"] if a.name == "tspo-checkpoint-tspo"]
    assert [e.path for e in ck.manifest.contents] == [
        f"external/{(ckpt / 'model.safetensors').relative_to('/').as_posix()}"]
    assert {e.path for e in got["logged"]["tspo-eval-tspo"].manifest.contents} == {
        "artifacts/eval/tspo/nq.jsonl", "metrics/eval_tspo.json", "metrics/detail/eval_tspo.json"}
    commands = [c.split("`")[0] for c in err.split("`wandb sync ")[1:]]
    assert commands == [str(got["dir"]), str(wandb_env / "wandb")] and "--sync-all" not in err
    wandb_cli = Path(sys.executable).with_name("wandb")
    for target in commands:
        out = subprocess.run([str(wandb_cli), "sync", "--dry-run", target], capture_output=True, text=True,
                             timeout=60, cwd=wandb_env)
        assert out.returncode == 0, out.stderr
        said = out.stdout + out.stderr
        assert "Would sync 1 run(s)" in said and f"run-{got['dir'].name.rsplit('-', 1)[1]}.wandb" in said, said
