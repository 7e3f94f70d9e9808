"""DVC plots: the flat CSV curves the sft and train flows write beside their jsonl histories (`write_csv`), the plot
definitions of the pipeline (`dvc plots show --json` on a throwaway project), and the offline HTML page rendered with
the template of scripts/make_plots_template.py (no external script, the vega libraries inlined)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import flows.sft
import flows.train
from conftest import REPO
from tspo_core import io as tio
from tspo_core.io import scalar_columns, write_csv
from tspo_core.train.rl import Dist

DVC = str(Path(sys.executable).parent / "dvc")
TEMPLATE_SCRIPT = REPO / "scripts" / "make_plots_template.py"
BUILT_TEMPLATE = REPO / "build" / "plots_template.html"
# the pipeline definition with the plots: dvc.yaml.new until the maintainer swaps it in, dvc.yaml after
PIPELINE = REPO / "dvc.yaml.new" if (REPO / "dvc.yaml.new").is_file() else REPO / "dvc.yaml"
COMPARISONS = ("reward_mean", "em", "zero_var_share_o", "zero_var_share_s", "complete_success", "near_miss",
               "success_without_retrieval", "complete_failure")
REPORT_PNGS = ("training_curves", "zero_variance", "training_categories", "eval_categories")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cell(value) -> str:
    """What a jsonl value looks like in the CSV."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ================================================================================================================
# write_csv
# ================================================================================================================
def test_write_csv_round_trip(tmp_path):
    records = [
        {"step": 1, "loss": 0.1 + 0.2, "obs_loss": None, "note": 'comma, "quote"'},
        {"step": 2, "loss": 1e-13, "lr": 3e-05, "done": True},  # lr and done first seen here
        {"step": 3, "note": "two\nlines", "loss": float("1.7976931348623157e308")},
    ]
    path = tmp_path / "out" / "curve.csv"  # the parent is created
    assert write_csv(path, records) == 3
    header, rows = _read_csv(path)
    assert header == ["step", "loss", "obs_loss", "note", "lr", "done"]  # union of keys, first-seen order
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [float(r["loss"]) for r in rows] == [0.1 + 0.2, 1e-13, 1.7976931348623157e308]  # exact floats
    assert rows[0]["obs_loss"] == "" and rows[0]["lr"] == "" and rows[2]["done"] == ""  # None / missing: empty
    assert rows[1]["done"] == "true"
    assert rows[0]["note"] == 'comma, "quote"' and rows[2]["note"] == "two\nlines"  # quoted by the csv module
    assert path.read_text(encoding="utf-8").splitlines()[0] == "step,loss,obs_loss,note,lr,done"

    # explicit columns: that order, other keys dropped, absent ones empty
    assert write_csv(path, records, columns=("loss", "step", "missing")) == 3
    header, rows = _read_csv(path)
    assert header == ["loss", "step", "missing"]
    assert rows[1] == {"loss": "1e-13", "step": "2", "missing": ""}

    write_csv(path, [], columns=["step", "loss"])
    assert path.read_text(encoding="utf-8") == "step,loss\n"  # no rows: the header alone
    write_csv(path, [])
    assert path.read_text(encoding="utf-8") == ""  # no rows, no columns: empty
    assert _leftovers(tmp_path / "out") == []


def test_scalar_columns_leave_out_lists_and_dicts():
    records = [{"step": 1, "per_turn": [0.1, 0.2], "em": 0.5}, {"step": 2, "em": None, "meta": {"a": 1}, "kl": 0.0},
               {"step": 3, "per_turn": None, "name": "x", "ok": False}]
    assert scalar_columns(records) == ["step", "em", "kl", "name", "ok"]
    assert scalar_columns([]) == []


