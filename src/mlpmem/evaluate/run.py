"""``mlpmem evaluate``: perplexity of the base LM, kNN-LM, MLP memory and memory + kNN-LM on the same tokens.

    mlpmem evaluate --run-dir runs/demo
    mlpmem evaluate --model gpt2 --corpus wikitext-2 --context 1024 --stride 512
    accelerate launch --multi_gpu --num_processes N -m mlpmem.cli evaluate --run-dir RUN   # windows by rank

λ (and the kNN temperature T) are tuned on valid over a grid and applied to test; the tuned values are recorded
in the evaluate manifest (``EvaluateManifest.systems``), where ``generate`` reads them. Also writes
RUN/evaluate/results.json and lambda.png for people.

Numbers that look good and are wrong are refused: scoring kNN-LM or the memory on the split their datastore was
built from (unless ``--allow-overlap``, then marked), and tuning on test (unless ``--tune-on test``, then
marked); a λ on the edge of its grid is searched beyond it, and an edge optimum is flagged.

Steps: ``survey`` (inputs found from manifests: a complete stage is reused without loading anything) → ``plan``
(every input loaded and checked: nothing is touched before this passes) → ``score_split``
(one LM pass per split, keys of the datastore's and the memory's layers from the same forward) →
``summarise`` (tune on valid, apply to every split) → outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from mlpmem.artifacts import Environment, RunDir, atomic_write_json
from mlpmem.config import EvaluateConfig
from mlpmem.data.corpus import load_corpus
from mlpmem.data.prepare import encode, vocab_fingerprint
from mlpmem.devices import resolve_device
from mlpmem.distributed import begin_shared, gather_to_main, process_state
from mlpmem.errors import UsageError
from mlpmem.evaluate.report import plot_lambda_curves
from mlpmem.evaluate.scoring import score_tokens
from mlpmem.evaluate.tune import (
    mixed_perplexity,
    on_edge,
    pair_on_edge,
    perplexity,
    tune_knn,
    tune_lambda,
    tune_pair,
)
from mlpmem.lm.load import load_lm, load_tokenizer, max_positions, model_fingerprint, require_model, run_lm_dir
from mlpmem.manifests import EvaluateManifest, SystemResult
from mlpmem.memory_system import MemorySystem, ResultRow, SystemEvaluation, SystemName
from mlpmem.systems import SYSTEMS, component_labels, key_components

RESULTS_FILE = "results.json"
PLOT_FILE = "lambda.png"


# planning: every input found, loaded and checked before the stage folder is touched -------------------------
@dataclass
class Sources:
    """The LM and the tokens to score: model path or id, fingerprints, token ids per split."""

    model_path: str
    model_fp: str
    tokenizer_fp: str
    tokens: dict[str, np.ndarray]
    inputs: dict[str, str]  # fingerprints recorded as the stage's inputs
    trained_context: int | None = None  # the run's LM's training window, when it is the LM evaluated


@dataclass
class Plan:
    """What ``evaluate`` scores, all checked: the LM, window sizes, the registered systems taking part."""

    sources: Sources
    lm: PreTrainedModel
    context: int
    stride: int
    systems: list[SystemEvaluation] = field(default_factory=list)  # the registered systems taking part
    overlap: str | None = None  # an evaluated split the datastore (and the memory) were built from
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> dict[SystemName, object]:
        """Every component on the LM's keys (``mlpmem.memory_system.Component``), by name."""
        return {name: c for system in self.systems for name, c in system.components.items()}

    @property
    def key_layers(self) -> list[str]:
        return list(dict.fromkeys(c.layer for c in self.components.values()))


def resolve_sources(config: EvaluateConfig, run: RunDir) -> Sources:
    """The model to evaluate (``--model`` or the run's LM) and the tokens of each split (``--corpus`` or the run's)."""
    if config.model is not None:
        model_path, model_fp = require_model(config.model), model_fingerprint(config.model)
        trained_context = None
    else:
        lm = run.require("train-lm")
        model_path, model_fp, trained_context = str(run_lm_dir(run.path)), lm.model_fingerprint, lm.config.context
    if config.corpus is not None:
        tokenizer = load_tokenizer(model_path)
        corpus = load_corpus(config.corpus)
        tokens = {s: encode(tokenizer, corpus.splits[s], s) for s in config.splits}
        tokenizer_fp = vocab_fingerprint(tokenizer)
        return Sources(
            model_path, model_fp, tokenizer_fp, tokens, {"model": model_fp, "tokenizer": tokenizer_fp}, trained_context
        )
    prepare = run.require("prepare")
    if config.model is not None and vocab_fingerprint(load_tokenizer(config.model)) != prepare.tokenizer_fingerprint:
        raise UsageError(
            f"{run.path} was prepared with another tokenizer than {config.model}'s; pass --corpus or use a matching run"
        )
    tokens = {s: run.array("prepare", s, prepare) for s in config.splits}
    inputs = {"model": model_fp, "tokenizer": prepare.tokenizer_fingerprint, "prepare": prepare.fingerprint}
    return Sources(model_path, model_fp, prepare.tokenizer_fingerprint, tokens, inputs, trained_context)


