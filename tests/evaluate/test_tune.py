"""λ / T tuning on small grids against hand-computed perplexities: chosen on valid, applied to test, ties, the
combined system. Probabilities are chosen so every expected value is a short fraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlpmem.artifacts import Environment
from mlpmem.config import EvaluateConfig
from mlpmem.errors import UsageError
from mlpmem.evaluate.report import format_results
from mlpmem.evaluate.run import summarise
from mlpmem.evaluate.tune import (
    beyond_edges,
    mixed_perplexity,
    on_edge,
    pair_on_edge,
    perplexity,
    tune_knn,
    tune_lambda,
    tune_pair,
)
from mlpmem.manifests import EvaluateManifest
from mlpmem.memory_system import SystemName

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def logs(*p: float) -> np.ndarray:
    return np.log(np.asarray(p, dtype=np.float64))


def test_perplexity_and_mixture_by_hand():
    assert perplexity(logs(0.5, 0.125)) == pytest.approx(4.0)  # exp(-(ln 1/2 + ln 1/8) / 2) = sqrt(16)
    # 0.75·0.2 + 0.25·0.6 = 0.3 and 0.75·0.4 + 0.25·0.8 = 0.5 -> 1/sqrt(0.15)
    assert mixed_perplexity([logs(0.2, 0.4), logs(0.6, 0.8)], [0.75, 0.25]) == pytest.approx(1 / math.sqrt(0.15))


def test_tune_lambda_picks_the_best_grid_point_and_returns_the_curve():
    # two positions pulling apart: (0.8 - 0.6λ)(0.1 + 0.6λ) peaks at λ = 7/12; the grid's best is 0.5
    lmbda, curve = tune_lambda(logs(0.8, 0.1), logs(0.2, 0.7), [0.25, 0.5, 0.75])
    assert lmbda == 0.5 and curve[0.5] == pytest.approx(1 / math.sqrt(0.5 * 0.4))
    assert sorted(curve) == [0.25, 0.5, 0.75] and not on_edge(curve, lmbda)  # interior: nothing added


def test_an_edge_optimum_extends_the_grid_until_interior_or_at_one():
    # the same peak at 7/12 from a grid that stops below it: steps of 0.1 up to 0.7, where PPL rises again
    lmbda, curve = tune_lambda(logs(0.8, 0.1), logs(0.2, 0.7), [0.1, 0.2])
    assert sorted(curve) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert lmbda == pytest.approx(0.6) and not on_edge(curve, lmbda)
    assert curve[lmbda] == pytest.approx(1 / math.sqrt(0.44 * 0.46))  # (0.8 - 0.36)(0.1 + 0.36)
    # one position, PPL(λ) = 1 / (0.2 + 0.4 λ) falls all the way: the search stops at 1, flagged as an edge
    lmbda, curve = tune_lambda(logs(0.2), logs(0.6), [0.25, 0.5, 0.75])
    assert lmbda == 1.0 and on_edge(curve, lmbda) and curve[1.0] == pytest.approx(1 / 0.6)
    # a useless component: down to 0, the LM alone
    lmbda, curve = tune_lambda(logs(0.6), logs(0.2), [0.3, 0.5])
    assert sorted(curve) == pytest.approx([0.0, 0.1, 0.3, 0.5]) and lmbda == 0.0 and on_edge(curve, lmbda)
    assert beyond_edges([0.5], [0.5]) == [0.6, 0.4] and beyond_edges([0.0, 1.0], [1.0, 0.0]) == []


def test_ties_go_to_the_smaller_lambda_whatever_the_grid_order():
    lm, other = logs(0.2, 0.6), logs(0.6, 0.2)  # λ and 1 - λ give the same two mixed probabilities, swapped
    lmbda, curve = tune_lambda(lm, other, [0.75, 0.25])
    assert curve[0.75] == curve[0.25] and lmbda == 0.25
    same = logs(0.3, 0.4)  # a component equal to the LM: every λ ties
    assert tune_lambda(same, same.copy(), [0.5, 0.1, 0.3])[0] == 0.0  # the edge 0.1 extends to 0


def test_tune_knn_chooses_temperature_and_lambda_together():
    lm = logs(0.25)
    knn = np.stack([logs(0.25), logs(0.75), logs(0.5)], axis=1)  # [1 position, 3 temperatures]
    t, lmbda, curve = tune_knn(lm, knn, [1.0, 5.0, 10.0], [0.25, 0.5])
    assert (t, lmbda) == (1, 0.99)  # T = 5 (p 0.75 against the LM's 0.25): λ grows to its top, 0.99 for kNN-LM
    top = 0.25 * 0.01 + 0.75 * 0.99  # the LM keeps 1%: a token no neighbour holds stays possible
    assert curve == pytest.approx({0.25: 1 / 0.375, 0.5: 1 / 0.5, 0.75: 1 / 0.625, 0.99: 1 / top})
    tied = np.stack([logs(0.75), logs(0.75)], axis=1)  # equal columns: the earlier T of the grid
    assert tune_knn(lm, tied, [10.0, 1.0], [0.5])[0] == 0


def test_tune_pair_respects_the_sum_below_one_and_beats_the_lm_alone():
    lm, a, b = logs(0.1), logs(0.5), logs(0.9)
    (la, lb), curve = tune_pair(lm, a, b, [0.2, 0.4, 0.6])
    # p = 0.1 + 0.4 la + 0.8 lb: the grid's best (0.2, 0.6) sits on both edges, so the grid grows to 0 .. 1 in
    # steps of 0.2; (0.2, 0.8) would give 0.82 but sums to 1: excluded; (0, 0.8) gives 0.74, λ_a on the 0 edge
    assert (la, lb) == (0.0, 0.8) and curve[(la, lb)] == pytest.approx(1 / 0.74) and (0.2, 0.8) not in curve
    assert pair_on_edge((la, lb), curve)
    worse = logs(0.05)
    (la, lb), curve = tune_pair(lm, worse, worse, [0.2, 0.4])
    assert (la, lb) == (0.0, 0.0) and curve[(0.0, 0.0)] == pytest.approx(10.0)  # nothing beats the LM alone
    # equal components: every pair summing to 0.75 ties at the best (the grid grows to 0 .. 1 by 0.25); the
    # smallest λ_a wins
    assert tune_pair(lm, a, a.copy(), [0.5, 0.25])[0] == (0.0, 0.75)
    # an interior pair: two positions where each component helps one of them
    (la, lb), curve = tune_pair(logs(0.1, 0.1), logs(0.9, 0.1), logs(0.1, 0.9), [0.3, 0.4, 0.5])
    assert (la, lb) == (0.4, 0.5) and not pair_on_edge((la, lb), curve)  # (0.5, 0.5) sums to 1; 0.6 was tried
    assert curve[(0.4, 0.5)] == pytest.approx(1 / math.sqrt(0.42 * 0.5)) and (0.3, 0.6) in curve


def test_summarise_tunes_on_valid_and_applies_to_test():
    # valid favours λ = 1 (after extending the grid) for the memory and T = 2 for kNN; test would favour others
    parts = {
        "valid": {
            SystemName.BASE: logs(0.2),
            SystemName.MLP_MEMORY: logs(0.6),
            SystemName.KNN_LM: np.stack([logs(0.1), logs(0.8)], axis=1),
        },
        "test": {
            SystemName.BASE: logs(0.5),
            SystemName.MLP_MEMORY: logs(0.1),
            SystemName.KNN_LM: np.stack([logs(0.9), logs(0.3)], axis=1),
        },
    }
    config = EvaluateConfig(knn_temperatures=[1.0, 2.0], lmbdas=[0.25, 0.5])
    systems, tuned_on, curves = summarise(parts, config)
    by_name = {s.name: s for s in systems}
    assert tuned_on == "valid" and [s.name for s in systems] == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    base = by_name["base"]
    assert (base.valid_ppl, base.test_ppl) == (pytest.approx(5.0), pytest.approx(2.0))
    knn = by_name["knn-lm"]  # valid: T = 2 (p 0.8), λ = 0.99 (kNN-LM's top); applied to test's T = 2 column (0.3)
    assert (knn.temperature, knn.lmbda, knn.edges) == (2.0, 0.99, ["lambda", "T"])
    assert knn.valid_ppl == pytest.approx(1 / (0.002 + 0.792)) and knn.test_ppl == pytest.approx(1 / (0.005 + 0.297))
    mem = by_name["mlp-memory"]  # valid: λ = 1 -> 0.6; test: 0.1
    assert (mem.lmbda, mem.edges) == (1.0, ["lambda"])
    assert mem.valid_ppl == pytest.approx(1 / 0.6) and mem.test_ppl == pytest.approx(10.0)
    both = by_name["mlp-memory+knn-lm"]  # p = 0.2(1 - a - b) + 0.6a + 0.8b on the grid 0 .. 1 by 0.25, a + b < 1:
    # (0, 0.75) gives 0.65, (0.25, 0.5) 0.6; test: 0.5·0.25 + 0.3·0.75 = 0.35
    assert both.weights == {"mlp-memory": 0.0, "knn-lm": 0.75} and both.lmbda == 0.75 and both.temperature == 2.0
    assert both.valid_ppl == pytest.approx(1 / 0.65) and both.test_ppl == pytest.approx(1 / 0.35)
    assert both.edges == ["lambda"]
    assert curves["mlp-memory"] == pytest.approx({0.25: 1 / 0.3, 0.5: 1 / 0.4, 0.75: 1 / 0.5, 1.0: 1 / 0.6})
    assert curves["knn-lm"] == pytest.approx({0.25: 1 / 0.35, 0.5: 1 / 0.5, 0.75: 1 / 0.65, 0.99: 1 / 0.794})


def test_tuning_on_test_is_refused_unless_asked_and_then_marked():
    only_test = {"test": {SystemName.BASE: logs(0.5), SystemName.MLP_MEMORY: logs(0.25)}}
    with pytest.raises(UsageError, match="tuned on valid, which is not scored.*--tune-on test") as err:
        summarise(only_test, EvaluateConfig(lmbdas=[0.5]))
    assert err.value.field == "tune_on"
    systems, tuned_on, _ = summarise(only_test, EvaluateConfig(lmbdas=[0.5], tune_on="test"))
    assert tuned_on == "test" and systems[1].lmbda == 0.0 and systems[1].valid_ppl is None  # 0.5 -> 0.4 -> .. -> 0
    manifest = EvaluateManifest(
        stage="evaluate",
        config=EvaluateConfig(),
        environment=Environment.current(),
        tuned_on="test",
        tokens={"test": 1},
        systems=systems,
    )
    text = format_results(manifest)
    assert "λ and T tuned on test" in text and "test PPL is NOT held out" in text and "^" in text
    base_only, tuned_on, _ = summarise(
        {"test": {SystemName.BASE: logs(0.5)}}, EvaluateConfig()
    )  # nothing to tune: scored
    assert tuned_on is None and base_only[0].test_ppl == pytest.approx(2.0)
    with pytest.raises(UsageError, match="base's test perplexity is inf"):
        summarise({"test": {SystemName.BASE: np.array([-np.inf, 0.0])}}, EvaluateConfig())
