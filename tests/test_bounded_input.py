"""Bounded input: YAML alias bombs refused before they are built, error messages that never render a whole value,
per-field limits and lone surrogates in data files (file and line named), prompts over the context cap refused
per question in evaluation (recorded in the row, never a crash)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tspo_core.agent.backends import Generation
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import MAX_YAML_ALIAS_EXPANSION, load_params, params_from_dict
from tspo_core.data.loaders import (MAX_ANSWER_CHARS, MAX_PASSAGE_CHARS, MAX_QUESTION_CHARS, load_corpus,
                                    load_flashrag_jsonl)
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError, DataError, bounded_repr
from tspo_core.evaluate import evaluate_dataset

from fakes import PASSAGES, DictRetriever, tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = (REPO / "configs" / "tiny.yaml").read_text(encoding="utf-8")


def _bomb(levels: int = 9) -> str:
    """The "billion laughs": 9 levels of 9 aliases each stand for 9**9 strings in ~1 KB of YAML."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# params YAML
# ----------------------------------------------------------------------------------------------------------------
def test_an_alias_bomb_in_a_string_setting_is_refused_before_it_is_built(tmp_path):
    path = _params_file(tmp_path, _bomb() + TINY.replace("\ntracking:", "\ntracking:\n  project: *l9", 1))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert time.monotonic() - t0 < 2
    msg = str(err.value)
    assert msg.startswith(f"{path}: YAML aliases expand") and f"{MAX_YAML_ALIAS_EXPANSION:,}" in msg
    assert "\n" not in msg


def test_a_recursive_alias_is_refused_naming_its_line(tmp_path):
    path = _params_file(tmp_path, "x: &a [1, *a]\n" + TINY)
    with pytest.raises(ConfigError, match=r":1: a recursive YAML alias"):
        load_params(path)


def test_modest_aliases_still_load(tmp_path):
    text = TINY.replace("  seed: 0", "  seed: &s 7", 1).replace("\neval:\n", "\neval:\n  seed: *s\n", 1)
    params = load_params(_params_file(tmp_path, text))
    assert params.data.seed == params.eval.seed == 7
    small = _bomb(levels=3)  # 9**3 strings: below the bound, refused only as an unknown key
    with pytest.raises(ConfigError, match=r"l0: unknown key"):
        load_params(_params_file(tmp_path, small + TINY))


