"""Generation through transformers' generate with the memory (and kNN-LM) mixed in by hooks.

References are computed independently: a full forward of the prefix, the keys from plain forward hooks (the
memory reads block 0, the datastore block 1), the memory's and a brute-force kNN's log-probs, mixed by
``mix_log_probs`` (the evaluation path's mixing).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.errors import UsageError
from mlpmem.evaluate.run import evaluate
from mlpmem.inference.generation import MemoryAugmentedLM, tuned_values
from mlpmem.inference.mixing import mix_log_probs

from gen_inputs import (  # noqa: F401
    KNN_LAYER,
    MEMORY_LAYER,
    evaluate_config,
    generation_run,
    generation_run_template,
    tiny_memory,
    write_memory,
)

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

PROMPT = torch.tensor([[5, 6, 7, 8, 40, 41]])


def loaded(run, **kwargs) -> MemoryAugmentedLM:
    """The run's mixed model with no end-of-text token (every generation runs its full length)."""
    mlm = MemoryAugmentedLM.from_run(run, device="cpu", **kwargs)
    mlm.lm.generation_config.eos_token_id = None
    return mlm


def datastore(run):
    keys = np.asarray(RunDir(run).array("datastore", "keys"), dtype=np.float32)
    return {"knn_keys": keys, "knn_values": np.asarray(RunDir(run).array("datastore", "values"))}


def reference_next_log_probs(
    mlm: MemoryAugmentedLM, prefix: torch.Tensor, knn_keys=None, knn_values=None
) -> torch.Tensor:
    """Joint log-probs [V] of the token after ``prefix`` [T]: a full forward, no cache, no mixing hook."""
    captured = {}
    handles = [
        mlm.lm.get_submodule(layer).register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o))
        for layer in (MEMORY_LAYER, KNN_LAYER)
    ]
    try:
        with torch.no_grad():
            logits = mlm.lm(prefix[None], use_cache=False).logits[0, -1]  # [V]
            parts = [
                torch.log_softmax(logits, -1),
                torch.log_softmax(mlm.memory(captured[MEMORY_LAYER][0, -1][None])[0], -1),
            ]
    finally:
        for handle in handles:
            handle.remove()
    weights = [1 - mlm.lmbda - mlm.knn_lmbda, mlm.lmbda]
    if knn_keys is not None:  # brute force on block 1's key: k nearest by squared L2, softmax(-d/T), summed per token
        d = ((knn_keys - captured[KNN_LAYER][0, -1].numpy()[None]) ** 2).sum(1)
        top = np.argsort(d, kind="stable")[: mlm.knn.k]
        w = torch.softmax(torch.from_numpy(-d[top] / mlm.knn.temperature).double(), 0)
        p = torch.zeros(logits.shape[-1], dtype=torch.float64).index_add_(
            0, torch.from_numpy(knn_values[top].astype(np.int64)), w
        )
        parts.append(p.float().log())
        weights.append(mlm.knn_lmbda)
    return mix_log_probs(parts, weights)


def greedy_steps_match_reference(mlm, sequence, n_prompt, **knn) -> int:
    """Checks every generated token is the argmax of the reference; returns how many steps had a clear margin."""
    clear = 0
    for t in range(n_prompt, sequence.shape[0]):
        ref = reference_next_log_probs(mlm, sequence[:t], **knn)
        top2 = torch.topk(ref, 2).values
        if top2[0] - top2[1] > 1e-4:  # away from float ties the argmax must be the generated token
            assert int(sequence[t]) == int(ref.argmax()), f"step {t - n_prompt}"
            clear += 1
    return clear


def test_greedy_equals_argmax_of_joint_log_probs(generation_run):
    mlm = loaded(generation_run)
    assert mlm.memory_layer == MEMORY_LAYER and mlm.key_layers == [MEMORY_LAYER]
    out = mlm.generate(PROMPT, max_new_tokens=12, do_sample=False)[0]
    assert greedy_steps_match_reference(mlm, out, PROMPT.shape[1]) >= 10
    base = mlm.lm.generate(PROMPT, max_new_tokens=12, do_sample=False, pad_token_id=0)[0]
    assert not torch.equal(out, base), "the memory should change some choices of this tiny LM"


