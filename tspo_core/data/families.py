"""The seven synthetic question families (FlashRAG names) drawn from the encyclopedia of `tspo_core.data.world`.

| family | types | mirrors |
|---|---|---|
| nq | single-hop: birthplace, birth year, founding years, headquarters, capital | short factoid questions |
| triviaqa | single-hop, entity answers; `golden_answers` lists aliases (surname, short company name) | aliases |
| popqa | single-hop about creative works (long-tail: one passage each) | subject-relation templates |
| hotpotqa | `bridge` (2 hops) and `comparison` (earlier / same city -> yes/no) | HotpotQA |
| 2wikimultihopqa | `compositional` (2 hops) and `comparison` (earlier/later / same employer) | 2WikiMultiHopQA |
| musique | `2hop`, `3hop`, `4hop` chains phrased as nested noun phrases | MuSiQue |
| bamboogle | `2hop` with unusual phrasings and relation pairs (meant as eval-only) | Bamboogle |

Every question records how an oracle answers it: `metadata["hops"]` is a list of `{"query", "answer", "support"}`
where `query` = "<subject name> <relation keyword>" (e.g. "Bobini Kalora birthplace"; the support passage's title
is the subject name, so BM25 and dense retrievers rank it first), `answer` is stated in the support passage, and
`metadata["final"]` says how the answer follows from the hops:
- `{"op": "last"}`: the answer is the last hop's answer (single-hop and chains);
- `{"op": "earlier" | "later", "candidates": [A, B]}`: the candidate whose hop answer (a year) is smaller/larger;
- `{"op": "same", "candidates": [A, B]}`: "yes" when both hop answers are equal, else "no".

Sampling: within a family, types take turns (round robin over shuffled per-type pools) so every type is
represented; a type that runs dry leaves its turns to the others. One registry of asked facts (start entity +
relation path, or the compared pair) is shared by all families and splits, so no question is asked twice anywhere.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

from tspo_core.data.schema import QAExample
from tspo_core.errors import ConfigError

if TYPE_CHECKING:
    from tspo_core.config import SplitSizes
    from tspo_core.data.world import Entity

Rel = tuple[str, str]
"""(subject kind, relation slot), e.g. ("person", "born_in")."""

# relation -> (oracle query keyword, noun phrase used by compositional questions)
RELATIONS: dict[Rel, tuple[str, str]] = {
    ("person", "born_in"): ("birthplace", "the birthplace of {x}"),
    ("person", "birth_year"): ("birth year", "the birth year of {x}"),
    ("person", "employer"): ("employer", "the employer of {x}"),
    ("company", "founder"): ("founder", "the founder of {x}"),
    ("company", "founding_year"): ("founding year", "the founding year of {x}"),
    ("company", "headquarters"): ("headquarters", "the headquarters city of {x}"),
    ("city", "country"): ("country", "the country of {x}"),
    ("city", "founding_year"): ("founding year", "the founding year of {x}"),
    ("city", "mayor"): ("mayor", "the mayor of {x}"),
    ("country", "capital"): ("capital", "the capital of {x}"),
    ("work", "creator"): ("creator", "the creator of {x}"),
    ("work", "release_year"): ("release year", "the release year of {x}"),
    ("work", "publisher"): ("publisher", "the publisher of {x}"),
}
# entity-valued relations -> kind of the object (the others are years)
OBJECT_KIND: dict[Rel, str] = {
    ("person", "born_in"): "city", ("person", "employer"): "company", ("company", "founder"): "person",
    ("company", "headquarters"): "city", ("city", "country"): "country", ("city", "mayor"): "person",
    ("country", "capital"): "city", ("work", "creator"): "person", ("work", "publisher"): "company",
}

P_BORN, P_YEAR, P_EMP = ("person", "born_in"), ("person", "birth_year"), ("person", "employer")
CO_FOUNDER, CO_YEAR, CO_HQ = ("company", "founder"), ("company", "founding_year"), ("company", "headquarters")
CI_COUNTRY, CI_YEAR, CI_MAYOR = ("city", "country"), ("city", "founding_year"), ("city", "mayor")
CN_CAPITAL = ("country", "capital")
W_CREATOR, W_YEAR, W_PUB = ("work", "creator"), ("work", "release_year"), ("work", "publisher")


def query_for(subject: str, rel: Rel) -> str:
    """The oracle's search query for one hop: the subject's name and the relation keyword."""
    return f"{subject} {RELATIONS[rel][0]}"


# ----------------------------------------------------------------------------------------------------------------
# question types
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A question before phrasing. `key` identifies the asked fact (shared de-duplication registry)."""

    key: tuple[str, ...]
    entities: tuple[str, ...]  # chain: (start,); comparison: (a, b)