@pytest.mark.parametrize("records, columns, error, match", [
    ([{"step": 1}, {"step": 2, "hist": [1, 2]}], None, TypeError, r"row 2, column 'hist': list is not a scalar"),
    ([{"step": 1}, ["not", "a", "dict"]], None, TypeError, r"row 2 is a list, expected a dict"),
    ([{"step": 1}], ["step", "step"], ValueError, r"duplicate column names"),
    ([{1: "x"}], None, TypeError, r"column name 1 is not a string"),
])
def test_write_csv_bad_input_leaves_the_previous_file(tmp_path, records, columns, error, match):
    path = tmp_path / "curve.csv"
    path.write_text("step\n1\n", encoding="utf-8")
    with pytest.raises(error, match=match):
        write_csv(path, records, columns)
    assert path.read_text(encoding="utf-8") == "step\n1\n"
    assert _leftovers(tmp_path) == []


def test_write_csv_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    """The disk fills after some rows were written: the previous file stays whole, no temporary is left, and a
    first write leaves no file at all."""
    real_writer = tio.csv.writer

    class FailingWriter:
        def __init__(self, fh, **kw):
            self._w = real_writer(fh, **kw)

        def writerow(self, row):
            return self._w.writerow(row)

        def writerows(self, rows):
            rows = list(rows)
            self._w.writerows(rows[:2])  # part of the file is on its way to disk ...
            raise OSError(28, "No space left on device")  # ... then the write fails

    monkeypatch.setattr(tio.csv, "writer", FailingWriter)
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    old = tmp_path / "old.csv"
    old.write_text("step,loss\n1,1.0\n", encoding="utf-8")
    with pytest.raises(OSError, match="No space left"):
        write_csv(old, records)
    assert old.read_text(encoding="utf-8") == "step,loss\n1,1.0\n"
    new = tmp_path / "new.csv"
    with pytest.raises(OSError, match="No space left"):
        write_csv(new, records)
    assert not new.exists()
    assert _leftovers(tmp_path) == []

    monkeypatch.setattr(tio.csv, "writer", real_writer)  # the same call succeeds once the disk has room
    write_csv(new, records)
    assert [r["step"] for r in _read_csv(new)[1]] == ["1", "2", "3", "4", "5"]


