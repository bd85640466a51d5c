"""Datastore extraction: keys (the LM's feed-forward input at every position) and values (the next token).

    mlpmem datastore --run-dir RUN [--split train] [--context C] [--stride S]
    accelerate launch -m mlpmem.cli datastore --run-dir RUN     # multi-GPU: chunks shared out by rank

Entry i is position i of the split, predicting token i + 1: ``keys`` [N, d] (float16 or float32) and ``values``
[N] int32 with N = n_tokens - 1. Windows follow ``mlpmem.data.windows`` (every position keyed once, with at
least context - stride tokens of history past the first window). Work is done in chunks of ``chunk_windows``
windows written straight into preallocated memmaps (RAM independent of corpus size); a rerun skips the chunks
already written. ``--keys streamed`` (disk-light) stores the values only; the index, targets and memory stages
recompute the keys with the LM (``mlpmem.knn.stream``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mlpmem.artifacts import RunDir, StageBuild, atomic_write_json, read_json
from mlpmem.config import DatastoreConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.lm.forward import forward_windows
from mlpmem.lm.keys import key_dim, key_module_path
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir
from mlpmem.manifests import DatastoreManifest, TrainLMManifest
from mlpmem.progress import progress

RANK_PROGRESS = "progress.rank{rank}.json"  # per-rank chunk lists under accelerate (no shared-file races)


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


def _done_chunks(build: StageBuild) -> set[int]:
    done = build.done_chunks()
    for path in build.dir.glob(RANK_PROGRESS.format(rank="*")):
        done |= set(read_json(path)["done"])
    return done


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


def process_group(config: DatastoreConfig):
    """accelerate's process state (one process unless launched) and the device this rank works on."""
    from accelerate import PartialState  # works without any accelerate config in a single process

    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)  # cpu=True: several CPU processes (torchrun) join a gloo group
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:  # processes that would each act as the only one
        raise UsageError(
            f"launched as {launched} processes but accelerate sees one; start with `accelerate launch` or torchrun"
        )
    device = state.device if (state.num_processes > 1 and config.device == "auto") else resolve_device(config.device)
    return state, device


def begin_build(
    run: RunDir, config: DatastoreConfig, inputs: dict[str, str], state, shape: tuple[int, int]
) -> StageBuild:
    """The main process begins the stage and allocates keys [N, d] and values [N]; the other ranks join it."""
    if state.is_main_process:
        build = run.begin("datastore", config, inputs)
        build.add_array("keys", config.key_dtype, shape)
        build.add_array("values", "int32", shape[:1])
    state.wait_for_everyone()
    return build if state.is_main_process else run.join("datastore")


def build_datastore(config: DatastoreConfig) -> DatastoreManifest:
    """Extract the keys and values of one prepared split with the run's LM; returns the datastore manifest."""
    run = RunDir(config.run_dir)
    prepare, lm = run.require("prepare"), run.require("train-lm")
    inputs = {"prepare": prepare.fingerprint, "train-lm": lm.fingerprint}
    if (done := run.reusable("datastore", config, inputs)) is not None:
        return done
    state, device = process_group(config)
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

    build = begin_build(run, config, inputs, state, (len(tokens) - 1, key_dim(model, key_layer)))
    seconds, computed = extract(
        build,
        chunks,
        state,
        lambda chunk, keys, values: write_chunk(
            model, key_layer, tokens, chunk, config.batch_size, keys, values, device
        ),
    )
    if state.is_main_process:
        for path in build.dir.glob(RANK_PROGRESS.format(rank="*")):
            path.unlink()
        # rate of the main process alone (each of the `world` processes extracts its share at about this rate)
        rate = round(computed / max(seconds, 1e-9), 1)
        build.manifest.timings = {
            **build.manifest.timings,
            "extract_seconds": round(seconds, 2),
            "tokens_per_second": rate,
        }
        build.complete(**found, processes=state.num_processes)
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
    return build.complete(**found, processes=1)


def extract(build: StageBuild, chunks: list[list[Window]], state, write) -> tuple[float, int]:
    """Write this rank's chunks not yet done (``write(chunk, keys, values)``), marking each once flushed;
    returns (seconds, entries written)."""
    rank, world = state.process_index, state.num_processes
    keys = build.manifest.arrays["keys"].open(build.dir, "r+")  # [N, d]
    values = build.manifest.arrays["values"].open(build.dir, "r+")  # [N]
    done = _done_chunks(build)
    mine = [c for c in range(len(chunks)) if c % world == rank]
    entries = lambda c: chunks[c][-1].end - 1 - chunks[c][0].first_scored  # noqa: E731
    initial = sum(entries(c) for c in mine if c in done)
    bar = progress(
        total=sum(map(entries, mine)),
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc="datastore",
        disable=not state.is_main_process,
    )
    t0, computed = time.time(), 0
    for c in (c for c in mine if c not in done):
        n = write(chunks[c], keys, values)
        keys.flush()
        values.flush()
        if world == 1:
            build.mark_chunk(c, done)
        else:
            done.add(c)
            atomic_write_json(build.dir / RANK_PROGRESS.format(rank=rank), {"done": sorted(done)})
        computed += n
        bar.update(n)
    bar.close()
    seconds = time.time() - t0
    state.wait_for_everyone()
    return seconds, computed
