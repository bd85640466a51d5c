"""Tiny generation inputs: a run with an LM + word-level tokenizer, a random (peaked) MLP memory paired with it,
and a datastore + exact index over the train split's keys (written here with a plain hook, not mlpmem.knn)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import TINY_VOCAB, make_tiny_run
from mlpmem.artifacts import Stage, read_json
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig

KEY_LAYER = "transformer.h.1.ln_2"
WORDS = ["<eos>"] + [f"w{i}" for i in range(1, TINY_VOCAB)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the tiny vocabulary ("w1 w2 ..."; id 0 is <eos>)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")


def tiny_memory(model_fp: str, seed: int = 0, lmbda: float = 0.5) -> MLPMemory:
    """A random 2-block memory with a peaked head (so mixing visibly changes the LM's choices)."""
    torch.manual_seed(seed)
    cfg = MLPMemoryConfig(input_dim=32, hidden_size=32, n_blocks=2, vocab_size=TINY_VOCAB, base_model_fingerprint=model_fp,
                          key_layer=KEY_LAYER, lmbda=lmbda, knn_temperature=5.0)
    memory = MLPMemory(cfg).eval()
    with torch.no_grad():
        memory.head.weight.mul_(40.0)
    return memory


def write_generation_run(run_dir: Path) -> Path:
    """Complete prepare, lm (with tokenizer), memory, datastore and index stages."""
    make_tiny_run(run_dir, n_train=800, n_eval=100)
    lm_manifest = Stage(run_dir, "lm").read()
    model_dir = run_dir / "lm" / "model"
    tiny_tokenizer().save_pretrained(model_dir)

    memory_stage = Stage(run_dir, "memory")
    memory_stage.begin({"synthetic": True}, {"lm": lm_manifest["fingerprint"]})
    tiny_memory(lm_manifest["model_fingerprint"]).save_pretrained(memory_stage.dir / "model")
    memory_stage.complete({})

    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens = np.fromfile(run_dir / "prepare" / "train.bin", dtype=np.uint16).astype(np.int64)
    captured = {}
    handle = lm.get_submodule(KEY_LAYER).register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    keys = []
    with torch.no_grad():
        for a in range(0, len(tokens) - 1, 64):
            chunk = tokens[a : min(a + 64, len(tokens) - 1)]
            lm(torch.from_numpy(chunk)[None])
            keys.append(captured["h"][0].numpy())
    handle.remove()
    keys = np.concatenate(keys)
    ds = Stage(run_dir, "datastore")
    ds.begin({"synthetic": True}, {"lm": lm_manifest["fingerprint"]})
    ds.add_array("keys", "float16", keys.shape)[:] = keys.astype(np.float16)
    ds.add_array("values", "int32", (len(keys),))[:] = tokens[1:]
    ds.complete({"entries": len(keys)}, model_fingerprint=lm_manifest["model_fingerprint"],
                tokenizer_fingerprint=lm_manifest["tokenizer_fingerprint"], key_layer=KEY_LAYER, key_dim=keys.shape[1],
                split="train")
    import faiss

    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys.astype(np.float32))
    ix = Stage(run_dir, "index")
    ix.begin({"factory": "Flat"}, {"datastore": ds.manifest["fingerprint"]})
    faiss.write_index(index, str(ix.dir / "index.faiss"))
    ix.complete({"ntotal": len(keys)}, factory="Flat", nlist=None, nprobe=None, ntotal=len(keys), dim=int(keys.shape[1]),
                key_layer=KEY_LAYER, datastore_fingerprint=ds.manifest["fingerprint"], index_file="index.faiss")
    assert read_json(run_dir / "index" / "manifest.json")["status"] == "complete"
    return run_dir


@pytest.fixture(scope="session")
def generation_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_generation_run(tmp_path_factory.mktemp("generation") / "run")
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def generation_run(generation_run_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of a run with complete prepare, lm (+ tokenizer), memory, datastore and index stages."""
    return Path(shutil.copytree(generation_run_template, tmp_path / "run"))