# ================================================================================================================
# the flows write each curve as jsonl and as CSV
# ================================================================================================================
def _params(tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(paths=SimpleNamespace(metrics_dir=str(tmp_path / "metrics"), sft_dir="artifacts/sft",
                                                 rl_dir=str(tmp_path / "rl")),
                           train=SimpleNamespace(steps=3))


def _sft_history(steps: int, obs_loss: bool) -> list[dict]:
    # the record of tspo_core.train.sft.sft_train (extra keys the curve does not keep)
    return [{"step": s, "loss": 7.0 / (s + 1), "obs_loss": (3.0 / (s + 1) if obs_loss and s % 2 else None),
             "token_acc": 0.01 * s, "grad_norm": 1.5, "lr": 1e-4 * min(1.0, (s + 1) / 4), "tokens": 120,
             "elapsed_s": 0.5 * s} for s in range(steps)]


def _train_record(step: int, estimator: str) -> dict:
    slope = 0.02 if estimator == "tspo" else 0.01
    em = round(slope * step, 6)
    rec = {"step": step, "reward_mean": em + 0.05, "em": em, "folr_share": 0.3, "zero_var_share_o": 1 - em,
           "zero_var_share_s": 0.8 - em, "complete_success": em, "near_miss": 0.1, "success_without_retrieval": 0.0,
           "complete_failure": round(0.9 - em, 6), "kl": 1e-4 * step, "entropy": 1.05,
           "skipped_nonfinite": 0.0, "step_s": 9.5}
    if step >= 2:
        rec["clip_frac"] = 0.01 * step  # a key first logged at step 2: empty cell at step 1
    if step == 3:
        rec["turn_rewards"] = [0.0, 0.5]  # not a scalar: stays in the jsonl only
    return rec


def run_sft_flow(monkeypatch, tmp_path: Path, history: list[dict]) -> Path:
    monkeypatch.setattr(flows.sft, "load", lambda _: _params(tmp_path))
    monkeypatch.setattr(flows.sft, "sft", lambda _: {"summary": {"final_loss": 1.0}, "history": history})
    monkeypatch.setattr(flows.sft, "publish", lambda *a, **k: None)
    flows.sft.sft_flow.fn("params.yaml")
    return tmp_path / "metrics"


def run_train_task(monkeypatch, tmp_path: Path, estimator: str, steps: int, seen: list | None = None) -> Path:
    """flows.train.train with a stand-in trainer that calls `on_step` like `run_rl` and writes the history with the
    writer `run_rl` uses (`outputs.write_history`, into the run's staging dir after every step, onto the metrics
    paths when the run is committed); `seen` collects, after each step, what the two curve files held."""
    from tspo_core.train.outputs import history_paths, write_history

    metrics = tmp_path / "metrics"

    def fake_run_rl(params, est, out_dir, on_step, dist, metrics_dir):
        assert Path(metrics_dir) == metrics
        jsonl, csv, _ = history_paths(metrics_dir, est)
        history = []
        for step in range(1, steps + 1):
            history.append(_train_record(step, est))
            write_history(jsonl, csv, history)
            on_step(history[-1], history)
            if seen is not None:
                seen.append((_read_jsonl(jsonl), _read_csv(csv)))
        return history

    monkeypatch.setattr(flows.train, "load", lambda _: _params(tmp_path))
    monkeypatch.setattr(flows.train, "run_rl", fake_run_rl)
    monkeypatch.setattr(flows.train, "_init_distributed", lambda: Dist())
    flows.train.train.fn("params.yaml", estimator)
    return metrics


def _assert_csv_matches_jsonl(csv_path: Path, records: list[dict]) -> list[str]:
    header, rows = _read_csv(csv_path)
    assert header == scalar_columns(records)
    assert len(rows) == len(records)
    for rec, row in zip(records, rows):
        assert row == {k: _cell(rec.get(k)) for k in header}
    return header


def test_sft_flow_writes_the_curve_as_jsonl_and_csv(tmp_path, monkeypatch):
    metrics = run_sft_flow(monkeypatch, tmp_path, _sft_history(6, obs_loss=True))
    records = _read_jsonl(metrics / "sft_curve.jsonl")
    assert [list(r) for r in records] == [list(flows.sft.SFT_CURVE_COLUMNS)] * 6
    header = _assert_csv_matches_jsonl(metrics / "sft_curve.csv", records)
    assert header == ["step", "loss", "obs_loss", "token_acc", "lr"]
    rows = _read_csv(metrics / "sft_curve.csv")[1]
    assert [r["obs_loss"] for r in rows][:2] == ["", "1.5"]  # None (no observation loss that step): empty
    assert json.loads((metrics / "sft.json").read_text()) == {"loss": 1.0}  # the headline, renamed
    assert json.loads((metrics / "detail" / "sft.json").read_text()) == {"final_loss": 1.0}  # the summary as is

    # sft.obs_loss_weight 0: obs_loss is None everywhere, the column is still there (empty)
    metrics = run_sft_flow(monkeypatch, tmp_path, _sft_history(3, obs_loss=False))
    header, rows = _read_csv(metrics / "sft_curve.csv")
    assert header == list(flows.sft.SFT_CURVE_COLUMNS) and {r["obs_loss"] for r in rows} == {""}
    assert _leftovers(metrics) == []


def test_train_history_csv_matches_the_jsonl_after_every_step(tmp_path, monkeypatch):
    seen: list = []
    metrics = run_train_task(monkeypatch, tmp_path, "tspo", steps=3, seen=seen)
    assert len(seen) == 3
    for n, (records, (header, rows)) in enumerate(seen, start=1):  # after step n, both files hold n records
        assert [r["step"] for r in records] == list(range(1, n + 1))
        assert [r["step"] for r in rows] == [str(s) for s in range(1, n + 1)]
        assert header == scalar_columns(records)
    records = _read_jsonl(metrics / "train_tspo.jsonl")
    assert records == [_train_record(s, "tspo") for s in (1, 2, 3)]
    header = _assert_csv_matches_jsonl(metrics / "train_tspo.csv", records)
    assert header[0] == "step" and "clip_frac" in header and "turn_rewards" not in header
    assert set(header) == set().union(*records) - {"turn_rewards"}  # every scalar column of the records
    assert _read_csv(metrics / "train_tspo.csv")[1][0]["clip_frac"] == ""
    assert _leftovers(metrics) == []


# ================================================================================================================
# dvc plots on a throwaway project with the pipeline's dvc.yaml
# ================================================================================================================
def _png() -> bytes:
    """A valid 1 x 1 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}
    proc = subprocess.run([DVC, *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def plots_project(tmp_path_factory) -> Path:
    """git init + dvc init, the pipeline's dvc.yaml and .gitignore, metrics written by the flows themselves (with
    the trainer and SFT replaced by stand-ins), the report's PNGs."""
    root = tmp_path_factory.mktemp("plots_project")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    shutil.copyfile(PIPELINE, root / "dvc.yaml")
    shutil.copyfile(REPO / ".gitignore", root / ".gitignore")
    _dvc(root, "init", "-q")
    with pytest.MonkeyPatch.context() as mp:
        run_sft_flow(mp, root, _sft_history(12, obs_loss=True))
        for estimator in ("grpo", "tspo"):
            run_train_task(mp, root, estimator, steps=5)
    (root / "reports").mkdir()
    for name in REPORT_PNGS:
        (root / "reports" / f"{name}.png").write_bytes(_png())
    return root


