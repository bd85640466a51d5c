"""Speed and storage of the explicit memory, for ``mlpmem bench`` (when the run has ``train-explicit``).

Decode latency (batch 1, KV cache) of the explicit-memory LM without memories and reading ``k`` (5) references'
memories, timed in interleaved rounds; the retrieval itself (one query of the 64 tokens before a chunk: search +
gathering the memories) timed apart, and amortised over the 64 tokens of a chunk. Bytes: the memories per
reference and in total, the reference token ids, and the retriever's files.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.explicit.model import ExplicitMemory
from mlpmem.explicit.scoring import ExplicitReader
from mlpmem.manifests import ExplicitMemoriesManifest, ReferencesManifest
from mlpmem.measure import interleaved_decode_ms
from mlpmem.memory_system import SystemName


def retrieval_ms(reader: ExplicitReader, tokens: np.ndarray, queries: int, seed: int) -> float:
    """Median ms of one retrieval (search of ``k`` references + their memories as a tensor) over real queries."""
    q = reader.store.query_tokens
    starts = np.random.default_rng(seed).integers(q, len(tokens), size=queries)
    times = []
    for s in starts:
        t0 = time.perf_counter()
        reader.store.kv(reader.store.search(tokens, [int(s)], reader.k))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def storage(run: RunDir) -> dict[str, int]:
    """Bytes on disk: memories (per reference and in total), reference ids, retriever files."""
    refs, mem = run.require(ReferencesManifest), run.require(ExplicitMemoriesManifest)
    spec = mem.arrays["memories"]
    id_files = {refs.arrays[name].file for name in ("ids", "offsets", "source_start")}
    return {
        "bytes_per_reference": spec.nbytes // spec.shape[0],
        "memories_bytes": spec.nbytes,
        "reference_ids_bytes": sum(r.bytes for name, r in refs.files.items() if name in id_files),
        "retriever_bytes": sum(r.bytes for name, r in refs.files.items() if name not in id_files),
        "references": spec.shape[0],
    }


def measure_explicit(run: RunDir, prompt: torch.Tensor, config: Any, device: torch.device) -> dict[str, Any]:
    """The ``explicit`` section of bench.json."""
    reader = ExplicitReader.open(run, 5, device, control=False)
    model = reader.model
    model.generation_config.eos_token_id = None
    tokens = np.asarray(run.array("prepare", "valid"))
    kv = reader.store.kv(reader.store.search(tokens, [len(tokens)], reader.k)).to(device)
    memory = ExplicitMemory.visible_everywhere(kv)
    systems = {
        SystemName.EXPLICIT_NO_MEMORY: model.generate,
        SystemName.EXPLICIT_MEMORY: functools.partial(model.generate, memory=memory),
    }
    ms = interleaved_decode_ms(systems, prompt, config.new_tokens, config.repeats)
    search = retrieval_ms(reader, tokens, 20, config.seed)
    chunk = reader.chunk
    with_retrieval = ms[SystemName.EXPLICIT_MEMORY].median + search / chunk
    return {
        "decode_ms": {name: spread.rounded() for name, spread in ms.items()},
        "retrieval_ms_per_query": round(search, 4),
        "decode_ms_with_retrieval": round(with_retrieval, 4),
        "references_read": reader.k,
        "note": f"decode_ms: [min, median, max] of the rounds' medians; with retrieval: the memory's median plus "
        f"one retrieval per {chunk} tokens",
        **storage(run),
    }


def explicit_lines(section: dict[str, Any]) -> list[str]:
    """The bench report's lines for the explicit memory."""
    from mlpmem.measure import human_bytes

    ms = section["decode_ms"]
    return [
        f"explicit memory: decode {ms['explicit-no-memory'][1]:.2f} ms/token without memory, "
        f"{ms['explicit-memory'][1]:.2f} reading {section['references_read']} references, "
        f"{section['decode_ms_with_retrieval']:.2f} with retrieval ({section['retrieval_ms_per_query']:.2f} ms per "
        "query, one per chunk)",
        f"explicit memory: {human_bytes(section['bytes_per_reference'])} per reference, "
        f"{human_bytes(section['memories_bytes'])} for {section['references']:,} references "
        f"(+ ids {human_bytes(section['reference_ids_bytes'])}, retriever {human_bytes(section['retriever_bytes'])})",
    ]