class _Index:
    """Name -> entity."""

    def __init__(self, entities: list[Entity]):
        self.by_name = {e.name: e for e in entities}

    def walk(self, start: str, path: tuple[Rel, ...]) -> list[tuple[str, str]] | None:
        """[(subject, value)] per hop, or None when the path leaves its kinds or revisits an entity."""
        seen, cur, out = [start], start, []
        for rel in path:
            e = self.by_name[cur]
            if e.kind != rel[0]:
                return None
            value = e.facts[rel[1]]
            if value in seen:  # a chain that comes back to an entity it already named
                return None
            out.append((cur, value))
            seen.append(value)
            cur = value
        return out


class QuestionType:
    """Enumerates candidates in a sub-world and phrases a chosen one. One signature for all types."""

    label: str

    def candidates(self, world: dict[str, list[Entity]], index: _Index) -> Iterator[Candidate]:
        """Every askable candidate of one sub-world (`world`: kind -> entities in generation order)."""
        raise NotImplementedError

    def phrase(self, cand: Candidate, index: _Index, rng: random.Random, aliases: bool) -> dict[str, Any]:
        raise NotImplementedError

    def words(self) -> list[str]:
        """Template texts (for the lexicon)."""
        raise NotImplementedError


def _rel_name(rel: Rel) -> str:
    return f"{rel[0]}.{rel[1]}"


class Chain(QuestionType):
    """Follow `path` from a start entity; `templates` use `{x}` for the start. None: nested noun phrases."""

    def __init__(self, label: str, path: tuple[Rel, ...], templates: tuple[str, ...] | None = None):
        for a, b in zip(path, path[1:]):
            assert OBJECT_KIND.get(a) == b[0], f"path {path} does not chain at {a} -> {b}"
        self.label, self.path, self.templates = label, path, templates

    def candidates(self, world: dict[str, list[Entity]], index: _Index) -> Iterator[Candidate]:
        rels = tuple(_rel_name(r) for r in self.path)
        for e in world.get(self.path[0][0], ()):
            if index.walk(e.name, self.path) is not None:
                yield Candidate(key=("chain", e.name, *rels), entities=(e.name,))

    def phrase(self, cand: Candidate, index: _Index, rng: random.Random, aliases: bool) -> dict[str, Any]:
        start = cand.entities[0]
        steps = index.walk(start, self.path)
        assert steps is not None
        if self.templates is None:
            np_ = start
            for rel in self.path:  # innermost relation first: "the country of the birthplace of X"
                np_ = RELATIONS[rel][1].format(x=np_)
            question = rng.choice(MUSIQUE_FRAMES).format(np=np_)
        else:
            question = rng.choice(self.templates).format(x=start)
        answer = steps[-1][1]
        golden = list(index.by_name[answer].aliases) if aliases and answer in index.by_name else [answer]
        hops = [{"query": query_for(subj, rel), "answer": value, "support": index.by_name[subj].passage_id}
                for (subj, value), rel in zip(steps, self.path)]
        return {"question": question, "golden_answers": golden, "hops": hops, "final": {"op": "last"},
                "relations": [_rel_name(r) for r in self.path]}

    def words(self) -> list[str]:
        if self.templates is not None:
            return list(self.templates)
        return [*MUSIQUE_FRAMES, *(RELATIONS[r][1] for r in self.path)]


class Compare(QuestionType):
    """Compare one relation of two entities of the same kind in one sub-world.

    `op` earlier/later: years must differ, answer = the candidate's name. `op` same: `want` picks pairs whose
    values are equal ("yes") or differ ("no"), so yes/no can be balanced by listing both.
    """

    def __init__(self, label: str, rel: Rel, op: str, templates: tuple[str, ...], want: str | None = None):
        assert op in ("earlier", "later", "same") and (want is not None) == (op == "same")
        self.label, self.rel, self.op, self.templates, self.want = label, rel, op, templates, want

    def candidates(self, world: dict[str, list[Entity]], index: _Index) -> Iterator[Candidate]:
        slot = self.rel[1]
        for a, b in combinations(world.get(self.rel[0], ()), 2):
            equal = a.facts[slot] == b.facts[slot]
            if (self.op != "same" and equal) or (self.want == "yes" and not equal) or (self.want == "no" and equal):
                continue
            yield Candidate(key=("compare", _rel_name(self.rel), a.name, b.name), entities=(a.name, b.name))

    def phrase(self, cand: Candidate, index: _Index, rng: random.Random, aliases: bool) -> dict[str, Any]:
        a, b = cand.entities if rng.random() < 0.5 else cand.entities[::-1]
        va, vb = (index.by_name[x].facts[self.rel[1]] for x in (a, b))
        if self.op == "same":
            answer = "yes" if va == vb else "no"
        else:
            a_first = int(va) < int(vb)
            answer = a if a_first == (self.op == "earlier") else b
        hops = [{"query": query_for(x, self.rel), "answer": v, "support": index.by_name[x].passage_id}
                for x, v in ((a, va), (b, vb))]
        return {"question": rng.choice(self.templates).format(a=a, b=b), "golden_answers": [answer], "hops": hops,
                "final": {"op": self.op, "candidates": [a, b]}, "relations": [_rel_name(self.rel)]}

    def words(self) -> list[str]:
        return [*self.templates, "yes", "no"]


