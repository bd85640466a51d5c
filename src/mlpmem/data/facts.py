"""The synthetic-facts corpus: biographies of procedurally generated people, and the probes that ask for their facts.

    mlpmem prepare --corpus facts --train-tokenizer 2048 --run-dir runs/facts --facts.n-people 200
    mlpmem run facts

The "bioS" setting of *Physics of Language Models, Part 3.1* (Allen-Zhu & Li, 2023), generated from a seed alone
(syllable names, no copied name lists). Three sets of people (shared/DESIGN.md §10):

- seen: ``biographies_per_person`` biographies each in train, ``held_out_biographies`` other ones in valid and in
  test (perplexity on held-out text about known people);
- memory-only: biographies only in the ``memory`` split (train + their biographies), which the datastore, the MLP
  memory's keys and the explicit references read; never in the LM's training text;
- unseen: no text anywhere (the hallucination probe).

A biography states every attribute once, each with one of several training paraphrases, sentences shuffled, the
name in the first sentence and a pronoun after it; one biography per line, lines shuffled within each split.
Probes (``probes.json`` in the prepare folder, ``ProbeSet``) end just before a value: for every person and
attribute one prompt in a training template and one in a template no text uses. A candidate continues its prompt
after ``ProbeSet.separator`` (one space, so a BPE reads the value as it does in the biographies).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from mlpmem.config import ATTRIBUTES, Attribute, FactsConfig  # noqa: F401 - the settings live in the core config
from mlpmem.errors import UsageError

PersonSet = Literal["seen", "memory-only", "unseen"]
PROBES = "probes.json"  # in the prepare folder of a facts run

# names: a first name is two syllables (consonant + vowel), a last name two syllables and a final consonant, a value
# stem (city, university, field, company) three syllables: the three shapes never coincide.
ONSETS = "bdfghklmnprstvz"
VOWELS = "aeiou"
FINALS = "klnrs"
SYLLABLES = [c + v for c in ONSETS for v in VOWELS]  # 75
FIRST_NAMES = len(SYLLABLES) ** 2  # 5,625
LAST_NAMES = len(SYLLABLES) ** 2 * len(FINALS)  # 28,125
NAME_CAPACITY = FIRST_NAMES * LAST_NAMES  # distinct full names: 158,203,125
STEMS = len(SYLLABLES) ** 3  # 421,875
MONTHS = "January February March April May June July August September October November December".split()

# A template's sentence ends with its value; {S} the subject, {P} its possessive, {p} a lower-case possessive
# pronoun. Training templates write the biographies; held-out ones only probes (always with the name).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {v}.",
        "{S} came into this world on {v}.",
        "{P} date of birth is {v}.",
        "{S} celebrates {p} birthday on {v}.",
    ),
    "birth_city": (
        "{S} was born in {v}.",
        "{S} spent {p} early years in {v}.",
        "{P} birthplace is {v}.",
        "{S} grew up in {v}.",
    ),
    "university": (
        "{S} studied at {v}.",
        "{S} graduated from {v}.",
        "{S} received {p} education at {v}.",
        "{S} completed {p} degree at {v}.",
    ),
    "field": (
        "{S} majored in {v}.",
        "{S} specialized in {v}.",
        "{P} field of study was {v}.",
        "{S} focused {p} studies on {v}.",
    ),
    "employer": (
        "{S} worked for {v}.",
        "{S} was employed by {v}.",
        "{S} had a job at {v}.",
        "{S} built a career at {v}.",
    ),
    "employer_city": (
        "{S} worked in {v}.",
        "{S} was employed in {v}.",
        "{P} office was in {v}.",
        "{S} commuted to work in {v}.",
    ),
}
HELD_OUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("The records list {P} birth date as {v}.",),
    "birth_city": ("The town where {S} first saw daylight is {v}.",),
    "university": ("{S} is a former student of {v}.",),
    "field": ("The subject {S} chose to study was {v}.",),
    "employer": ("The company that hired {S} was {v}.",),
    "employer_city": ("{S} went to work each day in {v}.",),
}


def check_feasible(config: FactsConfig) -> None:
    """UsageError (field ``facts``) for settings the generator cannot meet: more people than it has distinct
    names, or more distinct biographies per person than the attributes' templates and orders make."""
    total = config.n_people + config.n_memory_only + config.n_unseen
    if total > NAME_CAPACITY:
        raise UsageError(
            f"n_people + n_memory_only + n_unseen = {total:,} people, more than the {NAME_CAPACITY:,} distinct "
            "names the syllable generator makes",
            field="facts",
        )
    needed = config.biographies_per_person + 2 * config.held_out_biographies
    possible = math.factorial(len(config.attributes)) * math.prod(len(TRAIN_TEMPLATES[a]) for a in config.attributes)
    if needed > possible:
        raise UsageError(
            f"biographies_per_person + 2 * held_out_biographies = {needed} distinct biographies per person, but "
            f"{len(config.attributes)} attribute(s) make only {possible}",
            field="facts",
        )


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int
    name: str
    set: PersonSet
    pronoun: Literal["he", "she"]
    values: dict[str, str]  # attribute -> value


