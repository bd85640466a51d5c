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
