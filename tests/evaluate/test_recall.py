"""``mlpmem recall``: every candidate's total log-prob equals one forward per candidate through the same scoring
model (the joint text tokenised as a whole, log p of the tokens after the prompt summed), float32, to 1e-5; the
metrics equal a naive loop; a run without a facts corpus is one line, exit 2, nothing written.

The run: a real facts prepare (its tokenizer), a tiny random GPT-2 on it, a datastore of the memory split (keys
from a plain forward hook) with an exact index, a random MLP memory, and the real ``evaluate`` (λ and T tuned)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.config import FactsConfig, PrepareConfig, RecallConfig, TrainLMConfig
from mlpmem.data.facts import load_probes
from mlpmem.data.prepare import prepare
from mlpmem.evaluate.recall import LINE_START, candidate_scores, chosen_probes, encode_rows, recall
from mlpmem.evaluate.run import evaluate
from mlpmem.inference.scoring_models import scoring_models
from mlpmem.lm.load import load_tokenizer, model_fingerprint, run_lm_dir
from mlpmem.memory_system import SystemName

from conftest import tiny_gpt2
from gen_inputs import evaluate_config, tiny_memory, write_datastore_and_index, write_memory

pytestmark = pytest.mark.numeric

FACTS = FactsConfig(n_people=6, n_memory_only=4, n_unseen=4, biographies_per_person=3, values_per_attribute=5)


def write_facts_run(run_dir: Path) -> Path:
    """prepare (facts), train-lm (tiny random GPT-2 + the run's tokenizer), datastore, index, memory, evaluate."""
    prep = prepare(PrepareConfig(run_dir=run_dir, corpus="facts", train_tokenizer=300, facts=FACTS))
    run = RunDir(run_dir)
    build = run.begin(
        "train-lm",
        TrainLMConfig(n_layer=2, n_head=2, n_embd=32, context=128, max_steps=1),
        {"prepare": prep.fingerprint},
    )
    lm = tiny_gpt2(vocab_size=prep.vocab_size, n_positions=128, seed=0)
    lm.save_pretrained(build.dir / "model")
    load_tokenizer(str(run_dir / "prepare" / "tokenizer")).save_pretrained(build.dir / "model")
    lm_manifest = build.complete(model_fingerprint=model_fingerprint(build.dir / "model"))

    write_datastore_and_index(run, lm, prep.fingerprint, lm_manifest, "memory")
    write_memory(run_dir, tiny_memory(lm_manifest.model_fingerprint, vocab_size=prep.vocab_size))
    evaluate(evaluate_config(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def facts_run(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_facts_run(tmp_path_factory.mktemp("recall") / "run")
    finally:
        torch.set_num_threads(before)


def brute_force(model, tokenizer, prompt: str, continuation: str) -> float:
    """One forward over the whole text; Σ log p of the tokens after the prompt's."""
    context = tokenizer(LINE_START + prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(LINE_START + prompt + continuation, add_special_tokens=False)["input_ids"]
    assert ids[: len(context)] == context and len(ids) > len(context)
    x = torch.tensor(ids)[None]
    with torch.inference_mode():
        log_p = torch.log_softmax(model(input_ids=x).logits.float(), -1)[0]  # [T, V]
    return sum(float(log_p[t - 1, ids[t]]) for t in range(len(context), len(ids)))


def test_candidate_log_probs_equal_one_forward_per_candidate(facts_run):
    probes = load_probes(facts_run)
    chosen = probes.probes[::3]  # every set and template, a third of the probes (brute force is slow)
    assert {(p.set, p.template) for p in chosen} == {
        (s, t) for s in ("seen", "memory-only", "unseen") for t in ("train", "held_out")
    }
    tokenizer = load_tokenizer(str(run_lm_dir(facts_run)))
    rows = encode_rows(tokenizer, probes, chosen)
    models = scoring_models(facts_run, "cpu")
    assert set(models) == {SystemName.BASE, SystemName.KNN_LM, SystemName.MLP_MEMORY, SystemName.MLP_MEMORY_KNN_LM}
    for name, model in models.items():
        got = candidate_scores(model, rows, [p.attribute for p in chosen], 7, torch.device("cpu"))
        want = np.array(
            [
                [brute_force(model, tokenizer, p.prompt, probes.separator + v) for v in probes.candidates[p.attribute]]
                for p in chosen
            ]
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=str(name))
        assert np.isfinite(got).all()


def naive_metrics(scores: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy, mean gold log-prob, confident-wrong rate and 10-bin ECE, one probe at a time."""
    correct, confidence, gold_lp = [], [], []
    for row, g in zip(scores, gold, strict=True):
        total = sum(math.exp(s) for s in row)
        probs = [math.exp(s) / total for s in row]
        best = max(range(len(row)), key=lambda i: row[i])
        correct.append(best == g)
        confidence.append(probs[best])
        gold_lp.append(row[g])
    n = len(gold)
    ece = 0.0
    for b in range(10):
        members = [i for i in range(n) if b / 10 <= confidence[i] < (b + 1) / 10 or (b == 9 and confidence[i] == 1)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return {
        "accuracy": sum(correct) / n,
        "gold_log_prob": sum(gold_lp) / n,
        "confident_wrong": sum(1 for c, p in zip(correct, confidence, strict=True) if not c and p > 0.5) / n,
        "ece": ece,
    }


def test_the_stage_metrics_equal_a_naive_recomputation(facts_run, capsys):
    config = RecallConfig(run_dir=facts_run, max_people=3, device="cpu")
    manifest = recall(config)
    probes = load_probes(facts_run)
    chosen = chosen_probes(probes, 3)
    people = {p.id: p for p in probes.people}
    for person_set in ("seen", "memory-only", "unseen"):  # the first three people of each set, every probe of theirs
        ids = [p.id for p in probes.people if p.set == person_set][:3]
        assert sorted({p.person for p in chosen if people[p.person].set == person_set}) == ids
    assert manifest.probes == len(chosen) == 3 * 3 * 6 * 2
    assert manifest.chance == pytest.approx(1 / FACTS.values_per_attribute)
    tokenizer = load_tokenizer(str(run_lm_dir(facts_run)))
    rows = encode_rows(tokenizer, probes, chosen)
    evaluated = RunDir(facts_run).require("evaluate")
    for row, (name, model) in zip(manifest.systems, scoring_models(facts_run, "cpu").items(), strict=True):
        assert row.name == name and row.lmbda == evaluated.system(name).lmbda
        scores = candidate_scores(model, rows, [p.attribute for p in chosen], 64, torch.device("cpu"))
        gold = np.array([probes.candidates[p.attribute].index(p.gold) for p in chosen])
        for key, cell in row.cells.items():
            mask = np.array([key in (p.set, f"{p.set}/{p.template}") for p in chosen])
            assert cell.probes == mask.sum()
            want = naive_metrics(scores[mask], gold[mask])
            for metric, value in want.items():
                assert getattr(cell, metric) == pytest.approx(value, abs=1e-9), (name, key, metric)
        assert set(row.cells) == {"seen", "memory-only", "unseen"} | {
            f"{s}/{t}" for s in ("seen", "memory-only", "unseen") for t in ("train", "held_out")
        }
    assert (facts_run / "recall" / "results.json").is_file()
    assert main(["recall", "--run-dir", str(facts_run), "--max-people", "3", "--device", "cpu"]) == 0  # reused
    out = capsys.readouterr().out
    assert "Knowledge recall (108 probes" in out
    for row in manifest.systems:
        assert any(line.startswith(f"{row.name} ") for line in out.splitlines()), out


def files(run_dir: Path) -> list[Path]:
    """Every path under a run but the run's lock file (held by any command, kept between them)."""
    return sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if not p.name.startswith(".lock"))


def test_a_run_without_a_facts_corpus_is_one_line_and_writes_nothing(tiny_run, capsys):
    before = files(tiny_run)
    assert main(["recall", "--run-dir", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not --corpus facts: it has no knowledge probes" in err, err
    assert files(tiny_run) == before


def test_a_facts_run_not_yet_evaluated_is_one_line_and_writes_nothing(facts_run, tmp_path, capsys):
    run_dir = Path(shutil.copytree(facts_run, tmp_path / "run"))
    shutil.rmtree(run_dir / "evaluate")
    shutil.rmtree(run_dir / "recall", ignore_errors=True)
    before = files(run_dir)
    assert main(["recall", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluate" in err, err
    assert files(run_dir) == before
