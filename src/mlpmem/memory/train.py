"""``mlpmem train-memory``: train the MLP memory to imitate the kNN targets (stage "memory", DESIGN.md §1.5).

    mlpmem train-memory --run-dir runs/demo --n-blocks 4 --epochs 2 [--mode online]

One loop, two key sources: *offline* reads keys from the datastore memmap; *online* recomputes them with the
frozen LM over the datastore's sliding windows (no key storage). The last ``valid_size`` entries are held out
for the validation loss. Resumes from RUN/memory/checkpoints after a kill; multi-GPU through
`accelerate launch` (each rank takes a disjoint shard of every global batch). The final memory is saved with
save_pretrained to RUN/memory/model.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from mlpmem.artifacts import Stage, open_array, require_stage
from mlpmem.checkpoints import load_checkpoint, save_checkpoint, save_pretrained_atomically
from mlpmem.config import TrainMemoryConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import autocast, resolve_device, resolve_dtype
from mlpmem.errors import UsageError
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.lm.train import lr_factor, make_optimizer
from mlpmem.memory.loss import memory_loss
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig, load_memory  # noqa: F401  (load_memory re-exported)


# key sources -------------------------------------------------------------------------------------------------
class KeySource(Protocol):
    """Where keys come from. A *unit* is what batches are shuffled by (an entry offline, a window online)."""

    n_train: int  # training entries: ids 0 .. n_train - 1 (the rest are held out)
    n_units: int  # units holding at least one training entry
    keys_per_unit: float  # mean training entries per unit

    def batch(self, units: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """Sorted training entry ids [n] covered by ``units`` and their keys [n, d] (float32, on device)."""

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """Keys [n, d] (float32, on device) of the given entries, in their order."""


class OfflineKeys:
    """Keys read from RUN/datastore/keys; a unit is one training entry."""

    def __init__(self, run_dir: Path, n_train: int):
        self.keys = open_array(run_dir, "datastore", "keys")  # [N, d] memmap
        self.n_train = self.n_units = n_train
        self.keys_per_unit = 1.0

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.keys[entry_ids], dtype=np.float32)).to(device)  # [n, d]

    def batch(self, units: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        ids = np.sort(units)  # sorted reads are sequential on disk
        return ids, self.keys_for(ids, device)


def window_keys(
    lm: PreTrainedModel,
    key_layer: str,
    tokens: np.ndarray,
    windows: list[Window],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    forward_batch: int = 8,
) -> tuple[np.ndarray, torch.Tensor]:
    """Entry ids [n] and keys [n, d] (float32) of the positions ``windows`` score, as the datastore computes them.

    Windows are right-padded to a common length; under causal attention the padding cannot reach the scored
    positions, which all precede it.
    """
    from mlpmem.lm.keys import KeyHook

    ids, keys = [], []
    with KeyHook(lm, key_layer) as hook, torch.no_grad():
        for i in range(0, len(windows), forward_batch):
            chunk = windows[i : i + forward_batch]
            length = max(w.end - w.begin for w in chunk)
            x = torch.zeros(len(chunk), length, dtype=torch.long)  # [b, T]
            for row, w in enumerate(chunk):
                x[row, : w.end - w.begin] = torch.from_numpy(np.asarray(tokens[w.begin : w.end], dtype=np.int64))
            with autocast(device, dtype):
                lm.base_model(input_ids=x.to(device), use_cache=False)  # the key layer is inside; skip the head
            h = hook.keys if hook.keys.dim() == 3 else hook.keys.view(*x.shape, -1)  # [b, T, d]
            for row, w in enumerate(chunk):
                keys.append(h[row, w.first_scored - w.begin : w.end - 1 - w.begin].float())  # [n_scored, d]
                ids.append(np.arange(w.first_scored, w.end - 1))
    return np.concatenate(ids), torch.cat(keys)


def recompute_keys(
    lm: PreTrainedModel,
    key_layer: str,
    tokens: np.ndarray,
    windows: list[Window],
    entry_ids: np.ndarray,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    forward_batch: int = 8,
) -> torch.Tensor:
    """Keys [n, d] of the given entries (positions), recomputed by running the windows that score them."""
    entry_ids = np.asarray(entry_ids, dtype=np.int64)
    first = np.array([w.first_scored for w in windows])
    needed = np.unique(np.searchsorted(first, entry_ids, side="right") - 1)
    ids, keys = window_keys(lm, key_layer, tokens, [windows[j] for j in needed], device, dtype, forward_batch)
    rows = np.searchsorted(ids, entry_ids)  # ids ascend: windows are in order and score disjoint ranges
    if np.any(rows >= len(ids)) or np.any(ids[np.minimum(rows, len(ids) - 1)] != entry_ids):
        raise UsageError("some entries are not scored by the datastore's windows; recompute needs stride < context")
    return keys[torch.from_numpy(rows).to(keys.device)]


class OnlineKeys:
    """Keys recomputed by the frozen LM; a unit is one sliding window that scores at least one training entry."""

    def __init__(
        self, lm: PreTrainedModel, key_layer: str, tokens: np.ndarray, windows: list[Window], n_train: int,
        dtype: torch.dtype = torch.float32,  # the LM's autocast dtype; float32 as in `mlpmem datastore`
    ):
        self.lm, self.key_layer, self.tokens, self.dtype = lm, key_layer, tokens, dtype
        self.lm_device = next(lm.parameters()).device
        self.all_windows = windows
        self.windows = [w for w in windows if w.first_scored < n_train]
        self.n_train = n_train
        self.n_units = len(self.windows)
        self.keys_per_unit = n_train / self.n_units

    def batch(self, units: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        chosen = [self.windows[u] for u in np.sort(units)]
        ids, keys = window_keys(self.lm, self.key_layer, self.tokens, chosen, self.lm_device, self.dtype, len(chosen))
        keep = ids < self.n_train  # a window may reach into the held-out entries
        return ids[keep], keys[torch.from_numpy(keep).to(keys.device)].to(device)

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        keys = recompute_keys(self.lm, self.key_layer, self.tokens, self.all_windows, entry_ids, self.lm_device, self.dtype)
        return keys.to(device)


def units_for_step(step: int, per_step: int, n_units: int, seed: int) -> np.ndarray:
    """Units [per_step] of global step ``step``: a slice of the concatenation of per-epoch permutations.

    A pure function of the step, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    start, parts = step * per_step, []
    while per_step > 0:
        epoch, offset = divmod(start, n_units)
        take = min(per_step, n_units - offset)
        parts.append(np.random.default_rng([seed, epoch]).permutation(n_units)[offset : offset + take])
        start, per_step = start + take, per_step - take
    return np.concatenate(parts)


