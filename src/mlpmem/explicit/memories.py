"""``mlpmem explicit-memories``: the sparse key/values of every reference, encoded by the run's LM.

    mlpmem explicit-memories --run-dir runs/demo [--keep-tokens 8] [--memory-layers 0 1]

``memories`` [n_refs, layers, 2, heads, keep, head_dim] float16 (``mlpmem.explicit.encode``), written chunk by
chunk into a preallocated memmap; a rerun after a kill skips the chunks already written. The memories are encoded
once by the warm-up LM (``train-lm``) and read, frozen, by the continual training and by evaluation alike, so the
memories a model is evaluated with are the ones it was trained to read.
"""

from __future__ import annotations

import numpy as np

from mlpmem.artifacts import RunDir
from mlpmem.config import ExplicitMemoriesConfig
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.explicit.encode import encode_references
from mlpmem.lm.load import load_lm, load_tokenizer, run_lm_dir
from mlpmem.manifests import ExplicitMemoriesManifest
from mlpmem.progress import progress


def marker_ids(run: RunDir, marker: str) -> list[int]:
    """The end-of-text token then the marker text, in the run's tokenizer (the LM's folder holds it)."""
    tokenizer = load_tokenizer(run_lm_dir(run.path))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return [int(eos), *tokenizer(marker, add_special_tokens=False)["input_ids"]]


def memory_layers(config: ExplicitMemoriesConfig, n_layer: int) -> list[int]:
    """The configured memory layers, or the first half of the LM's; UsageError for a block it does not have."""
    layers = sorted(set(config.memory_layers)) if config.memory_layers else list(range(max(1, n_layer // 2)))
    if layers[-1] >= n_layer:
        raise UsageError(f"the LM has {n_layer} blocks (0..{n_layer - 1}); got {layers[-1]}", field="memory_layers")
    return layers


def build_explicit_memories(config: ExplicitMemoriesConfig) -> ExplicitMemoriesManifest:
    """Encode every reference (resumable by chunk); returns the complete manifest of RUN/explicit-memories."""
    run = RunDir(config.run_dir)
    lm_manifest, refs = run.require("train-lm"), run.require("references")
    inputs = {"train-lm": lm_manifest.fingerprint, "references": refs.fingerprint}
    if (done := run.reusable("explicit-memories", config, inputs)) is not None:
        return done
    lm = load_lm(run_lm_dir(run.path), resolve_device(config.device))
    if lm.config.model_type != "gpt2":
        raise UsageError(f"explicit memory reads GPT-2 attention; the run's LM is {lm.config.model_type!r}")
    layers, markers = memory_layers(config, lm.config.n_layer), marker_ids(run, config.marker)
    ids, offsets = run.array("references", "ids", refs), np.asarray(run.array("references", "offsets", refs))
    if np.diff(offsets).min() < config.keep_tokens:
        raise UsageError(
            f"a reference has {np.diff(offsets).min()} tokens, fewer than keep_tokens", field="keep_tokens"
        )
    if len(markers) + int(np.diff(offsets).max()) > lm.config.n_positions:
        raise UsageError(
            f"the marker ({len(markers)} tokens) and a reference ({np.diff(offsets).max()}) exceed the LM's "
            f"{lm.config.n_positions} positions; cut shorter references (references --chunk-tokens) or shorten it",
            field="marker",
        )
    heads = lm.config.n_head
    shape = (refs.references, len(layers), 2, heads, config.keep_tokens, lm.config.n_embd // heads)
    build = run.begin("explicit-memories", config, inputs)
    memories = build.add_array("memories", "float16", shape)
    starts = range(0, refs.references, config.chunk_refs)
    done = build.done_chunks(lambda c: [memories[starts[c] : starts[c] + config.chunk_refs]])
    for c, a in enumerate(progress(starts, desc="explicit-memories", unit="chunk")):
        if c in done:
            continue
        batch = range(a, min(a + config.chunk_refs, refs.references))
        memories[a : batch.stop] = encode_references(
            lm, ids, offsets, batch, markers, layers, config.keep_tokens, config.batch_size
        )
        memories.flush()
        build.mark_chunk(c, done, [memories[a : batch.stop]])
    return build.complete(model_fingerprint=lm_manifest.model_fingerprint, memory_layers=layers, marker_ids=markers)