def test_greedy_with_memory_and_knn_on_different_layers_equals_brute_force_reference(generation_run):
    mlm = loaded(generation_run, use_knn=True, k=16, knn_lmbda=0.3, lmbda=0.3)
    assert mlm.knn.temperature == 5.0  # the memory's target temperature (no evaluate results in this run)
    assert (mlm.memory_layer, mlm.knn_layer) == (MEMORY_LAYER, KNN_LAYER)
    out = mlm.generate(PROMPT, max_new_tokens=10)[0]
    assert greedy_steps_match_reference(mlm, out, PROMPT.shape[1], **datastore(generation_run)) >= 8


def test_joint_log_probs_match_reference_at_every_position(generation_run):
    mlm = loaded(generation_run, use_knn=True, k=16, knn_lmbda=0.2, lmbda=0.4)
    joint = mlm.joint_log_probs(PROMPT)[0]  # [T, V]
    knn = datastore(generation_run)
    for t in range(1, PROMPT.shape[1] + 1):
        torch.testing.assert_close(
            joint[t - 1], reference_next_log_probs(mlm, PROMPT[0, :t], **knn), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(joint.exp().sum(-1), torch.ones(PROMPT.shape[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_lambda_zero_reproduces_the_base_model(generation_run, mode):
    mlm = loaded(generation_run, lmbda=0.0)
    kwargs = {"greedy": {}, "sample": {"do_sample": True, "top_k": 20, "temperature": 0.8}, "beam": {"num_beams": 3}}[
        mode
    ]
    torch.manual_seed(3)
    mixed = mlm.generate(PROMPT, max_new_tokens=10, **kwargs)
    torch.manual_seed(3)
    base = mlm.lm.generate(PROMPT, max_new_tokens=10, pad_token_id=0, **kwargs)
    assert torch.equal(mixed, base)


def test_without_memory_or_knn_it_is_the_base_lm(generation_run, capsys):
    mlm = loaded(generation_run, use_memory=False)
    assert mlm.memory is None and mlm.knn is None and mlm.describe() == "base LM alone"
    torch.manual_seed(5)
    ours = mlm.generate(PROMPT, max_new_tokens=8, do_sample=True)
    torch.manual_seed(5)
    assert torch.equal(ours, mlm.lm.generate(PROMPT, max_new_tokens=8, do_sample=True, pad_token_id=0))
    with torch.no_grad():
        reference = torch.log_softmax(mlm.lm(PROMPT).logits.float(), -1)
    torch.testing.assert_close(mlm.joint_log_probs(PROMPT), reference)
    code = main(
        [
            "generate",
            "--run-dir",
            str(generation_run),
            "--prompt",
            "w1 w2",
            "--memory",
            "false",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and "base LM alone" in err and out.startswith("w1 w2 ") and len(out.split()) == 5


def test_batched_left_padded_generation_equals_one_by_one(generation_run):
    mlm = loaded(generation_run, use_knn=True, k=16, lmbda=0.3, knn_lmbda=0.2)
    prompts = ["w5 w6 w7 w8 w9 w10", "w30", "w60 w61 w62"]
    batched = mlm.generate(prompts, max_new_tokens=8)
    single = [mlm.generate(p, max_new_tokens=8) for p in prompts]
    assert batched == single
    for prompt, text in zip(prompts, single):  # 8 new tokens each (an <eos> among them is dropped from the text)
        ids = mlm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = mlm.generate(ids, max_new_tokens=8)[0, ids.shape[1] :]
        assert len(new) == 8 and mlm.tokenizer.decode(new, skip_special_tokens=True) == text


def test_memory_runs_once_per_new_token_on_one_position(generation_run):
    mlm = loaded(generation_run)
    shapes = []
    mlm.memory.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    mlm.generate(torch.cat([PROMPT, PROMPT]), max_new_tokens=7)
    assert shapes == [(2, 1, 32)] * 7  # prefill returns the last position only; then one token per step (KV cache)


def test_beam_search_and_sampling_run_and_sampling_is_seeded(generation_run):
    mlm = loaded(generation_run)
    beams = mlm.generate(["w1 w2", "w50"], max_new_tokens=6, num_beams=4, num_return_sequences=2)
    assert len(beams) == 4 and all(len(t.split()) == 6 for t in beams)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(
            mlm.generate(["w1 w2", "w50"], max_new_tokens=8, do_sample=True, top_p=0.9, top_k=30, temperature=1.3)
        )
    assert runs[0] == runs[1]
    torch.manual_seed(12)
    assert mlm.generate(["w1 w2", "w50"], max_new_tokens=8, do_sample=True) != runs[0]


def test_memory_of_another_model_is_refused(generation_run):
    write_memory(generation_run, tiny_memory("0000000000000000"), seed=1)
    with pytest.raises(UsageError, match="base model"):
        loaded(generation_run)


def test_memory_reading_a_module_the_lm_lacks_is_refused(generation_run):
    fp = RunDir(generation_run).require("train-lm").model_fingerprint
    write_memory(generation_run, tiny_memory(fp, layer="transformer.h.7.ln_2"), seed=1)
    with pytest.raises(UsageError, match="no such module"):
        loaded(generation_run)


def test_tuned_values_come_from_the_evaluate_manifest_of_this_memory(generation_run):
    manifest = evaluate(evaluate_config(generation_run))
    run = RunDir(generation_run)
    fp = run.require("train-lm").model_fingerprint
    memory_row, knn_row, both = (manifest.system(n) for n in ("mlp-memory", "knn-lm", "mlp-memory+knn-lm"))
    assert loaded(generation_run).lmbda == memory_row.lmbda
    knn_only = loaded(generation_run, use_memory=False, use_knn=True, k=16)
    assert (knn_only.knn_lmbda, knn_only.knn.temperature) == (knn_row.lmbda, knn_row.temperature)
    joint = tuned_values(run, fp, memory=True, knn=True)
    assert (joint.lmbda, joint.knn_lmbda) == (both.weights["mlp-memory"], both.weights["knn-lm"])
    # another memory: evaluate's λ was tuned for the old one, so the new memory's saved λ is used
    write_memory(generation_run, tiny_memory(fp, seed=3, lmbda=0.15), seed=3)
    assert tuned_values(run, fp, memory=True, knn=False).lmbda is None
    assert loaded(generation_run).lmbda == 0.15


def test_cli_prints_the_continuation(generation_run, capsys):
    code = main(
        [
            "generate",
            "--run-dir",
            str(generation_run),
            "--prompt",
            "w1 w2 w3",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1 and out[0].startswith("w1 w2 w3 ") and len(out[0].split()) == 8
    code = main(["generate", "--run-dir", str(generation_run), "--max-new-tokens", "5"])
    assert code == 2 and "--prompt" in capsys.readouterr().err


def test_cli_yaml_list_prompt_is_one_batch(generation_run, capsys):
    code = main(
        [
            "generate",
            "--run-dir",
            str(generation_run),
            "--prompt",
            '["w1 w2", "w40"]',
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 2
    assert out[0].startswith("w1 w2 ") and len(out[0].split()) == 6
    assert out[1].startswith("w40 ") and len(out[1].split()) == 5
    mlm = loaded(generation_run)
    assert [mlm.generate(p, max_new_tokens=4) for p in ("w1 w2", "w40")] == [
        o.split(" ", len(p.split()))[-1] for o, p in zip(out, ("w1 w2", "w40"))
    ]


def test_prompt_plus_new_tokens_beyond_the_positions_is_refused(generation_run, capsys):
    code = main(
        [
            "generate",
            "--run-dir",
            str(generation_run),
            "--prompt",
            "w1 w2 w3",
            "--max-new-tokens",
            "62",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "65" in err and "64 positions" in err
    with pytest.raises(UsageError, match="64 positions"):
        loaded(generation_run).generate(PROMPT, max_new_tokens=59)
    assert loaded(generation_run).generate(PROMPT, max_new_tokens=58).shape == (1, 64)  # exactly the positions: fine


def test_printed_generations_end_without_blank_lines(capsys):
    """A model that ends its continuation in newlines and spaces prints each continuation on its own line, and
    nothing after it; a continuation without a leading space is set off from its prompt by one."""
    from mlpmem.inference.generation import Generations, print_generations

    result = Generations(["A", "B"], [" one\n\n\n  \n", "two  \n"], 1, "memory", 0.5, 0.0)
    print_generations(result)
    assert capsys.readouterr().out == "A one\nB two\n"
