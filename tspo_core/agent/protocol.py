"""The Search-R1 agent protocol: prompt, action parsing, observation formatting. Pure: standard library only.

A rollout alternates *turns* (text the policy generates, ended by a stop string) and *observations* (text the
environment appends, masked out of the loss):

1. `build_prompt(question)` instructs the model to think in `<think>...</think>`, search with
   `<search> query </search>` and finish with `<answer> ... </answer>`, then appends `Question: {q}` (the question
   stripped, with a trailing `?` added when missing), as Search-R1 does.
2. Each turn's text goes through `parse_action`. Rule: the **earliest closing tag decides**. The first occurrence
   of `</search>` or `</answer>` in the turn (whichever ends first) names the action kind, and the content is the
   text between that closing tag and the *last* matching opening tag before it, stripped. This agrees with
   `STOP_STRINGS`: generation stops at the first closing tag, so the action is exactly the pair that tag closes.
   The action is `invalid` when there is no closing tag (unclosed or missing tags), when no matching opening tag
   precedes the closing tag, when the stripped content is empty (an empty query, and also an empty answer), or
   when the content contains another action tag (`<search>`, `</search>`, `<answer>`, `</answer>`), e.g.
   `<search> a <answer> b </search>`. Tags are matched case-sensitively and exactly (`< search >` is not a tag).
   Text after the deciding closing tag is ignored.
3. After a search the environment appends `format_observation(passages)`; after an invalid action it appends
   `INVALID_ACTION_MESSAGE`. Both are wrapped in `<information>...</information>` with blank lines around, and
   both are observation segments (masked out of the loss).

>>> parse_action("<think>need the capital</think> <search> capital of France </search>")
Action(kind='search', content='capital of France')
>>> parse_action("<answer> Paris </answer>")
Action(kind='answer', content='Paris')
>>> parse_action("I think it is Paris.")
Action(kind='invalid', content='')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tspo_core.data.schema import Passage

STOP_STRINGS: tuple[str, ...] = ("</search>", "</answer>")
"""Generation of a turn stops at (and includes) the first of these."""

ActionKind = Literal["search", "answer", "invalid"]

_OPEN = {"search": "<search>", "answer": "<answer>"}
_CLOSE = {"search": "</search>", "answer": "</answer>"}
_ACTION_TAG = re.compile(r"</?(?:search|answer)>")

_INSTRUCTIONS = (
    "Answer the question below. Every time you receive new information, first reason about it inside "
    "<think> and </think>. If you are missing some knowledge, you may query a search engine by writing "
    "<search> your query </search>; the top results will be returned to you between <information> and "
    "</information>. You may search as many times as you need. Once you no longer need more information, give "
    "the final answer inside <answer> and </answer>, short and without explanation, for example "
    "<answer> Paris </answer>."
)

INVALID_ACTION_MESSAGE: str = (
    "\n\n<information>Invalid action. To search, write your query between <search> and </search>. To finish, "
    "write the final answer between <answer> and </answer>. Try again.</information>\n\n"
)
"""Appended after a turn whose action is invalid; an observation segment like retrieved passages (masked)."""


@dataclass(frozen=True)
class Action:
    """A parsed turn: `kind` in {"search", "answer", "invalid"}; `content` is the stripped query or answer
    ("" when invalid)."""

    kind: ActionKind
    content: str


INVALID = Action("invalid", "")


PROMPT_TEMPLATES: dict[str, str] = {
    "search_r1": _INSTRUCTIONS + " Question: {q}\n",
    # Same protocol, short instruction: for a tiny model trained from scratch every prompt token costs compute
    # in SFT, rollouts and updates, and a model that never read English gains nothing from the long version.
    "compact": "Search with <search> query </search>, answer with <answer> answer </answer>. Question: {q}\n",
}
"""Prompt templates by name (`rollout.prompt_template`); `{q}` is the stripped question ending with `?`."""


def build_prompt(question: str, template: str = "search_r1") -> str:
    """The instruction followed by `Question: {q}`; `q` is stripped and ends with `?`.

    >>> build_prompt("  who wrote Hamlet ").endswith("Question: who wrote Hamlet?\\n")
    True
    """
    q = question.strip()
    if not q:
        raise ValueError("build_prompt: empty question")
    if template not in PROMPT_TEMPLATES:
        raise KeyError(f"unknown prompt template {template!r}; known: {sorted(PROMPT_TEMPLATES)}")
    if not q.endswith("?"):
        q += "?"
    return PROMPT_TEMPLATES[template].format(q=q)


def parse_action(turn_text: str) -> Action:
    """The action of one generated turn (the turn's own text only, never the prompt or observations).

    The earliest closing tag decides; see the module docstring for the full rule.

    >>> parse_action("<search> a </search> <answer> b </answer>")
    Action(kind='search', content='a')
    >>> parse_action("<search>   </search>")
    Action(kind='invalid', content='')
    """
    ends = {kind: turn_text.find(tag) for kind, tag in _CLOSE.items()}
    found = {kind: pos for kind, pos in ends.items() if pos >= 0}
    if not found:
        return INVALID
    kind = min(found, key=lambda k: found[k] + len(_CLOSE[k]))
    close = found[kind]
    start = turn_text.rfind(_OPEN[kind], 0, close)
    if start < 0:
        return INVALID
    content = turn_text[start + len(_OPEN[kind]):close].strip()
    if not content or _ACTION_TAG.search(content):
        return INVALID
    return Action(kind, content)


def format_observation(passages: Sequence[Passage]) -> str:
    """Search-R1's observation, one `Doc i(Title: T) text` line per passage inside `<information>`, blank lines
    around: `\\n\\n<information>Doc 1(Title: T1) text1\\nDoc 2(Title: T2) text2</information>\\n\\n`.

    The title is the first line of `contents` unquoted, the text is the rest (as `Passage.title` / `.text`).

    >>> format_observation([Passage("1", '"T1"\\ntext1'), Passage("2", '"T2"\\ntext2')])
    '\\n\\n<information>Doc 1(Title: T1) text1\\nDoc 2(Title: T2) text2</information>\\n\\n'
    """
    docs = "\n".join(f"Doc {i}(Title: {p.title}) {p.text}" for i, p in enumerate(passages, start=1))
    return f"\n\n<information>{docs}</information>\n\n"
