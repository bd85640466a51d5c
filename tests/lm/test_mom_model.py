"""MoMForCausalLM (MoM and Gated DeltaNet as a Hugging Face causal LM), against references written here: the full
forward for the cache, generation without a cache for generation with one, each row alone for a padded batch.

PYTHONPATH=src python -m pytest -q tests/lm/test_mom_model.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from mlpmem.lm.mom import MoMCache, MoMForCausalLM, MoMLMConfig

V = 40
SIZES = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_heads=2, chunk_size=4)
CONFIGS = {
    "mom": lambda: MoMLMConfig(num_memories=4, topk=2, shared_memory=True, **SIZES),
    "gated-deltanet": lambda: MoMLMConfig.gated_deltanet(**SIZES),
}


@pytest.fixture(params=sorted(CONFIGS))
def model(request) -> MoMForCausalLM:
    torch.manual_seed(0)
    return MoMForCausalLM(CONFIGS[request.param]()).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_gated_deltanet_is_one_memory_without_router():
    config = CONFIGS["gated-deltanet"]()
    assert (config.num_memories, config.topk, config.shared_memory, config.is_gated_deltanet) == (1, 1, False, True)
    layer = MoMForCausalLM(config).model.layers[0].mixer
    assert layer.router is None


def test_save_and_load_round_trip_gives_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoMForCausalLM
    assert loaded.config.to_diff_dict() | {"_name_or_path": ""} == model.config.to_diff_dict() | {"_name_or_path": ""}
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    x = tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_full_forward_equals_token_by_token_with_the_cache(model):
    x = tokens(2, 11)  # crosses chunk boundaries (chunk_size 4)
    with torch.no_grad():
        full = model(x).logits  # [B, T, V]
        cache, steps = None, []
        for t in range(x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        # a prompt then single tokens: the chunked form hands its state to the per-token form
        prefix = model(x[:, :5], use_cache=True)
        rest = model(x[:, 5:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([prefix.logits, rest], 1), full, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == x.shape[1]


def test_cache_size_does_not_grow_with_the_context(model):
    with torch.no_grad():
        short = model(tokens(2, 8), use_cache=True).past_key_values
        long = model(tokens(2, 64), use_cache=True).past_key_values
    assert isinstance(short, MoMCache) and short.num_elements() == long.num_elements() > 0
    assert [s.memory.shape for s in short.states] == [s.memory.shape for s in long.states]


def test_greedy_generation_equals_the_argmax_of_a_full_forward(model):
    prompt = tokens(2, 7)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
        for t in range(prompt.shape[1], out.shape[1]):
            assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t]), t


@pytest.mark.parametrize("mode", ["beams", "sampling"])
def test_generation_with_the_cache_equals_generation_without(model, mode):
    """Beam search reorders the cache and sampling expands it; without a cache every step is a full forward."""
    prompt = tokens(2, 6)
    kwargs = dict(num_beams=3, num_return_sequences=2) if mode == "beams" else dict(do_sample=True, top_k=0)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        with torch.no_grad():
            runs.append(model.generate(prompt, max_new_tokens=8, use_cache=use_cache, **kwargs))
    assert torch.equal(runs[0], runs[1])


def test_left_padded_batch_gives_each_row_its_unpadded_generation(model):
    long, short = tokens(1, 7, seed=2), tokens(1, 4, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = [model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0) for x in (long, short)]
    assert torch.equal(together[0], alone[0][0]) and torch.equal(together[1, 3:], alone[1][0])


def test_training_loss_adds_the_weighted_load_balancing_loss():
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMLMConfig(aux_loss_weight=0.5, **{**SIZES, "num_hidden_layers": 1}))
    x = tokens(2, 9)
    model.eval()
    plain = model(x, labels=x)
    model.train()
    trained = model(x, labels=x)
    assert plain.aux_loss > 0
    torch.testing.assert_close(trained.loss, plain.loss + 0.5 * trained.aux_loss)


def test_import_mlpmem_is_light_and_registers_the_model(tmp_path):
    MoMForCausalLM(CONFIGS["mom"]()).save_pretrained(tmp_path)
    code = (
        "import sys, mlpmem; assert 'torch' not in sys.modules and 'transformers' not in sys.modules;"
        "from transformers import AutoConfig, AutoModelForCausalLM;"
        f"print(AutoConfig.from_pretrained({str(tmp_path)!r}).model_type,"
        f" type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["mlpmem-mom", "MoMForCausalLM"]
