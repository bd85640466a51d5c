"""Datastore extraction: keys (the LM's feed-forward input at every position) and values (the next token).

    mlpmem datastore --run-dir RUN [--split train] [--context C] [--stride S]
    accelerate launch -m mlpmem.cli datastore --run-dir RUN     # multi-GPU: chunks shared out by rank

Entry i is position i of the split, predicting token i + 1: ``keys`` [N, d] (float16 or float32) and ``values``
[N] int32 with N = n_tokens - 1. Windows follow ``mlpmem.data.windows`` (every position keyed once, with at
least context - stride tokens of history past the first window). Work is done in chunks of ``chunk_windows``
windows written straight into preallocated memmaps (RAM independent of corpus size); a rerun skips the chunks
already written.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mlpmem.artifacts import ArraySpec, Stage, atomic_write_json, read_json, require_stage
from mlpmem.config import DatastoreConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.lm.keys import KeyHook, key_dim, key_module_path
from mlpmem.lm.load import load_lm, max_positions, run_lm_dir

RANK_PROGRESS = "progress.rank{rank}.json"  # per-rank chunk lists under accelerate (no shared-file races)


def check_lm_matches_tokens(prepare: dict[str, Any], lm: dict[str, Any], run_dir: Path) -> None:
    """The run's LM must carry a model fingerprint and share the prepared split's tokenizer."""
    if not lm.get("model_fingerprint"):
        raise UsageError(f"{run_dir / 'lm' / 'manifest.json'} has no model_fingerprint; rerun `mlpmem train-lm --run-dir {run_dir}`")
    ours, theirs = prepare.get("tokenizer_fingerprint"), lm.get("tokenizer_fingerprint")
    if ours and theirs and ours != theirs:
        raise UsageError(f"the LM in {run_dir / 'lm'} was trained with another tokenizer ({theirs}) than {run_dir / 'prepare'} ({ours})")


def window_sizes(config: DatastoreConfig, lm: dict[str, Any], positions: int | None) -> tuple[int, int]:
    """(context, stride): context defaults to the LM's training context capped by its positions."""
    if config.context is not None:
        if positions is not None and config.context > positions:
            raise UsageError(f"--context ({config.context}) exceeds the model's {positions} positions")
        context = config.context
    else:
        candidates = [c for c in (lm.get("context"), positions) if isinstance(c, int) and c > 0]
        if not candidates:
            raise UsageError("cannot tell the model's context length; give --context TOKENS")
        context = min(candidates)
    stride = config.stride or max(1, context // 2)
    if stride >= context:
        raise UsageError(f"--stride ({stride}) must be smaller than --context ({context}) so that every position gets a key")
    return context, stride


def _done_chunks(stage: Stage) -> set[int]:
    done = stage.done_chunks()
    for path in stage.dir.glob(RANK_PROGRESS.format(rank="*")):
        done |= set(read_json(path)["done"])
    return done


def _fill(runner: torch.nn.Module, hook: KeyHook, tokens: np.ndarray, batch: list[Window], keys: np.memmap,
          values: np.memmap, device: torch.device) -> int:
    """Forward one batch of windows through ``runner`` (the LM or its backbone) and write the keys and values
    of their scored positions; returns the number of entries written."""
    length = max(w.end - w.begin for w in batch)
    ids = np.zeros((len(batch), length), dtype=np.int64)  # [B, T], right-padded (causal: no effect on keys)
    mask = np.zeros((len(batch), length), dtype=np.int64)
    for r, w in enumerate(batch):
        ids[r, : w.end - w.begin] = tokens[w.begin : w.end]
        mask[r, : w.end - w.begin] = 1
    runner(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device), use_cache=False)
    out = hook.keys.to(torch.float32 if keys.dtype == np.float32 else torch.float16).cpu().numpy()  # [B, T, d]
    n = 0
    for r, w in enumerate(batch):
        keys[w.first_scored : w.end - 1] = out[r, w.first_scored - w.begin : w.end - 1 - w.begin]
        values[w.first_scored : w.end - 1] = tokens[w.first_scored + 1 : w.end]
        n += w.n_scored
    return n


