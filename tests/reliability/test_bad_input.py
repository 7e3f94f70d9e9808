"""Bad input, one test per case: each runs the real stage CLI (`python -m flows.<stage> --params params.yaml`) in a
working copy of the tiny world and asserts

1. exit status 2 (the CLI's "bad input" status: a `TSPOError`, not a crash) and a final `error:` message naming the
   key, file and line (or option) at fault;
2. no partial outputs: every file of the working copy is byte-identical afterwards (the previous `data/`,
   `artifacts/index`, `artifacts/sft` included), nothing new was written, and the stage's own outs that did not
   exist still do not.

The retrieval server cases send the bad request to a running server process instead: a 4xx naming the limit, never
a 5xx, the server keeps serving, its index directory is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from reliability_support import Work, diff_snapshots, error_text, served, snapshot

pytestmark = pytest.mark.reliability


# ----------------------------------------------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    setup: Callable[[Work, dict], list[str]]  # edits the working copy; returns extra CLI arguments
    fragments: tuple[str, ...]  # all must appear in the CLI's final error message ({id}: the repeated id)
    fails_before_flow: bool = False  # a params/option error: refused before any flow run (no orchestrator, fast)
    marks: tuple = ()  # the cases that load a model in the CLI take ~10 s: slow


def _set(**dotted) -> Callable[[Work, dict], list[str]]:
    def setup(work: Work, _: dict) -> list[str]:
        work.set(**{k.replace("__", "."): v for k, v in dotted.items()})
        return []
    return setup


def _args(*args: str, **dotted) -> Callable[[Work, dict], list[str]]:
    def setup(work: Work, _: dict) -> list[str]:
        if dotted:
            work.set(**{k.replace("__", "."): v for k, v in dotted.items()})
        return list(args)
    return setup


def _typo_section(work: Work, _: dict) -> list[str]:
    work.raw["trian"] = {"steps": 2}
    work.write()
    return []


def _duplicate_section(work: Work, _: dict) -> list[str]:
    text = work.write().read_text(encoding="utf-8")
    work.params_path.write_text(text + "train:\n  seed: 7\n", encoding="utf-8")  # a second `train:` section
    return []


def _missing_params(work: Work, _: dict) -> list[str]:
    return ["--params", str(work.root / "missing.yaml")]


# -- real-file inputs (data.source = files) ---------------------------------------------------------------------
def _files(corpus: Callable[[list[bytes]], list[bytes]] | None = None,
           train: Callable[[list[bytes]], list[bytes]] | None = None,
           evals: Callable[[list[bytes]], list[bytes]] | None = None, files: dict | None = None) -> Callable:
    """Inputs under `inputs/` made from the tiny world's own files (20 passages, the nq train and test questions),
    one of them spoiled by `corpus`/`train`/`evals` (functions of the file's lines); `files` overrides entries of
    `data.files`."""
    def setup(work: Work, _: dict) -> list[str]:
        inputs = work.root / "inputs"
        inputs.mkdir()
        data = work.path("data_dir")
        sources = {"corpus.jsonl": (data / "corpus.jsonl", 20, corpus), "train.jsonl": (data / "nq" / "train.jsonl",
                   None, train), "nq.jsonl": (data / "nq" / "test.jsonl", None, evals)}
        for name, (src, n, spoil) in sources.items():
            lines = src.read_bytes().splitlines(keepends=True)[:n]
            (inputs / name).write_bytes(b"".join(spoil(lines) if spoil else lines))
        section = {"corpus": "inputs/corpus.jsonl", "train": ["inputs/train.jsonl"], "eval": {"nq": "inputs/nq.jsonl"}}
        work.set(**{"data.source": "files", "data.files": {**section, **(files or {})}})
        return []
    return setup


def _line(i: int, new: bytes) -> Callable[[list[bytes]], list[bytes]]:
    """Replace 1-based line `i`."""
    return lambda lines: lines[:i - 1] + [new] + lines[i:]


REPEATED: dict[str, str] = {}  # the id `_with_id_of` copied, for the expected message


def _with_id_of(i: int, j: int) -> Callable[[list[bytes]], list[bytes]]:
    """Line `i` gets the id of line `j` (1-based)."""
    def spoil(lines: list[bytes]) -> list[bytes]:
        rec = json.loads(lines[i - 1])
        rec["id"] = REPEATED["id"] = json.loads(lines[j - 1])["id"]
        return lines[:i - 1] + [json.dumps(rec).encode() + b"\n"] + lines[i:]
    return spoil


def _empty_answers(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[1])
    rec["golden_answers"] = []
    return lines[:1] + [json.dumps(rec).encode() + b"\n"] + lines[2:]


# -- the index stage's input: data/corpus.jsonl -----------------------------------------------------------------
def _spoil_data_corpus(spoil: Callable[[list[bytes]], list[bytes]] | None) -> Callable:
    def setup(work: Work, _: dict) -> list[str]:
        path = work.path("data_dir") / "corpus.jsonl"
        if spoil is None:
            path.unlink()
        else:
            path.write_bytes(b"".join(spoil(path.read_bytes().splitlines(keepends=True))))
        return []
    return setup


# -- checkpoints ------------------------------------------------------------------------------------------------
def _model(name: str) -> Callable:
    """The sft stage starting from a foreign checkpoint (`model.name_or_path`)."""
    def setup(work: Work, ctx: dict) -> list[str]:
        work.set(**{"model.name_or_path": str(ctx["checkpoints"] / name)})
        return []
    return setup


def _evaluate_checkpoint(name: str) -> Callable:
    """The evaluate stage on a foreign checkpoint placed where the grpo run's model would be."""
    def setup(work: Work, ctx: dict) -> list[str]:
        shutil.copytree(ctx["checkpoints"] / name, work.path("rl_dir") / "grpo" / "model")
        return ["--run", "grpo"]
    return setup


def _broken_copy_of_sft(spoil: str) -> Callable:
    """The evaluate stage on a copy of the SFT checkpoint (placed where the grpo run's model would be) with its
    tokenizer files removed (`no-tokenizer`) or a NaN written into its weights (`nan-weights`)."""
    def setup(work: Work, _: dict) -> list[str]:
        model = work.path("rl_dir") / "grpo" / "model"
        shutil.copytree(work.path("sft_dir"), model)
        if spoil == "no-tokenizer":
            for f in model.glob("tokenizer*"):
                f.unlink()
        else:
            from safetensors.torch import load_file, save_file

            weights = load_file(str(model / "model.safetensors"))
            name = sorted(weights)[0]
            weights[name][0] = float("nan")
            save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
        return ["--run", "grpo"]
    return setup


def _empty_checkpoint(work: Work, _: dict) -> list[str]:
    (work.path("rl_dir") / "grpo" / "model").mkdir(parents=True)
    return ["--run", "grpo"]


def _data_dir_holds_the_inputs(work: Work, ctx: dict) -> list[str]:
    """Real files under inputs/ (as `_files`), and paths.data_dir pointing at that very folder."""
    _files()(work, ctx)
    work.set(**{"paths.data_dir": str(work.root / "inputs")})
    return []


def _path_is(key: str, other: str, sub: str = "") -> Callable:
    """paths.<key> set to paths.<other> (or a folder `sub` inside it)."""
    def setup(work: Work, _: dict) -> list[str]:
        work.set(**{f"paths.{key}": str(work.path(other) / sub)})
        return []
    return setup


def _data_dir_is_the_working_copy(work: Work, _: dict) -> list[str]:
    work.set(**{"paths.data_dir": "."})  # relative to the CLI's working directory, which holds params.yaml
    return []


CASES = [
    # params: typos, wrong types, sizes, top-k (refused before any flow run starts)
    Case("params-typo-section", "data", _typo_section, ("params.yaml", "trian: unknown key (typo?)"), True),
    Case("params-typo-key", "evaluate", _args("--run", "sft", optim__lrr=1e-3),
         ("params.yaml", "optim.lrr: unknown key (typo?)"), True),
    Case("params-duplicate-section", "index", _duplicate_section,
         ("params.yaml:", "duplicate key 'train' (first on line"), True),
    Case("wrong-type-string", "evaluate", _set(train__steps="ten"), ("train.steps: ", "valid integer"), True),
    Case("wrong-type-boolean", "evaluate", _set(retrieval__top_k=True),
         ("retrieval.top_k: ", "expected a number, got a boolean"), True),
    Case("negative-size", "data", _set(data__synthetic__n_worlds=-3),
         ("data.synthetic.n_worlds: ", "greater than 1"), True),
    Case("zero-size", "index", _set(train__prompts_per_step=0), ("train.prompts_per_step: ", "greater than 0"),
         True),
    Case("top-k-zero", "evaluate", _set(retrieval__top_k=0), ("retrieval.top_k: ", "greater than or equal to 1"),
         True),
    Case("top-k-1e9", "evaluate", _set(retrieval__top_k=10**9), ("retrieval.top_k: ", "less than or equal to 100"),
         True),
    Case("top-k-over-server-limit", "evaluate", _set(retrieval__top_k=20, retrieval__max_top_k=10),
         ("retrieval: ", "top_k (20) exceeds max_top_k (10)"), True),
    Case("unknown-estimator", "train", _args("--estimator", "tspoo"),
         ("--estimator 'tspoo': unknown advantage estimator", "'grpo'", "'tspo'"), True),
    Case("missing-params-file", "data", _missing_params, ("missing.yaml: params file not found",), True),
    Case("empty-train-file-list", "data", _files(files={"train": []}),
         ("data.files.train: ", "at least 1 item"), True),
    # real data files (the data stage; the previous data/ must survive byte for byte)
    Case("missing-corpus-file", "data", _files(files={"corpus": "inputs/nope.jsonl"}),
         ("inputs/nope.jsonl: file not found",)),
    Case("corpus-line-not-json", "data", _files(corpus=_line(3, b'{"id": "x", "contents": \n')),
         ("inputs/corpus.jsonl:3: invalid JSON",)),
    Case("passage-without-contents", "data", _files(corpus=_line(2, b'{"id": "p2", "text": "no contents"}\n')),
         ("inputs/corpus.jsonl:2: passage without 'contents'", "found 'text'")),
    Case("duplicate-passage-ids", "data", _files(corpus=_with_id_of(5, 2)),
         ("inputs/corpus.jsonl:5: duplicate passage id '{id}' (first on line 2)",)),
    Case("non-utf8-bytes", "data", _files(corpus=_line(2, b'{"id": "p2", "contents": "caf\xe9"}\n')),
         ("inputs/corpus.jsonl:2: not valid UTF-8: byte b'\\xe9'",)),
    Case("empty-answer-list", "data", _files(evals=_empty_answers),
         ("inputs/nq.jsonl:2: empty answer list 'golden_answers'",)),
    Case("zero-row-dataset", "data", _files(train=lambda lines: []), ("inputs/train.jsonl: no records",)),
    Case("duplicate-question-ids", "data", _files(train=_with_id_of(3, 1)),
         ("inputs/train.jsonl:3: duplicate id '{id}' (first on line 1)",)),
    # the index stage on a spoiled data/corpus.jsonl (the previous index must survive)
    Case("index-corpus-line-not-json", "index", _spoil_data_corpus(_line(4, b"{not json}\n")),
         ("data/corpus.jsonl:4: not valid JSON",)),
    Case("index-duplicate-passage-ids", "index", _spoil_data_corpus(_with_id_of(6, 1)),
         ("data/corpus.jsonl:6: duplicate passage id '{id}' (first on line 1)",)),
    Case("index-missing-corpus", "index", _spoil_data_corpus(None), ("data/corpus.jsonl: corpus file not found",)),
    Case("index-over-memory-budget", "index", _set(index__memory_budget_gb=1e-9),
         ("refusing to build the bm25/bm25 index", "index.memory_budget_gb = 1e-09")),
    # checkpoints and tokenizers (nothing is downloaded: HF_HUB_OFFLINE=1)
    Case("wrong-architecture-t5", "sft", _model("t5"),
         ("/t5: cannot load a causal LM checkpoint", "T5Config"), marks=(pytest.mark.slow,)),
    Case("encoder-only-checkpoint-bert", "sft", _model("bert"), ("/bert", "causal"),
         marks=(pytest.mark.slow,)),
    Case("tokenizer-without-protocol-tags", "evaluate", _evaluate_checkpoint("gpt2-plain-tokenizer"),
         ("artifacts/rl/grpo/model: tokenizer cannot represent the protocol tag '<think>'",),
         marks=(pytest.mark.slow,)),
    Case("missing-checkpoint", "evaluate", _args("--run", "grpo"),
         ("artifacts/rl/grpo/model: cannot load a causal LM checkpoint",), marks=(pytest.mark.slow,)),
    # issue 19: outputs never overlap inputs (refused before the flow run: nothing is written)
    Case("data-dir-is-the-inputs-folder", "data", _data_dir_holds_the_inputs,
         ("output paths.data_dir (", "/inputs) contains input data.files.corpus (", "/inputs/corpus.jsonl)"), True),
    Case("data-dir-holds-the-params-file", "data", _data_dir_is_the_working_copy,
         ("output paths.data_dir (", "contains input --params (", "params.yaml)"), True),
    Case("index-dir-is-the-data-dir", "index", _path_is("index_dir", "data_dir"),
         ("output paths.index_dir (", "/data) is input paths.data_dir ("), True),
    Case("rl-dir-inside-the-sft-checkpoint", "train", _path_is("rl_dir", "sft_dir", "rl"),
         ("output paths.rl_dir (", "/artifacts/sft/rl/tspo) lies inside input paths.sft_dir ("), True),
    Case("eval-dir-is-the-checkpoint", "evaluate", _args("--run", "sft", **{"paths.eval_dir": "artifacts"}),
         ("output paths.eval_dir (", "/artifacts/sft) is input paths.sft_dir ("), True),
    Case("metrics-dir-inside-the-index", "index", _path_is("metrics_dir", "index_dir"),
         ("output paths.index_dir (", "/artifacts/index) contains output paths.metrics_dir (",
          "/artifacts/index/index.json)"), True),
    # issue 19: settings that make training numerically impossible, and nonsense for RL, refused by name
    Case("lr-infinite", "train", _set(optim__lr=float("inf")), ("optim.lr: ", "must be a finite number"), True),
    Case("lr-overflows-float32", "train", _set(optim__lr=1e308), ("optim.lr: ", "overflows float32"), True),
    Case("sft-lr-infinite", "sft", _set(sft__lr=float("inf")), ("sft.lr: ", "must be a finite number"), True),
    Case("betas-outside-0-1", "train", _set(optim__betas=[0.9, 1.0]),
         ("optim.betas: ", "AdamW betas must be within [0, 1)"), True),
    Case("kl-coef-infinite", "train", _set(optim__kl_coef=float("inf")), ("optim.kl_coef: ", "finite"), True),
    Case("seed-over-64-bits", "train", _set(train__seed=10**23), ("train.seed: ", "within 0..2**63-1"), True),
    Case("group-size-1", "train", _set(rollout__group_size=1),
         ("rollout.group_size = 1: RL needs at least 2 rollouts per question",), True),
    Case("temperature-0", "train", _set(rollout__temperature=0.0), ("rollout.temperature = 0: RL samples",), True),
    # issue 19: checkpoints refused at load with a message that says what is wrong
    Case("empty-checkpoint-dir", "evaluate", _empty_checkpoint,
         ("artifacts/rl/grpo/model: not a complete checkpoint: no model files", "no tokenizer files"),
         marks=(pytest.mark.slow,)),
    Case("checkpoint-without-tokenizer", "evaluate", _broken_copy_of_sft("no-tokenizer"),
         ("artifacts/rl/grpo/model: not a complete checkpoint: no tokenizer files",
          "the checkpoint's tokenizer is missing"), marks=(pytest.mark.slow,)),
    Case("checkpoint-nan-weights", "evaluate", _broken_copy_of_sft("nan-weights"),
         ("artifacts/rl/grpo/model/model.safetensors: non-finite weights (NaN or inf)",), marks=(pytest.mark.slow,)),
]

STAGE_OUTS = {  # the DVC outs (and metrics) of each stage, relative to the working copy
    "data": ["data"], "index": ["artifacts/index", "metrics/index.json", "metrics/detail/index.json"],
    "sft": ["artifacts/sft", "metrics/sft.json", "metrics/detail/sft.json", "metrics/sft_curve.jsonl"],
    "train": ["artifacts/rl", "metrics/train_tspo.json", "metrics/detail/train_tspo.json", "metrics/train_tspo.jsonl",
              "metrics/train_tspoo.json"],
    "evaluate": ["artifacts/eval", "metrics/eval_sft.json", "metrics/eval_grpo.json", "metrics/detail/eval_sft.json"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Small foreign checkpoints saved locally (nothing downloaded): an encoder-decoder (T5) and an encoder-only
    model (BERT), both with the project's tokenizer, and a GPT-2 whose word-level tokenizer has no protocol tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast,
                              T5Config, T5ForConditionalGeneration)

    from fakes import tokenizer as project_tokenizer

    root = tmp_path_factory.mktemp("checkpoints")
    tok = project_tokenizer()
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, decoder_start_token_id=tok.pad_token_id))
    t5.save_pretrained(root / "t5")
    tok.save_pretrained(root / "t5")
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=512))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    words = ["<unk>", "<eos>", "the", "question", "answer", "search", "<", ">", "/"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                      bos_token_id=1, eos_token_id=1))
    gpt2.save_pretrained(root / "gpt2-plain-tokenizer")
    plain.save_pretrained(root / "gpt2-plain-tokenizer")
    return root


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_fails_cleanly_naming_the_fault(case: Case, work: Work, checkpoints: Path):
    extra = case.setup(work, {"checkpoints": checkpoints})
    outs = {rel: (work.root / rel).exists() for rel in STAGE_OUTS[case.stage]}
    before = snapshot(work.root)
    args = list(extra)
    params = None
    if "--params" in args:  # the case names its own params file
        i = args.index("--params")
        params, args = args[i + 1], args[:i] + args[i + 2:]
    proc = work.run(case.stage, *args, params=params, needs_prefect=not case.fails_before_flow)
    message = error_text(proc.stderr)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    for fragment in (f.replace("{id}", REPEATED.get("id", "{id}")) for f in case.fragments):
        assert fragment in message, f"{fragment!r} not in the error message:\n{message or proc.stderr[-3000:]}"
    if case.fails_before_flow:  # refused up front: one clean message, no orchestrator run, no traceback
        assert "Traceback" not in proc.stderr and "Flow run" not in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # never a traceback on the console
    assert message.count("\n") == 1 and message.startswith("error: "), message  # one line
    changes = diff_snapshots(before, snapshot(work.root))
    assert not changes, f"the failed stage changed files: {changes[:10]}"
    for rel, existed in outs.items():
        if not existed:
            assert not (work.root / rel).exists(), f"partial output {rel} left behind"


