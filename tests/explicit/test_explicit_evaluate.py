"""evaluate's explicit-memory rows, recomputed here without mlpmem's scoring: plain sliding windows, the control
through Hugging Face alone, the explicit-memory LM with retrieval done here (bm25s on the 16 tokens before each
16-token chunk, 5 references per chunk) and its memories gathered from the stored array."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mlpmem.artifacts import RunDir
from mlpmem.config import EvaluateConfig, TrainExplicitConfig
from mlpmem.data.windows import sliding_windows
from mlpmem.evaluate.run import evaluate
from mlpmem.explicit.model import ExplicitMemory
from mlpmem.explicit.retriever import BM25_DIR, BM25Retriever
from mlpmem.explicit.train import train_explicit

from explicit_inputs import CONFIG, memory_run
from gen_inputs import generation_run, generation_run_template  # noqa: F401 - fixtures

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


@pytest.fixture
def evaluated(tmp_path):
    path = memory_run(tmp_path / "run")
    train_explicit(TrainExplicitConfig(run_dir=path, **CONFIG))
    config = EvaluateConfig(run_dir=path, context=48, stride=24, max_tokens=150, device="cpu")
    return path, evaluate(config)


def naive_ppl(path, name, tokens, context, stride, with_memory):
    run = RunDir(path)
    model = AutoModelForCausalLM.from_pretrained(path / "train-explicit" / name).eval()
    retriever = BM25Retriever.load(run.file("references", BM25_DIR)).model
    memories = run.array("explicit-memories", "memories")
    nll = []
    for w in sliding_windows(len(tokens), context, stride):
        x = torch.from_numpy(tokens[w.begin : w.end])[None]
        memory = None
        if with_memory:
            kv, start, end = [], [], []
            for j, s in enumerate(range(w.begin, w.end, 16)):
                if s == 0:
                    continue  # nothing before the first token: no retrieval
                from bm25s.tokenization import Tokenized

                query = [int(t) for t in tokens[s - 16 : s]]
                vocab = {str(t): t for t in range(len(retriever.vocab_dict))}
                found = retriever.retrieve(Tokenized(ids=[query], vocab=vocab), k=5, show_progress=False)[0][0]
                for r in found:
                    kv.append(torch.from_numpy(memories[r].astype(np.float32)))
                    start.append(16 * j)
                    end.append(min(16 * j + 16, w.end - w.begin))
            memory = ExplicitMemory(torch.stack(kv)[None], torch.tensor([start]), torch.tensor([end]))
        with torch.no_grad():
            logp = torch.log_softmax(model(x, memory=memory).logits[0].double(), -1)
        for pos in range(w.first_scored, w.end - 1):
            nll.append(-float(logp[pos - w.begin, tokens[pos + 1]]))
    return math.exp(np.mean(nll))


def test_explicit_rows_equal_an_independent_recomputation(evaluated):
    path, manifest = evaluated
    names = [s.name for s in manifest.systems]
    assert names == ["base", "explicit-memory", "explicit-control"]
    tokens = np.asarray(RunDir(path).array("prepare", "test")[:150], dtype=np.int64)
    control = naive_ppl(path, "control", tokens, 48, 24, with_memory=False)
    explicit = naive_ppl(path, "model", tokens, 48, 24, with_memory=True)
    assert manifest.system("explicit-control").test_ppl == pytest.approx(control, rel=1e-4)
    assert manifest.system("explicit-memory").test_ppl == pytest.approx(explicit, rel=1e-4)
    assert 0 < manifest.memory_mass < 1


def test_generate_reads_the_memories_the_prompt_retrieves(evaluated):
    """``generate --explicit`` equals greedy argmax over full forwards with the memories of the 5 references that
    the prompt's last 16 tokens retrieve (bm25s called here), every token seeing them."""
    from bm25s.tokenization import Tokenized

    from mlpmem.config import GenerateConfig
    from mlpmem.inference.generation import generate_from_config

    path, _ = evaluated
    prompt = " ".join(f"w{i}" for i in [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    got = generate_from_config(
        GenerateConfig(run_dir=path, prompt=prompt, explicit=True, max_new_tokens=6, device="cpu")
    )

    run = RunDir(path)
    model = AutoModelForCausalLM.from_pretrained(path / "train-explicit" / "model").eval()
    retriever = BM25Retriever.load(run.file("references", BM25_DIR)).model
    ids = [int(w[1:]) for w in prompt.split()]
    vocab = {str(t): t for t in range(len(retriever.vocab_dict))}
    found = retriever.retrieve(Tokenized(ids=[ids[-16:]], vocab=vocab), k=5, show_progress=False)[0][0]
    kv = torch.from_numpy(run.array("explicit-memories", "memories")[found].astype(np.float32))[None]
    memory = ExplicitMemory(kv, torch.zeros(1, 5, dtype=torch.long), torch.full((1, 5), 10**9))
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):
            x = torch.cat([x, model(x, memory=memory).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = " ".join(f"w{t}" if t else "<eos>" for t in x[0, len(ids) :].tolist())
    assert got.outputs[0].split() == [w for w in want.split() if w != "<eos>"]


def test_bench_section_times_both_decodes_and_counts_the_bytes_on_disk(evaluated):
    from types import SimpleNamespace

    from mlpmem.explicit.bench import explicit_lines, measure_explicit

    path, _ = evaluated
    prompt = torch.randint(1, 96, (1, 8))
    section = measure_explicit(RunDir(path), prompt, SimpleNamespace(new_tokens=4, repeats=1, seed=0), "cpu")
    assert set(section["decode_ms"]) == {"explicit-no-memory", "explicit-memory"}
    assert all(v[1] > 0 for v in section["decode_ms"].values()) and section["retrieval_ms_per_query"] > 0
    n_refs = (path / "references" / "offsets.bin").stat().st_size // 8 - 1
    assert section["references"] == n_refs
    assert section["bytes_per_reference"] == 1 * 2 * 2 * 4 * 16 * 2  # layers, K/V, heads, keep, head dim, fp16
    assert section["memories_bytes"] == (path / "explicit-memories" / "memories.bin").stat().st_size
    bm25 = sum(f.stat().st_size for f in (path / "references" / "bm25").iterdir())
    assert section["retriever_bytes"] == bm25
    assert len(explicit_lines(section)) == 2


def test_with_an_mlp_memory_in_the_run_the_table_also_mixes_it_with_the_explicit_memory(generation_run):
    """On a run with kNN-LM and an MLP memory, the explicit rows join the same table, and the explicit memory mixed
    with the MLP memory has λ tuned on valid (its valid PPL the minimum of its λ curve; at λ = 0, the explicit
    memory alone)."""
    from mlpmem.config import ExplicitMemoriesConfig, ReferencesConfig
    from mlpmem.explicit.memories import build_explicit_memories
    from mlpmem.explicit.references import build_references

    build_references(ReferencesConfig(run_dir=generation_run, chunk_tokens=32, query_tokens=16, recall_samples=0))
    build_explicit_memories(ExplicitMemoriesConfig(run_dir=generation_run, keep_tokens=4, device="cpu"))
    train_explicit(TrainExplicitConfig(run_dir=generation_run, **CONFIG))
    config = EvaluateConfig(
        run_dir=generation_run, k=16, knn_temperatures=[5.0], lmbdas=[0.1, 0.3], context=32, stride=16, device="cpu"
    )
    manifest = evaluate(config)
    names = [s.name for s in manifest.systems]
    assert names == [
        "base", "knn-lm", "mlp-memory", "mlp-memory+knn-lm", "explicit-memory", "explicit-control",
        "explicit-memory+mlp-memory",
    ]  # fmt: skip
    mixed, alone = manifest.system("explicit-memory+mlp-memory"), manifest.system("explicit-memory")
    curve = {float(k): v for k, v in manifest.lambda_curves["explicit-memory+mlp-memory"].items()}
    assert {0.1, 0.3} <= set(curve) and mixed.valid_ppl == pytest.approx(min(curve.values()))
    assert mixed.valid_ppl == pytest.approx(curve[mixed.lmbda])
    if 0.0 in curve:  # λ = 0: the explicit-memory LM alone
        assert curve[0.0] == pytest.approx(alone.valid_ppl)