# targets, validation, checkpoints ----------------------------------------------------------------------------
class Targets:
    """Sparse p_kNN rows and gold tokens of RUN/targets, read for sorted entry ids."""

    def __init__(self, run_dir: Path):
        self.tokens = open_array(run_dir, "targets", "tokens")  # [N, w] int32, pad -1
        self.probs = open_array(run_dir, "targets", "probs")  # [N, w] float32, pad 0
        self.gold = open_array(run_dir, "targets", "gold")  # [N] int32

    def rows(self, ids: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def read(arr: np.ndarray, dtype: type) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arr[ids], dtype=dtype)).to(device)

        return read(self.tokens, np.int64), read(self.probs, np.float32), read(self.gold, np.int64)


@torch.no_grad()
def validate(
    model: torch.nn.Module, keys: torch.Tensor, ids: np.ndarray, targets: Targets, alpha: float,
    batch_size: int, device: torch.device, dtype: torch.dtype,
) -> dict[str, float]:
    """Mean loss, kl and ce over the held-out entries (keys [n, d] already computed)."""
    model.eval()
    sums = np.zeros(3)
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        with autocast(device, dtype):
            logits = model(keys[i : i + batch_size].to(device))  # [b, V]
        parts = memory_loss(logits, *targets.rows(chunk, device), alpha)
        sums += np.array([p.item() for p in parts]) * len(chunk)
    model.train()
    loss, kl, ce = sums / max(1, len(ids))
    return {"loss": round(float(loss), 6), "kl": round(float(kl), 6), "ce": round(float(ce), 6)}


# the stage ---------------------------------------------------------------------------------------------------
def check_inputs(run_dir: Path, ds: dict, tg: dict, config: TrainMemoryConfig) -> tuple[int, int]:
    """(N, key width) after checking datastore and targets belong together; UsageError (one line) otherwise."""
    n, d = ds["arrays"]["keys"]["shape"]
    if ds["arrays"]["values"]["shape"][0] != n:
        raise UsageError(f"{run_dir}/datastore is inconsistent: {n} keys but {ds['arrays']['values']['shape'][0]} values")
    for name in ("tokens", "probs", "gold"):
        if tg["arrays"][name]["shape"][0] != n:
            raise UsageError(
                f"{run_dir}/targets has {tg['arrays'][name]['shape'][0]} rows, the datastore {n} entries; rerun `mlpmem targets`"
            )
    upstream = tg.get("inputs", {}).get("datastore")
    if upstream is not None and upstream != ds["fingerprint"]:
        raise UsageError(f"{run_dir}/targets were computed from another datastore; rerun `mlpmem targets`")
    if ds.get("key_dim", d) != d:
        raise UsageError(f"{run_dir}/datastore records key_dim {ds['key_dim']} but stores keys of width {d}")
    if config.valid_size >= n:
        raise UsageError(f"--valid-size ({config.valid_size}) must be smaller than the datastore ({n} entries)")
    return n, d


