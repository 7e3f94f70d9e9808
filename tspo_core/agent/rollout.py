"""Multi-turn rollouts, token-in / token-out (Search-R1 protocol without its pitfalls 1, 2, 4, 5 and 6).

For a batch of questions, each repeated G times (group ids are made per question *before* the repeat):

1. The prompt is tokenized once (chat template for instruct models, plain text for base models).
2. Each turn, the backend samples every active rollout until a stop string (`</search>`, `</answer>`), EOS or
   the per-turn token cap. The sampled ids are kept as they are, with their log-probs.
3. The turn's own text is parsed (`protocol.parse_action`): an answer ends the rollout; the searches of all active
   rollouts go to the retriever in one batched call; an invalid action gets the corrective message.
4. Observations are tokenized once and appended as ids (capped at `max_obs_tokens`, keeping the closing tag),
   never merged with the policy's text and re-tokenized.
5. After `max_turns` search rounds comes one last turn in which only an answer counts.
6. A rollout whose context reaches `max_context_tokens` stops there (no left truncation: the question is never
   dropped); every cap that bites is counted in the batch stats and logged.
7. A question whose prompt alone fills `max_context_tokens` is refused, per question: its rollouts end before the
   first turn, unanswered, with the event `prompt_too_long` (their prompt segment is cut to the cap, so no tensor
   grows with the question). A cap that not even the prompt template with an empty question fits under is a
   `ConfigError` naming `rollout.max_context_tokens`, raised when the engine is made.
8. So is a tokenizer that cannot run the protocol (`check_protocol_tokenizer`): no chat template while
   `use_chat_template` is set, or a stop string that does not survive encode -> decode. A stop string may span
   several tokens (SmolLM2 splits `</search>` into `</`, `search`, `>`): the backend finds it in the decoded text
   and returns the sampled ids up to the token that completes it, which may run past it; those ids are kept.

The result carries explicit per-token masks (`masks.build_masks`), the per-token turn index, the rollout
log-probs aligned to the tokens, per-turn observations as text (for FOLR), final answers, and per-rollout logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tspo_core.agent.backends import GenerationBackend
from tspo_core.agent.masks import Segment, TokenTensors, build_masks
from tspo_core.agent.protocol import INVALID_ACTION_MESSAGE, STOP_STRINGS, Action, build_prompt, \
    format_observation, parse_action
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError
from tspo_core.retrieval.base import Retriever

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutSettings:
    """The engine's knobs (from `RolloutConfig`, `RetrievalConfig.top_k` and `ModelConfig.use_chat_template`)."""

    max_turns: int = 4
    max_new_tokens_per_turn: int = 500
    max_obs_tokens: int = 500
    max_context_tokens: int = 4096
    top_k: int = 3
    use_chat_template: bool = False
    prompt_template: str = "search_r1"


@dataclass
class Rollout:
    """One trajectory. `observations[k]` is the text retrieved after turn k (None when turn k did not search)."""

    example: QAExample
    group_id: int
    segments: list[Segment] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # one per policy token, in order
    turns: list[str] = field(default_factory=list)  # the text the policy generated in each turn
    actions: list[Action] = field(default_factory=list)
    observations: list[str | None] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    retrieved_ids: list[list[str]] = field(default_factory=list)
    answer: str | None = None
    events: list[str] = field(default_factory=list)  # "obs_truncated", "context_full", "turn_cap",
    # "prompt_too_long" (refused before the first turn)
    done: bool = False
    length: int = 0

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    @property
    def num_invalid(self) -> int:
        return sum(a.kind == "invalid" for a in self.actions)

    @property
    def num_policy_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def context_ids(self) -> list[int]:
        return [t for seg in self.segments for t in seg.token_ids]


@dataclass
class RolloutBatch:
    """B = len(rollouts) trajectories and their (B, T) tensors; `logprobs` is 0 off the policy mask."""

    rollouts: list[Rollout]
    tensors: TokenTensors
    logprobs: torch.Tensor  # (B, T) float
    group_ids: torch.Tensor  # (B,) long

    def stats(self) -> dict[str, float]:
        n = max(len(self.rollouts), 1)
        events = [e for r in self.rollouts for e in r.events]
        actions = [a for r in self.rollouts for a in r.actions]
        return {
            "turns_mean": sum(r.num_turns for r in self.rollouts) / n,
            "searches_mean": sum(r.num_searches for r in self.rollouts) / n,
            "response_tokens_mean": sum(r.num_policy_tokens for r in self.rollouts) / n,
            "invalid_action_rate": sum(a.kind == "invalid" for a in actions) / max(len(actions), 1),
            "answered_rate": sum(r.answer is not None for r in self.rollouts) / n,
            "obs_truncated": float(events.count("obs_truncated")),
            "context_full": float(events.count("context_full")),
            "turn_cap_hits": float(events.count("turn_cap")),
        }


