"""Search-R1 protocol: prompt, action parsing edge cases, observation format; purity of the agent package."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import importlib
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo_core.agent.protocol import (INVALID_ACTION_MESSAGE, STOP_STRINGS, Action, build_prompt,
                                      format_observation, parse_action)
from tspo_core.data.schema import Passage

AGENT_DIR = Path(__file__).resolve().parents[1] / "tspo_core" / "agent"
# the pure modules (rollout/backends in the same package drive a model and are not held to this)
PURE_MODULES = ("protocol", "masks", "rewards", "advantages", "losses", "diagnostics")


# ---------------------------------------------------------------------------------------------------------------
# prompt
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_strips_question_and_adds_question_mark():
    p = build_prompt("  who wrote Hamlet \n")
    assert p.endswith("Question: who wrote Hamlet?\n")
    assert build_prompt("who wrote Hamlet?").endswith("Question: who wrote Hamlet?\n")  # no second "?"


def test_prompt_instructs_the_three_tags():
    p = build_prompt("q")
    for tag in ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>", "<information>"):
        assert tag in p
    assert p.count("Question:") == 1


def test_prompt_rejects_empty_question():
    with pytest.raises(ValueError):
        build_prompt("   ")


# ---------------------------------------------------------------------------------------------------------------
# parse_action
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("<search>capital of France</search>", Action("search", "capital of France")),
    ("<think>hm</think>\n<search>  capital of\nFrance \n</search>", Action("search", "capital of\nFrance")),
    ("<answer> Paris </answer>", Action("answer", "Paris")),
    # several complete actions: the earliest closing tag decides
    ("<search> a </search> <answer> b </answer>", Action("search", "a")),
    ("<answer> b </answer> <search> a </search>", Action("answer", "b")),
    # nested: </answer> closes before </search>, so the inner answer is the action
    ("<search> a <answer> b </answer> </search>", Action("answer", "b")),
    # a repeated opening tag: the content starts after the last one before the closing tag
    ("<search> <search> q </search>", Action("search", "q")),
    # an unclosed answer before a complete search is ignored
    ("<answer> x <search> q </search>", Action("search", "q")),
    # text after the deciding closing tag is ignored
    ("<search>q</search> and then more <answer>z", Action("search", "q")),
])
def test_parse_action_valid(text, expected):
    assert parse_action(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "I believe it is Paris.",
    "<search> unclosed query",                 # unclosed
    "<answer> Paris",                          # unclosed
    "query </search>",                         # closing tag without an opening one
    "<answer> x </search>",                    # closing tag of the other kind
    "<search></search>",                       # empty query
    "<search> \n\t </search>",                 # whitespace-only query
    "<answer>  </answer>",                     # empty answer (decided: invalid too)
    "<search> a <answer> b </search>",         # another action tag inside the content
    "<answer> a </search> b </answer>",        # </search> closes first, no <search> before it
    "<SEARCH> q </SEARCH>",                    # tags are case-sensitive
    "< search > q < /search >",                # and exact
    "<think> only thinking </think>",
])
def test_parse_action_invalid(text):
    assert parse_action(text) == Action("invalid", "")


def test_action_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_action("<answer> a </answer>").kind = "search"  # type: ignore[misc]


_plain = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(prefix=_plain, query=_plain, kind=st.sampled_from(["search", "answer"]))
def test_parse_action_roundtrip(prefix, query, kind):
    # an action written with the protocol's own tags parses back to its stripped content (or invalid if blank)
    action = parse_action(f"{prefix}<{kind}>{query}</{kind}>")
    if query.strip():
        assert action == Action(kind, query.strip())
    else:
        assert action.kind == "invalid"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab <>/") + ["<search>", "</search>", "<answer>", "</answer>"]), max_size=30))
def test_parse_action_never_raises_and_content_is_clean(pieces):
    text = "".join(pieces)
    action = parse_action(text)
    assert action.kind in {"search", "answer", "invalid"}
    if action.kind == "invalid":
        assert action.content == ""
    else:
        assert action.content == action.content.strip() and action.content
        assert not any(tag in action.content for tag in ("<search>", "</search>", "<answer>", "</answer>"))


def test_stop_strings():
    assert STOP_STRINGS == ("</search>", "</answer>")


# ---------------------------------------------------------------------------------------------------------------
# observations
# ---------------------------------------------------------------------------------------------------------------
def test_format_observation_exact():
    passages = [Passage("1", '"T1"\ntext1'), Passage("2", '"T2"\ntext2')]
    assert format_observation(passages) == \
        "\n\n<information>Doc 1(Title: T1) text1\nDoc 2(Title: T2) text2</information>\n\n"


def test_format_observation_edge_cases():
    assert format_observation([]) == "\n\n<information></information>\n\n"
    # no newline: the whole contents is the title, the text is empty
    assert format_observation([Passage("x", '"Only title"')]) == \
        "\n\n<information>Doc 1(Title: Only title) </information>\n\n"
    # the text keeps its own newlines; only the first line is the title
    assert format_observation([Passage("y", 'Unquoted\nline a\nline b')]) == \
        "\n\n<information>Doc 1(Title: Unquoted) line a\nline b</information>\n\n"


def test_invalid_action_message_is_wrapped_like_an_observation():
    assert INVALID_ACTION_MESSAGE.startswith("\n\n<information>")
    assert INVALID_ACTION_MESSAGE.endswith("</information>\n\n")
    assert 0 < len(INVALID_ACTION_MESSAGE) < 300


# ---------------------------------------------------------------------------------------------------------------
# package-wide: runnable docstring examples; imports limited to the standard library, torch and pure tspo_core
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PURE_MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(f"tspo_core.agent.{name}"), verbose=False)
    assert result.failed == 0


ALLOWED_INTERNAL = {"tspo_core.metrics", "tspo_core.data.schema", "tspo_core.errors"}


@pytest.mark.parametrize("name", PURE_MODULES + ("__init__",))
def test_pure_modules_import_only_stdlib_torch_and_pure_code(name):
    path = AGENT_DIR / f"{name}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    for name in names:
        top = name.split(".")[0]
        ok = (top in sys.stdlib_module_names or top == "torch" or name in ALLOWED_INTERNAL
              or name.removeprefix("tspo_core.agent.") in PURE_MODULES)
        assert ok, f"{path.name} imports {name}"
