"""MLPMemory: the architecture by hand, save → load round trip, head initialisation, pairing checks, loader."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel

from mlpmem.artifacts import RunDir
from mlpmem.config import TrainMemoryConfig
from mlpmem.errors import UsageError
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig, check_pairing, load_memory

from conftest import tiny_gpt2

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def small(**kw) -> MLPMemory:
    torch.manual_seed(0)
    cfg = dict(
        input_dim=24,
        hidden_size=32,
        n_blocks=3,
        vocab_size=50,
        base_model_fingerprint="abc",
        key_layer="transformer.h.1.ln_2",
        knn_temperature=7.0,
    )
    model = MLPMemory(MLPMemoryConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():  # non-trivial norms and biases so the reference is tested on them too
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def reference_forward(sd: dict, cfg: MLPMemoryConfig, keys: torch.Tensor) -> torch.Tensor:
    """The memory written out from its state dict: proj → blocks x + FFN(LN(x)) → LN → head."""
    x = keys @ sd["proj.weight"].T + sd["proj.bias"] if "proj.weight" in sd else keys
    for i in range(cfg.n_blocks):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (cfg.hidden_size,), sd[b + "norm.weight"], sd[b + "norm.bias"], cfg.layer_norm_eps)
        if cfg.ffn == "gelu":
            h = (
                F.gelu(h @ sd[b + "ffn.up.weight"].T + sd[b + "ffn.up.bias"]) @ sd[b + "ffn.down.weight"].T
                + sd[b + "ffn.down.bias"]
            )
        else:
            h = (F.silu(h @ sd[b + "ffn.gate.weight"].T) * (h @ sd[b + "ffn.up.weight"].T)) @ sd[
                b + "ffn.down.weight"
            ].T
        x = x + h
    x = F.layer_norm(x, (cfg.hidden_size,), sd["norm.weight"], sd["norm.bias"], cfg.layer_norm_eps)
    return x @ sd["head.weight"].T


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("input_dim", [24, 32])
def test_forward_matches_reference(ffn, input_dim):
    model = small(ffn=ffn, input_dim=input_dim)
    assert (model.proj is None) == (input_dim == 32)
    keys = torch.randn(7, input_dim)
    sd = dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(keys), reference_forward(sd, model.config, keys), rtol=1e-5, atol=1e-5)
        seq = torch.randn(2, 5, input_dim)
        torch.testing.assert_close(model(seq), reference_forward(sd, model.config, seq), rtol=1e-5, atol=1e-5)
    assert "head.bias" not in sd


def test_swiglu_has_about_the_gelu_parameter_count():
    gelu, swiglu = small(ffn="gelu", input_dim=32), small(ffn="swiglu", input_dim=32)
    block = lambda m: sum(p.numel() for p in m.blocks[0].ffn.parameters())  # noqa: E731
    assert abs(block(swiglu) - block(gelu)) / block(gelu) < 0.1


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
def test_save_load_round_trip(tmp_path, ffn):
    model = small(ffn=ffn)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    keys = torch.randn(4, 24)
    for loaded in (
        MLPMemory.from_pretrained(tmp_path / "m"),
        AutoModel.from_pretrained(tmp_path / "m"),
        load_memory(tmp_path / "m"),
    ):
        assert isinstance(loaded, MLPMemory)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(keys), model(keys))
        cfg = loaded.config
        assert (cfg.input_dim, cfg.base_model_fingerprint, cfg.key_layer, cfg.knn_temperature, cfg.ffn) == (
            24,
            "abc",
            "transformer.h.1.ln_2",
            7.0,
            ffn,
        )
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "mlp-memory"


def test_a_memory_folder_with_nan_truncated_or_pickled_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    small().save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["blocks.1.ffn.up.weight"][2, 3] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="blocks.1.ffn.up.weight holds nan/inf"):
        load_memory(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(UsageError, match="cannot load the memory") as err:
        load_memory(folder)
    assert "\n" not in str(err.value)
    (folder / "model.safetensors").unlink()
    torch.save(small().state_dict(), folder / "pytorch_model.bin")  # a pickle: never read
    with pytest.raises(UsageError, match="only safetensors weights are read"):
        load_memory(folder)


def test_load_memory_finds_run_folder_and_refuses_missing(tmp_path):
    run = RunDir(tmp_path / "run")
    build = run.begin("train-memory", TrainMemoryConfig(), {})
    small().save_pretrained(build.dir / "model")
    build.complete(key_layer="transformer.h.1.ln_2")
    for where in (run.path, run.path / "train-memory", run.path / "train-memory" / "model"):
        assert isinstance(load_memory(where), MLPMemory)
    with pytest.raises(UsageError, match="no MLP memory"):
        load_memory(tmp_path / "elsewhere")
    # weights replaced after the stage completed: refused by their content hash
    small(n_blocks=2).save_pretrained(run.path / "train-memory" / "model")
    with pytest.raises(UsageError, match="does not match its recorded content hash") as err:
        load_memory(run.path)
    assert "\n" not in str(err.value)
    # a stage folder without a complete manifest is not taken as a memory
    (run.path / "train-memory" / "manifest.json").unlink()
    with pytest.raises(UsageError, match="missing or incomplete"):
        load_memory(run.path)


def test_init_head_from(caplog):
    model = small(input_dim=32)
    emb = torch.randn(50, 32)
    assert model.init_head_from(emb)
    assert torch.equal(model.head.weight, emb)
    with caplog.at_level(logging.WARNING):
        assert not model.init_head_from(torch.randn(50, 48))
    assert "not initialised" in caplog.text
    assert torch.equal(model.head.weight, emb)


def test_pairing_checks_the_lm_itself():
    lm = tiny_gpt2()
    memory = small(input_dim=32, vocab_size=96).config
    assert check_pairing(memory, lm, "abc") == "transformer.h.1.ln_2"
    refusals = {
        "trained on keys of base model abc": (memory, "xyz"),
        "no such module": (small(input_dim=32, vocab_size=96, key_layer="transformer.h.9.ln_2").config, "abc"),
        "width 32, but 'transformer.h.1.mlp.c_fc' of the LM gives 128": (
            small(input_dim=32, vocab_size=96, key_layer="transformer.h.1.mlp.c_fc").config,
            "abc",
        ),
        "predicts 50 tokens, the LM 96": (small(input_dim=32).config, "abc"),
        "does not record the LM module": (small(input_dim=32, vocab_size=96, key_layer=None).config, "abc"),
    }
    for message, (cfg, fingerprint) in refusals.items():
        with pytest.raises(UsageError, match=re.escape(message)) as err:
            check_pairing(cfg, lm, fingerprint)
        assert "\n" not in str(err.value)
    # another layer of the same width is a valid pairing: the memory's key layer is its own
    assert (
        check_pairing(small(input_dim=32, vocab_size=96, key_layer="transformer.h.0.ln_2").config, lm, "abc")
        == "transformer.h.0.ln_2"
    )


def test_wrong_key_width_is_refused():
    with pytest.raises(UsageError, match="width 24"):
        small()(torch.randn(2, 32))
