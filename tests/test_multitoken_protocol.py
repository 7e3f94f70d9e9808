"""Protocol tags that span several tokens (as in SmolLM2's tokenizer, where `</search>` is `</` `search` `>`):
the HF backend stops on the decoded text, a stop string may end inside a token, and the rollout keeps the sampled
ids exactly (prompt ids through the chat template, then per turn the ids the backend returned and the observation
ids), never a re-tokenization of the decoded text. Also: a tokenizer that cannot run the protocol is refused when
the engine is made, in one line naming it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from tspo_core.agent.backends import HFBackend
from tspo_core.agent.protocol import STOP_STRINGS, format_observation
from tspo_core.agent.rollout import RolloutEngine, RolloutSettings
from tspo_core.config import load_params
from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError

from fakes import PASSAGES, DictRetriever

CHAT_TEMPLATE = ("{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Multi-character pieces: the tags' parts, a split form of "search", and pieces that run past a tag's `>`.
PIECES = ["</", "<", "search", "sea", "rch", "answer", ">", ">\n\n", "> Kal", "ora ", "Bob", "ani", "Kalora",
          "Question", "think", "information", "Doc", "Title"]


def multi_token_tokenizer(drop_chars: str = "", chat_template: str | None = CHAT_TEMPLATE):
    """A Unigram tokenizer over printable ASCII (minus `drop_chars`) and PIECES, with no protocol tag as a token
    of its own; `<|user|>`, `<|assistant|>` and `<|end|>` (eos) are special tokens."""
    chars = [chr(c) for c in range(32, 127) if chr(c) not in drop_chars] + ["\n"]
    vocab = [("<unk>", 0.0)] + [(c, -10.0) for c in chars] + [(p, -1.0) for p in PIECES
                                                                 if not set(p) & set(drop_chars)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|user|>", "<|assistant|>", "<|end|>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>", pad_token="<|end|>",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = chat_template
    return hf


class ScriptedLM(torch.nn.Module):
    """A causal LM for HFBackend whose greedy output follows a script: row r's k-th turn emits `scripts[r][k]`
    token by token (rows are told apart by their first tokens, turns by the prefills that row has seen). The
    "cache" is the ids seen so far per row. Counts the tokens it was asked to produce."""

    def __init__(self, vocab_size: int, scripts: dict[tuple[int, ...], list[list[int]]], key_len: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.scripts, self.key_len = vocab_size, scripts, key_len
        self.turn_of: dict[tuple[int, ...], int] = {}
        self.generated = 0

    def _logits(self, rows: list[list[int]], state: list[tuple]) -> torch.Tensor:
        logits = torch.full((len(rows), 1, self.vocab_size), -30.0)
        for b, (key, turn, start) in enumerate(state):
            step = len(rows[b]) - start
            script = self.scripts[key][turn]
            logits[b, 0, script[step] if step < len(script) else 0] = 30.0
        self.generated += len(rows)
        return logits

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=None):
        if past_key_values is None:  # prefill: one new turn per row
            rows = [[int(t) for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids, attention_mask)]
            state = []
            for row in rows:
                key = tuple(row[:self.key_len])
                turn = self.turn_of.get(key, 0)
                self.turn_of[key] = turn + 1
                state.append((key, turn, len(row)))
        else:
            rows, state = past_key_values
            for b, t in enumerate(input_ids[:, 0].tolist()):
                if attention_mask[b, -1]:
                    rows[b].append(t)
        return SimpleNamespace(logits=self._logits(rows, state), past_key_values=(rows, state))


def ids_of(tok, pieces: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids, pieces
    return ids


def test_rollout_ids_are_the_sampled_ids_plus_observation_ids_with_multi_token_tags():
    tok = multi_token_tokenizer()
    for stop in STOP_STRINGS:
        assert len(tok.encode(stop, add_special_tokens=False)) > 1  # the tags really are multi-token here
    settings = RolloutSettings(max_turns=2, max_new_tokens_per_turn=40, top_k=2, use_chat_template=True)
    engine = RolloutEngine(HFBackend(None, tok), tok, DictRetriever(PASSAGES), settings)
    q = QAExample("q1", "where was Bobani born", ["Kalora"])
    prompt = engine.prompt_ids(q.question)
    assert tok.decode(prompt).startswith("<|user|>\n") and tok.decode(prompt).endswith("<|assistant|>\n")

    # Turn 0: `</search>` spelled `</` `sea` `rch` and completed inside `>\n\n` (the stop string ends mid-token);
    # the script goes on past it, which the backend must not sample. Turn 1: the answer spelled letter by letter,
    # `</answer>` ending on `>`.
    after = ids_of(tok, ["Q", "u"])
    turn0 = ids_of(tok, ["<", "search", ">", " ", "Bob", "ani", " ", "</", "sea", "rch", ">\n\n"])
    turn1 = ids_of(tok, ["<", "answer", ">", " ", *"Kalora", " ", "</", "answer", ">"])
    model = ScriptedLM(len(tok), {tuple(prompt[:8]): [turn0 + after, turn1 + after]}, key_len=8)
    engine.backend = HFBackend(model, tok)
    batch = engine.run([q], group_size=1, temperature=0.0)

    r = batch.rollouts[0]
    assert r.turns == ["<search> Bobani </search>\n\n", "<answer> Kalora </answer>"]
    assert r.queries == ["Bobani"] and r.answer == "Kalora"
    obs = tok.encode(format_observation(PASSAGES["Bobani"][:2]), add_special_tokens=False)
    expected = prompt + turn0 + obs + turn1
    assert r.context_ids == expected
    n = len(expected)
    assert batch.tensors.input_ids[0, :n].tolist() == expected
    policy = [i for i, m in enumerate(batch.tensors.policy_mask[0, :n].tolist()) if m]
    assert [expected[i] for i in policy] == turn0 + turn1
    assert len(r.logprobs) == len(turn0) + len(turn1)
    # the stop was found as soon as the completing token was sampled: nothing of `after` was generated
    assert model.generated == len(turn0) + len(turn1)
    # a re-tokenizing engine would have produced other ids: the assertions above can tell the two apart
    for turn in (turn0, turn1):
        assert tok.encode(tok.decode(turn), add_special_tokens=False) != turn


def test_backend_stop_on_decoded_text_per_row_in_a_batch():
    """Two rows of different lengths (left padding): each stops at its own multi-token stop string, with the
    completing token included and nothing after it."""
    tok = multi_token_tokenizer()
    a = tok.encode("Question a?", add_special_tokens=False)
    b = tok.encode("Question bb, longer?", add_special_tokens=False)
    turn_a = ids_of(tok, ["<", "answer", ">", "x", "</", "answer", ">\n\n"])
    turn_b = ids_of(tok, ["t", "h", "<", "search", ">", "y", "</", "sea", "rch", ">", "z", "z"])
    model = ScriptedLM(len(tok), {tuple(a[:4]): [turn_a + turn_a], tuple(b[:4]): [turn_b]}, key_len=4)
    assert tuple(a[:4]) != tuple(b[:4])
    gens = HFBackend(model, tok).generate([a, b], [30, 30], temperature=0.0, top_p=1.0, stop=STOP_STRINGS)
    assert [g.token_ids for g in gens] == [turn_a, turn_b[:10]]
    assert [g.finish for g in gens] == ["stop", "stop"]
    assert all(len(g.logprobs) == len(g.token_ids) for g in gens)


def test_a_tokenizer_without_chat_template_is_refused_in_one_line():
    tok = multi_token_tokenizer(chat_template=None)
    tok.name_or_path = "/ckpt/base-model"
    with pytest.raises(ConfigError, match=r"model\.use_chat_template = true but the tokenizer of "
                                          r"/ckpt/base-model has no chat template") as err:
        RolloutEngine(HFBackend(None, tok), tok, DictRetriever(PASSAGES), RolloutSettings(use_chat_template=True))
    assert "\n" not in str(err.value)
    # the same tokenizer is fine for a base-model prompt
    RolloutEngine(HFBackend(None, tok), tok, DictRetriever(PASSAGES), RolloutSettings(use_chat_template=False))


def test_a_tokenizer_that_cannot_express_a_stop_string_is_refused_in_one_line():
    tok = multi_token_tokenizer(drop_chars="/")  # "/" is unknown: `</search>` decodes with <unk> in it
    tok.name_or_path = "/ckpt/no-slash"
    with pytest.raises(ConfigError, match=r"^/ckpt/no-slash: its tokenizer cannot express the protocol's stop "
                                          r"string '</search>'") as err:
        RolloutEngine(HFBackend(None, tok), tok, DictRetriever(PASSAGES), RolloutSettings(use_chat_template=True))
    assert "\n" not in str(err.value)


def test_smollm2_presets_differ_only_in_the_backend():
    hf = load_params("configs/smollm2_real_qa.yaml")
    vllm = load_params("configs/smollm2_real_qa_vllm.yaml")
    assert hf.rollout.backend == "hf" and vllm.rollout.backend == "vllm"
    assert hf.model.use_chat_template and hf.model.name_or_path == ".cache/models/smollm2-135m-instruct"
    a, b = hf.model_dump(mode="json"), vllm.model_dump(mode="json")
    a["rollout"].pop("backend"), b["rollout"].pop("backend")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