def test_an_integer_too_long_to_convert_is_one_config_error(tmp_path):
    path = _params_file(tmp_path, TINY + "_x: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"params.yaml: cannot read: Exceeds the limit"):
        load_params(path)


def test_error_messages_never_render_a_whole_value():
    nested: list = ["lol" * 1000] * 9
    for _ in range(8):  # 9**9 elements through shared references: a whole repr would take gigabytes
        nested = [nested] * 9
    raw = {"data": {"source": "synthetic", "synthetic": {"splits": {}}}, "tracking": {"project": nested}}
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert time.monotonic() - t0 < 2
    line = next(li for li in str(err.value).splitlines() if "tracking.project" in li)
    assert len(line) < 300
    huge = "x" * 10**7
    with pytest.raises(ConfigError) as err:
        params_from_dict({"data": {"source": huge}})
    assert len(str(err.value)) < 1000
    assert len(bounded_repr(huge)) == 200 and bounded_repr(10**5000) == "<int>"


# ----------------------------------------------------------------------------------------------------------------
# data files
# ----------------------------------------------------------------------------------------------------------------
def _jsonl(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


OK = json.dumps({"id": "a", "question": "who?", "golden_answers": ["x"]})


@pytest.mark.parametrize("record,fragment", [
    ({"id": "b", "question": "q" * (MAX_QUESTION_CHARS + 1), "golden_answers": ["x"]},
     f"'question' has {MAX_QUESTION_CHARS + 1:,} characters; the limit is {MAX_QUESTION_CHARS:,}"),
    ({"id": "b", "question": "q" * 10**6, "golden_answers": ["x"]}, "'question' has 1,000,000 characters"),
    ({"id": "b", "question": "q", "golden_answers": ["x", "a" * (MAX_ANSWER_CHARS + 1)]},
     f"golden_answers[1] has {MAX_ANSWER_CHARS + 1:,} characters"),
])
def test_over_long_fields_name_the_file_and_line(tmp_path, record, fragment):
    path = _jsonl(tmp_path, "nq.jsonl", [OK, json.dumps(record)])
    with pytest.raises(DataError) as err:
        load_flashrag_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and fragment in str(err.value)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("line,fragment", [
    ('{"id": "b", "question": "who \\ud800?", "golden_answers": ["x"]}', "'question' holds a lone surrogate"),
    ('{"id": "b", "question": "who?", "golden_answers": ["\\udfff"]}', "'golden_answers[0]' holds a lone surrogate"),
    ('{"id": "b", "question": "who?", "golden_answers": ["x"], "metadata": {"k": ["\\ud83d"]}}',
     "'metadata.k[0]' holds a lone surrogate"),
])
def test_a_lone_surrogate_names_the_file_and_line(tmp_path, line, fragment):
    path = _jsonl(tmp_path, "nq.jsonl", [OK, line])
    with pytest.raises(DataError) as err:
        load_flashrag_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and fragment in str(err.value)
    # a surrogate *pair* is an ordinary character
    assert load_flashrag_jsonl(_jsonl(tmp_path, "ok.jsonl", [
        OK, '{"id": "c", "question": "smile \\ud83d\\ude00", "golden_answers": ["x"]}']))[1].question.endswith("😀")


def test_corpus_passages_are_bounded_and_valid_unicode(tmp_path):
    good = json.dumps({"id": "p0", "contents": '"T"\ntext'})
    path = _jsonl(tmp_path, "corpus.jsonl", [good, json.dumps({"id": "p1", "contents": "z" * (MAX_PASSAGE_CHARS + 1)})])
    with pytest.raises(DataError, match=rf"corpus.jsonl:2: 'contents' has {MAX_PASSAGE_CHARS + 1:,} characters"):
        load_corpus(path)
    path = _jsonl(tmp_path, "corpus2.jsonl", [good, '{"id": "p1", "contents": "\\"T\\"\\ntext \\udc00"}'])
    with pytest.raises(DataError, match=r"corpus2.jsonl:2: 'contents' holds a lone surrogate"):
        load_corpus(path)


# ----------------------------------------------------------------------------------------------------------------
# prompts over rollout.max_context_tokens
# ----------------------------------------------------------------------------------------------------------------
class AnswerBackend:
    """Answers every context with `<answer> Kalora </answer>`; records the context lengths it was given."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def generate(self, contexts, max_new_tokens, temperature, top_p, stop):
        self.seen += [len(c) for c in contexts]
        ids = self.tok.encode("<answer> Kalora </answer>", add_special_tokens=False)
        return [Generation(ids[:budget], [-0.1] * len(ids[:budget]), "stop") for budget in max_new_tokens]


def test_evaluation_refuses_an_over_long_prompt_in_its_row_and_goes_on(tmp_path):
    tok = tokenizer()
    backend = AnswerBackend(tok)
    probe = RolloutEngine(backend, tok, DictRetriever(PASSAGES), RolloutSettings())
    cap = len(probe.prompt_ids("where was Bobani born")) + 50
    engine = RolloutEngine(backend, tok, DictRetriever(PASSAGES), RolloutSettings(max_context_tokens=cap))
    long_q = "where was Bobani born " + "and Kalora " * 700  # < MAX_QUESTION_CHARS, far over the cap in tokens
    examples = [QAExample("short", "where was Bobani born", ["Kalora"]), QAExample("long", long_q, ["Kalora"]),
                QAExample("short2", "where was Bobani born again", ["Kalora"])]
    rows = evaluate_dataset(engine, examples, tmp_path / "nq.jsonl", batch_size=3)
    by_id = {r["id"]: r for r in rows}
    assert by_id["long"]["prompt_refused"] and by_id["long"]["prediction"] is None and by_id["long"]["em"] == 0
    assert by_id["long"]["events"] == ["prompt_too_long"] and by_id["long"]["turns"] == 0
    assert not by_id["short"]["prompt_refused"] and by_id["short"]["em"] == 1.0 and by_id["short2"]["em"] == 1.0
    assert max(backend.seen) < cap and len(backend.seen) == 2  # the long prompt never reached the model
    stored = [json.loads(li) for li in (tmp_path / "nq.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt_refused"] for r in stored] == [False, True, False]
