"""Datastore extraction: keys (the LM's feed-forward input at every position) and values (the next token).

    mlpmem datastore --run-dir RUN [--split train] [--context C] [--stride S]
    accelerate launch --multi_gpu --num_processes N -m mlpmem.cli datastore --run-dir RUN   # chunks shared by rank

Entry i is position i of the split, predicting token i + 1: ``keys`` [N, d] (float16 or float32) and ``values``
[N] int32 with N = n_tokens - 1. Windows follow ``mlpmem.data.windows`` (every position keyed once, with at
least context - stride tokens of history past the first window). Work is done in chunks of ``chunk_windows``
windows written straight into preallocated memmaps (RAM independent of corpus size); a rerun skips the chunks
already written. ``--keys streamed`` (disk-light) stores the values only; the index, targets and memory stages
recompute the keys with the LM (``mlpmem.knn.stream``).
"""

from __future__ import annotations

import numpy as np
import torch

from mlpmem.artifacts import RunDir, StageBuild
from mlpmem.config import DatastoreConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.distributed import begin_shared, clear_rank_progress, process_state, run_chunks
from mlpmem.errors import UsageError
from mlpmem.lm.forward import forward_windows
from mlpmem.lm.keys import key_dim, key_module_path
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir
from mlpmem.manifests import DatastoreManifest, TrainLMManifest


def window_sizes(config: DatastoreConfig, lm: TrainLMManifest, positions: int | None) -> tuple[int, int]:
    """(context, stride): context defaults to the LM's training context capped by its positions."""
    if config.context is not None:
        if positions is not None and config.context > positions:
            raise UsageError(f"context ({config.context}) exceeds the model's {positions} positions", field="context")
        context = config.context
    else:
        candidates = [c for c in (lm.config.context, positions) if isinstance(c, int) and c > 0]
        context = min(candidates)
    stride = config.stride or max(1, context // 2)
    if stride >= context:
        raise UsageError(
            f"stride ({stride}) must be smaller than context ({context}) so that every position gets a key",
            field="stride",
        )
    return context, stride


def write_chunk(
    model: torch.nn.Module,
    key_layer: str,
    tokens: np.ndarray,
    chunk: list[Window],
    batch_size: int,
    keys: np.memmap,
    values: np.memmap,
    device: torch.device,
) -> int:
    """Keys and values of the positions one chunk of windows scores, written in place; returns how many.

    Non-finite keys (a model with nan weights) stop the stage with one line before anything is marked done.
    """
    n = 0
    for out in forward_windows(model, tokens, chunk, batch_size, key_layers=[key_layer], device=device):
        k = out.keys[key_layer].float()  # [b, d]
        if not torch.isfinite(k).all():
            raise UsageError(
                f"the LM produced nan/inf keys at positions {out.positions[0]}..{out.positions[-1]}; "
                "its weights are probably broken (retrain it)"
            )
        keys[out.positions] = k.cpu().numpy().astype(keys.dtype)
        values[out.positions] = out.gold.numpy()
        n += len(out.positions)
    return n


def build_datastore(config: DatastoreConfig) -> DatastoreManifest:
    """Extract the keys and values of one prepared split with the run's LM; returns the datastore manifest."""
    run = RunDir(config.run_dir)
    prepare, lm = run.require("prepare"), run.require("train-lm")
    inputs = {"prepare": prepare.fingerprint, "train-lm": lm.fingerprint}
    if (done := run.reusable("datastore", config, inputs)) is not None:
        return done
    state, device = process_state(config.device)
    model = load_lm(run_lm_dir(run.path), device)
    if prepare.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"the prepared tokens use {prepare.vocab_size} ids but the LM has only {model.config.vocab_size}"
        )
    key_layer = key_module_path(model, config.key_layer)
    context, stride = window_sizes(config, lm, max_positions(model))
    tokens = open_split(run.path, config.split)  # [n_tokens] memmap
    windows = sliding_windows(len(tokens), context, stride)
    found = {"model_fingerprint": lm.model_fingerprint, "key_layer": key_layer, "context": context, "stride": stride}
    found |= {"windows": len(windows), "key_width": key_dim(model, key_layer)}
    if config.keys == "streamed":
        if state.is_main_process:
            build_values_only(run, config, inputs, tokens, found)
        state.wait_for_everyone()
        return run.require("datastore")
    chunks = [windows[i : i + config.chunk_windows] for i in range(0, len(windows), config.chunk_windows)]

    shape = (len(tokens) - 1, key_dim(model, key_layer))

    def allocate(build: StageBuild) -> None:  # keys [N, d], values [N]
        build.add_array("keys", config.key_dtype, shape)
        build.add_array("values", "int32", shape[:1])

    build = begin_shared(run, "datastore", config, inputs, state, allocate)
    seconds, computed = extract(
        build,
        chunks,
        state,
        lambda chunk, keys, values: write_chunk(
            model, key_layer, tokens, chunk, config.batch_size, keys, values, device
        ),
    )
    if state.is_main_process:
        clear_rank_progress(build)
        # tokens of all processes over the wall time until the last one finished
        rate = round(computed / max(seconds, 1e-9), 1)
        build.manifest.timings = {
            **build.manifest.timings,
            "extract_seconds": round(seconds, 2),
            "tokens_per_second": rate,
        }
        build.complete(**found)
    state.wait_for_everyone()
    return run.require("datastore")


def build_values_only(
    run: RunDir, config: DatastoreConfig, inputs: dict[str, str], tokens: np.ndarray, found: dict
) -> DatastoreManifest:
    """A streamed (disk-light) datastore: values [N] only (token i + 1 of every position i; no LM forward).

    Its keys are recomputed by the LM where needed (``knn.stream``), over the windows recorded here.
    """
    build = run.begin("datastore", config, inputs)
    values = build.add_array("values", "int32", (len(tokens) - 1,))
    for a in range(0, len(values), 1 << 22):
        values[a : a + (1 << 22)] = tokens[a + 1 : a + 1 + (1 << 22)]
    values.flush()
    return build.complete(**found)


def extract(build: StageBuild, chunks: list[list[Window]], state, write) -> tuple[float, int]:
    """Write this rank's chunks not yet done (``write(chunk, keys, values)``; chunk c is rank c % processes');
    returns (seconds, entries written by this rank)."""
    keys = build.manifest.arrays["keys"].open(build.dir, "r+")  # [N, d]
    values = build.manifest.arrays["values"].open(build.dir, "r+")  # [N]

    def work(c: int) -> int:
        n = write(chunks[c], keys, values)
        keys.flush()
        values.flush()
        return n

    entries = lambda c: chunks[c][-1].end - 1 - chunks[c][0].first_scored  # noqa: E731

    def rows(c: int) -> tuple[np.ndarray, np.ndarray]:  # the positions chunk c scores
        a, b = chunks[c][0].first_scored, chunks[c][-1].end - 1
        return keys[a:b], values[a:b]

    return run_chunks(build, state, len(chunks), entries, work, "datastore", "tok", rows)
