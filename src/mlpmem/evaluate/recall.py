"""``mlpmem recall``: knowledge recall on the synthetic-facts probes, for every system ``evaluate`` scored.

    mlpmem recall --run-dir runs/facts
    mlpmem run facts                     # prepare ... evaluate, then recall

For each probe (shared/DESIGN.md §10) every candidate value of its attribute is scored by its total log-prob (the
sum over the value's tokens, as lm-eval's multiple choice does, unnormalised by length) under each scoring model
of ``mlpmem.inference.scoring_models``: one per evaluate row, at the λ and T evaluate tuned on valid perplexity
(not on the probes). A prompt is read as the start of a line, after a newline, as a biography is in the token
stream; a candidate is ``ProbeSet.separator + value``, encoded apart from its prompt (lm-eval's split).

Per system, set of people (seen, memory-only, unseen) and template (train, held_out), with the candidate
distribution the softmax of the candidates' total log-probs:

- ``accuracy``: the gold value ranked first;
- ``gold_log_prob``: the mean total log-prob of the gold value (nats);
- ``confident_wrong``: the top candidate is not the gold value and has probability > 0.5. For unseen people the
  gold value is a draw no text states: any confident answer there is a hallucination, so this is the rate asked
  of them (reported for every set);
- ``ece``: expected calibration error of the top candidate's probability against its correctness, 10 equal-width
  bins, Σ_b n_b / N · |accuracy_b − confidence_b|.

Scoring: rows are (prompt, candidate) token lists grouped by total length, so a batch needs no padding and each
row is computed exactly as alone; only the last ``max candidate length + 1`` positions' logits are asked for
(``logits_to_keep``), so a mixture searches its index only there. Writes RUN/recall/results.json (the table
and its provenance); the manifest holds the same numbers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mlpmem.artifacts import Environment, RunDir, atomic_write_json
from mlpmem.config import RecallConfig
from mlpmem.data.facts import Probe, ProbeSet, load_probes
from mlpmem.devices import resolve_device
from mlpmem.manifests import RecallCell, RecallManifest, RecallRow
from mlpmem.progress import progress

RESULTS_FILE = "results.json"
LINE_START = "\n"  # what precedes a biography in the token stream
CONFIDENT = 0.5  # a top candidate above this probability is a confident answer
ECE_BINS = 10
SETS = ("seen", "memory-only", "unseen")
TEMPLATES = ("train", "held_out")


# probes and their token rows ------------------------------------------------------------------------------------
def chosen_probes(probes: ProbeSet, max_people: int | None) -> list[Probe]:
    """The probes of the first ``max_people`` people of each set (all when None), in file order."""
    if max_people is None:
        return list(probes.probes)
    kept: set[int] = set()
    for person_set in SETS:
        kept.update([p.id for p in probes.people if p.set == person_set][:max_people])
    return [p for p in probes.probes if p.person in kept]


@dataclass
class Rows:
    """Every (prompt, candidate) pair: ``contexts[p]`` the token ids of probe p's prompt, ``candidates[a]`` those of
    each candidate of attribute a, ``gold[p]`` the index of probe p's gold value among its candidates."""

    contexts: list[list[int]]
    candidates: dict[str, list[list[int]]]
    gold: np.ndarray  # [P]


def encode_rows(tokenizer, probes: ProbeSet, chosen: list[Probe]) -> Rows:
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    candidates = {a: [ids(probes.separator + v) for v in values] for a, values in probes.candidates.items()}
    contexts = [ids(LINE_START + p.prompt) for p in chosen]
    gold = np.array([probes.candidates[p.attribute].index(p.gold) for p in chosen], dtype=np.int64)
    return Rows(contexts, candidates, gold)


# scoring --------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def continuation_log_probs(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    batch_size: int,
    device: torch.device,
    desc: str = "recall",
) -> np.ndarray:
    """Σ log p(continuation tokens | context) [R] of each (context, continuation) pair (a non-empty context),
    under a model whose ``log_softmax(logits)`` are next-token log-probs. Pairs of one total length share a batch
    (no padding); float32."""
    out = np.zeros(len(pairs), dtype=np.float64)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (context, continuation) in enumerate(pairs):
        by_length[len(context) + len(continuation)].append(i)
    batches = [group[a : a + batch_size] for group in by_length.values() for a in range(0, len(group), batch_size)]
    for batch in progress(batches, desc=desc, unit="batch"):
        ids = torch.tensor([pairs[i][0] + pairs[i][1] for i in batch], device=device)  # [B, T]
        keep = max(len(pairs[i][1]) for i in batch) + 1
        logits = model(input_ids=ids, logits_to_keep=keep).logits[:, -keep:]  # [B, keep, V] (a model may give all T)
        log_p = torch.log_softmax(logits.float(), -1)[:, :-1]  # [B, keep - 1, V]: predicts the last keep - 1 tokens
        targets = ids[:, -(keep - 1) :]  # [B, keep - 1]
        picked = log_p.gather(-1, targets[..., None])[..., 0]  # [B, keep - 1]
        lengths = torch.tensor([len(pairs[i][1]) for i in batch], device=device)
        scored = torch.arange(keep - 1, device=device)[None] >= (keep - 1 - lengths)[:, None]  # the continuation's
        out[batch] = (picked.double() * scored).sum(-1).cpu().numpy()  # summed in float64
    return out