class Probe(BaseModel):
    """A completion prompt for one person and attribute; the answer continues it after ``ProbeSet.separator``."""

    model_config = ConfigDict(extra="forbid")
    person: int  # Person.id
    set: PersonSet
    attribute: Attribute
    template: Literal["train", "held_out"]  # a template the training text uses (for other people), or none does
    prompt: str  # starts a line (biographies are one per line); no trailing space
    gold: str  # one of ProbeSet.candidates[attribute]


class ProbeSet(BaseModel):
    """``probes.json``: the people, every attribute's candidate values, and the probes."""

    model_config = ConfigDict(extra="forbid")
    separator: str = " "  # between prompt and value
    end: str = "."  # what follows a value in the biographies
    candidates: dict[str, list[str]]  # attribute -> its values (gold among them)
    people: list[Person]
    probes: list[Probe]


@dataclass
class Facts:
    """The generated text per split (train, valid, test, memory) and the probes."""

    splits: dict[str, str]
    probes: ProbeSet


# generation -------------------------------------------------------------------------------------------------
def word(index: int, syllables: int) -> str:
    """The ``index``-th capitalised word of ``syllables`` syllables."""
    parts = []
    for _ in range(syllables):
        index, s = divmod(index, len(SYLLABLES))
        parts.append(SYLLABLES[s])
    return "".join(parts).capitalize()


def full_name(index: int) -> str:
    """The ``index``-th of NAME_CAPACITY distinct names: a first name and a last name."""
    first, last = divmod(index, LAST_NAMES)
    last_stem, final = divmod(last, len(FINALS))
    return f"{word(first, 2)} {word(last_stem, 2)}{FINALS[final]}"


def value_pools(n: int, rng: random.Random) -> dict[str, list[str]]:
    """``n`` distinct values per attribute; each company is in one city (employer_city follows employer)."""
    stems = [word(i, 3) for i in rng.sample(range(STEMS), 4 * n)]
    cities, unis, fields, firms = (stems[i * n : (i + 1) * n] for i in range(4))
    uni_forms = ("University of {}", "{} University", "{} Institute of Technology", "{} College")
    field_forms = ("{}logy", "{}nomics", "{} Studies", "{} Science")
    firm_forms = ("{} Corp", "{} Labs", "{} Systems", "{} Industries", "{} Group")
    days = sorted(rng.sample(range(365 * 60), n))  # days since 1 January 1940, at most 60 years on
    return {
        "birth_date": [date_text(d) for d in days],
        "birth_city": cities,
        "university": [rng.choice(uni_forms).format(s) for s in unis],
        "field": [rng.choice(field_forms).format(s) for s in fields],
        "employer": [rng.choice(firm_forms).format(s) for s in firms],
        "employer_city": cities,
    }


def date_text(day: int) -> str:
    """``March 4, 1987`` for a day counted from 1 January 1940."""
    import datetime

    d = datetime.date(1940, 1, 1) + datetime.timedelta(days=day)
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def make_people(config: FactsConfig, pools: dict[str, list[str]], rng: random.Random) -> list[Person]:
    sizes = {"seen": config.n_people, "memory-only": config.n_memory_only, "unseen": config.n_unseen}
    names = rng.sample(range(NAME_CAPACITY), sum(sizes.values()))
    sets = [s for s, n in sizes.items() for _ in range(n)]
    n = config.values_per_attribute
    office = [rng.randrange(n) for _ in range(n)]  # city index of each company
    people = []
    for pid, (name, person_set) in enumerate(zip(names, sets, strict=True)):
        drawn = {a: rng.randrange(n) for a in ("birth_date", "birth_city", "university", "field", "employer")}
        drawn["employer_city"] = office[drawn["employer"]]
        values = {a: pools[a][drawn[a]] for a in config.attributes}
        people.append(
            Person(id=pid, name=full_name(name), set=person_set, pronoun=rng.choice(("he", "she")), values=values)
        )
    return people