def check_protocol_tokenizer(tokenizer, use_chat_template: bool) -> None:
    """Refuse, with one line naming the tokenizer, one that cannot run the protocol: no chat template while
    `model.use_chat_template` is true, or a stop string (`</search>`, `</answer>`) that does not survive
    encode -> decode (the turn could never stop on it: both backends look for it in the decoded text)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.use_chat_template = true but the tokenizer of {name} has no chat template "
                          "(a base model: set model.use_chat_template: false)")
    for stop in STOP_STRINGS:
        ids = list(tokenizer.encode(stop, add_special_tokens=False))
        back = tokenizer.decode(ids)
        if back != stop:
            raise ConfigError(f"{name}: its tokenizer cannot express the protocol's stop string {stop!r} (it "
                              f"decodes back as {back!r}): generation could never stop on it")


class RolloutEngine:
    def __init__(self, backend: GenerationBackend, tokenizer, retriever: Retriever, settings: RolloutSettings):
        check_protocol_tokenizer(tokenizer, settings.use_chat_template)
        self.backend, self.tokenizer, self.retriever, self.s = backend, tokenizer, retriever, settings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._invalid_ids = self._encode(INVALID_ACTION_MESSAGE)
        self._obs_tail = self._encode("</information>\n\n")
        shortest = len(self.prompt_ids("?"))  # the template around an empty question
        if shortest >= settings.max_context_tokens:
            raise ConfigError(f"rollout.max_context_tokens = {settings.max_context_tokens} leaves no room to answer: "
                              f"the {settings.prompt_template!r} prompt with an empty question already takes "
                              f"{shortest} tokens; raise it well above that")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, question: str) -> list[int]:
        return self.user_turn_ids(build_prompt(question, self.s.prompt_template))

    def user_turn_ids(self, text: str) -> list[int]:
        """`text` as the prompt: the user turn of the chat template (instruct models), else BOS + text."""
        if self.s.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self._encode(text)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._encode(text)

    def _observation_ids(self, text: str, rollout: Rollout) -> list[int]:
        ids = self._encode(text)
        if len(ids) > self.s.max_obs_tokens:
            keep = max(self.s.max_obs_tokens - len(self._obs_tail), 0)
            ids = ids[:keep] + self._obs_tail
            rollout.events.append("obs_truncated")
        return ids

    def _append(self, r: Rollout, ids: Sequence[int], kind: str, turn: int) -> None:
        r.segments.append(Segment(list(ids), kind, turn))
        r.length += len(ids)

    def run(self, examples: Sequence[QAExample], group_size: int, temperature: float, top_p: float = 1.0,
            group_offset: int = 0) -> RolloutBatch:
        """G = group_size rollouts per example; example i gets group id `group_offset + i`."""
        s = self.s
        rollouts: list[Rollout] = []
        for i, ex in enumerate(examples):
            prompt = self.prompt_ids(ex.question)
            too_long = len(prompt) >= s.max_context_tokens
            if too_long:
                log.warning("question %s refused: its prompt takes %d tokens, rollout.max_context_tokens is %d",
                            ex.id, len(prompt), s.max_context_tokens)
            for _ in range(group_size):
                r = Rollout(example=ex, group_id=group_offset + i)
                if too_long:
                    self._append(r, prompt[:s.max_context_tokens], "prompt", 0)
                    r.done = True
                    r.events.append("prompt_too_long")
                else:
                    self._append(r, prompt, "prompt", 0)
                rollouts.append(r)

        for turn in range(s.max_turns + 1):
            active = [r for r in rollouts if not r.done]
            if not active:
                break
            final = turn == s.max_turns
            budgets = [min(s.max_new_tokens_per_turn, s.max_context_tokens - r.length) for r in active]
            gens = self.backend.generate([r.context_ids for r in active], budgets, temperature, top_p,
                                         STOP_STRINGS)
            searching: list[Rollout] = []
            for r, g in zip(active, gens):
                self._append(r, g.token_ids, "policy", turn)
                r.logprobs.extend(g.logprobs)
                text = self.tokenizer.decode(g.token_ids)
                action = parse_action(text)
                r.turns.append(text)
                r.actions.append(action)
                r.observations.append(None)
                if g.finish == "length" and action.kind == "invalid":
                    r.events.append("turn_cap")
                if action.kind == "answer":
                    r.answer, r.done = action.content, True
                elif final:
                    r.done = True  # the last turn is answer-only: a search or an invalid action ends it unanswered
                elif action.kind == "search":
                    searching.append(r)
                else:
                    self._append(r, self._invalid_ids, "obs", turn)
            if searching:
                results = self.retriever.search([r.actions[-1].content for r in searching], s.top_k)
                for r, passages in zip(searching, results):
                    text = format_observation(passages)
                    ids = self._observation_ids(text, r)
                    self._append(r, ids, "obs", turn)
                    r.queries.append(r.actions[-1].content)
                    r.retrieved_ids.append([p.id for p in passages])
                    r.observations[-1] = self.tokenizer.decode(ids)
            for r in active:
                if not r.done and r.length >= s.max_context_tokens:
                    r.done = True
                    r.events.append("context_full")
                    log.warning("rollout of %s stopped: context reached %d tokens", r.example.id, r.length)

        n_trunc = sum(e == "obs_truncated" for r in rollouts for e in r.events)
        if n_trunc:
            log.info("%d observations truncated to %d tokens", n_trunc, s.max_obs_tokens)
        return self._collate(rollouts)

    def _collate(self, rollouts: list[Rollout]) -> RolloutBatch:
        tensors = build_masks([r.segments for r in rollouts], pad_id=self.pad_id)
        logprobs = torch.zeros(tensors.input_ids.shape, dtype=torch.float32)
        for b, r in enumerate(rollouts):
            pos = tensors.policy_mask[b].nonzero().flatten()
            logprobs[b, pos] = torch.tensor(r.logprobs, dtype=torch.float32)
        group_ids = torch.tensor([r.group_id for r in rollouts], dtype=torch.long)
        return RolloutBatch(rollouts, tensors, logprobs, group_ids)
