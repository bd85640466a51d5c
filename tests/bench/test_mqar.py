"""MQAR generator: every scored answer is right by construction (checked by a brute-force scan of the context)."""

from __future__ import annotations

import pytest
import torch

from mlpmem.bench.mqar import IGNORE, MQARTask, equal_parameter_models, mqar_batch, num_parameters, recall_accuracy
from mlpmem.errors import UsageError


def brute_force_targets(inputs: list[int], num_pairs: int) -> dict[int, int]:
    """Position -> the value of the key found there, for every repeat of a context key after the context."""
    context = {inputs[2 * i]: inputs[2 * i + 1] for i in range(num_pairs)}
    return {t: context[x] for t, x in enumerate(inputs) if t >= 2 * num_pairs and x in context}


@pytest.mark.parametrize("seq_len,num_pairs", [(16, 4), (64, 16), (128, 8), (256, 64)])
def test_answers_match_a_scan_of_the_context(seq_len, num_pairs):
    task = MQARTask(seq_len=seq_len, num_pairs=num_pairs, vocab_size=160)
    batch = mqar_batch(task, num_examples=20, seed=3)
    assert batch.inputs.shape == batch.targets.shape == (20, seq_len)
    half = task.vocab_size // 2
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
        keys, values = inputs[0 : 2 * num_pairs : 2], inputs[1 : 2 * num_pairs : 2]
        assert len(set(keys)) == num_pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == num_pairs and all(half <= v < task.vocab_size for v in values)
        scored = {t: y for t, y in enumerate(targets) if y != IGNORE}
        assert len(scored) == num_pairs  # every key asked once
        assert sorted(inputs[t] for t in scored) == sorted(keys)
        assert all(t >= 2 * num_pairs and (t - 2 * num_pairs) % 2 == 0 for t in scored)
        # filler may repeat a key by chance: then the scan finds more positions, and the scored ones agree
        found = brute_force_targets(inputs, num_pairs)
        assert all(found[t] == y for t, y in scored.items())


def test_deterministic_by_seed():
    task = MQARTask(seq_len=64, num_pairs=8)
    a, b, c = (mqar_batch(task, 8, seed) for seed in (0, 0, 1))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_recall_accuracy_counts_hits_at_query_positions_only():
    targets = torch.tensor([[IGNORE, 5, IGNORE, 7]])
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 3] = logits[0, 1, 5] = logits[0, 3, 2] = 1.0  # position 0 unscored; 1 right; 3 wrong
    assert recall_accuracy(logits, targets) == (1, 2)


def test_impossible_tasks_name_the_field():
    with pytest.raises(UsageError) as err:
        MQARTask(seq_len=60, num_pairs=16)
    assert err.value.field == "seq_len"
    with pytest.raises(UsageError) as err:
        MQARTask(seq_len=256, num_pairs=64, vocab_size=100)
    assert err.value.field == "vocab_size"


def test_equal_parameter_models_match_within_three_percent(capsys):
    models = equal_parameter_models(vocab_size=64, width=32, layers=2, heads=2, mom_ffn=32, max_len=64)
    counts = {arch: num_parameters(m) for arch, m in models.items()}
    print("parameters:", counts)  # shown with -s
    assert set(counts) == {"gpt2", "gated-deltanet", "mom"}
    assert max(counts.values()) <= 1.03 * min(counts.values())
    assert sum(p.numel() for p in models["gpt2"].parameters()) == counts["gpt2"]  # tied head counted once
    mom, gdn = models["mom"].config, models["gated-deltanet"].config
    assert (mom.num_memories, mom.topk, mom.shared_memory) == (4, 2, True)
    assert gdn.is_gated_deltanet and gdn.intermediate_size > mom.intermediate_size
    batch = mqar_batch(MQARTask(seq_len=64, num_pairs=4, vocab_size=64), num_examples=2, seed=0)
    for model in models.values():
        assert model(input_ids=batch.inputs).logits.shape == (2, 64, 64)