def build_memory(config: TrainMemoryConfig, ds: dict, tg: dict, key_dim: int, vocab_size: int) -> MLPMemory:
    """A fresh memory whose config records the base LM, key layer, default λ, T and α."""
    torch.manual_seed(config.seed)
    memory_config = MLPMemoryConfig(
        input_dim=key_dim, hidden_size=config.hidden_size or key_dim, n_blocks=config.n_blocks, ffn=config.ffn,
        vocab_size=vocab_size, base_model_fingerprint=ds["model_fingerprint"],
        tokenizer_fingerprint=ds.get("tokenizer_fingerprint"), key_layer=ds["key_layer"], lmbda=config.lmbda,
        knn_temperature=tg.get("config", {}).get("knn_temperature", tg.get("knn_temperature")), alpha=config.alpha,
    )
    return MLPMemory(memory_config)


def begin_stage(config: TrainMemoryConfig, ds: dict, tg: dict, accelerator: Accelerator) -> tuple[Stage, str]:
    """The 'memory' stage and its status ('fresh', 'resume' or 'complete'); only the main process writes."""
    stage = Stage(Path(config.run_dir), "memory")
    identity = (config.model_dump(mode="json", exclude={"run_dir", "device"}), {"datastore": ds["fingerprint"], "targets": tg["fingerprint"]})
    status = stage.begin(*identity) if accelerator.is_main_process else "wait"
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        status = stage.begin(*identity)  # the main process made the folder: 'resume' or 'complete'
    return stage, status


def make_source(config: TrainMemoryConfig, ds: dict, lm: PreTrainedModel | None, n_entries: int) -> KeySource:
    """The key source of ``config.mode`` over the first N - valid_size entries.

    Online keys come from the LM in float32, as the datastore's did; only the memory runs under autocast.
    """
    n_train = n_entries - config.valid_size
    if config.mode == "offline":
        return OfflineKeys(Path(config.run_dir), n_train)
    tokens, windows = _online_inputs(Path(config.run_dir), ds, n_entries)
    return OnlineKeys(lm.requires_grad_(False), ds["key_layer"], tokens, windows, n_train)


def train_memory(config: TrainMemoryConfig) -> dict:
    """Train (or resume) the MLP memory of a run; returns the complete manifest of RUN/memory."""
    run_dir = Path(config.run_dir)
    ds = require_stage(run_dir, "datastore", f"mlpmem datastore --run-dir {run_dir}")
    tg = require_stage(run_dir, "targets", f"mlpmem targets --run-dir {run_dir}")
    n_entries, key_dim = check_inputs(run_dir, ds, tg, config)
    lm_manifest = require_stage(run_dir, "lm", f"mlpmem train-lm --run-dir {run_dir}")
    if lm_manifest.get("model_fingerprint") not in (None, ds["model_fingerprint"]):
        raise UsageError(f"{run_dir}/datastore was built with another LM than {run_dir}/lm; rerun `mlpmem datastore`")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if dtype == torch.float16:
        raise UsageError("--dtype float16 is not supported for training (no loss scaling); use bfloat16 or float32")
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False)
    if accelerator.num_processes > 1:
        device = accelerator.device
    stage, status = begin_stage(config, ds, tg, accelerator)
    if status == "complete":
        return stage.manifest

    need_lm = config.mode == "online" or config.init_head_from_lm
    lm = load_lm(run_lm_dir(run_dir), device if config.mode == "online" else "cpu") if need_lm else None
    vocab_size = lm.config.vocab_size if lm is not None else AutoConfig.from_pretrained(run_lm_dir(run_dir)).vocab_size
    source = make_source(config, ds, lm, n_entries)
    memory = build_memory(config, ds, tg, key_dim, vocab_size)
    head_from_lm = memory.init_head_from(lm.get_output_embeddings().weight) if config.init_head_from_lm else False
    memory.to(device).train()
    optimizer = make_optimizer(memory, config.lr, config.weight_decay)
    state = load_checkpoint(stage.dir, memory) if status == "resume" else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    memory, optimizer = accelerator.prepare(memory, optimizer)
    result = fit(config, stage, accelerator, memory, optimizer, source, n_entries, state, device, dtype)
    if not accelerator.is_main_process:
        return stage.manifest
    model = accelerator.unwrap_model(memory)
    save_pretrained_atomically(model, stage.dir / "model")
    shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    stage.manifest["timings"]["train_seconds"] = round(result["train_seconds"], 2)
    counts = {
        "entries": n_entries, "train_entries": source.n_train, "valid_entries": n_entries - source.n_train,
        "steps": result["step"], "parameters": sum(p.numel() for p in model.parameters()),
        "memory_bytes": sum(f.stat().st_size for f in (stage.dir / "model").glob("*.safetensors")),
    }
    return stage.complete(
        counts,
        model_dir="model",
        base_model_fingerprint=ds["model_fingerprint"],
        tokenizer_fingerprint=ds.get("tokenizer_fingerprint"),
        key_layer=ds["key_layer"],
        key_dim=key_dim,
        knn_temperature=model.config.knn_temperature,
        head_from_lm=head_from_lm,
        keys_per_s=round(result["keys_seen"] / result["train_seconds"], 1) if result["train_seconds"] else None,
        valid=result["valid"],
        valid_history=result["valid_history"],
    )


