"""Perplexity of the explicit-memory LM under the sliding-window protocol (``mlpmem.data.windows``).

Each window is read in chunks of ``chunk`` tokens from its first token; chunk j retrieves ``k`` references with
the ``query_tokens`` tokens before it (``mlpmem.explicit.reading.reading_memory``) and its tokens read their
memories. The scored positions and their order are those of ``mlpmem.evaluate.scoring.score_tokens``, so the
log-probs line up with every other system's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutput

from mlpmem.artifacts import RunDir
from mlpmem.data.windows import sliding_windows
from mlpmem.explicit.model import ExplicitMemoryLM
from mlpmem.explicit.reading import MemoryStore, reading_memory
from mlpmem.manifests import TrainExplicitManifest
from mlpmem.progress import progress


@dataclass
class ExplicitReader:
    """The trained explicit-memory LM, its control, the run's memory store and the reading protocol."""

    model: ExplicitMemoryLM
    control: ExplicitMemoryLM | None
    store: MemoryStore
    chunk: int
    k: int
    mass: list[float] = field(default_factory=list)  # attention mass on memory, per memory layer and window

    @classmethod
    def open(cls, run: RunDir, k: int, device: torch.device | str = "cpu", control: bool = True) -> ExplicitReader:
        """The run's trained models (the control too when asked and trained) and its memory store."""
        manifest = run.require(TrainExplicitManifest)
        folder = Path(run.folder("train-explicit"))
        model = ExplicitMemoryLM.from_pretrained(folder / "model").to(device).eval()
        control_model = None
        if control and manifest.config.control:
            control_model = ExplicitMemoryLM.from_pretrained(folder / "control").to(device).eval()
        return cls(model, control_model, MemoryStore.open(run), manifest.config.chunk_tokens, k)


@torch.inference_mode()
def explicit_log_probs(reader: ExplicitReader, tokens: np.ndarray, context: int, stride: int, desc: str) -> np.ndarray:
    """log p(gold) [N] float32 of the explicit-memory LM at every position the sliding windows score."""
    windows = sliding_windows(len(tokens), context, stride)
    out = np.empty(sum(w.n_scored for w in windows), dtype=np.float32)
    device = next(reader.model.parameters()).device
    pos = 0
    for w in progress(windows, desc=desc, unit="window"):
        x = torch.from_numpy(np.asarray(tokens[w.begin : w.end], dtype=np.int64))[None].to(device)  # [1, L]
        memory = reading_memory(reader.store, tokens, w.begin, w.end - w.begin, reader.k, reader.chunk)
        memory.kv, memory.mass = memory.kv.to(device), []
        logits = reader.model(input_ids=x, memory=memory).logits[0].float()  # [L, V]
        rows = slice(w.first_scored - w.begin, w.end - 1 - w.begin)
        gold = x[0, rows.start + 1 : rows.stop + 1]
        out[pos : pos + len(gold)] = torch.log_softmax(logits[rows], -1).gather(-1, gold[:, None])[:, 0].cpu().numpy()
        reader.mass.extend(m for m in memory.mass if math.isfinite(m))
        pos += len(gold)
    return out


class ExplicitScoringModel(torch.nn.Module):
    """The explicit-memory LM under the HF causal-LM contract, for one window per row: ``input_ids`` [B, T] ->
    ``logits`` [B, T, V], each row read as a window of its own (its chunks retrieve with the tokens before them
    in that row), as ``explicit_log_probs`` reads a split's first window."""

    def __init__(self, reader: ExplicitReader):
        super().__init__()
        self.reader = reader
        self.model = reader.model

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **kwargs) -> CausalLMOutput:
        r = self.reader
        rows = []
        for ids in input_ids:
            tokens = ids.cpu().numpy()
            memory = reading_memory(r.store, tokens, 0, len(tokens), r.k, r.chunk)
            memory.kv = memory.kv.to(ids.device)
            rows.append(r.model(input_ids=ids[None], memory=memory).logits[0])  # [T, V]
        return CausalLMOutput(logits=torch.stack(rows))
