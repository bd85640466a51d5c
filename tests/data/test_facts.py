"""The synthetic-facts corpus and its probes: reproducible, every fact stated once per biography, people in exactly
the splits their set allows, probes that training text never holds, bad input refused before anything is written."""

import re

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from mlpmem.artifacts import RunDir
from mlpmem.cli import apply_overrides, main
from mlpmem.config import DatastoreConfig, PrepareConfig, ReferencesConfig, validate
from mlpmem.data.facts import (
    ATTRIBUTES,
    HELD_OUT_TEMPLATES,
    NAME_CAPACITY,
    TRAIN_TEMPLATES,
    FactsConfig,
    generate_facts,
    load_probes,
)
from mlpmem.data.prepare import prepare
from mlpmem.errors import UsageError
from mlpmem.explicit.references import build_references
from mlpmem.knn.datastore import build_datastore
from mlpmem.presets import load_pipeline
from mlpmem.stages import RunConfig

from conftest import make_tiny_run

SMALL = FactsConfig(n_people=30, n_memory_only=12, n_unseen=8, biographies_per_person=3, values_per_attribute=10)


@pytest.fixture(scope="module")
def facts():
    return generate_facts(SMALL)


def lines(text):
    return text.splitlines()


def template_regex(template):
    """A sentence of ``template``: subject, possessive, lower-case possessive and value as groups."""
    pattern = re.escape(template)
    for key, group in (("S", r"(?P<S>.+?)"), ("P", r"(?P<P>.+?)"), ("p", r"(?P<p>his|her)"), ("v", r"(?P<v>.+)")):
        pattern = pattern.replace(re.escape("{" + key + "}"), group, 1)
    return re.compile(pattern + r"\Z")


def parse(bio):
    """[(attribute, subject, possessive, value)] of one biography, each sentence matched to its training template."""
    out = []
    for text in re.split(r"(?<=\.) (?=[A-Z])", bio):
        found = [
            (a, m) for a, ts in TRAIN_TEMPLATES.items() for t in ts if (m := template_regex(t).match(text)) is not None
        ]
        assert len(found) == 1, text  # exactly one template reads each sentence
        a, m = found[0]
        out.append((a, m.groupdict().get("S"), m.groupdict().get("P"), m["v"]))
    return out


def test_same_config_same_bytes_and_the_seed_changes_them(facts):
    again = generate_facts(SMALL)
    assert again.splits == facts.splits
    assert again.probes.model_dump_json() == facts.probes.model_dump_json()
    other = generate_facts(SMALL.model_copy(update={"seed": 1}))
    assert other.splits["train"] != facts.splits["train"]


def test_every_biography_states_every_attribute_once_name_first_then_pronoun(facts):
    people = {p.name: p for p in facts.probes.people}
    counts = {split: {} for split in facts.splits}
    for split, text in facts.splits.items():
        for bio in lines(text):
            sentences = parse(bio)
            first = sentences[0][1] or sentences[0][2].removesuffix("'s")
            person = people[first]
            assert sorted(a for a, *_ in sentences) == sorted(ATTRIBUTES)
            assert {a: v for a, _, _, v in sentences} == person.values
            pronoun = person.pronoun.capitalize()
            for _, subject, possessive, _ in sentences[1:]:  # after the first mention: he/she, his/her
                assert subject in (None, pronoun) and possessive in (None, "His" if pronoun == "He" else "Her")
            counts[split][person.id] = counts[split].get(person.id, 0) + 1
    seen = [p.id for p in facts.probes.people if p.set == "seen"]
    memory_only = [p.id for p in facts.probes.people if p.set == "memory-only"]
    assert counts["train"] == dict.fromkeys(seen, SMALL.biographies_per_person)
    assert counts["valid"] == counts["test"] == dict.fromkeys(seen, SMALL.held_out_biographies)
    assert counts["memory"] == {**counts["train"], **dict.fromkeys(memory_only, SMALL.biographies_per_person)}
    held_out = set(lines(facts.splits["valid"])) | set(lines(facts.splits["test"]))
    assert len(held_out) == 2 * len(seen) and not held_out & set(lines(facts.splits["train"]))  # no copies


