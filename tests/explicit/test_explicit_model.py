"""The memory-reading LM against independent references: the plain LM (no memory), the plain LM over a prefix
(memories that are a prefix's full key/values), a full forward (generation with the KV cache), a round trip."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mlpmem.explicit.encode import QKVHook, encode_batch
from mlpmem.explicit.model import ExplicitMemory, ExplicitMemoryLM

from conftest import tiny_gpt2

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def random_memory(model, batch=1, refs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    shape = (batch, refs, len(c.memory_layers), 2, c.n_head, c.keep_tokens, c.n_embd // c.n_head)
    return torch.randn(shape, generator=g)


def test_without_memories_it_is_the_plain_lm_exactly():
    lm = tiny_gpt2()
    model = ExplicitMemoryLM.from_lm(lm, memory_layers=[0], keep_tokens=4).eval()
    x = torch.randint(0, 96, (2, 20))
    plain = lm(x).logits
    assert torch.equal(model(x).logits, plain)
    empty = ExplicitMemory.visible_everywhere(random_memory(model, batch=2, refs=0))
    assert torch.equal(model(x, memory=empty).logits, plain)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in lm.parameters())


def prefix_kv(lm, prefix):
    """Every layer's full keys/values of ``prefix`` [n] from the plain LM, as one memory [1, 1, L, 2, H, n, d]."""
    hooks = [QKVHook(block.attn) for block in lm.transformer.h]
    for h in hooks:
        h.__enter__()
    with torch.no_grad():
        lm(prefix[None])
    for h in hooks:
        h.__exit__()
    return torch.stack([torch.stack(h.qkv()[1:], dim=1) for h in hooks], dim=1)[:, None]  # [1, 1, L, 2, H, n, d]


def test_memories_holding_a_prefix_equal_the_plain_lm_reading_that_prefix():
    """With every layer a memory layer and the memory = a prefix's full key/values (at their positions), the model
    on x (at the positions after the prefix) gives the plain LM's logits on prefix + x."""
    lm = tiny_gpt2()
    prefix, x = torch.randint(0, 96, (12,)), torch.randint(0, 96, (9,))
    model = ExplicitMemoryLM.from_lm(lm, memory_layers=[0, 1], keep_tokens=len(prefix)).eval()
    memory = ExplicitMemory.visible_everywhere(prefix_kv(lm, prefix))
    positions = torch.arange(len(prefix), len(prefix) + len(x))[None]
    with torch.no_grad():
        got = model(x[None], memory=memory, position_ids=positions).logits[0]
        want = lm(torch.cat([prefix, x])[None]).logits[0, len(prefix) :]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_memory_changes_only_the_tokens_of_its_interval_and_after():
    lm = tiny_gpt2()
    model = ExplicitMemoryLM.from_lm(lm, memory_layers=[0], keep_tokens=4).eval()
    x = torch.randint(0, 96, (1, 24))
    kv = random_memory(model, refs=2)
    memory = ExplicitMemory(kv, torch.tensor([[8, 30]]), torch.tensor([[16, 40]]))  # ref 1 is seen by no token
    with torch.no_grad():
        got, plain = model(x, memory=memory).logits[0], lm(x).logits[0]
        only_first = model(x, memory=ExplicitMemory(kv[:, :1], memory.start[:, :1], memory.end[:, :1])).logits[0]
    torch.testing.assert_close(got[:8], plain[:8], atol=1e-6, rtol=1e-5)  # another attention kernel, same math
    assert not torch.allclose(got[8:16], plain[8:16])
    torch.testing.assert_close(got, only_first)


def test_generation_with_the_cache_equals_argmax_of_full_forwards():
    lm = tiny_gpt2()
    model = ExplicitMemoryLM.from_lm(lm, memory_layers=[0], keep_tokens=4).eval()
    memory = ExplicitMemory.visible_everywhere(random_memory(model, refs=2) * 3)
    prompt = torch.randint(1, 96, (1, 7))
    out = model.generate(prompt, memory=memory, max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain = lm.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert not torch.equal(out, plain)  # the memory is read
    with torch.no_grad():
        for t in range(prompt.shape[1], out.shape[1]):
            assert model(out[:, :t], memory=memory).logits[0, -1].argmax() == out[0, t]


def test_save_and_load_round_trip(tmp_path):
    model = ExplicitMemoryLM.from_lm(tiny_gpt2(), memory_layers=[1], keep_tokens=4, marker_ids=[0, 5]).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, ExplicitMemoryLM)
    assert loaded.config.memory_layers == [1] and loaded.config.marker_ids == [0, 5]
    x = torch.randint(0, 96, (1, 10))
    memory = ExplicitMemory.visible_everywhere(random_memory(model))
    with torch.no_grad():
        assert torch.equal(loaded(x, memory=memory).logits, model(x, memory=memory).logits)


def test_top_tokens_agree_with_a_brute_force_attention_matrix():
    """The kept keys/values: per memory layer and head, the reference tokens with the largest sum_i exp(q_i.k_j/√d),
    recomputed here from the layer's input (output_hidden_states), its ln_1 and c_attn, in float64."""
    lm = tiny_gpt2()
    marker, keep, layers = [0, 7], 5, [0, 1]
    refs = torch.randint(1, 96, (3, 20))
    got = encode_batch(lm, refs, marker, layers, keep)  # [3, 2, 2, H, keep, d]
    x = torch.cat([torch.tensor(marker).expand(3, -1), refs], dim=1)
    with torch.no_grad():
        hidden = lm(x, output_hidden_states=True).hidden_states
    for li, layer in enumerate(layers):
        attn = lm.transformer.h[layer].attn
        with torch.no_grad():
            qkv = attn.c_attn(lm.transformer.h[layer].ln_1(hidden[layer])).double().numpy()  # [3, n, 3E]
        e, h = lm.config.n_embd, lm.config.n_head
        d = e // h
        for b in range(3):
            q, k, v = (qkv[b, len(marker) :, i * e : (i + 1) * e].reshape(-1, h, d) for i in range(3))
            for head in range(h):
                a = np.exp(q[:, head] @ k[:, head].T / np.sqrt(d))  # [n_i, n_j]
                top = np.sort(np.argsort(-a.sum(axis=0))[:keep])
                np.testing.assert_allclose(got[b, li, 0, head].numpy(), k[top, head], atol=1e-5)
                np.testing.assert_allclose(got[b, li, 1, head].numpy(), v[top, head], atol=1e-5)


@pytest.mark.parametrize(
    "first_import",
    ["from transformers import GPT2Config", "from transformers import GPT2LMHeadModel", "import transformers"],
)
def test_auto_classes_load_the_explicit_lm_whatever_transformers_imports_first(first_import, tmp_path):
    """GPT-2's config module loads modeling_auto half-way through: registration must wait, not fail."""
    ExplicitMemoryLM.from_lm(tiny_gpt2(), memory_layers=[0], keep_tokens=4).save_pretrained(tmp_path)
    code = (
        f"import mlpmem; {first_import}; from transformers import AutoModelForCausalLM;"
        f"print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ExplicitMemoryLM"
    assert "could not register" not in out.stderr
