"""The seeded synthetic encyclopedia: many small fictional sub-worlds merged into one wiki-18 style corpus.

What it builds (`generate_world(cfg, seed)`):
1. Names. Every name word is a capitalized concatenation of three syllables from a fixed inventory (`SYLLABLES`),
   e.g. "Bobini Kalora". Each word belongs to exactly one entity in the whole world, so a name never occurs inside
   another name and nothing is answerable from real-world knowledge (a short list of real words is rejected).
2. Sub-worlds. `cfg.n_worlds` independent sub-worlds, each with countries, cities, people, companies, creative
   works and events. Relations stay inside a sub-world: a person is born in a city and works for a company; a city
   lies in a country and has a mayor; a company has a founder and headquarters; a work has a creator and a
   publisher; years of birth, founding and release are consistent (a founder is born before the company).
3. Passages. One passage per entity, `"Title"\\ntext`, title = the entity name. Every kind of passage has ONE
   fixed layout (`LAYOUTS`): sentence k always states the same relation (FEASIBILITY.md: a 2-layer model reads by
   position). Each passage also carries a sentence that is never asked about (occupation, friend, neighbour, ...),
   and event passages act as distractors: they mention people, a city and a company without stating any fact
   that a question asks for.
4. Questions. `tspo_core.data.families` draws the seven FlashRAG-named families from the sub-worlds: train
   questions only from the first `n_worlds - n_eval_worlds` sub-worlds, dev/test only from the last
   `n_eval_worlds` (held-out entities).
5. Lexicon. The syllable inventory and every template word of passages, questions and oracle queries, so a
   tokenizer trained on it splits unseen names into known pieces.

Determinism: every random choice comes from a `random.Random` seeded from (seed, purpose); nothing iterates over
a set or depends on hashing, so the same config and seed give byte-identical output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tspo_core.config import FAMILIES, SyntheticConfig
from tspo_core.data import families
from tspo_core.data.schema import Passage, QAExample

# ----------------------------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------------------------
_CONSONANTS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
SYLLABLES: tuple[str, ...] = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
"""The fixed syllable inventory (70 consonant-vowel pairs); every name word is three of them."""

SYLLABLES_PER_WORD = 3

# Real words and places that the inventory can spell; a name must never carry real-world meaning.
_REAL_WORDS = frozenset("""
banana barato bikini bolero bonita bonito dakota debate define demote denali denote devote dilute divine domino
figure future garage gelato genome gomera kabuki kanaka karate kimono lasino latino legato libido limone lolita
malibu manila manure mature medina mikado mimosa minute nagano nature navona negate nevada pagoda pamela panama
parade patina pinata pirate potato ramada ramona rebate refine refute relate remote repute resale reside resume
romano safari sakura salami salute samara sedate senate sodoma sonata sudoku tamale tamara tirade tobago toledo
tomato zapata
""".split())

# ----------------------------------------------------------------------------------------------------------------
# vocabularies of the unasked attributes and name decorations (all words start with a consonant: "a ..." works)
# ----------------------------------------------------------------------------------------------------------------
OCCUPATIONS = ("painter", "singer", "banker", "doctor", "farmer", "lawyer", "poet", "sailor", "teacher", "writer",
               "merchant", "soldier", "judge", "chemist")
INDUSTRIES = ("shipping", "mining", "textile", "banking", "publishing", "railway", "brewing", "timber")
GENRES = ("novel", "poem", "play", "song", "film")
FEATURES = ("bridges", "markets", "gardens", "harbor", "castle", "museums", "vineyards", "fountains")
REGIONS = ("northern", "southern", "eastern", "western", "central")
COUNTRY_FORMS = ("Republic", "Kingdom", "Federation", "Principality")
COMPANY_SUFFIXES = ("Group", "Holdings", "Industries", "Company", "Works", "Limited")
EVENT_KINDS = ("Festival", "Summit", "Fair", "Congress", "Regatta")
WORK_TITLES = ("The {a}", "{a} {b}", "Tales of {a}", "Return to {a}")
"""Title patterns of creative works; `{a}`, `{b}` are fresh name words."""

# ----------------------------------------------------------------------------------------------------------------
# passage layouts: kind -> ordered (slot, sentence template); sentence k always states slot k
# ----------------------------------------------------------------------------------------------------------------
# Only the first sentence names the subject; the rest say "They"/"It"/"Its": the title already names it, and
# repeating a six-syllable name in every sentence doubled the tokens a tiny model must read per passage.
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (
        ("occupation", "{n} is a {v}."),
        ("born_in", "They were born in the city of {v}."),
        ("birth_year", "They were born in the year {v}."),
        ("employer", "They work for {v}."),
        ("friend", "They are a friend of {v}."),
    ),
    "city": (
        ("country", "{n} is a city in {v}."),
        ("founding_year", "It was founded in the year {v}."),
        ("mayor", "Its mayor is {v}."),
        ("feature", "It is known for its {v}."),
    ),
    "country": (
        ("region", "{n} is a country in the {v} region."),
        ("capital", "Its capital is {v}."),
        ("official_name", "Its official name is the {v}."),
        ("neighbor", "It shares a border with {v}."),
    ),
    "company": (
        ("industry", "{n} is a {v} company."),
        ("founder", "It was founded by {v}."),
        ("founding_year", "It was founded in the year {v}."),
        ("headquarters", "Its headquarters are in {v}."),
    ),
    "work": (
        ("genre", "{n} is a {v}."),
        ("creator", "It was created by {v}."),
        ("release_year", "It was released in the year {v}."),
        ("publisher", "It was published by {v}."),
    ),
    "event": (
        ("event_kind", "The {n} was a {v}."),
        ("venue", "It was held in {v}."),
        ("event_year", "It took place in the year {v}."),
        ("guests", "Its guests included {v}."),
        ("sponsor", "It was sponsored by {v}."),
    ),
}
KINDS: tuple[str, ...] = tuple(LAYOUTS)


@dataclass(frozen=True)
class Entity:
    """One encyclopedia entry. `facts` maps every slot of its passage layout to the stated value (an entity name
    or a year as a string, or an unasked attribute); `aliases` starts with the name itself."""

    name: str
    kind: str
    world: int
    passage_id: str
    facts: dict[str, str]
    aliases: tuple[str, ...]


@dataclass
class World:
    """The generated encyclopedia. `datasets[family][split]` for the seven families and train/dev/test;
    `entities` and `eval_worlds` describe the ground truth (for tests and diagnostics)."""

    corpus: list[Passage]
    datasets: dict[str, dict[str, list[QAExample]]]
    lexicon: dict[str, list[str]]
    entities: list[Entity] = field(default_factory=list)
    eval_worlds: tuple[int, ...] = ()

    def passage_world(self) -> dict[str, int]:
        """Passage id -> sub-world index."""
        return {e.passage_id: e.world for e in self.entities}


# ----------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------
class _Names:
    """Draws fresh name words; a word is never handed out twice (global uniqueness across sub-worlds)."""

    def __init__(self, rng: random.Random, reserved: frozenset[str]):
        self._rng = rng
        self._used: set[str] = set()  # membership only: never iterated
        self._reserved = reserved

    def word(self) -> str:
        for _ in range(10_000):
            w = "".join(self._rng.choice(SYLLABLES) for _ in range(SYLLABLES_PER_WORD)).capitalize()
            low = w.lower()
            if w not in self._used and low not in _REAL_WORDS and low not in self._reserved:
                self._used.add(w)
                return w
        raise RuntimeError("name inventory exhausted")  # ~340k words; unreachable at supported sizes


def _sub_world(w: int, cfg: SyntheticConfig, rng: random.Random, names: _Names) -> list[Entity]:
    """Entities of sub-world `w` (passage ids assigned later), in a fixed kind order."""
    n_country, n_city, n_person = cfg.countries_per_world, cfg.cities_per_world, cfg.people_per_world
    n_company, n_work, n_event = cfg.companies_per_world, cfg.works_per_world, cfg.distractors_per_world

    countries = [names.word() for _ in range(n_country)]
    cities = [names.word() for _ in range(n_city)]
    people = [f"{names.word()} {names.word()}" for _ in range(n_person)]
    company_core = [names.word() for _ in range(n_company)]
    companies = [f"{c} {rng.choice(COMPANY_SUFFIXES)}" for c in company_core]

    # every country gets at least one city; its capital is one of its cities
    city_country = [countries[i] if i < n_country else rng.choice(countries) for i in range(n_city)]
    capital = {c: rng.choice([ci for ci, co in zip(cities, city_country) if co == c]) for c in countries}

    birth_year = {p: rng.randint(1800, 1950) for p in people}
    mayors = rng.sample(people, n_city)
    founders = rng.sample(people, n_company)

    out: list[Entity] = []

    def add(name: str, kind: str, facts: dict[str, str], aliases: tuple[str, ...] = ()) -> None:
        out.append(Entity(name=name, kind=kind, world=w, passage_id="", facts=facts, aliases=(name, *aliases)))

    for i, c in enumerate(countries):
        form = rng.choice(COUNTRY_FORMS)
        add(c, "country", {"region": rng.choice(REGIONS), "capital": capital[c], "official_name": f"{form} of {c}",
                           "neighbor": countries[(i + 1) % n_country]}, (f"{form} of {c}",))
    for ci, co, mayor in zip(cities, city_country, mayors):
        add(ci, "city", {"country": co, "founding_year": str(rng.randint(1100, 1790)), "mayor": mayor,
                         "feature": rng.choice(FEATURES)})
    for i, p in enumerate(people):
        friend = people[(i + rng.randint(1, n_person - 1)) % n_person]
        add(p, "person", {"occupation": rng.choice(OCCUPATIONS), "born_in": rng.choice(cities),
                          "birth_year": str(birth_year[p]), "employer": rng.choice(companies), "friend": friend},
            (p.split(" ")[1],))
    for core, co, founder in zip(company_core, companies, founders):
        year = birth_year[founder] + rng.randint(20, 60)
        add(co, "company", {"industry": rng.choice(INDUSTRIES), "founder": founder, "founding_year": str(year),
                            "headquarters": rng.choice(cities)}, (core,))
    for _ in range(n_work):
        title = rng.choice(WORK_TITLES).format(a=names.word(), b=names.word())
        creator = rng.choice(people)
        add(title, "work", {"genre": rng.choice(GENRES), "creator": creator,
                            "release_year": str(birth_year[creator] + rng.randint(18, 70)),
                            "publisher": rng.choice(companies)})
    for _ in range(n_event):
        kind = rng.choice(EVENT_KINDS)
        guests = rng.sample(people, 2)
        add(f"{names.word()} {kind}", "event", {"event_kind": kind.lower(), "venue": rng.choice(cities),
                                               "event_year": str(rng.randint(1850, 2010)),
                                               "guests": f"{guests[0]} and {guests[1]}",
                                               "sponsor": rng.choice(companies)})
    return out


def render_passage(e: Entity) -> str:
    """`"Title"\\ntext` with the fixed sentence layout of the entity's kind."""
    text = " ".join(tpl.format(n=e.name, v=e.facts[slot]) for slot, tpl in LAYOUTS[e.kind])
    return f'"{e.name}"\n{text}'


