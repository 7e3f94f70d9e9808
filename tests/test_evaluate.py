"""Evaluation: per-example scores and categories, aggregates, resumable result files, subsets, the EM table, the
stage driver on a tiny saved model, and an oracle policy end to end over the real corpus with BM25."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tspo_core.agent.backends import Generation
from tspo_core.agent.protocol import Action
from tspo_core.agent.rollout import Rollout, RolloutEngine, RolloutSettings
from tspo_core.config import FAMILIES, IndexConfig, TinyModelConfig, load_params
from tspo_core.data.schema import QAExample
from tspo_core.data.subsets import subset
from tspo_core.errors import DataError
from tspo_core.evaluate import aggregate, average_metrics, evaluate_dataset, markdown_table, read_results, \
    run_evaluate, score_rollout
from tspo_core.layout import checkpoint_for
from tspo_core.metrics import contains_answer
from tspo_core.policy import build_tiny_model

from fakes import PASSAGES, DictRetriever, tokenizer

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# fakes at the boundaries: a scripted policy (the dict retriever is in tests/fakes.py)
# ----------------------------------------------------------------------------------------------------------------
class PolicyBackend:
    """Plays `policy(question, turn, transcript) -> turn text` for every context (transcript = everything after the
    question line). `kill_on`: questions whose appearance raises, as a crash would, before anything is generated.
    `asked` records every question seen at turn 0."""

    def __init__(self, tokenizer, policy, kill_on=()):
        self.tok, self.policy, self.kill_on = tokenizer, policy, set(kill_on)
        self.eos_token_id = tokenizer.eos_token_id
        self.asked: list[str] = []

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        assert temperature == 0.0  # evaluation is greedy
        parsed = []
        for ctx in contexts:
            question, transcript = self.tok.decode(ctx).split("Question: ", 1)[1].split("\n", 1)
            if question in self.kill_on:
                raise RuntimeError(f"killed while evaluating {question!r}")
            parsed.append((question, transcript))
        out = []
        for (question, transcript), budget in zip(parsed, max_new_tokens):
            turn = transcript.count("</information>")
            if turn == 0:
                self.asked.append(question)
            ids = self.tok.encode(self.policy(question, turn, transcript), add_special_tokens=False)[:budget]
            out.append(Generation(ids, [-0.25] * len(ids), "stop"))
        return out


def scripted(scripts):
    """A policy from {question: [turn texts]} (questions as the prompt shows them, ending with '?')."""
    return lambda question, turn, transcript: scripts[question][turn]


def _engine(tok, policy, retriever=None, kill_on=(), **settings):
    backend = PolicyBackend(tok, policy, kill_on)
    settings = {"max_turns": 3, "top_k": 2, **settings}
    return RolloutEngine(backend, tok, retriever or DictRetriever(PASSAGES), RolloutSettings(**settings)), backend


# ----------------------------------------------------------------------------------------------------------------
# per-example scores and aggregates
# ----------------------------------------------------------------------------------------------------------------
def _answered(qid, golds, answer):
    turns = [f"<answer> {answer} </answer>" if answer is not None else "no tags"]
    action = Action("answer", answer) if answer is not None else Action("invalid", "")
    return Rollout(example=QAExample(qid, f"question {qid}", golds), group_id=0, turns=turns, actions=[action],
                   observations=[None], answer=answer)


def test_aggregate_em_f1_cover_on_hand_written_predictions():
    rows = [score_rollout(r) for r in (
        _answered("a", ["Paris"], "Paris"),              # em 1, f1 1, cover 1
        _answered("b", ["Paris"], "the city of Paris"),  # em 0; f1: "city of paris" vs "paris": P 1/3, R 1 -> 0.5
        _answered("c", ["USA"], "U.S.A."),               # em 1 after normalization, f1 1, cover 1
        _answered("d", ["Paris"], "Lyon"),               # 0, 0, 0
        _answered("e", ["Paris"], None),                 # no answer: 0, 0, 0 (one invalid action)
    )]
    assert [r["em"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert [r["f1"] for r in rows] == [1.0, 0.5, 1.0, 0.0, 0.0]
    assert [r["cover_em"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0]
    m = aggregate(rows)
    assert m["n"] == 5
    assert m["em"] == pytest.approx(2 / 5) and m["f1"] == pytest.approx(2.5 / 5)
    assert m["cover_em"] == pytest.approx(3 / 5)
    assert m["answered_rate"] == pytest.approx(4 / 5)
    assert m["invalid_action_rate"] == pytest.approx(1 / 5)  # 1 invalid of 5 actions
    # no retrieval at all: the two correct ones succeeded without retrieval, the rest failed completely
    assert m["success_without_retrieval"] == pytest.approx(2 / 5) and m["complete_failure"] == pytest.approx(3 / 5)
    assert m["complete_success"] == 0.0 and m["near_miss"] == 0.0 and m["answer_in_evidence_rate"] == 0.0
    with pytest.raises(ValueError, match="no result rows"):
        aggregate([])


def test_categories_come_from_the_observations_only():
    tok = tokenizer()
    scripts = {
        # found at turn 0 and answered right
        "success?": ["<search> Bobani </search>", "<answer> Kalora </answer>"],
        # found at turn 0, answered wrong
        "near?": ["<search> Bobani </search>", "<answer> Tuni </answer>"],
        # the gold is only in the model's own text: never counts as found
        "lucky?": ["<think> Kalora </think><answer> Kalora </answer>"],
        # retrieved text without the gold, wrong answer
        "fail?": ["<search> Bobani </search>", "<answer> Bo </answer>"],
        # nothing on the first search, found on the second (first occurrence = turn 1)
        "second?": ["<search> Mitu </search>", "<search> Kalora </search>", "<answer> Tuni </answer>"],
        # an invalid action, then a wrong answer
        "invalid?": ["I do not know", "<answer> Bo </answer>"],
    }
    golds = {"success": "Kalora", "near": "Kalora", "lucky": "Kalora", "fail": "Tuni", "second": "Tuni",
             "invalid": "Kalora"}
    examples = [QAExample(k, k, [g]) for k, g in golds.items()]
    engine, _ = _engine(tok, scripted(scripts))
    rows = [score_rollout(r) for r in engine.run(examples, group_size=1, temperature=0.0).rollouts]
    by_id = {r["id"]: r for r in rows}
    assert {k: r["category"] for k, r in by_id.items()} == {
        "success": "complete_success", "near": "near_miss", "lucky": "success_without_retrieval",
        "fail": "complete_failure", "second": "complete_success", "invalid": "complete_failure"}
    assert {k: r["first_occurrence"] for k, r in by_id.items()} == {
        "success": 0, "near": 0, "lucky": None, "fail": None, "second": 1, "invalid": None}
    assert [r["answer_in_evidence"] for r in rows] == [True, True, False, False, True, False]
    second = by_id["second"]
    assert second["queries"] == ["Mitu", "Kalora"] and second["retrieved_ids"] == [[], ["p3"]]
    assert second["turns"] == 3 and second["searches"] == 2 and second["prediction"] == "Tuni"
    assert by_id["invalid"]["invalid_actions"] == 1
    json.dumps(rows)  # rows are plain JSON

    m = aggregate(rows)
    assert (m["complete_success"], m["near_miss"], m["success_without_retrieval"], m["complete_failure"]) == \
        pytest.approx((2 / 6, 1 / 6, 1 / 6, 2 / 6))
    assert m["answer_in_evidence_rate"] == pytest.approx(3 / 6)
    assert m["turns_mean"] == pytest.approx(12 / 6)  # 2 + 2 + 1 + 2 + 3 + 2
    assert m["searches_mean"] == pytest.approx(5 / 6)
    assert m["invalid_action_rate"] == pytest.approx(1 / 12)


def test_average_is_unweighted_over_datasets():
    a = {"n": 10, "em": 0.5, "f1": 0.6}
    b = {"n": 30, "em": 0.1, "f1": 0.2}
    avg = average_metrics({"nq": a, "popqa": b})
    assert avg == pytest.approx({"n": 40, "datasets": 2, "em": 0.3, "f1": 0.4})


# ----------------------------------------------------------------------------------------------------------------
# resumable result files
# ----------------------------------------------------------------------------------------------------------------
NAMES = ["Bobani", "Kalora", "Mitu", "Bo", "Tuni", "Kabo", "Nira"]


def _questions():
    return [QAExample(f"q{i}", f"who is {name}", [name]) for i, name in enumerate(NAMES)]


def _echo_policy(question, turn, transcript):
    """Searches the name in the question, then answers it when the search returned something, else 'unknown'."""
    name = question.removeprefix("who is ").rstrip("?")
    if turn == 0:
        return f"<search> {name} </search>"
    return f"<answer> {name if 'Doc 1' in transcript else 'unknown'} </answer>"


def test_resume_after_a_kill_gives_the_rows_of_an_uninterrupted_run(tmp_path):
    tok = tokenizer()
    examples = _questions()
    full_engine, _ = _engine(tok, _echo_policy)
    reference = evaluate_dataset(full_engine, examples, tmp_path / "full.jsonl", batch_size=2)
    assert [r["id"] for r in reference] == [ex.id for ex in examples]

    # killed in the third batch (examples 4 and 5): the first two batches are on disk
    path = tmp_path / "nq.jsonl"
    dying, _ = _engine(tok, _echo_policy, kill_on={"who is Tuni?"})
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_dataset(dying, examples, path, batch_size=2)
    assert [r["id"] for r in read_results(path)[0]] == ["q0", "q1", "q2", "q3"]
    # ... and the kill landed mid-write: half a row without its newline
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"id": "q4", "question": "who is Tu')

    seen = []
    engine, backend = _engine(tok, _echo_policy)
    rows = evaluate_dataset(engine, examples, path, batch_size=2, progress=seen.append)
    assert backend.asked == ["who is Tuni?", "who is Kabo?", "who is Nira?"]  # finished ids are not redone
    assert rows == reference
    assert path.read_bytes() == (tmp_path / "full.jsonl").read_bytes()  # no duplicates, same order
    assert [s["done"] for s in seen] == [6, 7] and seen[-1]["total"] == 7

    # a third run has nothing to do and changes nothing
    engine, backend = _engine(tok, _echo_policy)
    assert evaluate_dataset(engine, examples, path, batch_size=3) == reference
    assert backend.asked == [] and path.read_bytes() == (tmp_path / "full.jsonl").read_bytes()


def test_stale_rows_are_redone_or_dropped(tmp_path):
    tok = tokenizer()
    examples = _questions()[:4]
    path = tmp_path / "r.jsonl"
    engine, _ = _engine(tok, _echo_policy)
    reference = evaluate_dataset(engine, examples, path, batch_size=4)
    rows = [dict(r) for r in reference]
    rows[1]["golden_answers"] = ["somebody else"]  # the data changed since: this row no longer applies
    extra = {**rows[0], "id": "gone"}              # an id no longer evaluated
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], rows[0], extra, *rows[1:]]), encoding="utf-8")

    engine, backend = _engine(tok, _echo_policy)
    assert evaluate_dataset(engine, examples, path, batch_size=4) == reference
    assert backend.asked == ["who is Kalora?"]
    assert [r["id"] for r in read_results(path)[0]] == ["q0", "q1", "q2", "q3"]


def test_bad_inputs(tmp_path):
    tok = tokenizer()
    engine, _ = _engine(tok, _echo_policy)
    ex = _questions()[0]
    with pytest.raises(DataError, match="duplicate question ids"):
        evaluate_dataset(engine, [ex, ex], tmp_path / "d.jsonl", batch_size=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q0"}\nnot json\n{"id": "q1"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        evaluate_dataset(engine, [ex], bad, batch_size=1)


# ----------------------------------------------------------------------------------------------------------------
# subsets and the table
# ----------------------------------------------------------------------------------------------------------------
def test_subset_is_fixed_by_seed_and_ids():
    exs = [QAExample(f"id{i}", f"q{i}", ["a"]) for i in range(50)]
    a = subset(exs, 10, seed=0)
    assert len(a) == 10 and a == subset(exs, 10, seed=0)
    assert [exs.index(e) for e in a] == sorted(exs.index(e) for e in a)  # input order kept
    assert set(e.id for e in subset(list(reversed(exs)), 10, seed=0)) == set(e.id for e in a)  # order-free
    assert set(e.id for e in subset(exs, 10, seed=1)) != set(e.id for e in a)
    assert set(e.id for e in a) <= set(e.id for e in subset(exs, 25, seed=0))  # nested: bigger reuses smaller
    assert subset(exs, None, 0) == exs and subset(exs, 50, 0) == exs and subset(exs, 80, 0) == exs
    assert subset(exs, 0, 0) == []


def test_markdown_table_format():
    def m(ems, avg):
        return {"datasets": {k: {"em": v} for k, v in ems.items()}, "average": {"em": avg}}

    table = markdown_table({
        "tspo": m({"nq": 0.5, "hotpotqa": 0.25}, 0.375),
        "sft": m({"nq": 0.1, "hotpotqa": 0.3}, 0.2),
        "grpo": m({"nq": 0.4}, 0.4),
    })
    assert table == "\n".join([
        "| Run | NQ | TriviaQA | PopQA | HotpotQA | 2Wiki | MuSiQue | Bamboogle | Avg. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| SFT | 0.100 | – | – | **0.300** | – | – | – | 0.200 |",
        "| GRPO | 0.400 | – | – | – | – | – | – | **0.400** |",
        "| TSPO | **0.500** | – | – | 0.250 | – | – | – | 0.375 |",
    ])
    one = markdown_table({"sft": m({f: 0.5 for f in FAMILIES}, 0.5)}, digits=2)
    assert one.splitlines()[2] == "| SFT | " + " | ".join(["0.50"] * 8) + " |"  # one run: nothing bold
    tie = markdown_table({"grpo": m({"nq": 0.2}, 0.2), "tspo": m({"nq": 0.2}, 0.2)})
    assert "**" not in tie  # nothing to single out when all runs are equal


# ----------------------------------------------------------------------------------------------------------------
# the stage driver on a tiny saved model and a BM25 index
# ----------------------------------------------------------------------------------------------------------------
def _write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_run_evaluate_writes_metrics_rows_and_table_and_resumes(tmp_path):
    from tspo_core.retrieval.index import build_index

    tok = tokenizer()
    tiny = TinyModelConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=1024)
    sft = tmp_path / "sft"
    build_tiny_model(tiny, tok, seed=0).save_pretrained(sft)
    tok.save_pretrained(sft)
    data = tmp_path / "data"
    q = lambda i, name: {"id": f"x{i}", "question": f"where was {name} born", "golden_answers": ["Kalora"]}  # noqa
    _write_jsonl(data / "nq" / "test.jsonl", [q(i, n) for i, n in enumerate(["Bobani", "Mitu", "Tuni"])])
    _write_jsonl(data / "hotpotqa" / "dev.jsonl", [q(i, n) for i, n in enumerate(["Kabo", "Nira"])])  # no test
    build_index([p for ps in PASSAGES.values() for p in ps], IndexConfig(kind="bm25"), tmp_path / "index",
                show_progress=False)
    overrides = {"paths.data_dir": str(data), "paths.index_dir": str(tmp_path / "index"),
                 "paths.sft_dir": str(sft), "paths.rl_dir": str(tmp_path / "rl"),
                 "paths.eval_dir": str(tmp_path / "eval"), "paths.metrics_dir": str(tmp_path / "metrics"),
                 "index.kind": "bm25", "retrieval.mode": "inprocess", "retrieval.top_k": 2,
                 "rollout.backend": "hf", "rollout.max_turns": 1, "rollout.max_new_tokens_per_turn": 6,
                 "rollout.max_obs_tokens": 200, "rollout.max_context_tokens": 1024,
                 "rollout.prompt_template": "compact", "model.name_or_path": None,
                 "model.dtype": "float32",
                 "eval.datasets": ["nq", "hotpotqa", "musique"], "eval.split": "test", "eval.subset_size": 2,
                 "eval.seed": 0, "eval.batch_size": 2}
    params = load_params(REPO / "params.yaml", overrides=overrides)
    assert checkpoint_for(params.paths, "sft") == sft
    assert checkpoint_for(params.paths, "tspo") == tmp_path / "rl" / "tspo" / "model"

    metrics = run_evaluate(params, sft, "sft")
    assert set(metrics["datasets"]) == {"nq", "hotpotqa"}
    assert metrics["meta"]["splits_used"] == {"nq": "test", "hotpotqa": "dev"}
    assert "musique" in metrics["meta"]["skipped"]
    assert metrics["datasets"]["nq"]["n"] == 2 and metrics["datasets"]["hotpotqa"]["n"] == 2
    avg = metrics["average"]
    assert avg["datasets"] == 2 and avg["n"] == 4
    assert avg["em"] == pytest.approx((metrics["datasets"]["nq"]["em"] + metrics["datasets"]["hotpotqa"]["em"]) / 2)
    for m in (*metrics["datasets"].values(), avg):
        assert 0.0 <= m["em"] <= 1.0
        assert sum(m[c] for c in ("complete_success", "near_miss", "success_without_retrieval",
                                  "complete_failure")) == pytest.approx(1.0)
    stored = json.loads((tmp_path / "metrics" / "detail" / "eval_sft.json").read_text())
    assert stored["datasets"] == metrics["datasets"] and stored["average"] == metrics["average"]
    assert stored["meta"]["seconds"] >= 0 and "environment" in stored["meta"]
    # the DVC metric beside it: the headline only (no timings, no meta)
    declared = json.loads((tmp_path / "metrics" / "eval_sft.json").read_text())
    assert declared == {"em": avg["em"], "f1": avg["f1"], "cover_em": avg["cover_em"],
                        "nq": metrics["datasets"]["nq"]["em"], "hotpotqa": metrics["datasets"]["hotpotqa"]["em"]}
    run_dir = tmp_path / "eval" / "sft"
    nq_file = run_dir / "nq.jsonl"
    assert len(read_results(nq_file)[0]) == 2 and len(read_results(run_dir / "hotpotqa.jsonl")[0]) == 2
    table = (run_dir / "table.md").read_text()
    assert table.startswith("| Run | NQ |") and re.search(r"^\| SFT \| \d\.\d{3} \| – \|", table, re.M)
    assert (run_dir / "params.resolved.yaml").is_file()

    # rerun: everything is reused (the result file is not rewritten)
    before = nq_file.stat().st_mtime_ns
    time.sleep(0.01)
    again = run_evaluate(params, sft, "sft")
    assert again["datasets"] == metrics["datasets"] and nq_file.stat().st_mtime_ns == before
    # a changed checkpoint invalidates the stored rows
    (sft / "generation_config.json").write_text("{}", encoding="utf-8")
    run_evaluate(params, sft, "sft")
    assert nq_file.stat().st_mtime_ns != before

    nothing = load_params(REPO / "params.yaml", overrides={**overrides, "eval.datasets": ["musique"]})
    with pytest.raises(DataError, match="nothing to evaluate"):
        run_evaluate(nothing, sft, "sft")


# ----------------------------------------------------------------------------------------------------------------
# real data: an oracle policy over the real corpus with BM25
# ----------------------------------------------------------------------------------------------------------------
_INFO = re.compile(r"<information>(.*?)</information>", re.S)
_LABEL = re.compile(r"Doc \d+\(Title: ")


def test_oracle_on_real_nq_with_bm25(real_qa_dir: Path, tmp_path):
    from tspo_core.data.loaders import load_flashrag_jsonl
    from tspo_core.retrieval.index import build_index
    from tspo_core.retrieval.retriever import load_retriever

    build_index(real_qa_dir / "corpus.jsonl", IndexConfig(kind="bm25"), tmp_path / "index", show_progress=False)
    retriever = load_retriever(tmp_path / "index")
    examples = load_flashrag_jsonl(real_qa_dir / "nq.jsonl")
    golds = {ex.question.strip() + ("" if ex.question.strip().endswith("?") else "?"): ex.golden_answers
             for ex in examples}

    def oracle(question, turn, transcript):
        if turn == 0:
            return f"<search> {question.rstrip('?')} </search>"
        evidence = _LABEL.sub(" ", _INFO.findall(transcript)[-1])  # passages only, not the "Doc 1" labels
        found = [g for g in golds[question] if contains_answer(evidence, [g])]
        return f"<answer> {found[0] if found else 'unknown'} </answer>"

    tok = tokenizer()  # byte fallback: any text round-trips; observations are long but never truncated here
    engine, _ = _engine(tok, oracle, retriever, max_turns=1, top_k=3, max_obs_tokens=10**6,
                        max_context_tokens=10**6)
    try:
        rows = evaluate_dataset(engine, examples, tmp_path / "nq.jsonl", batch_size=50)
    finally:
        retriever.close()

    answered = [r for r in rows if r["prediction"] != "unknown"]
    missed = [r for r in rows if r["prediction"] == "unknown"]
    assert len(rows) == 200 and answered and missed
    assert all(r["em"] == 1.0 for r in answered)  # the oracle's answers are gold answers: EM exactly 1
    assert all(r["category"] == "complete_success" and r["answer_in_evidence"] for r in answered)
    assert all(r["category"] == "complete_failure" and not r["answer_in_evidence"] and r["em"] == 0.0
               for r in missed)
    # categories agree with what the retrieved passages (by id, from the corpus itself) contain
    corpus = {}
    with open(real_qa_dir / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            corpus[rec["id"]] = rec["contents"]
    for r in rows:
        assert r["searches"] == 1 and len(r["retrieved_ids"][0]) == 3
        in_passages = any(contains_answer(corpus[pid], r["golden_answers"]) for pid in r["retrieved_ids"][0])
        assert in_passages == r["answer_in_evidence"], r["id"]
        assert (r["category"] == "complete_success") == (r["answer_in_evidence"] and r["em"] == 1.0)
    m = aggregate(rows)
    assert m["em"] == len(answered) / 200 == m["complete_success"] == m["answer_in_evidence_rate"]
    assert m["near_miss"] == 0.0 and m["success_without_retrieval"] == 0.0
    # BM25 over the question text finds the answer for a good share of the NQ questions whose gold passage is in
    # the corpus (the index tests measure recall@3 ~ 0.8 for the answer passage)
    supported = set(json.loads((real_qa_dir / "supported_ids.json").read_text())["nq"])
    hit = sum(r["answer_in_evidence"] for r in rows if r["id"] in supported) / len(supported)
    print(f"oracle EM on real NQ with BM25 top-3: {m['em']:.3f}; answer found for {hit:.1%} of supported ids")
    assert hit > 0.5


def test_the_checkpoint_fingerprint_ignores_the_run_record_and_nothing_else(tmp_path):
    """Finished evaluation rows are kept while the checkpoint is the same: a new run record (timings of an
    otherwise identical training run) keeps the fingerprint, any other byte changes it."""
    from tspo_core.evaluate import fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "run_record.json").write_text('{"history_timings": [{"step_s": 1.0}]}', encoding="utf-8")
    before = fingerprint(tmp_path, {"top_k": 1})
    (tmp_path / "run_record.json").write_text('{"history_timings": [{"step_s": 2.5}]}', encoding="utf-8")
    assert fingerprint(tmp_path, {"top_k": 1}) == before
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    assert fingerprint(tmp_path, {"top_k": 1}) != before