# ----------------------------------------------------------------------------------------------------------------
# the families
# ----------------------------------------------------------------------------------------------------------------
MUSIQUE_FRAMES = ("What is {np}?", "Can you name {np}?")


def _single(rel: Rel, *templates: str) -> Chain:
    return Chain("single", (rel,), templates)


def _musique_paths(hops: int) -> list[tuple[Rel, ...]]:
    """Every kind-consistent relation path of `hops` relations (entity-valued except possibly the last)."""
    paths: list[tuple[Rel, ...]] = [(r,) for r in OBJECT_KIND]
    for _ in range(hops - 2):
        paths = [p + (r,) for p in paths for r in OBJECT_KIND if r[0] == OBJECT_KIND[p[-1]]]
    return [p + (r,) for p in paths for r in RELATIONS if r[0] == OBJECT_KIND[p[-1]]]


class _PathPool(QuestionType):
    """All chains of a given hop count (musique): the union of `Chain(path)` over every valid path."""

    def __init__(self, label: str, hops: int):
        self.label = label
        self.chains = {p: Chain(label, p) for p in _musique_paths(hops)}

    def candidates(self, world: dict[str, list[Entity]], index: _Index) -> Iterator[Candidate]:
        for chain in self.chains.values():
            yield from chain.candidates(world, index)

    def phrase(self, cand: Candidate, index: _Index, rng: random.Random, aliases: bool) -> dict[str, Any]:
        path = tuple(tuple(r.split(".")) for r in cand.key[2:])
        return self.chains[path].phrase(cand, index, rng, aliases)  # type: ignore[index]

    def words(self) -> list[str]:
        return [w for c in self.chains.values() for w in c.words()]