def test_pipeline_declares_the_csv_plots_and_keeps_the_jsonl_outputs():
    pipeline = yaml.safe_load(PIPELINE.read_text(encoding="utf-8"))
    if "plots" not in pipeline:
        pytest.fail(f"{PIPELINE.name} has no top-level plots (swap in dvc.yaml.new)")
    stages = pipeline["stages"]

    def names(entries):
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]

    assert names(stages["sft"]["plots"]) == ["metrics/sft_curve.csv"]
    assert "metrics/sft_curve.jsonl" in names(stages["sft"]["outs"])
    assert names(stages["train"]["do"]["plots"]) == ["metrics/train_${item}.csv"]
    assert "metrics/train_${item}.jsonl" in names(stages["train"]["do"]["outs"])
    # the report reads the jsonl histories: they stay outputs of the train stages, so the report depends on them
    assert {"metrics/train_grpo.jsonl", "metrics/train_tspo.jsonl"} <= set(stages["report"]["deps"])
    assert not [p for s in stages.values() for p in names(s.get("plots", s.get("do", {}).get("plots")))
                if p.endswith(".jsonl")]  # DVC cannot read jsonl plots


def test_dvc_plots_show_json(plots_project):
    out = json.loads(_dvc(plots_project, "plots", "show", "--json").stdout)
    assert "errors" not in out, out.get("errors")
    data = out["data"]
    assert set(data) == {"sft_loss", *COMPARISONS, "metrics/sft_curve.csv", "metrics/train_grpo.csv",
                         "metrics/train_tspo.csv", *(f"reports/{n}.png" for n in REPORT_PNGS)}
    for plot_id in COMPARISONS:  # GRPO vs TSPO on one plot, 5 steps each
        (plot,) = data[plot_id]
        spec = plot["content"]
        values = spec["data"]["values"]
        assert sorted({v["filename"] for v in values}) == ["train_grpo.csv", "train_tspo.csv"], plot_id
        assert len(values) == 10
        for est in ("grpo", "tspo"):
            got = [float(v[plot_id]) for v in values if v["filename"] == f"train_{est}.csv"]
            assert got == [_train_record(s, est)[plot_id] for s in range(1, 6)], (plot_id, est)
        assert "GRPO vs TSPO" in spec["title"]["text"]
        assert spec["encoding"]["x"]["title"] == "RL step"
        assert spec["layer"][0]["encoding"]["y"]["title"]  # a y label, not the bare field name
    sft = data["sft_loss"][0]["content"]
    assert [float(v["loss"]) for v in sft["data"]["values"]] == [h["loss"] for h in _sft_history(12, True)]
    assert sft["title"]["text"].startswith("SFT") and sft["encoding"]["x"]["title"] == "SFT step"
    kl = data["metrics/train_tspo.csv"][0]["content"]
    assert kl["title"]["text"] == "train@tspo: KL to the frozen SFT reference"  # ${item} resolved per stage
    assert data["reports/training_curves.png"][0]["type"] == "image"


