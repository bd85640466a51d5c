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

from mlpmem.artifacts import RunDir
from mlpmem.cli import main
from mlpmem.config import TrainLMConfig
from mlpmem.errors import UsageError
from mlpmem.inference.generation import MemoryAugmentedLM
from mlpmem.lm.mom.configuration import MoMLMConfig
from mlpmem.lm.mom.model import MoMCache, MoMForCausalLM
from mlpmem.lm.train import build_model, check_inputs
from test_e2e_pipeline import TINY_PIPELINE, write_config

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

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


# train-lm --arch --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "mom", "gated-deltanet"])
def test_build_model_builds_the_chosen_architecture(arch, tmp_path):
    config = TrainLMConfig(run_dir=tmp_path, arch=arch, n_layer=2, n_head=2, n_embd=16, n_memories=3, top_k=1)
    model = build_model(config, 50, "unused")
    assert model.config.model_type == {"gpt2": "gpt2"}.get(arch, "mlpmem-mom")
    if arch != "gpt2":
        expected = (3, 1, True) if arch == "mom" else (1, 1, False)
        c = model.config
        assert (c.num_memories, c.topk, c.shared_memory) == expected
        assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.vocab_size) == (16, 2, 2, 50)


def test_train_lm_refuses_top_k_above_the_memories(tmp_path):
    config = TrainLMConfig(run_dir=tmp_path, arch="mom", n_memories=2, top_k=3, context=8)
    with pytest.raises(UsageError) as err:
        check_inputs(config, torch.zeros(100).numpy())
    assert err.value.field == "top_k"


def test_train_lm_config_without_arch_keeps_its_identity(tmp_path):
    """A stage built before --arch existed is still reusable: a missing field counts as its default."""
    config = TrainLMConfig(run_dir=tmp_path)
    recorded = {k: v for k, v in config.model_dump(mode="json").items() if k not in {"arch", "n_memories", "top_k"}}
    assert TrainLMConfig.identity_of(recorded) == config.identity()


def test_pipeline_runs_end_to_end_on_a_mom_base_lm(tmp_path):
    path = write_config(tmp_path, tmp_path / "run", train_lm={**TINY_PIPELINE["train_lm"], "arch": "mom"})
    assert main(["run", str(path)]) == 0
    run = RunDir(tmp_path / "run")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "train-lm" / "model")
    assert type(lm) is MoMForCausalLM and lm.config.num_memories == 4
    systems = {s.name: s for s in run.require("evaluate").systems}
    assert set(systems) == {"base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm"}
    assert all(s.valid_ppl > 1 and s.test_ppl > 1 for s in systems.values())
    # generation through the joint model (MoM + memory + kNN-LM): the cache changes nothing, greedy or beams
    mlm = MemoryAugmentedLM.from_run(tmp_path / "run")
    prompt = torch.tensor([[5, 17, 42, 7]])
    for kwargs in (dict(do_sample=False), dict(num_beams=3)):
        with_cache, without = (mlm.generate(prompt, max_new_tokens=6, use_cache=c, **kwargs) for c in (True, False))
        assert torch.equal(with_cache, without), kwargs
