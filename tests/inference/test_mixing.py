"""The one mixing function against the probability-space mixture it stands for."""

from __future__ import annotations

import pytest
import torch

from mlpmem.inference.mixing import mix_log_probs, mix_with_lm

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


@pytest.mark.parametrize("seed", range(5))
def test_log_space_mix_equals_probability_space_mix(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.log_softmax(torch.randn(4, 7, 50, generator=g, dtype=torch.float64) * s, -1) for s in (1, 5, 30)]
    w = torch.rand(3, generator=g, dtype=torch.float64)
    weights = (w / w.sum()).tolist()
    weights[0] = 1.0 - weights[1] - weights[2]
    expected = sum(wi * p.exp() for wi, p in zip(weights, parts)).log()
    torch.testing.assert_close(mix_log_probs(parts, weights), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        mix_with_lm(parts[0], parts[1], 0.3), (0.7 * parts[0].exp() + 0.3 * parts[1].exp()).log()
    )


def test_extreme_log_probs_stay_finite_where_any_component_has_mass():
    lm = torch.tensor([0.0, -1e4, float("-inf")])
    other = torch.tensor([float("-inf"), 0.0, -2000.0])
    mixed = mix_log_probs([lm, other], [0.75, 0.25])
    assert torch.isfinite(mixed[:2]).all() and mixed[2] == pytest.approx(-2000.0 + torch.log(torch.tensor(0.25)).item())


def test_zero_weight_returns_the_lm_bit_for_bit_and_bad_weights_are_refused():
    lm = torch.log_softmax(torch.randn(3, 9), -1)
    assert mix_log_probs([lm, torch.zeros(3, 9)], [1.0, 0.0]) is lm
    with pytest.raises(ValueError):
        mix_log_probs([lm, lm], [0.7, 0.7])
    with pytest.raises(ValueError):
        mix_log_probs([lm], [0.5, 0.5])
