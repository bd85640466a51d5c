"""``scoring_models``: one HF causal LM per evaluate row. Over one window, each model's log-prob of every gold
token equals evaluate's own per-position log-prob of that row (its components from evaluate's sliding-window
scoring, mixed with the tuned weights and T by ``mix_log_probs``). Compared in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpmem.artifacts import RunDir
from mlpmem.evaluate.run import evaluate, plan_evaluation, score_split, survey_evaluation
from mlpmem.inference.mixing import mix_log_probs
from mlpmem.inference.scoring_models import scoring_models
from mlpmem.memory_system import SystemName

from gen_inputs import evaluate_config, generation_run, generation_run_template  # noqa: F401

pytestmark = pytest.mark.numeric


def row_log_probs(row, parts: dict, temperatures: list[float]) -> np.ndarray:
    """evaluate's per-position log p(gold) [N] of one row, from its components' scores."""
    weights = row.weights or ({row.name: row.lmbda} if row.name != SystemName.BASE else {})
    comps = [torch.from_numpy(parts[SystemName.BASE])]
    for name in weights:
        values = parts[name]
        if values.ndim == 2:  # the temperature grid: the tuned T's column
            values = values[:, temperatures.index(row.temperature)]
        comps.append(torch.from_numpy(np.ascontiguousarray(values)))
    lm_weight = 1.0
    for w in weights.values():
        lm_weight -= w
    return mix_log_probs(comps, [lm_weight, *weights.values()]).numpy()


def test_each_rows_model_gives_evaluates_log_probs_on_one_window(generation_run):  # noqa: F811
    config = evaluate_config(generation_run)
    manifest = evaluate(config)
    models = scoring_models(generation_run)
    rows = {s.name: s for s in manifest.systems}
    assert (
        set(models)
        == {
            SystemName.BASE,
            SystemName.KNN_LM,
            SystemName.MLP_MEMORY,
            SystemName.MLP_MEMORY_KNN_LM,
        }
        == set(rows)
    )
    # one window of 32 tokens: every position but the first is scored, in order
    one = config.model_copy(update={"stride": config.context, "splits": ["valid"], "tune_on": "valid"})
    run = RunDir(generation_run)
    plan = plan_evaluation(one, run, survey_evaluation(one, run))
    tokens = run.array("prepare", "valid")[: one.context]
    parts = score_split(plan, tokens, one, "valid")
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))[None]  # [1, 32]
    for name, model in models.items():
        with torch.inference_mode():
            log_p = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]  # [31, V]
        got = log_p.gather(-1, ids[0, 1:, None])[:, 0].numpy()
        want = row_log_probs(rows[name], parts, config.knn_temperatures)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=str(name))
    assert rows[SystemName.MLP_MEMORY_KNN_LM].weights  # the mixture row really mixes two components