def optional_stage(run: RunDir, stage: str):
    """A stage's complete, current manifest; None when it was never built (a broken or stale one is refused)."""
    return run.require(stage) if run.complete(stage) is not None else None


def window_sizes(config: EvaluateConfig, sources: Sources, lm: PreTrainedModel) -> tuple[int, int]:
    """(context, stride), checked against the model's positions and the number of tokens of every split."""
    positions = max_positions(lm)
    context = config.context or sources.trained_context or positions or 1024
    if positions is not None and context > positions:
        raise UsageError(f"context {context} exceeds the model's {positions} positions", field="context")
    stride = config.stride or max(1, context // 2)
    if stride > context:
        raise UsageError(f"stride {stride} must not exceed the context ({context})", field="stride")
    for split, tokens in sources.tokens.items():
        n = min(len(tokens), config.max_tokens or len(tokens))
        if n < 2:
            raise UsageError(f"the {split} split has {n} token(s); scoring needs at least 2")
    return context, stride


@dataclass
class Survey:
    """What ``evaluate`` will score, found from manifests alone (no weights loaded): the sources, which systems,
    an overlap allowed by ``--allow-overlap``, and the stage's inputs (the fingerprints of everything it reads)."""

    sources: Sources
    overlap: str | None
    inputs: dict[str, str]
    systems: list[MemorySystem] = field(default_factory=list)  # the registered systems the run has


def survey_evaluation(config: EvaluateConfig, run: RunDir) -> Survey:
    """The cheap half of the checks: everything decided from manifests, before any weights are loaded."""
    if not config.splits:
        raise UsageError("no split to score", field="splits")
    sources = resolve_sources(config, run)
    systems = {system: system.evaluation_inputs(config, run, sources.model_fp) for system in SYSTEMS}
    systems = {system: inputs for system, inputs in systems.items() if inputs is not None}
    mixed = [system for system in systems if system.key_components]  # mixed with the LM: weights tuned
    tuning_split(config, config.splits, tunes=bool(mixed))
    overlap = check_overlap(config, run, mixed)
    inputs = dict(sources.inputs)
    for system_inputs in systems.values():
        inputs.update(system_inputs)
    return Survey(sources, overlap, inputs, list(systems))


def plan_evaluation(config: EvaluateConfig, run: RunDir, survey: Survey, device=None) -> Plan:
    """Load and check the LM, memory and retriever the survey found (UsageError, one line, on the first problem)."""
    device = device or resolve_device(config.device)
    lm = load_lm(survey.sources.model_path, device)
    context, stride = window_sizes(config, survey.sources, lm)
    plan = Plan(survey.sources, lm, context, stride, overlap=survey.overlap, inputs=survey.inputs)
    model_fp = survey.sources.model_fp
    plan.systems = [system.open_evaluation(config, run, device, lm, model_fp) for system in survey.systems]
    return plan


def check_overlap(config: EvaluateConfig, run: RunDir, systems: list[MemorySystem]) -> str | None:
    """The evaluated split the run's datastore (and so its memory) was built from, when ``--allow-overlap`` lets it
    be scored; UsageError otherwise. None when the splits are disjoint (or no system was built from one)."""
    built = [split for system in systems if (split := system.built_from(run)) is not None]
    if not built or built[0] not in config.splits:
        return None
    split = built[0]
    if not config.allow_overlap:
        raise UsageError(
            f"the datastore (and the memory trained on it) was built from the {split} split being evaluated: "
            f"kNN-LM and memory numbers there are recall, not held-out perplexity; score other splits "
            f"(--splits) or pass --allow-overlap to have them marked",
            field="splits",
        )
    return split


def tuning_split(config: EvaluateConfig, splits: list[str], tunes: bool) -> str | None:
    """The split λ and T are tuned on (None when nothing is tuned); UsageError when it is not scored."""
    if not tunes:
        return None
    if config.tune_on not in splits:
        raise UsageError(
            f"λ and T are tuned on {config.tune_on}, which is not scored; add it to --splits"
            + (
                " (or pass --tune-on test: the test numbers are then not held out)" if config.tune_on == "valid" else ""
            ),
            field="tune_on",
        )
    return config.tune_on


# scoring ------------------------------------------------------------------------------------------------------
def score_split(
    plan: Plan, tokens: np.ndarray, config: EvaluateConfig, split: str, state=None
) -> dict[str, np.ndarray] | None:
    """log p(gold) per scored position of one split: ``base`` [N], each component on the LM's keys (``mlp-memory``
    [N], ``knn-lm`` [N, len(T grid)]), and each registered system's own components [N].

    Under a launch of several processes each scores its block of windows and the main process gets them all, in
    order (the other ranks get None)."""
    tokens = tokens[: config.max_tokens] if config.max_tokens else tokens
    share = (state.process_index, state.num_processes) if state is not None else (0, 1)
    scored = score_tokens(
        plan.lm, tokens, plan.context, plan.stride, config.batch_size, plan.key_layers, f"evaluate {split}", share
    )
    parts = {SystemName.BASE: scored.lm_log_prob}
    for name, component in plan.components.items():
        parts[name] = component.gold_log_probs(scored.keys[component.layer], scored.gold)
    if share[1] > 1:
        shares = gather_to_main(parts, state)
        if shares is None:
            return None
        parts = {name: np.concatenate([p[name] for p in shares]) for name in parts}
    for system in plan.systems:  # the registered systems' rows: the whole split, on the main process
        parts.update(system_parts(system, plan, tokens, config, split))
    check_scores(parts, split)
    return parts


def system_parts(
    system: SystemEvaluation, plan: Plan, tokens: np.ndarray, config: EvaluateConfig, split: str
) -> dict[SystemName, np.ndarray]:
    """log p(gold) [N] of a registered system's components: its own scoring, then its plain LMs through the
    shared sliding-window core."""
    parts = system.score(tokens, plan.context, plan.stride, split)
    for name, lm in system.plain_lms.items():
        parts[name] = score_tokens(lm, tokens, plan.context, plan.stride, config.batch_size, desc=name).lm_log_prob
    return parts


COMPONENT_NAMES = {SystemName.BASE: "the LM", **component_labels()}


def check_scores(parts: dict[str, np.ndarray], split: str) -> None:
    """NaN anywhere, or a non-finite LM log-prob, is refused (a component on the LM's keys may give -inf: kNN-LM
    when the gold token is not retrieved)."""
    on_keys = key_components()
    for name, values in parts.items():
        bad = int(np.isnan(values).sum()) if name in on_keys else int((~np.isfinite(values)).sum())
        if bad:
            raise UsageError(
                f"{COMPONENT_NAMES[name]} gives {bad:,} non-finite log-probabilities on {split} "
                "(diverged or damaged weights?); retrain it or leave it out"
            )


# tuning on valid, applied to every split -----------------------------------------------------------------------
Parts = dict[str, dict[str, np.ndarray]]


def split_ppls(parts: Parts, components: list[str], weights: list[float]) -> dict[str, float]:
    """``{split}_ppl`` of the mixture Σ w_i p_i on every split."""
    return {f"{split}_ppl": mixed_perplexity([p[c] for c in components], weights) for split, p in parts.items()}


def base_system(parts: Parts) -> SystemResult:
    return SystemResult(
        name=SystemName.BASE, **{f"{split}_ppl": perplexity(p[SystemName.BASE]) for split, p in parts.items()}
    )


def summarise(
    parts: Parts, config: EvaluateConfig
) -> tuple[list[SystemResult], str | None, dict[str, dict[float, float]]]:
    """Every row, the registered systems' in registry order, with λ (and T) tuned on ``config.tune_on`` and applied
    to every split; the split tuned on (None when only the base LM was scored); PPL on the tuning split against λ
    per mixture row."""
    first = next(iter(parts.values()))
    tuned_on = tuning_split(config, list(parts), tunes=bool(set(first) & key_components()))
    systems, curves, chosen = [base_system(parts)], {}, {}
    for system in SYSTEMS:
        for row in system.result_rows(set(first), tuned_on):
            result, parts = result_row(row, parts, tuned_on, config, curves, chosen)
            systems.append(result)
    check_systems(systems)
    return systems, tuned_on, curves


def result_row(
    row: ResultRow,
    parts: Parts,
    tuned_on: str | None,
    config: EvaluateConfig,
    curves: dict[str, dict],
    chosen: dict[SystemName, float],
) -> tuple[SystemResult, Parts]:
    """One row: a component's perplexity, or ``row.part`` mixed with one component (λ tuned on ``tuned_on``; over
    its temperature grid too when it has one: T chosen, the parts keep that column from then on) or two (both
    weights tuned, at the T already chosen). The λ curve goes to ``curves[row.name]``, a chosen T to ``chosen``."""
    if not row.mixed_with:
        return SystemResult(name=row.name, **{f"{s}_ppl": perplexity(p[row.part]) for s, p in parts.items()}), parts
    tune = parts[tuned_on]
    if len(row.mixed_with) == 2:
        a, b = row.mixed_with
        (la, lb), curve = tune_pair(tune[row.part], tune[a], tune[b], config.lmbdas)
        ppls = split_ppls(parts, [row.part, a, b], [1 - la - lb, la, lb])
        result = SystemResult(
            name=row.name,
            lmbda=round(la + lb, 6),
            weights={a: la, b: lb},
            temperature=next((chosen[c] for c in row.mixed_with if c in chosen), None),
            edges=["lambda"] * pair_on_edge((la, lb), curve),
            **ppls,
        )
        return result, parts
    (other,) = row.mixed_with
    if tune[other].ndim == 1:
        lmbda, curves[row.name] = tune_lambda(tune[row.part], tune[other], config.lmbdas)
        mixed = split_ppls(parts, [row.part, other], [1 - lmbda, lmbda])
        edges = ["lambda"] * on_edge(curves[row.name], lmbda)
        return SystemResult(name=row.name, lmbda=lmbda, edges=edges, **mixed), parts
    t, lmbda, curves[row.name] = tune_knn(tune[row.part], tune[other], config.knn_temperatures, config.lmbdas)
    parts = {split: {**p, other: p[other][:, t]} for split, p in parts.items()}
    temperature = chosen[other] = config.knn_temperatures[t]
    searched_t = len(set(config.knn_temperatures)) > 1
    flags = (
        ("lambda", on_edge(curves[row.name], lmbda)),
        ("T", searched_t and on_edge(config.knn_temperatures, temperature)),
    )
    edges = [name for name, flagged in flags if flagged]
    mixed = split_ppls(parts, [row.part, other], [1 - lmbda, lmbda])
    return SystemResult(name=row.name, lmbda=lmbda, temperature=temperature, edges=edges, **mixed), parts


def check_systems(systems: list[SystemResult]) -> None:
    """A perplexity that is not finite is an error, never a printed ``nan``."""
    for s in systems:
        for split, value in (("valid", s.valid_ppl), ("test", s.test_ppl)):
            if value is not None and not math.isfinite(value):
                raise UsageError(
                    f"{s.name}'s {split} perplexity is {value} (non-finite scores); check the model and memory weights"
                )


# the stage ------------------------------------------------------------------------------------------------------
def evaluate(config: EvaluateConfig) -> EvaluateManifest:
    """Score, tune on valid, apply to test; returns the complete evaluate manifest (tuned λ/T in ``systems``)."""
    run = RunDir(config.run_dir)
    survey = survey_evaluation(config, run)
    if (done := run.reusable("evaluate", config, survey.inputs)) is not None:
        return done  # nothing loaded
    state, device = process_state(config.device)
    plan = plan_evaluation(config, run, survey, device)
    build = begin_shared(run, "evaluate", config, plan.inputs, state)
    parts = {split: score_split(plan, tokens, config, split, state) for split, tokens in plan.sources.tokens.items()}
    if state.is_main_process:
        finish(build, plan, parts, config)
    state.wait_for_everyone()
    return run.require("evaluate")


def finish(build, plan: Plan, parts: Parts, config: EvaluateConfig) -> None:
    """Tune on valid, apply to every split, write the outputs and complete the stage (the main process)."""
    systems, tuned_on, curves = summarise(parts, config)
    fields = dict(
        model=plan.sources.model_path,
        context=plan.context,
        stride=plan.stride,
        tokens={split: int(len(p[SystemName.BASE])) for split, p in parts.items()},
        tuned_on=tuned_on,
        overlap=plan.overlap,
        systems=systems,
        lambda_curves={name: {str(x): y for x, y in c.items() if math.isfinite(y)} for name, c in curves.items()},
        memory_mass=None,
    )
    for system in plan.systems:
        fields.update(system.manifest_fields())
    write_outputs(build.dir, fields, curves, config)
    build.complete(**fields)


def write_outputs(folder: Path, fields: dict, curves: dict[str, dict[float, float]], config: EvaluateConfig) -> None:
    """results.json (the table with its provenance) and lambda.png, for people; the manifest holds the same values."""
    results = {
        "systems": [s.model_dump(mode="json") for s in fields["systems"]],
        **{k: v for k, v in fields.items() if k != "systems"},
        "config": config.model_dump(mode="json"),
        "provenance": Environment.current().model_dump(),
    }
    atomic_write_json(folder / RESULTS_FILE, results)
    if curves and fields["tuned_on"]:
        base = fields["systems"][0]
        finite = {name: {x: y for x, y in c.items() if math.isfinite(y)} for name, c in curves.items()}
        plot_lambda_curves(finite, getattr(base, f"{fields['tuned_on']}_ppl"), folder / PLOT_FILE)