FAMILY_TYPES: dict[str, tuple[QuestionType, ...]] = {
    "nq": (
        _single(P_BORN, "Where was {x} born?", "In which city was {x} born?", "What is the birthplace of {x}?"),
        _single(P_YEAR, "When was {x} born?", "In what year was {x} born?", "What is the birth year of {x}?"),
        _single(CO_YEAR, "When was {x} founded?", "In what year was {x} founded?"),
        _single(CO_HQ, "Where is {x} headquartered?", "In which city are the headquarters of {x}?"),
        _single(CI_YEAR, "When was the city of {x} founded?", "In what year was the city of {x} founded?"),
        _single(CN_CAPITAL, "What is the capital of {x}?", "Which city is the capital of {x}?"),
    ),
    "triviaqa": (
        _single(P_EMP, "Which company does {x} work for?", "Who employs {x}?"),
        _single(CO_FOUNDER, "Who founded {x}?", "Which person founded the company {x}?"),
        _single(CI_MAYOR, "Who is the mayor of {x}?", "Which person serves as mayor of {x}?"),
        _single(CI_COUNTRY, "In which country is {x}?", "{x} is a city in which country?"),
    ),
    "popqa": (
        _single(W_CREATOR, "Who created {x}?", "Who is the creator of {x}?"),
        _single(W_YEAR, "When was {x} released?", "In what year was {x} released?"),
        _single(W_PUB, "Who published {x}?", "Which company published {x}?"),
    ),
    "hotpotqa": (
        Chain("bridge", (CO_FOUNDER, P_BORN), ("Where was the founder of {x} born?",
                                                "In which city was the founder of {x} born?")),
        Chain("bridge", (CO_FOUNDER, P_YEAR), ("When was the founder of {x} born?",
                                                "In what year was the founder of {x} born?")),
        Chain("bridge", (W_CREATOR, P_BORN), ("Where was the creator of {x} born?",
                                               "In which city was the creator of {x} born?")),
        Chain("bridge", (W_CREATOR, P_YEAR), ("When was the creator of {x} born?",
                                               "In what year was the creator of {x} born?")),
        Chain("bridge", (P_EMP, CO_HQ), ("In which city is the company that {x} works for headquartered?",
                                         "Where is the employer of {x} headquartered?")),
        Chain("bridge", (P_EMP, CO_FOUNDER), ("Who founded the company that {x} works for?",
                                              "Who is the founder of the company that employs {x}?")),
        Chain("bridge", (W_PUB, CO_HQ), ("Where is the publisher of {x} headquartered?",
                                         "In which city is the company that published {x} based?")),
        Chain("bridge", (CI_MAYOR, P_YEAR), ("When was the mayor of {x} born?",
                                             "In what year was the mayor of {x} born?")),
        Compare("comparison", P_YEAR, "earlier", ("Who was born first, {a} or {b}?", "Who is older, {a} or {b}?")),
        Compare("comparison", P_BORN, "same", ("Were {a} and {b} born in the same city?",
                                               "Are {a} and {b} from the same city?"), want="yes"),
        Compare("comparison", P_BORN, "same", ("Were {a} and {b} born in the same city?",
                                               "Are {a} and {b} from the same city?"), want="no"),
        Compare("comparison", CO_YEAR, "earlier", ("Which company was founded first, {a} or {b}?",
                                                   "Which company is older, {a} or {b}?")),
    ),
    "2wikimultihopqa": (
        Chain("compositional", (P_BORN, CI_COUNTRY), ("In which country was {x} born?",
                                                      "What country was {x} born in?")),
        Chain("compositional", (P_EMP, CO_YEAR), ("When was the company that {x} works for founded?",
                                                  "In what year was the employer of {x} founded?")),
        Chain("compositional", (W_CREATOR, P_EMP), ("Which company does the creator of {x} work for?",
                                                    "Who employs the creator of {x}?")),
        Chain("compositional", (CO_HQ, CI_COUNTRY), ("In which country is {x} headquartered?",
                                                     "What country are the headquarters of {x} in?")),
        Chain("compositional", (W_PUB, CO_FOUNDER), ("Who founded the publisher of {x}?",
                                                     "Who is the founder of the company that published {x}?")),
        Chain("compositional", (CI_MAYOR, P_BORN), ("Where was the mayor of {x} born?",
                                                    "In which city was the mayor of {x} born?")),
        Compare("comparison", W_YEAR, "earlier", ("Which was released first, {a} or {b}?",
                                                  "Which came out earlier, {a} or {b}?")),
        Compare("comparison", P_YEAR, "later", ("Who was born later, {a} or {b}?", "Who is younger, {a} or {b}?")),
        Compare("comparison", P_EMP, "same", ("Do {a} and {b} work for the same company?",
                                              "Are {a} and {b} employed by the same company?"), want="yes"),
        Compare("comparison", P_EMP, "same", ("Do {a} and {b} work for the same company?",
                                              "Are {a} and {b} employed by the same company?"), want="no"),
        Compare("comparison", CI_YEAR, "earlier", ("Which city was founded first, {a} or {b}?",
                                                   "Which city is older, {a} or {b}?")),
    ),
    "musique": (_PathPool("2hop", 2), _PathPool("3hop", 3), _PathPool("4hop", 4)),
    "bamboogle": (
        Chain("2hop", (P_EMP, CO_YEAR), ("The company that employs {x} was founded in which year?",)),
        Chain("2hop", (CI_COUNTRY, CN_CAPITAL), ("Which city serves as the capital of the country where {x} lies?",)),
        Chain("2hop", (CO_HQ, CI_MAYOR), ("Who governs the city that hosts the headquarters of {x}?",)),
        Chain("2hop", (W_CREATOR, P_EMP), ("The person who created {x} is employed by which company?",)),
        Chain("2hop", (CO_FOUNDER, P_BORN), ("Which city did the person who founded {x} come from?",)),
        Chain("2hop", (W_PUB, CO_YEAR), ("The company behind {x} came into being in which year?",)),
    ),
}
ALIAS_FAMILIES = frozenset({"triviaqa"})
"""Families whose golden answers list every alias of an entity answer."""


def template_words() -> list[str]:
    """Every word of the question templates and oracle queries (placeholders removed)."""
    texts = [w for types in FAMILY_TYPES.values() for t in types for w in t.words()]
    texts += [kw for kw, _ in RELATIONS.values()]
    return words_of(texts)


