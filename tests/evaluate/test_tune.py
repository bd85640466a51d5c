"""λ / T tuning on small grids against hand-computed perplexities: chosen on valid, applied to test, ties, the
combined system. Probabilities are chosen so every expected value is a short fraction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlpmem.config import EvaluateConfig
from mlpmem.errors import UsageError
from mlpmem.evaluate.run import summarise
from mlpmem.evaluate.tune import mixed_perplexity, perplexity, tune_knn, tune_lambda, tune_pair


def logs(*p: float) -> np.ndarray:
    return np.log(np.asarray(p, dtype=np.float64))


def test_perplexity_and_mixture_by_hand():
    assert perplexity(logs(0.5, 0.125)) == pytest.approx(4.0)  # exp(-(ln 1/2 + ln 1/8) / 2) = sqrt(16)
    # 0.75·0.2 + 0.25·0.6 = 0.3 and 0.75·0.4 + 0.25·0.8 = 0.5 -> 1/sqrt(0.15)
    assert mixed_perplexity([logs(0.2, 0.4), logs(0.6, 0.8)], [0.75, 0.25]) == pytest.approx(1 / math.sqrt(0.15))


def test_tune_lambda_picks_the_best_grid_point_and_returns_the_curve():
    lm, other = logs(0.2), logs(0.6)  # one position: PPL(λ) = 1 / (0.2 + 0.4 λ), falls with λ
    lmbda, curve = tune_lambda(lm, other, [0.25, 0.5, 0.75])
    assert lmbda == 0.75
    assert curve == pytest.approx({0.25: 1 / 0.3, 0.5: 1 / 0.4, 0.75: 1 / 0.5})
    # two positions pulling apart: (0.8 - 0.6λ)(0.1 + 0.6λ) peaks at λ = 7/12; the grid's best is 0.5
    lmbda, curve = tune_lambda(logs(0.8, 0.1), logs(0.2, 0.7), [0.25, 0.5, 0.75])
    assert lmbda == 0.5 and curve[0.5] == pytest.approx(1 / math.sqrt(0.5 * 0.4))


def test_ties_go_to_the_smaller_lambda_whatever_the_grid_order():
    lm, other = logs(0.2, 0.6), logs(0.6, 0.2)  # λ and 1 - λ give the same two mixed probabilities, swapped
    lmbda, curve = tune_lambda(lm, other, [0.75, 0.25])
    assert curve[0.75] == curve[0.25] and lmbda == 0.25
    same = logs(0.3, 0.4)  # a component equal to the LM: every λ ties
    assert tune_lambda(same, same.copy(), [0.5, 0.1, 0.3])[0] == 0.1


def test_tune_knn_chooses_temperature_and_lambda_together():
    lm = logs(0.25)
    knn = np.stack([logs(0.25), logs(0.75), logs(0.5)], axis=1)  # [1 position, 3 temperatures]
    t, lmbda, curve = tune_knn(lm, knn, [1.0, 5.0, 10.0], [0.25, 0.5])
    assert (t, lmbda) == (1, 0.5)  # T = 5: 0.5·0.25 + 0.5·0.75 = 0.5
    assert curve == pytest.approx({0.25: 1 / 0.375, 0.5: 1 / 0.5})
    tied = np.stack([logs(0.75), logs(0.75)], axis=1)  # equal columns: the earlier T of the grid
    assert tune_knn(lm, tied, [10.0, 1.0], [0.5])[0] == 0


def test_tune_pair_respects_the_sum_below_one_and_beats_the_lm_alone():
    lm, a, b = logs(0.1), logs(0.5), logs(0.9)
    (la, lb), ppl = tune_pair(lm, a, b, [0.2, 0.4, 0.6])
    # p = 0.1(1 - la - lb) + 0.5 la + 0.9 lb; (0.4, 0.6) would give 0.74 but sums to 1: excluded
    assert (la, lb) == (0.2, 0.6) and ppl == pytest.approx(1 / (0.02 + 0.1 + 0.54))
    worse = logs(0.05)
    assert tune_pair(lm, worse, worse, [0.2, 0.4]) == ((0.0, 0.0), pytest.approx(10.0))  # nothing beats the LM alone
    # equal components: (0.5, 0.25) and (0.25, 0.5) tie at the best total 0.75; the smaller λ_a wins
    assert tune_pair(lm, a, a.copy(), [0.5, 0.25])[0] == (0.25, 0.5)


def test_summarise_tunes_on_valid_and_applies_to_test():
    # valid favours a large λ for the memory and T = 2 for kNN; test would favour other choices
    parts = {
        "valid": {"lm": logs(0.2), "mem": logs(0.6), "knn": np.stack([logs(0.1), logs(0.8)], axis=1)},
        "test": {"lm": logs(0.5), "mem": logs(0.1), "knn": np.stack([logs(0.9), logs(0.3)], axis=1)},
    }
    config = EvaluateConfig(knn_temperatures=[1.0, 2.0], lmbdas=[0.25, 0.5])
    systems, tuned_on, curves = summarise(parts, config)
    by_name = {s.name: s for s in systems}
    assert tuned_on == "valid" and [s.name for s in systems] == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    base = by_name["base"]
    assert (base.valid_ppl, base.test_ppl) == (pytest.approx(5.0), pytest.approx(2.0))
    knn = by_name["knn-lm"]  # valid: T = 2 (p 0.8), λ = 0.5 -> 0.5; applied to test's T = 2 column (0.3)
    assert (knn.temperature, knn.lmbda) == (2.0, 0.5)
    assert knn.valid_ppl == pytest.approx(1 / 0.5) and knn.test_ppl == pytest.approx(1 / (0.25 + 0.15))
    mem = by_name["mlp-memory"]  # valid: λ = 0.5 -> 0.4; test: 0.5·0.5 + 0.5·0.1 = 0.3
    assert mem.lmbda == 0.5 and mem.valid_ppl == pytest.approx(2.5) and mem.test_ppl == pytest.approx(1 / 0.3)
    both = by_name["mlp-memory+knn-lm"]  # valid grid pairs with sum < 1: (0.25, 0.25), (0.25, 0.5), (0.5, 0.25)
    # p = 0.2(1 - a - b) + 0.6a + 0.8b: 0.45, 0.6, 0.55 -> (0.25, 0.5); test: 0.125 + 0.025 + 0.15 = 0.3
    assert both.weights == {"mlp-memory": 0.25, "knn-lm": 0.5} and both.lmbda == 0.75 and both.temperature == 2.0
    assert both.valid_ppl == pytest.approx(1 / 0.6) and both.test_ppl == pytest.approx(1 / 0.3)
    assert curves["mlp-memory"] == pytest.approx({0.25: 1 / 0.3, 0.5: 1 / 0.4})
    assert curves["knn-lm"] == pytest.approx({0.25: 1 / 0.35, 0.5: 1 / 0.5})


def test_summarise_without_valid_tunes_on_test_and_refuses_non_finite_rows():
    systems, tuned_on, _ = summarise({"test": {"lm": logs(0.5), "mem": logs(0.25)}}, EvaluateConfig(lmbdas=[0.5]))
    assert tuned_on == "test" and systems[1].test_ppl == pytest.approx(1 / 0.375) and systems[1].valid_ppl is None
    with pytest.raises(UsageError, match="base's test perplexity is inf"):
        summarise({"test": {"lm": np.array([-np.inf, 0.0])}}, EvaluateConfig())
