"""The key hook sits at the last block's feed-forward input, for every family in the table."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mlpmem.errors import UsageError
from mlpmem.lm.keys import KEY_MODULES, KeyHook, key_dim, key_module_path
from mlpmem.lm.mom.configuration import MoMLMConfig

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

SMALL = dict(vocab_size=96, max_position_embeddings=64, num_hidden_layers=2, num_attention_heads=2)
CONFIGS = {
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **SMALL),
    "opt": lambda: tf.OPTConfig(
        hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1, **SMALL
    ),
    "llama": lambda: tf.LlamaConfig(hidden_size=32, intermediate_size=64, **SMALL),
    "mistral": lambda: tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **SMALL),
    "mlpmem-mom": lambda: MoMLMConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=2),
}
# the feed-forward module of the last block, whose *input* the key must be
FFN_MODULES = {
    "gpt2": "transformer.h.1.mlp",
    "gpt_neox": "gpt_neox.layers.1.mlp",
    "opt": "model.decoder.layers.1.fc1",
    "llama": "model.layers.1.mlp",
    "mistral": "model.layers.1.mlp",
    "qwen2": "model.layers.1.mlp",
    "mlpmem-mom": "model.layers.1.ffn",
}


def build(family: str, **overrides) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    config = CONFIGS[family]()
    for name, value in overrides.items():
        setattr(config, name, value)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def ffn_input(model: tf.PreTrainedModel, path: str, ids: torch.Tensor) -> torch.Tensor:
    """Input of the feed-forward module, caught by a pre-hook (a route independent of KEY_MODULES)."""
    seen = {}
    handle = model.get_submodule(path).register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen["x"].reshape(ids.shape[0], ids.shape[1], -1)


def test_table_covers_the_families():
    assert set(KEY_MODULES) == set(CONFIGS)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hook_catches_the_feed_forward_input(family):
    model = build(family)
    assert model.config.model_type == family
    ids = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with KeyHook(model) as hook:
        with torch.no_grad():
            model(ids)
    assert hook.path == KEY_MODULES[family].format(block=1)
    assert hook.keys.shape == (2, 7, key_dim(model)) == (2, 7, 32)
    torch.testing.assert_close(hook.keys, ffn_input(model, FFN_MODULES[family], ids), rtol=0, atol=0)
    # calling the backbone alone (no LM head), as the datastore does, gives the same 3-D keys
    with KeyHook(model) as hook, torch.no_grad():
        model.base_model(input_ids=ids)
    torch.testing.assert_close(hook.keys, ffn_input(model, FFN_MODULES[family], ids), rtol=0, atol=0)
    # the hook is gone after the context
    hook.keys = None
    with torch.no_grad():
        model(ids)
    assert hook.keys is None


def test_opt_post_norm_variant_keys_the_attention_norm():
    model = build("opt", do_layer_norm_before=False)
    ids = torch.randint(2, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    with KeyHook(model) as hook, torch.no_grad():
        model(ids)
    assert hook.path == "model.decoder.layers.1.self_attn_layer_norm"
    torch.testing.assert_close(hook.keys, ffn_input(model, "model.decoder.layers.1.fc1", ids), rtol=0, atol=0)


def test_gpt2_keys_equal_manual_recomputation():
    """ln_2(h + attn(ln_1(h))) with attention written out by hand from the block's weights."""
    model = build("gpt2")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with KeyHook(model) as hook, torch.no_grad():
        out = model(ids, output_hidden_states=True)
    block = model.transformer.h[1]
    h = out.hidden_states[1]  # input of the last block, [B, T, 32]
    with torch.no_grad():
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(32, dim=2)
        split = lambda x: x.view(2, 9, 2, 16).transpose(1, 2)  # [B, heads, T, 16]
        scores = split(q) @ split(k).transpose(-1, -2) / 16**0.5
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 9, 32)
        expected = block.ln_2(h + block.attn.c_proj(attn))
    torch.testing.assert_close(hook.keys, expected, rtol=1e-5, atol=1e-5)


def test_gpt_neox_parallel_residual_key_is_norm_of_block_input():
    model = build("gpt_neox")
    assert model.config.use_parallel_residual
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    with KeyHook(model) as hook, torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = model.gpt_neox.layers[1].post_attention_layernorm(out.hidden_states[1])
    torch.testing.assert_close(hook.keys, expected, rtol=1e-6, atol=1e-6)


def test_explicit_key_layer_wins_and_bad_ones_are_one_line():
    model = build("gpt2")
    assert key_module_path(model, "transformer.h.0.ln_2") == "transformer.h.0.ln_2"
    with pytest.raises(UsageError, match="no such module") as err:
        key_module_path(model, "transformer.h.7.ln_2")
    assert "\n" not in str(err.value)
    model.config.model_type = "mystery"
    with pytest.raises(UsageError, match="--key-layer") as err:
        key_module_path(model)
    assert "\n" not in str(err.value)


def test_key_dim_of_a_non_norm_module_is_measured():
    model = build("gpt2")
    assert key_dim(model, "transformer.h.1.mlp.c_fc") == 128  # 4 x 32
    assert key_dim(model, "lm_head") == 96


def test_a_key_layer_that_outputs_no_single_tensor_is_refused_with_the_choices():
    """The backbone returns a model output, not a tensor: refused on the first forward, naming the flag and the
    family's feed-forward inputs (a block's tuple and a linear layer stay usable keys)."""
    model = build("gpt2")
    with pytest.raises(UsageError) as err:
        key_dim(model, "transformer")
    assert err.value.for_cli() == (
        "--key-layer: 'transformer' outputs a BaseModelOutputWithPastAndCrossAttentions, not one [batch, seq, width] "
        "tensor; give a block's feed-forward input (transformer.h.0.ln_2 .. transformer.h.1.ln_2), or another "
        "module that outputs one tensor (e.g. lm_head)"
    )
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    with KeyHook(model, "transformer.h.0") as hook, torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]  # block 0's output
    torch.testing.assert_close(hook.keys, hidden)