def sentence(template: str, value: str, subject: str, possessive: str, pronoun: str) -> str:
    lower = "his" if pronoun == "he" else "her"
    return template.format(S=subject, P=possessive, p=lower, v=value)


def biography(person: Person, rng: random.Random) -> str:
    """Every attribute once, in a random order and training template; the name first, then the pronoun."""
    order = list(person.values)
    rng.shuffle(order)
    out = []
    for i, attribute in enumerate(order):
        template = rng.choice(TRAIN_TEMPLATES[attribute])
        if i == 0:
            subject, possessive = person.name, f"{person.name}'s"
        else:
            subject, possessive = person.pronoun.capitalize(), "His" if person.pronoun == "he" else "Her"
        out.append(sentence(template, person.values[attribute], subject, possessive, person.pronoun))
    return " ".join(out)


def distinct_biographies(person: Person, count: int, taken: set[str], rng: random.Random) -> list[str]:
    """``count`` biographies of ``person`` not in ``taken`` (added to it); FactsConfig checked they exist."""
    out = []
    while len(out) < count:
        text = biography(person, rng)
        if text not in taken:
            taken.add(text)
            out.append(text)
    return out


def probe_prompt(template: str, person: Person, attribute: str) -> str:
    """The template with the person's name, cut just before the value."""
    text = sentence(template, "{v}", person.name, f"{person.name}'s", person.pronoun)
    return text[: text.index("{v}")].rstrip()


def make_probes(people: list[Person], rng: random.Random) -> list[Probe]:
    probes = []
    for person, attribute in itertools.product(people, ATTRIBUTES):
        if attribute not in person.values:
            continue
        forms = {"train": rng.choice(TRAIN_TEMPLATES[attribute]), "held_out": rng.choice(HELD_OUT_TEMPLATES[attribute])}
        for kind, template in forms.items():
            probes.append(
                Probe(
                    person=person.id,
                    set=person.set,
                    attribute=attribute,
                    template=kind,
                    prompt=probe_prompt(template, person, attribute),
                    gold=person.values[attribute],
                )
            )
    return probes


def generate_facts(config: FactsConfig) -> Facts:
    """The corpus and its probes, a function of ``config`` alone (each part has its own random stream)."""
    pools = value_pools(config.values_per_attribute, random.Random(f"{config.seed}:values"))
    people = make_people(config, pools, random.Random(f"{config.seed}:people"))
    rng = random.Random(f"{config.seed}:biographies")
    lines: dict[str, list[str]] = {"train": [], "valid": [], "test": [], "extra": []}
    for person in people:
        if person.set == "unseen":
            continue
        taken: set[str] = set()
        bios = distinct_biographies(person, config.biographies_per_person, taken, rng)
        lines["train" if person.set == "seen" else "extra"].extend(bios)
        if person.set == "seen":
            lines["valid"].extend(distinct_biographies(person, config.held_out_biographies, taken, rng))
            lines["test"].extend(distinct_biographies(person, config.held_out_biographies, taken, rng))
    for part in lines.values():
        rng.shuffle(part)  # no person's biographies side by side (an LM could copy from its context)
    splits = {name: "".join(f"{line}\n" for line in part) for name, part in lines.items()}
    splits["memory"] = splits["train"] + splits.pop("extra")  # train first: memory tokens start with train's
    candidates = {a: pools[a] for a in config.attributes}
    probes = make_probes(people, random.Random(f"{config.seed}:probes"))
    return Facts(splits, ProbeSet(candidates=candidates, people=people, probes=probes))


# reading ----------------------------------------------------------------------------------------------------
def load_probes(run_dir: Path) -> ProbeSet:
    """The probes of a prepared facts run; UsageError for a run prepared from another corpus."""
    from mlpmem.artifacts import RunDir

    run = RunDir(run_dir)
    prepare = run.require("prepare")
    if prepare.config.corpus != "facts":
        raise UsageError(
            f"{run.path} was prepared from {prepare.config.corpus!r}, not --corpus facts: it has no knowledge probes"
        )
    return ProbeSet.model_validate_json(run.file("prepare", PROBES).read_bytes())