def test_each_set_of_people_is_in_exactly_the_splits_it_may_be(facts):
    text = {split: facts.splits[split] for split in ("train", "valid", "test", "memory")}
    assert facts.splits["memory"].startswith(facts.splits["train"])
    for person in facts.probes.people:
        where = {split for split, t in text.items() if re.search(rf"\b{person.name}\b", t)}
        expected = {"seen": {"train", "valid", "test", "memory"}, "memory-only": {"memory"}, "unseen": set()}
        assert where == expected[person.set], (person.name, person.set)
    names = [p.name for p in facts.probes.people]
    assert len(set(names)) == len(names) == SMALL.n_people + SMALL.n_memory_only + SMALL.n_unseen


def name_free_piece(prompt, name):
    """The longer of the prompt's text before and after the person's name (possessive included)."""
    before, _, after = prompt.partition(name)
    return max(before, after, key=len)


def test_probes_cover_every_person_and_attribute_in_both_forms(facts):
    probes = facts.probes
    keys = sorted((p.person, p.attribute, p.template) for p in probes.probes)
    expected = sorted((p.id, a, t) for p in probes.people for a in ATTRIBUTES for t in ("train", "held_out"))
    assert keys == expected
    people = {p.id: p for p in probes.people}
    for probe in probes.probes:
        person = people[probe.person]
        assert probe.set == person.set and probe.gold == person.values[probe.attribute]
        assert probe.gold in probes.candidates[probe.attribute]
        assert person.name in probe.prompt and probe.prompt == probe.prompt.rstrip()
    for attribute, values in probes.candidates.items():
        assert len(set(values)) == len(values) == SMALL.values_per_attribute, attribute


def test_held_out_prompts_never_occur_in_training_text(facts):
    train = facts.splits["train"]
    people = {p.id: p for p in facts.probes.people}
    for probe in facts.probes.probes:
        name = people[probe.person].name
        piece = name_free_piece(probe.prompt, name)
        if probe.template == "held_out":  # neither the prompt nor its template's wording is in any text
            assert not any(piece in t for t in facts.splits.values()), probe.prompt
        else:  # a training template: its wording is in the training text (for other people too)
            assert piece in train, probe.prompt
        if probe.set != "seen":
            assert probe.prompt not in train
    assert all(len(HELD_OUT_TEMPLATES[a]) >= 1 and len(TRAIN_TEMPLATES[a]) >= 4 for a in ATTRIBUTES)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("facts-run")
    config = PrepareConfig(run_dir=run_dir, corpus="facts", train_tokenizer=300, facts=SMALL)
    return run_dir, prepare(config)


def test_prepare_writes_four_splits_and_fingerprinted_probes(prepared, facts):
    run_dir, manifest = prepared
    run = RunDir(run_dir)
    assert set(manifest.arrays) == {"train", "valid", "test", "memory"}
    train, memory = np.asarray(run.array("prepare", "train")), np.asarray(run.array("prepare", "memory"))
    assert np.array_equal(memory[: len(train)], train)  # memory = train, then the memory-only biographies
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "prepare" / "tokenizer")
    assert tokenizer.decode(memory.tolist()) == facts.splits["memory"]
    assert "probes.json" in manifest.files and manifest.summary()["probes"] == len(facts.probes.probes)
    again = prepare(PrepareConfig(run_dir=run_dir, corpus="facts", train_tokenizer=300, facts=SMALL))
    assert again.fingerprint == manifest.fingerprint and again.timings == manifest.timings  # reused, not rebuilt
    assert load_probes(run_dir) == facts.probes
    path = run_dir / "prepare" / "probes.json"
    original = path.read_bytes()
    fewer = facts.probes.model_copy(update={"probes": facts.probes.probes[1:]})
    path.write_text(fewer.model_dump_json())
    with pytest.raises(UsageError, match="probes.json"):
        RunDir(run_dir).require("prepare")  # the manifest's size and hash catch an edited probe file
    path.write_bytes(original)
    assert RunDir(run_dir).require("prepare").fingerprint == manifest.fingerprint