# ================================================================================================================
# the offline page template
# ================================================================================================================
def _make_template(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TEMPLATE_SCRIPT), "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


@pytest.fixture(scope="module")
def plots_template(tmp_path_factory) -> Path:
    """build/plots_template.html when `make plots-template` built it from the current script, else one generated
    here; the HTML test skips with the script's message when it cannot be generated (npm missing or offline)."""
    if BUILT_TEMPLATE.is_file() and BUILT_TEMPLATE.stat().st_mtime >= TEMPLATE_SCRIPT.stat().st_mtime:
        return BUILT_TEMPLATE
    out = tmp_path_factory.mktemp("template") / "plots_template.html"
    proc = _make_template(out)
    if proc.returncode != 0:
        pytest.skip(f"offline plots template unavailable: {proc.stderr.strip()}")
    return out


def _inlined_libraries(template: str) -> dict[str, str]:
    blocks = template.split('<script type="text/javascript" data-library="')[1:]
    return {b.split('"', 1)[0]: b.split(">", 1)[1].split("</script>", 1)[0] for b in blocks}


def test_dvc_plots_html_is_self_contained(plots_project, plots_template, tmp_path):
    template = plots_template.read_text(encoding="utf-8")
    libs = _inlined_libraries(template)
    assert sorted(libs) == ["vega-embed@6.18.2", "vega-lite@5.2.0", "vega@5.20.2"]
    assert all(len(code) > 50_000 for code in libs.values())
    assert "{plot_divs}" in template and "{scripts}" not in template

    out = tmp_path / "html"
    proc = _dvc(plots_project, "plots", "show", "--html-template", str(plots_template), "-o", str(out))
    assert (out / "index.html").as_uri() in proc.stdout
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<script src=" not in html.replace(" ", "")  # no external script at all ...
    assert '<script src="http' not in html and "cdn.jsdelivr.net" not in html  # ... in particular no CDN
    for name, code in libs.items():
        assert code in html, f"{name} not inlined"
    assert 'var e="5.20.2"' in html  # vega's own code, not a reference to it
    for plot_id in ("sft_loss", *COMPARISONS):
        assert f"vegaEmbed('#{plot_id}', spec);" in html
    assert html.count("vegaEmbed('#") == 12  # 9 definitions + 3 stage CSV plots
    assert "RL training: mean reward, GRPO vs TSPO" in html and "SFT warmup: loss per step" in html
    assert "{plot_divs}" not in html and "{refresh_tag}" not in html
    assert html.count('src="static/') == len(REPORT_PNGS)  # the PNGs are local files beside the page

    # the default page, for contrast: it loads the libraries from the CDN
    default = tmp_path / "default"
    _dvc(plots_project, "plots", "show", "-o", str(default))
    assert '<script src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>' in (default / "index.html").read_text()


def test_template_script_without_npm_fails_clearly(tmp_path):
    out = tmp_path / "t.html"
    proc = _make_template(out, NPM=str(tmp_path / "no-such-npm"))
    assert proc.returncode == 1
    assert "npm not found" in proc.stderr and "make plots-template" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_template_script_with_unreachable_registry_fails_clearly(tmp_path):
    if shutil.which("npm") is None:
        pytest.skip("npm not installed")
    out = tmp_path / "t.html"
    # a closed port on loopback as the registry and an empty cache: what an offline machine sees
    proc = _make_template(out, NPM=f"npm --registry=http://127.0.0.1:9/ --cache={tmp_path / 'npm-cache'}")
    assert proc.returncode == 1
    assert "failed" in proc.stderr and "registry is unreachable" in proc.stderr and "ECONNREFUSED" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