def words_of(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Sorted distinct alphabetic tokens of `texts`, `{placeholders}` removed."""
    found: dict[str, None] = {}
    for t in texts:
        for tok in re.findall(r"[A-Za-z]+", re.sub(r"\{[^}]*\}", " ", t)):
            found[tok] = None
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------------
def _pools(types: tuple[QuestionType, ...], worlds: dict[int, dict[str, list[Entity]]], group: tuple[int, ...],
           index: _Index, rng: random.Random) -> list[list[Candidate]]:
    pools = []
    for t in types:
        pool = [c for w in group for c in t.candidates(worlds[w], index)]
        rng.shuffle(pool)
        pool.reverse()  # popped from the end: keeps the shuffled order
        pools.append(pool)
    return pools


def _available(pools: list[list[Candidate]], used: set[tuple[str, ...]], stop: int | None = None
               ) -> tuple[int, list[int]]:
    """Distinct unused candidates (in all, and per pool); counting ends once `stop` are found."""
    per_type, seen = [], set()
    for pool in pools:
        n = 0
        for c in pool:
            if stop is not None and len(seen) >= stop:
                break
            if c.key not in used and c.key not in seen:
                seen.add(c.key)
                n += 1
        per_type.append(n)
    return len(seen), per_type


def _draw(family: str, split: str, n: int, types: tuple[QuestionType, ...], pools: list[list[Candidate]],
          used: set[tuple[str, ...]], n_worlds: int) -> list[tuple[QuestionType, Candidate]]:
    total, per_type = _available(pools, used, stop=n)
    if total < n:
        detail = ", ".join(f"{t.label}:{k}" for t, k in zip(types, per_type))
        group = "eval (dev/test)" if split != "train" else "train"
        raise ConfigError(
            f"synthetic family {family!r} split {split!r}: asked for {n} questions, but the {n_worlds} {group} "
            f"sub-world(s) can supply only {total} distinct ones not already used ({detail}). Lower "
            f"data.synthetic.splits.{family}.{split} or enlarge the world (n_worlds, n_eval_worlds, *_per_world).")
    chosen: list[tuple[QuestionType, Candidate]] = []
    while len(chosen) < n:
        before = len(chosen)
        for t, pool in zip(types, pools):  # round robin: one question per type per turn
            while pool and pool[-1].key in used:
                pool.pop()
            if pool:
                c = pool.pop()
                used.add(c.key)
                chosen.append((t, c))
                if len(chosen) == n:
                    break
        assert len(chosen) > before, "pools ran dry although _available counted enough"
    return chosen


def build_datasets(entities: list[Entity], train_worlds: tuple[int, ...], eval_worlds: tuple[int, ...],
                   splits: dict[str, SplitSizes], seed: int) -> dict[str, dict[str, list[QAExample]]]:
    """family -> split -> examples. Train from `train_worlds`, dev then test from `eval_worlds`."""
    index = _Index(entities)
    worlds: dict[int, dict[str, list[Entity]]] = {}
    for e in entities:
        worlds.setdefault(e.world, {}).setdefault(e.kind, []).append(e)
    used: set[tuple[str, ...]] = set()  # asked facts: membership only, never iterated
    out: dict[str, dict[str, list[QAExample]]] = {}
    for family in splits:
        types = FAMILY_TYPES[family]
        sizes = splits[family]
        pools = {"train": _pools(types, worlds, train_worlds, index, random.Random(f"{seed}-{family}-train-pool"))}
        pools["dev"] = pools["test"] = _pools(types, worlds, eval_worlds, index,
                                              random.Random(f"{seed}-{family}-eval-pool"))
        out[family] = {}
        for split in ("train", "dev", "test"):
            n = getattr(sizes, split)
            group = train_worlds if split == "train" else eval_worlds
            rng = random.Random(f"{seed}-{family}-{split}-phrase")
            examples = []
            for i, (t, c) in enumerate(_draw(family, split, n, types, pools[split], used, len(group))):
                p = t.phrase(c, index, rng, aliases=family in ALIAS_FAMILIES)
                supporting = list(dict.fromkeys(h["support"] for h in p["hops"]))
                meta = {"family": family, "type": t.label, "relations": p["relations"],
                        "world": index.by_name[c.entities[0]].world, "hops": p["hops"],
                        "supporting_ids": supporting, "final": p["final"]}
                examples.append(QAExample(id=f"{family}-{split}-{i:06d}", question=p["question"],
                                          golden_answers=p["golden_answers"], metadata=meta))
            out[family][split] = examples
    return out