def candidate_scores(
    model: nn.Module, rows: Rows, attributes: list[str], batch_size: int, device: torch.device, desc: str = "recall"
) -> np.ndarray:
    """[P, C] total log-prob of every candidate of every probe (probes of one attribute count; C = the most
    candidates of an attribute, -inf past a probe's own)."""
    width = max(len(c) for c in rows.candidates.values())
    pairs, where = [], []
    for p, (context, attribute) in enumerate(zip(rows.contexts, attributes, strict=True)):
        for c, candidate in enumerate(rows.candidates[attribute]):
            pairs.append((context, candidate))
            where.append((p, c))
    scores = np.full((len(rows.contexts), width), -np.inf)
    flat = continuation_log_probs(model, pairs, batch_size, device, desc)
    index = np.array(where, dtype=np.int64).reshape(-1, 2)
    scores[index[:, 0], index[:, 1]] = flat
    return scores


# metrics --------------------------------------------------------------------------------------------------------
def recall_cell(scores: np.ndarray, gold: np.ndarray) -> RecallCell:
    """The metrics of probes with candidate scores [P, C] and gold indices [P] (see the module doc)."""
    shifted = scores - scores.max(1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)  # [P, C]
    top = scores.argmax(1)
    correct = top == gold
    confidence = probs.max(1)
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean())
        for b in range(ECE_BINS)
        if (bins == b).any()
    )
    return RecallCell(
        probes=len(gold),
        accuracy=float(correct.mean()),
        gold_log_prob=float(scores[np.arange(len(gold)), gold].mean()),
        confident_wrong=float(((confidence > CONFIDENT) & ~correct).mean()),
        ece=float(ece),
    )


def cells(scores: np.ndarray, gold: np.ndarray, chosen: list[Probe]) -> dict[str, RecallCell]:
    """One cell per set of people (both templates pooled, keyed ``SET``) and per set and template
    (``SET/TEMPLATE``) that has probes."""
    out = {}
    for person_set in SETS:
        in_set = np.array([p.set == person_set for p in chosen])
        if not in_set.any():
            continue
        out[person_set] = recall_cell(scores[in_set], gold[in_set])
        for template in TEMPLATES:
            mask = in_set & np.array([p.template == template for p in chosen])
            if mask.any():
                out[f"{person_set}/{template}"] = recall_cell(scores[mask], gold[mask])
    return out


# the stage ------------------------------------------------------------------------------------------------------
def recall(config: RecallConfig) -> RecallManifest:
    """Score every probe's candidates under every evaluated system; returns the complete recall manifest."""
    from mlpmem.inference.scoring_models import scoring_models
    from mlpmem.lm.load import load_tokenizer, run_lm_dir

    run = RunDir(config.run_dir)
    probes = load_probes(run.path)  # a run without a facts corpus is refused here, before anything is written
    evaluated = run.require("evaluate")
    inputs = {"prepare": run.require("prepare").fingerprint, "evaluate": evaluated.fingerprint}
    if (done := run.reusable("recall", config, inputs)) is not None:
        return done
    chosen = chosen_probes(probes, config.max_people)
    device = resolve_device(config.device)
    models = scoring_models(run.path, device)
    rows = encode_rows(load_tokenizer(str(run_lm_dir(run.path))), probes, chosen)
    attributes = [p.attribute for p in chosen]
    build = run.begin("recall", config, inputs)
    systems = []
    for name, model in models.items():
        scores = candidate_scores(model, rows, attributes, config.batch_size, device, desc=f"recall {name}")
        tuned = evaluated.system(name)
        systems.append(
            RecallRow(
                name=name,
                lmbda=tuned.lmbda if tuned else None,
                weights=tuned.weights if tuned else None,
                temperature=tuned.temperature if tuned else None,
                cells=cells(scores, rows.gold, chosen),
            )
        )
    fields = dict(
        probes=len(chosen),
        chance=float(np.mean([1 / len(probes.candidates[p.attribute]) for p in chosen])),
        tuned_on=evaluated.tuned_on,
        systems=systems,
    )
    results = {
        **{k: v for k, v in fields.items() if k != "systems"},
        "systems": [s.model_dump(mode="json") for s in systems],
        "weights_from": "evaluate (λ and T tuned on its split's perplexity, not on the probes)",
        "config": config.model_dump(mode="json"),
        "provenance": Environment.current().model_dump(),
    }
    atomic_write_json(build.dir / RESULTS_FILE, results)
    return build.complete(**fields)


# the table ------------------------------------------------------------------------------------------------------
COLUMNS = (("seen/train", "seen"), ("seen/held_out", "seen h-o"), ("memory-only", "mem-only"), ("unseen", "unseen"))


def format_recall(manifest: RecallManifest) -> str:
    """Rows: systems; columns: accuracy on seen people (train and held-out templates), memory-only and unseen
    people (both templates), then the unseen people's confident-wrong rate and calibration error."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    head = f"{'system':<20}" + "".join(f" {label:>9}" for _, label in COLUMNS) + f" {'conf-wrong':>10} {'ECE':>6}"
    lines = [
        f"Knowledge recall ({manifest.probes:,} probes; accuracy, chance {manifest.chance:.3f}; λ and T as tuned on "
        f"{manifest.tuned_on or '-'} perplexity by evaluate; unseen: confident-wrong rate and ECE):",
        head,
    ]
    for row in manifest.systems:
        accuracy = "".join(f" {fmt(c.accuracy if (c := row.cells.get(key)) else None):>9}" for key, _ in COLUMNS)
        unseen = row.cells.get("unseen")
        wrong, ece = (unseen.confident_wrong, unseen.ece) if unseen else (None, None)
        lines.append(f"{row.name:<20}{accuracy} {fmt(wrong):>10} {fmt(ece):>6}")
    return "\n".join(lines)


def print_recall(manifest: RecallManifest, config: Any = None) -> None:
    """``mlpmem recall``'s terminal output: the table and where the results were written."""
    print(format_recall(manifest))
    if config is not None:
        print(f"results: {Path(config.run_dir) / 'recall' / RESULTS_FILE}")