def test_a_value_tokenises_the_same_after_its_prompt(prepared):
    run_dir, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "prepare" / "tokenizer")
    probes = load_probes(run_dir)
    for probe in probes.probes[::7]:
        for value in probes.candidates[probe.attribute][:3] + [probe.gold]:
            joint = tokenizer(probe.prompt + probes.separator + value)["input_ids"]
            parts = tokenizer(probe.prompt)["input_ids"] + tokenizer(probes.separator + value)["input_ids"]
            assert joint == parts, (probe.prompt, value)


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--facts.n-people", "0"], "--facts.n-people: Input should be greater than or equal to 1"),
        (["--facts.n-people", str(NAME_CAPACITY)], "distinct names the syllable generator makes"),
        (["--facts.attributes", "birth_city", "shoe_size"], "--facts.attributes.1: Input should be 'birth_date'"),
        (["--facts.attributes", "birth_city", "--facts.held-out-biographies", "2"], "make only 4"),
    ],
)
def test_bad_facts_settings_are_one_line_and_write_nothing(flags, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    err = one_line_error(
        capsys, ["prepare", "--corpus", "facts", "--train-tokenizer", "300", "--run-dir", str(run_dir), *flags]
    )
    assert message in err and not run_dir.exists()


def test_facts_settings_without_the_facts_corpus_are_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["prepare", "--train-tokenizer", "300", "--run-dir", str(run_dir), "--facts.n-people", "5"]
    assert "settings are for --corpus facts only" in one_line_error(capsys, argv) and not run_dir.exists()


def test_probes_and_the_memory_split_are_refused_for_a_run_without_facts(tmp_path):
    prepare(PrepareConfig(run_dir=tmp_path, train_tokenizer=300))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.name.startswith(".lock"))
    with pytest.raises(UsageError, match="not --corpus facts: it has no knowledge probes") as info:
        load_probes(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="has no memory split") as info:
        build_references(ReferencesConfig(run_dir=tmp_path, split="memory"))
    assert info.value.field == "split"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.name.startswith(".lock"))
    assert after == before


def test_the_facts_preset_reads_the_memory_split_and_takes_group_overrides():
    data = apply_overrides(load_pipeline("facts"), ["--prepare.facts.n_people", "7", "--prepare.facts.seed", "3"])
    run = validate(RunConfig, data)
    configs = run.stage_configs()
    assert configs["prepare"].facts.n_people == 7 and configs["prepare"].facts.seed == 3
    assert configs["prepare"].facts.n_memory_only == 100  # the preset's other settings stay
    assert configs["datastore"].split == configs["references"].split == "memory"
    assert yaml.safe_load(yaml.safe_dump(configs["prepare"].model_dump(mode="json")))["facts"]["n_people"] == 7


def test_the_datastore_stores_the_memory_split_and_a_run_without_one_is_refused(tmp_path):
    with_memory = make_tiny_run(tmp_path / "facts", n_train=600, n_eval=200, n_memory=300)
    manifest = build_datastore(DatastoreConfig(run_dir=with_memory, split="memory", device="cpu"))
    memory = np.asarray(RunDir(with_memory).array("prepare", "memory"))
    assert len(memory) == 900 and manifest.entries == len(memory) - 1
    assert np.array_equal(RunDir(with_memory).array("datastore", "values"), memory[1:])  # entry i predicts i + 1
    without = make_tiny_run(tmp_path / "plain", n_train=600, n_eval=200)
    with pytest.raises(UsageError, match="has no memory split") as info:
        build_datastore(DatastoreConfig(run_dir=without, split="memory", device="cpu"))
    assert info.value.field == "split" and not (without / "datastore").exists()
    assert not (without / "datastore.partial").exists()
