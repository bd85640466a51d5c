"""Sliding-window perplexity against independent references (HF loss, per-position recomputation)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2

from mlpmem.config import EvaluateConfig
from mlpmem.data.windows import sliding_windows
from mlpmem.errors import UsageError
from mlpmem.evaluate.run import evaluate
from mlpmem.evaluate.scoring import score_tokens
from mlpmem.evaluate.tune import perplexity

CPU = torch.device("cpu")


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 96, n).astype(np.uint16)


def test_stride_equal_to_context_matches_hf_loss_on_disjoint_windows():
    model, toks, context = tiny_gpt2(), tokens(200), 32
    scored = score_tokens(model, toks, context, context, batch_size=3, device=CPU)
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(toks), context):
            x = torch.from_numpy(toks[begin : begin + context].astype(np.int64))[None]
            if x.shape[1] < 2:
                continue
            loss = model(input_ids=x, labels=x).loss.item()  # HF's own shifted mean loss
            total += loss * (x.shape[1] - 1)
            count += x.shape[1] - 1
    assert len(scored.lm_log_prob) == count
    assert perplexity(scored.lm_log_prob) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_overlapping_windows_match_per_position_recomputation():
    model, toks, context, stride = tiny_gpt2(), tokens(90, seed=1), 16, 5
    scored = score_tokens(model, toks, context, stride, batch_size=4, device=CPU)
    expected = []
    with torch.no_grad():
        for w in sliding_windows(len(toks), context, stride):
            for p in range(w.first_scored, w.end - 1):  # its own forward over exactly its window history
                x = torch.from_numpy(toks[w.begin : p + 1].astype(np.int64))[None]
                expected.append(torch.log_softmax(model(input_ids=x).logits[0, -1], -1)[int(toks[p + 1])].item())
    np.testing.assert_allclose(scored.lm_log_prob, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(scored.gold, toks[1:])


def test_evaluate_stage_writes_results_for_the_base_lm(tiny_run):
    results = evaluate(EvaluateConfig(run_dir=tiny_run, knn=False, memory=False, context=32, stride=16, device="cpu"))
    saved = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    assert saved["systems"] == results["systems"]
    base = saved["systems"][0]
    assert base["name"] == "base" and base["valid_ppl"] > 1 and base["test_ppl"] > 1
    assert saved["tokens"] == {"valid": 599, "test": 599}


def test_context_beyond_model_positions_is_refused(tiny_run):
    with pytest.raises(UsageError, match="exceeds the model's 64 positions"):
        evaluate(EvaluateConfig(run_dir=tiny_run, knn=False, memory=False, context=128, device="cpu"))


def test_unknown_model_is_refused(tiny_run):
    with pytest.raises(UsageError, match="model path not found"):
        evaluate(EvaluateConfig(run_dir=tiny_run, model="./no/such/model", knn=False, memory=False))