def build_datastore(config: DatastoreConfig) -> dict[str, Any]:
    """Extract the keys and values of one prepared split with the run's LM; returns the datastore manifest."""
    from accelerate import PartialState  # works without any accelerate config in a single process

    run_dir = Path(config.run_dir)
    prepare = require_stage(run_dir, "prepare", f"mlpmem prepare --run-dir {run_dir}")
    lm = require_stage(run_dir, "lm", f"mlpmem train-lm --run-dir {run_dir}")
    check_lm_matches_tokens(prepare, lm, run_dir)
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)  # cpu=True: several CPU processes (torchrun) join a gloo group
    rank, world = state.process_index, state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world == 1:  # processes that would each act as the only one
        raise UsageError(f"launched as {launched} processes but accelerate sees {world}; start with `accelerate launch` or torchrun")
    device = state.device if (world > 1 and config.device == "auto") else resolve_device(config.device)

    model = load_lm(run_lm_dir(run_dir), device)
    vocab = prepare.get("vocab_size")
    if isinstance(vocab, int) and vocab > model.config.vocab_size:
        raise UsageError(f"the prepared tokens use {vocab} ids but the LM has only {model.config.vocab_size}")
    key_layer = key_module_path(model, config.key_layer)
    backbone = getattr(model, "base_model", model)
    inside = backbone is not model and key_layer.startswith(f"{model.base_model_prefix}.")
    runner = backbone if inside else model  # skip the LM head when the key layer lies before it
    dim = key_dim(model, key_layer)
    context, stride = window_sizes(config, lm, max_positions(model))
    tokens = open_split(run_dir, config.split)  # [n_tokens] memmap
    n_entries = len(tokens) - 1
    windows = sliding_windows(len(tokens), context, stride)
    chunks = [windows[i : i + config.chunk_windows] for i in range(0, len(windows), config.chunk_windows)]

    stage = Stage(run_dir, "datastore")
    if state.is_main_process:
        status = stage.begin(config.model_dump(mode="json", exclude={"run_dir"}), {"prepare": prepare["fingerprint"], "lm": lm["fingerprint"]})
        if status != "complete":
            stage.add_array("keys", config.key_dtype, (n_entries, dim))
            stage.add_array("values", "int32", (n_entries,))
    state.wait_for_everyone()
    stage.manifest = stage.read()
    if stage.manifest["status"] == "complete":
        return stage.manifest
    keys = ArraySpec(**stage.manifest["arrays"]["keys"]).open(stage.dir, "r+")  # [N, d]
    values = ArraySpec(**stage.manifest["arrays"]["values"]).open(stage.dir, "r+")  # [N]

    done = _done_chunks(stage)
    mine = [c for c in range(len(chunks)) if c % world == rank]
    todo = [c for c in mine if c not in done]
    entries = lambda c: chunks[c][-1].end - 1 - chunks[c][0].first_scored  # noqa: E731
    bar = tqdm(total=sum(map(entries, mine)), initial=sum(entries(c) for c in mine if c in done),
               unit="tok", unit_scale=True, desc="datastore", disable=not state.is_main_process)
    t0, computed = time.time(), 0
    with KeyHook(model, key_layer) as hook, torch.inference_mode():
        for c in todo:
            for i in range(0, len(chunks[c]), config.batch_size):
                n = _fill(runner, hook, tokens, chunks[c][i : i + config.batch_size], keys, values, device)
                computed += n
                bar.update(n)
            keys.flush()
            values.flush()
            if world == 1:
                stage.mark_chunk(c, done)
            else:
                done.add(c)
                atomic_write_json(stage.dir / RANK_PROGRESS.format(rank=rank), {"done": sorted(done)})
    bar.close()
    seconds = time.time() - t0
    state.wait_for_everyone()
    if state.is_main_process:
        for path in stage.dir.glob(RANK_PROGRESS.format(rank="*")):
            path.unlink()
        # rate of the main process alone (each of the `world` processes extracts its share at about this rate)
        stage.manifest["timings"].update(processes=world, extract_seconds=round(seconds, 2), tokens_per_second=round(computed / max(seconds, 1e-9), 1))
        stage.complete(
            {"entries": n_entries, "windows": len(windows), "tokens": len(tokens)},
            model_fingerprint=lm["model_fingerprint"],
            tokenizer_fingerprint=lm.get("tokenizer_fingerprint") or prepare.get("tokenizer_fingerprint"),
            key_layer=key_layer,
            key_dim=dim,
            key_dtype=config.key_dtype,
            context=context,
            stride=stride,
            split=config.split,
            entries=n_entries,
        )
    state.wait_for_everyone()
    return stage.read()