def fit(
    config: TrainMemoryConfig, stage: Stage, accelerator: Accelerator, memory: torch.nn.Module,
    optimizer: torch.optim.Optimizer, source: KeySource, n_entries: int, state: dict | None,
    device: torch.device, dtype: torch.dtype,
) -> dict:
    """The training loop, from step 0 or a checkpoint's ``state``; returns step, timings and validation results."""
    rank, world = accelerator.process_index, accelerator.num_processes
    per_step = max(world, round(config.batch_size / source.keys_per_unit))  # units per global step
    total_steps = max(1, math.ceil(config.epochs * source.n_units / per_step))
    targets = Targets(Path(config.run_dir))
    valid_ids = np.arange(source.n_train, n_entries)
    valid_keys = source.keys_for(valid_ids, torch.device("cpu")) if len(valid_ids) else None  # [n_valid, d]

    def run_validation(at_step: int, history: list) -> dict[str, float] | None:
        if valid_keys is None:
            return None
        result = validate(memory, valid_keys, valid_ids, targets, config.alpha, config.batch_size, device, dtype)
        history.append({"step": at_step, **result})
        return result

    step = int(state["step"]) if state else 0
    history = list(state["valid_history"]) if state else []
    train_seconds = float(state["train_seconds"]) if state else 0.0
    keys_seen = int(state["keys_seen"]) if state else 0
    if step == 0:
        run_validation(0, history)
    bar = tqdm(total=total_steps, initial=step, desc="train-memory", unit="step", disable=not accelerator.is_main_process)
    while step < total_steps:
        t0 = time.perf_counter()
        units = units_for_step(step, per_step, source.n_units, config.seed)[rank::world]
        ids, keys = source.batch(units, device)  # [b], [b, d]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.warmup_steps, total_steps, config.min_lr_ratio)
        with autocast(device, dtype):
            logits = memory(keys)  # [b, V]
        loss, kl, ce = memory_loss(logits, *targets.rows(ids, device), config.alpha)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(memory.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_seconds += time.perf_counter() - t0
        keys_seen += len(ids) * world
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.3f}", keys_s=f"{keys_seen / train_seconds:,.0f}", refresh=False)
        if step % config.eval_interval == 0 and step < total_steps:
            if (result := run_validation(step, history)) is not None:
                bar.write(f"step {step}: valid loss {result['loss']:.4f} kl {result['kl']:.4f} ce {result['ce']:.4f}")
            if accelerator.is_main_process:
                progress = {"train_seconds": train_seconds, "keys_seen": keys_seen, "valid_history": history}
                save_checkpoint(stage.dir, step, accelerator.unwrap_model(memory), {"optimizer": optimizer.state_dict(), **progress})
                stage.manifest["valid_history"] = history
                stage.save()
            accelerator.wait_for_everyone()
    bar.close()
    final = run_validation(step, history)
    return {"step": step, "train_seconds": train_seconds, "keys_seen": keys_seen, "valid": final, "valid_history": history}


def _online_inputs(run_dir: Path, ds: dict, n_entries: int) -> tuple[np.ndarray, list[Window]]:
    """The datastore split's tokens and windows; UsageError unless its windows score entries 0 .. N-1 in order."""
    tokens = open_split(run_dir, ds["split"])
    windows = sliding_windows(len(tokens), ds["context"], ds["stride"])
    scored = sum(w.n_scored for w in windows)
    if scored != n_entries or len(tokens) - 1 != n_entries:
        raise UsageError(
            f"online mode recomputes keys by position, but the datastore's windows (context {ds['context']}, "
            f"stride {ds['stride']}) score {scored} of {len(tokens) - 1} positions for {n_entries} entries; use --mode offline"
        )
    return tokens, windows