def template_words() -> list[str]:
    """Every word of the world's passage templates and vocabularies (placeholders removed)."""
    texts = [tpl for layout in LAYOUTS.values() for _, tpl in layout]
    texts += [*OCCUPATIONS, *INDUSTRIES, *GENRES, *FEATURES, *REGIONS, *COUNTRY_FORMS, *COMPANY_SUFFIXES,
              *EVENT_KINDS, *(k.lower() for k in EVENT_KINDS), *WORK_TITLES, "of", "and"]
    return families.words_of(texts)


def generate_world(cfg: SyntheticConfig, seed: int) -> World:
    """Build the corpus, the seven families' train/dev/test splits and the lexicon (see the module docstring).

    Raises ConfigError (naming the family, the split and what the world can supply) when a split size cannot be
    met with distinct questions.
    """
    lexicon_words = sorted(set(template_words()) | set(families.template_words()))
    reserved = frozenset(w.lower() for w in lexicon_words)
    names = _Names(random.Random(f"tspo-names-{seed}"), reserved)

    entities: list[Entity] = []
    for w in range(cfg.n_worlds):
        entities.extend(_sub_world(w, cfg, random.Random(f"tspo-world-{seed}-{w}"), names))
    entities = [Entity(e.name, e.kind, e.world, str(i), e.facts, e.aliases) for i, e in enumerate(entities)]
    corpus = [Passage(id=e.passage_id, contents=render_passage(e)) for e in entities]

    n_train = cfg.n_worlds - cfg.n_eval_worlds
    eval_worlds = tuple(range(n_train, cfg.n_worlds))
    datasets = families.build_datasets(entities, train_worlds=tuple(range(n_train)), eval_worlds=eval_worlds,
                                       splits={f: cfg.splits[f] for f in FAMILIES}, seed=seed)
    lexicon = {"syllables": list(SYLLABLES), "words": lexicon_words}
    return World(corpus=corpus, datasets=datasets, lexicon=lexicon, entities=entities, eval_worlds=eval_worlds)
