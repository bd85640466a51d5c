"""Sliding-window perplexity against independent references (HF loss, per-position recomputation, plain hooks,
brute-force kNN), and the evaluate stage's refusals (all before its folder is touched)."""

import json
import math

import numpy as np
import pytest
import torch

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.config import EvaluateConfig
from mlpmem.data.windows import sliding_windows
from mlpmem.errors import UsageError
from mlpmem.evaluate.run import evaluate
from mlpmem.evaluate.scoring import score_tokens
from mlpmem.evaluate.tune import perplexity
from mlpmem.memory.model import MLPMemory

from conftest import tiny_gpt2
from gen_inputs import (  # noqa: F401
    KNN_LAYER,
    MEMORY_LAYER,
    evaluate_config,
    generation_run,
    generation_run_template,
    tiny_memory,
    write_generation_run,
    write_memory,
)

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 96, n).astype(np.uint16)


def test_stride_equal_to_context_matches_hf_loss_on_disjoint_windows():
    model, toks, context = tiny_gpt2(), tokens(200), 32
    scored = score_tokens(model, toks, context, context, batch_size=3)
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


def test_overlapping_windows_match_per_position_recomputation_with_keys_of_two_layers():
    model, toks, context, stride = tiny_gpt2(), tokens(90, seed=1), 16, 5
    scored = score_tokens(model, toks, context, stride, batch_size=4, key_layers=[MEMORY_LAYER, KNN_LAYER])
    captured = {}
    for layer in (MEMORY_LAYER, KNN_LAYER):
        model.get_submodule(layer).register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o))
    expected, keys = [], {MEMORY_LAYER: [], KNN_LAYER: []}
    with torch.no_grad():
        for w in sliding_windows(len(toks), context, stride):
            for p in range(w.first_scored, w.end - 1):  # its own forward over exactly its window history
                x = torch.from_numpy(toks[w.begin : p + 1].astype(np.int64))[None]
                expected.append(torch.log_softmax(model(input_ids=x).logits[0, -1], -1)[int(toks[p + 1])].item())
                for layer in keys:
                    keys[layer].append(captured[layer][0, -1].numpy())
    np.testing.assert_allclose(scored.lm_log_prob, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(scored.gold, toks[1:])
    assert set(scored.keys) == {MEMORY_LAYER, KNN_LAYER}
    for layer, reference in keys.items():
        assert scored.keys[layer].dtype == np.float32  # compared in float32: the hook's own output
        np.testing.assert_allclose(scored.keys[layer], np.stack(reference), rtol=1e-5, atol=1e-5)
    assert not np.allclose(scored.keys[MEMORY_LAYER], scored.keys[KNN_LAYER])


def test_evaluate_stage_records_results_for_the_base_lm(tiny_run):
    manifest = evaluate(EvaluateConfig(run_dir=tiny_run, knn=False, memory=False, context=32, stride=16, device="cpu"))
    assert RunDir(tiny_run).require("evaluate").model_dump() == manifest.model_dump()
    saved = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    assert saved["systems"] == [s.model_dump(mode="json") for s in manifest.systems]
    base = manifest.system("base")
    assert [s.name for s in manifest.systems] == ["base"] and base.valid_ppl > 1 and base.test_ppl > 1
    assert manifest.tokens == {"valid": 599, "test": 599} == saved["tokens"]
    assert (manifest.context, manifest.stride, manifest.tuned_on) == (32, 16, None)  # nothing to tune
    again = evaluate(EvaluateConfig(run_dir=tiny_run, knn=False, memory=False, context=32, stride=16, batch_size=3))
    assert again.timings == manifest.timings  # device and batch size do not define the stage: reused


def memory_row_reference(run, manifest, split, dequantise=False):
    """The memory row's perplexity recomputed with one plain forward per window, the memory's key (block 0) from a
    hook written here (float32, as the LM computes them), the mixture formed in probability space.
    ``dequantise``: every Linear weight replaced by its int8 codes times their row's scale, in float32."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(run / "train-lm" / "model").eval()
    memory = MLPMemory.from_pretrained(run / "train-memory" / "model").eval()
    if dequantise:
        from mlpmem.memory.quantize import Int8Linear

        with torch.no_grad():
            for module in memory.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(Int8Linear.from_linear(module).dequantized())
    lmbda = manifest.system("mlp-memory").lmbda
    toks = np.asarray(RunDir(run).array("prepare", split), dtype=np.int64)
    captured = {}
    lm.get_submodule(MEMORY_LAYER).register_forward_hook(lambda m, i, o: captured.__setitem__("key", o))
    nll = []
    with torch.no_grad():
        for w in sliding_windows(len(toks), manifest.context, manifest.stride):
            p_lm = torch.softmax(lm(torch.from_numpy(toks[w.begin : w.end])[None]).logits[0].double(), -1)  # [L, V]
            p_mem = torch.softmax(memory(captured["key"][0]).double(), -1)
            for pos in range(w.first_scored, w.end - 1):
                i, gold = pos - w.begin, toks[pos + 1]
                nll.append(-math.log((1 - lmbda) * p_lm[i, gold] + lmbda * p_mem[i, gold]))
    return math.exp(np.mean(nll))


def knn_row_reference(run, manifest, split, k):
    """kNN-LM's perplexity with brute-force neighbours of block 1's float32 keys over the stored fp16 datastore."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(run / "train-lm" / "model").eval()
    row = manifest.system("knn-lm")
    stored = np.asarray(RunDir(run).array("datastore", "keys"), dtype=np.float32)
    values = np.asarray(RunDir(run).array("datastore", "values"))
    toks = np.asarray(RunDir(run).array("prepare", split), dtype=np.int64)
    captured = {}
    lm.get_submodule(KNN_LAYER).register_forward_hook(lambda m, i, o: captured.__setitem__("key", o))
    nll = []
    with torch.no_grad():
        for w in sliding_windows(len(toks), manifest.context, manifest.stride):
            p_lm = torch.softmax(lm(torch.from_numpy(toks[w.begin : w.end])[None]).logits[0].double(), -1)
            queries = captured["key"][0].numpy()
            for pos in range(w.first_scored, w.end - 1):
                i, gold = pos - w.begin, toks[pos + 1]
                d = ((stored - queries[i]) ** 2).sum(1)
                top = np.argsort(d, kind="stable")[:k]
                weights = np.exp(-(d[top] - d[top].min()) / row.temperature)
                p_knn = weights[values[top] == gold].sum() / weights.sum()
                nll.append(-math.log((1 - row.lmbda) * float(p_lm[i, gold]) + row.lmbda * p_knn))
    return math.exp(np.mean(nll))


def test_memory_and_knn_rows_read_their_own_layers_and_match_independent_references(generation_run):
    config = evaluate_config(generation_run)
    manifest = evaluate(config)
    assert [s.name for s in manifest.systems] == ["base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"]
    run = RunDir(generation_run)
    assert manifest.inputs["train-memory"] == run.require("train-memory").fingerprint
    assert manifest.inputs["datastore"] == run.require("datastore").fingerprint
    assert manifest.inputs["index"] == run.require("index").fingerprint
    for split in ("valid", "test"):
        assert getattr(manifest.system("mlp-memory"), f"{split}_ppl") == pytest.approx(
            memory_row_reference(generation_run, manifest, split), rel=1e-4
        )
        assert getattr(manifest.system("knn-lm"), f"{split}_ppl") == pytest.approx(
            knn_row_reference(generation_run, manifest, split, k=16), rel=1e-4
        )


def test_the_exported_model_reproduces_the_published_memory_row(generation_run, tmp_path):
    """One numeric path: the evaluate stage's memory row is the exported HF model's own loss over the same sliding
    windows (float32 keys on both sides), to 1e-4."""
    from transformers import AutoModelForCausalLM

    manifest = evaluate(evaluate_config(generation_run).model_copy(update={"knn": False}))
    row = manifest.system("mlp-memory")
    out = tmp_path / "exported"
    assert main(["export", "--run-dir", str(generation_run), "--out", str(out), "--lmbda", str(row.lmbda)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for split in ("valid", "test"):
        toks = np.asarray(RunDir(generation_run).array("prepare", split), dtype=np.int64)
        nll, n = 0.0, 0
        for w in sliding_windows(len(toks), manifest.context, manifest.stride):
            ids = torch.from_numpy(toks[w.begin : w.end])[None]
            labels = ids.clone()
            labels[0, : w.first_scored - w.begin + 1] = -100  # HF shifts: label j is scored by position j - 1
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss.item()
            nll += loss * w.n_scored
            n += w.n_scored
        assert math.exp(nll / n) == pytest.approx(getattr(row, f"{split}_ppl"), rel=1e-4)


def test_an_int8_memory_is_scored_with_its_dequantised_weights(generation_run):
    """--memory-dtype int8: the memory row equals the reference with the int8 weights dequantised (bf16
    activations aside), is recorded as a different stage identity, and stays near the float32 row."""
    fp32 = evaluate(evaluate_config(generation_run).model_copy(update={"knn": False}))
    manifest = evaluate(evaluate_config(generation_run).model_copy(update={"knn": False, "memory_dtype": "int8"}))
    assert manifest.config.memory_dtype == "int8" and manifest.timings != fp32.timings  # rebuilt, not reused
    for split in ("valid", "test"):
        got = getattr(manifest.system("mlp-memory"), f"{split}_ppl")
        assert got == pytest.approx(memory_row_reference(generation_run, manifest, split, dequantise=True), rel=2e-3)
        assert got == pytest.approx(getattr(fp32.system("mlp-memory"), f"{split}_ppl"), rel=2e-2)


def assert_untouched(run):
    assert not (run / "evaluate").exists() and not (run / "evaluate.partial").exists()


def test_context_beyond_model_positions_is_refused_before_the_stage_is_touched(tiny_run):
    with pytest.raises(UsageError, match="exceeds the model's 64 positions") as err:
        evaluate(EvaluateConfig(run_dir=tiny_run, knn=False, memory=False, context=128, device="cpu"))
    assert err.value.field == "context"
    assert_untouched(tiny_run)


def test_k_beyond_the_datastore_is_refused_before_the_stage_is_touched(generation_run, capsys):
    assert main(["evaluate", "--run-dir", str(generation_run), "--k", "5000", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlpmem: error: --k: ") and "799 entries" in err and err.count("\n") == 1
    assert_untouched(generation_run)


def test_a_memory_giving_nan_is_one_line_not_a_nan_row(generation_run, capsys):
    memory = tiny_memory(RunDir(generation_run).require("train-lm").model_fingerprint)
    with torch.no_grad():
        memory.blocks[0].ffn.up.bias.fill_(float("nan"))
    write_memory(generation_run, memory, seed=2)
    code = main(["evaluate", "--run-dir", str(generation_run), "--knn", "false", "--device", "cpu", "--context", "32"])
    errors = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("mlpmem:")
    ]  # after progress lines
    assert code == 2 and len(errors) == 1 and ("non-finite" in errors[0] or "nan" in errors[0])
    assert not (generation_run / "evaluate").exists()


def test_unknown_model_is_refused(tiny_run):
    with pytest.raises(UsageError, match="model path not found"):
        evaluate(EvaluateConfig(run_dir=tiny_run, model="./no/such/model", knn=False, memory=False))


def test_cli_prints_the_table_from_the_manifest(tiny_run, capsys):
    args = [
        "evaluate",
        "--run-dir",
        str(tiny_run),
        "--knn",
        "false",
        "--memory",
        "false",
        "--context",
        "32",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    base = RunDir(tiny_run).require("evaluate").system("base")
    assert out[0] == "Perplexity (valid 599, test 599 tokens):"  # the base LM alone: nothing tuned
    assert out[2].split() == ["base", f"{base.valid_ppl:.2f}", f"{base.test_ppl:.2f}", "-", "-"]
    assert out[3] == f"results: {tiny_run / 'evaluate' / 'results.json'}"


def test_a_hub_model_without_network_fails_at_once_with_one_line(tmp_path):
    """No network (the hub's address refuses connections; an empty cache): HF offline mode, no retries, one line."""
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("HF_", "TRANSFORMERS"))
    }
    env |= {
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    argv = [sys.executable, "-m", "mlpmem", "evaluate", "--model", "gpt2", "--corpus", "wikitext-2-slice"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot load tokenizer 'gpt2': the Hugging Face hub cannot be reached (offline)" in out.stderr
    assert "thrown while requesting" not in out.stderr  # no retry ran


def test_a_datastore_of_the_evaluated_split_is_refused_unless_allowed_and_then_marked(tmp_path, capsys):
    run = write_generation_run(tmp_path / "run", datastore_split="valid")  # memory and kNN-LM built from valid
    args = ["evaluate", "--run-dir", str(run), "--k", "16", "--context", "32", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "mlpmem: error: --splits: the datastore (and the memory trained on it) was built from the "
            "valid split being evaluated"
        )
        and "--allow-overlap" in err
        and err.count("\n") == 1
    )
    assert_untouched(run)
    assert main([*args, "--allow-overlap"]) == 0
    out = capsys.readouterr().out.splitlines()
    manifest = RunDir(run).require("evaluate")
    assert manifest.overlap == "valid"
    rows = {line.split()[0]: line for line in out[1:5]}
    knn_valid = f"{manifest.system('knn-lm').valid_ppl:.2f}!"
    assert knn_valid in rows["knn-lm"].split() and "!" not in rows["base"]  # the overlapping split is marked
    assert f"{manifest.system('knn-lm').test_ppl:.2f}" in rows["knn-lm"].split()  # test is not
    assert any(line.startswith("! scored on valid, the split the datastore and memory were built from") for line in out)