# ----------------------------------------------------------------------------------------------------------------
# the retrieval server: oversized and out-of-limit requests
# ----------------------------------------------------------------------------------------------------------------
LIMITS = {"retrieval.max_queries": 8, "retrieval.max_query_chars": 64, "retrieval.max_top_k": 10}
MAX_BODY = 8 * (64 * 6 + 8) + 64 * 1024  # server.ServerLimits.max_body_bytes for LIMITS


@pytest.fixture(scope="module")
def limited_server(base_world, tmp_path_factory):
    """The server CLI on the tiny BM25 index with small limits (read from a params file)."""
    import yaml

    from reliability_support import tiny_params

    root = tmp_path_factory.mktemp("limited")
    raw = tiny_params(root, LIMITS)
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    index = base_world / "artifacts" / "index"
    before = snapshot(index)
    server = served(index, root, params=root / "params.yaml")
    try:
        yield server
    finally:
        server.stop()
    assert diff_snapshots(before, snapshot(index)) == []  # the server never writes to its index


def _good(server) -> None:
    r = httpx.post(server.url + "/retrieve", json={"queries": ["capital city country"], "topk": 2}, timeout=30)
    assert r.status_code == 200 and len(r.json()["result"]) == 1


@pytest.mark.parametrize("body, status, fragment", [
    pytest.param({"queries": ["x" * 60] * 20_000, "topk": 3}, 413, f"request body over {MAX_BODY} bytes",
                 id="oversized-body"),
    pytest.param({"queries": ["q"] * 9, "topk": 3}, 422, "9 queries in one request; the limit is 8",
                 id="too-many-queries"),
    pytest.param({"queries": ["ok", "y" * 65], "topk": 3}, 422, "query 1 has 65 characters; the limit is 64",
                 id="query-too-long"),
    pytest.param({"queries": ["q"], "topk": 0}, 422, "topk must be between 1 and 10, got 0", id="top-k-zero"),
    pytest.param({"queries": ["q"], "topk": 10**9}, 422, "topk must be between 1 and 10, got 1000000000",
                 id="top-k-1e9"),
])
def test_server_refuses_bad_requests_naming_the_limit(limited_server, body, status, fragment):
    r = httpx.post(limited_server.url + "/retrieve", content=json.dumps(body).encode(),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status and fragment in r.json()["detail"], (r.status_code, r.text[:300])
    assert limited_server.proc.poll() is None  # still running
    _good(limited_server)  # and still answering


def test_server_refuses_an_oversized_chunked_body(limited_server):
    """Without Content-Length the cap applies while reading: the body is never buffered whole."""
    def chunks():
        yield b'{"queries": ["'
        for _ in range(200):
            yield b"z" * 4096
        yield b'"]}'

    r = httpx.post(limited_server.url + "/retrieve", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and f"request body over {MAX_BODY} bytes" in r.json()["detail"]
    _good(limited_server)


def test_server_cli_refuses_an_index_whose_corpus_changed(base_world, tmp_path):
    """A stage-like CLI failure: exit 2, the message names the corpus file and what changed."""
    import subprocess
    import sys

    from reliability_support import REPO, free_port

    shutil.copytree(base_world / "data", tmp_path / "data")
    shutil.copytree(base_world / "artifacts" / "index", tmp_path / "artifacts" / "index")
    corpus = tmp_path / "data" / "corpus.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"id": "new", "contents": "\\"New\\"\\nadded later"}\n')
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tspo_core.retrieval.server", "--index",
                           str(tmp_path / "artifacts" / "index"), "--port", str(free_port())], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{corpus}: " in proc.stderr and "the corpus changed since indexing" in proc.stderr
    assert diff_snapshots(before, snapshot(tmp_path)) == []
