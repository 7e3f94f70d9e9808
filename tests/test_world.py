"""The synthetic encyclopedia: determinism, held-out eval worlds, fixed passage layouts, answerable hops, sizes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tspo_core.config import FAMILIES, SplitSizes, SyntheticConfig, load_params
from tspo_core.data.families import FAMILY_TYPES
from tspo_core.data.world import LAYOUTS, SYLLABLES, SYLLABLES_PER_WORD, World, generate_world

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test")


def small_cfg(**overrides) -> SyntheticConfig:
    sizes = {f: {"train": 40, "dev": 5, "test": 8} for f in FAMILIES}
    sizes["nq"]["train"] = sizes["hotpotqa"]["train"] = 60
    sizes["bamboogle"] = {"train": 0, "dev": 3, "test": 5}
    raw = dict(n_worlds=4, n_eval_worlds=1, people_per_world=12, cities_per_world=4, countries_per_world=2,
               companies_per_world=4, works_per_world=8, distractors_per_world=2, splits=sizes)
    raw.update(overrides)
    return SyntheticConfig.model_validate(raw)


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(small_cfg(), seed=7)


def dump(w: World) -> str:
    return json.dumps({"corpus": [p.to_json() for p in w.corpus],
                       "datasets": {f: {s: [e.to_json() for e in xs] for s, xs in sp.items()}
                                    for f, sp in w.datasets.items()},
                       "lexicon": w.lexicon}, sort_keys=True)


def examples(w: World, splits=SPLITS):
    for fam in w.datasets.values():
        for s in splits:
            yield from fam[s]


def has_word(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(phrase)}(?![A-Za-z0-9])", text) is not None


def test_same_seed_byte_identical_other_seed_differs(world):
    assert dump(generate_world(small_cfg(), seed=7)) == dump(world)
    assert dump(generate_world(small_cfg(), seed=8)) != dump(world)


def test_output_does_not_depend_on_hash_seed(world):
    # set/dict-hash order must not leak into the output: two interpreters with different hash seeds agree
    code = ("import hashlib, sys; sys.path.insert(0, 'tests'); from test_world import small_cfg, dump; "
            "from tspo_core.data.world import generate_world; "
            "print(hashlib.sha256(dump(generate_world(small_cfg(), 7)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert digests == {hashlib.sha256(dump(world).encode()).hexdigest()}


def test_families_and_split_sizes(world):
    cfg = small_cfg()
    assert list(world.datasets) == list(FAMILIES)
    for f in FAMILIES:
        for s in SPLITS:
            assert len(world.datasets[f][s]) == getattr(cfg.splits[f], s), (f, s)
            assert all(e.metadata["family"] == f for e in world.datasets[f][s])
    per_world = 12 + 4 + 2 + 4 + 8 + 2
    assert len(world.corpus) == cfg.n_worlds * per_world == cfg.passages


def test_ids_unique_and_well_formed(world):
    qids = [e.id for e in examples(world)]
    assert len(qids) == len(set(qids))
    assert all(re.fullmatch(r"[a-z0-9]+-(train|dev|test)-\d{6}", q) for q in qids)
    pids = [p.id for p in world.corpus]
    assert len(pids) == len(set(pids)) and all(isinstance(p, str) for p in pids)
    titles = [p.title for p in world.corpus]
    assert len(titles) == len(set(titles))
    assert all(p.contents.startswith(f'"{p.title}"\n') for p in world.corpus)
    # no two questions anywhere ask the same thing
    questions = [e.question for e in examples(world)]
    assert len(questions) == len(set(questions))


def test_questions_and_answers_well_formed(world):
    for e in examples(world):
        assert e.question.endswith("?") and "{" not in e.question and "}" not in e.question, e.question
        assert e.golden_answers and all(isinstance(a, str) and a.strip() for a in e.golden_answers), e
        assert e.metadata["type"] in {t.label for t in FAMILY_TYPES[e.metadata["family"]]}
    trivia = list(examples(world))
    trivia = [e for e in trivia if e.metadata["family"] == "triviaqa"]
    assert all(len(e.golden_answers) >= 2 for e in trivia), "triviaqa answers are entities with aliases"
    assert all(len(e.golden_answers) == 1 for e in examples(world) if e.metadata["family"] != "triviaqa")


def test_every_hop_answer_is_stated_in_its_support_passage(world):
    by_id = {p.id: p for p in world.corpus}
    for e in examples(world):
        hops = e.metadata["hops"]
        assert hops, e
        for h in hops:
            passage = by_id[h["support"]]
            assert has_word(passage.text, h["answer"]), (e.id, h)
            # the oracle's query is the support passage's title plus a relation keyword
            assert h["query"].startswith(passage.title + " ") and len(h["query"]) > len(passage.title) + 1, h
        assert e.metadata["supporting_ids"] == list(dict.fromkeys(h["support"] for h in hops))


def test_answer_follows_from_the_hops(world):
    seen_ops = set()
    for e in examples(world):
        final, answers = e.metadata["final"], [h["answer"] for h in e.metadata["hops"]]
        seen_ops.add(final["op"])
        if final["op"] == "last":
            assert e.golden_answers[0] == answers[-1]
            assert len(answers) == len(e.metadata["relations"])
        elif final["op"] in ("earlier", "later"):
            (a, b), (ya, yb) = final["candidates"], map(int, answers)
            assert ya != yb
            assert e.golden_answers == [(a if ya < yb else b) if final["op"] == "earlier" else (a if ya > yb else b)]
            assert a in e.question and b in e.question
        else:
            assert final["op"] == "same"
            assert e.golden_answers == ["yes" if answers[0] == answers[1] else "no"]
    assert seen_ops == {"last", "earlier", "later", "same"}
    same = [e.golden_answers[0] for e in examples(world, ("train",)) if e.metadata["final"]["op"] == "same"]
    assert "yes" in same and "no" in same


def test_hop_counts_per_family(world):
    for e in examples(world):
        n, fam = len(e.metadata["hops"]), e.metadata["family"]
        if fam in ("nq", "triviaqa", "popqa"):
            assert n == 1
        elif fam == "musique":
            assert n == int(e.metadata["type"][0]) and 2 <= n <= 4
        else:
            assert n == 2
    musique_types = {e.metadata["type"] for e in world.datasets["musique"]["train"]}
    assert musique_types == {"2hop", "3hop", "4hop"}


def test_eval_entities_are_held_out(world):
    assert world.eval_worlds == (3,)
    pworld = world.passage_world()
    assert set(pworld) == {p.id for p in world.corpus}
    for e in examples(world):
        in_eval = e.id.split("-")[-2] != "train"
        assert (e.metadata["world"] in world.eval_worlds) == in_eval
        assert all((pworld[s] in world.eval_worlds) == in_eval for s in e.metadata["supporting_ids"]), e.id
    # no name word of an eval entity occurs in any train question, query or answer
    lexicon = set(world.lexicon["words"])
    eval_words = {w for ent in world.entities if ent.world in world.eval_worlds
                  for w in re.findall(r"[A-Za-z]+", ent.name) if w not in lexicon}
    assert eval_words
    for e in examples(world, ("train",)):
        text = " ".join([e.question, *e.golden_answers, *(h["query"] + " " + h["answer"] for h in e.metadata["hops"])])
        assert not set(re.findall(r"[A-Za-z]+", text)) & eval_words, e.id


def test_passages_keep_a_fixed_sentence_order(world):
    by_id = {p.id: p for p in world.corpus}
    skeletons: dict[str, set[str]] = {k: set() for k in LAYOUTS}
    for ent in world.entities:
        text = by_id[ent.passage_id].text
        sentences = re.split(r"(?<=\.) ", text)
        layout = LAYOUTS[ent.kind]
        assert len(sentences) == len(layout), text
        for (slot, _), sent in zip(layout, sentences):
            assert has_word(sent, ent.facts[slot]), (slot, sent)
        # with the name and the values blanked, every passage of a kind reads the same
        skel = text
        for slot, _ in layout:
            skel = re.sub(rf"(?<![A-Za-z0-9]){re.escape(ent.facts[slot])}(?![A-Za-z0-9])", "<V>", skel)
        skeletons[ent.kind].add(skel.replace(ent.name, "<N>"))
    assert all(len(s) == 1 for s in skeletons.values()), skeletons


def test_distractors_mention_entities_but_are_never_support(world):
    events = [ent for ent in world.entities if ent.kind == "event"]
    assert events
    supports = {s for e in examples(world) for s in e.metadata["supporting_ids"]}
    names = {ent.name for ent in world.entities if ent.kind != "event"}
    by_id = {p.id: p for p in world.corpus}
    for ev in events:
        assert ev.passage_id not in supports
        assert sum(has_word(by_id[ev.passage_id].text, n) for n in names) >= 3  # 2 guests, a city, a company


def test_names_unique_and_made_of_syllables(world):
    lexicon = set(world.lexicon["words"])
    assert world.lexicon["syllables"] == list(SYLLABLES) and len(SYLLABLES) == len(set(SYLLABLES))
    owner: dict[str, str] = {}
    syl = "|".join(SYLLABLES)
    for ent in world.entities:
        for w in re.findall(r"[A-Za-z]+", ent.name):
            if w in lexicon:
                continue  # "The", "Tales", "Group", "Festival", ...
            assert re.fullmatch(rf"(?:{syl}){{{SYLLABLES_PER_WORD}}}", w.lower()) and w[0].isupper(), w
            assert owner.setdefault(w, ent.name) == ent.name, f"{w} used by {owner[w]} and {ent.name}"


def test_lexicon_covers_every_word(world):
    lexicon = set(world.lexicon["words"])
    syl = "|".join(SYLLABLES)
    texts = [p.contents for p in world.corpus]
    for e in examples(world):
        texts += [e.question, *e.golden_answers, *(h["query"] for h in e.metadata["hops"])]
    for text in texts:
        for w in re.findall(r"[A-Za-z]+", text):
            assert w in lexicon or re.fullmatch(rf"(?:{syl})+", w.lower()), (w, text)


def test_bm25_top3_retrieves_every_hop_support(world):
    bm25s = pytest.importorskip("bm25s")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([p.contents for p in world.corpus], stopwords="en", show_progress=False),
                    show_progress=False)
    hops = [h for e in examples(world) for h in e.metadata["hops"]]
    res, _ = retriever.retrieve(bm25s.tokenize([h["query"] for h in hops], stopwords="en", show_progress=False),
                                k=3, show_progress=False)
    ids = [p.id for p in world.corpus]
    misses = [h for h, row in zip(hops, res) if h["support"] not in {ids[i] for i in row}]
    assert not misses, misses[:5]


def test_clear_error_when_sizes_cannot_be_met():
    cfg = small_cfg()
    splits = dict(cfg.splits)
    splits["popqa"] = SplitSizes(train=40, dev=5, test=500)
    with pytest.raises(ValueError, match=r"popqa.*'test'.*500.*only \d+"):
        generate_world(cfg.model_copy(update={"splits": splits}), seed=7)
    splits = dict(cfg.splits)
    splits["nq"] = SplitSizes(train=10_000, dev=5, test=8)
    with pytest.raises(ValueError, match=r"'nq'.*'train'"):
        generate_world(cfg.model_copy(update={"splits": splits}), seed=7)


def test_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="capital"):
        small_cfg(cities_per_world=1, countries_per_world=2)
    with pytest.raises(ValueError, match="mayors"):
        small_cfg(people_per_world=3)
    with pytest.raises(ValueError, match="n_eval_worlds"):
        small_cfg(n_eval_worlds=4)


def test_shipped_params_generate_within_budget():
    params = load_params(REPO / "params.yaml")
    cfg = params.data.synthetic
    t0 = time.perf_counter()
    w = generate_world(cfg, params.data.seed)
    elapsed = time.perf_counter() - t0
    train = {f: len(w.datasets[f]["train"]) for f in FAMILIES}
    print(f"\nshipped world: {len(w.corpus)} passages, train {sum(train.values())} {train}, "
          f"generated in {elapsed:.2f}s")
    assert len(w.corpus) == cfg.passages <= 12_000
    assert 15_000 <= sum(train.values()) <= 25_000
    assert all(train[f] >= 3000 for f in params.data.rl_train_families)
    for f in FAMILIES:
        for s in ("dev", "test"):
            assert len(w.datasets[f][s]) == getattr(cfg.splits[f], s) > 0
    assert elapsed < 60, "generation should take seconds"
