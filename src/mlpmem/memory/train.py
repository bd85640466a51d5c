"""``mlpmem train-memory``: train the MLP memory to imitate the kNN targets (DESIGN.md §1.5).

    mlpmem train-memory --run-dir runs/demo --n-blocks 4 --epochs 2 [--mode online [--key-depth 0.7]]

One loop, two key sources: *offline* reads keys from the datastore memmap; *online* recomputes them with the
frozen LM through the forward core (no key storage), at the datastore's key layer or any other (``--key-layer``,
``--key-depth``: the memory's key layer is its own setting; the targets always come from the datastore). Online
keys are computed a pool at a time (``--shuffle-keys``) and shuffled across the pool's batches, so that a batch
mixes many windows, as an offline batch mixes the whole corpus. The last ``valid_size`` entries are held out for
the validation loss. Resumes from its checkpoints after a kill (kept until the stage is complete); several
processes (CPU or GPU) through ``accelerate launch --multi_gpu --num_processes N -m mlpmem.cli train-memory ...``:
each rank takes a disjoint shard of every global batch (online: the batch's entries among the windows it
computed), and the averaged gradient is that of the global batch's mean loss (equal to one process within float
tolerance, tested). The final memory is saved with save_pretrained to RUN/train-memory/model.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from mlpmem.artifacts import RunDir, StageBuild
from mlpmem.checkpoints import load_checkpoint, save_checkpoint, save_pretrained_atomically
from mlpmem.config import TrainMemoryConfig
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import autocast, resolve_device, resolve_dtype
from mlpmem.distributed import check_launch, sum_over_ranks
from mlpmem.errors import UsageError
from mlpmem.knn.stream import StoredKeys
from mlpmem.knn.targets import SearchedTargets
from mlpmem.lm.forward import forward_windows
from mlpmem.lm.keys import key_dim, key_module_path
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.manifests import DatastoreManifest, TargetsManifest, TrainMemoryManifest
from mlpmem.memory.loss import memory_loss
from mlpmem.memory.model import MLPMemory, MLPMemoryConfig
from mlpmem.progress import progress
from mlpmem.training import (
    MetricsLog,
    StepWindow,
    check_finite,
    check_weights_finite,
    checkpoint_due,
    make_optimizer,
    make_scheduler,
    metrics_due,
)

log = logging.getLogger(__name__)


# key sources -------------------------------------------------------------------------------------------------
class KeySource(Protocol):
    """Where keys come from. A *unit* is what batches are shuffled by (an entry offline, a window online)."""

    n_train: int  # training entries: ids 0 .. n_train - 1 (the rest are held out)
    n_units: int  # units holding at least one training entry
    keys_per_unit: float  # mean training entries per unit

    def batch(self, units: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """Sorted training entry ids [n] covered by ``units`` and their keys [n, d] (float32, on device)."""

    def step_batch(self, step: int, plan: BatchPlan, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """This rank's share of global step ``step``: sorted entry ids [n] and their keys [n, d]."""

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        """Keys [n, d] (float32, on device) of the given entries, in their order."""


class OfflineKeys:
    """Keys read from RUN/datastore/keys; a unit is one training entry."""

    def __init__(self, run_dir: Path, n_train: int):
        self.stored = StoredKeys(RunDir(run_dir).array("datastore", "keys"))  # [N, d] memmap, read checked finite
        self.n_train = self.n_units = n_train
        self.keys_per_unit = 1.0

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        keys = np.asarray(self.stored.keys[entry_ids], dtype=np.float32)
        return torch.from_numpy(self.stored.finite(keys, entry_ids)).to(device)  # [n, d]

    def batch(self, units: np.ndarray, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        ids = np.sort(units)  # sorted reads are sequential on disk
        return ids, self.keys_for(ids, device)

    def step_batch(self, step: int, plan: BatchPlan, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        return self.batch(plan.units(step, 1)[plan.rank :: plan.world], device)


def window_keys(
    lm: PreTrainedModel,
    key_layer: str,
    tokens: np.ndarray,
    windows: list[Window],
    device: torch.device,
    forward_batch: int = 8,
) -> tuple[np.ndarray, torch.Tensor]:
    """Entry ids [n] and keys [n, d] (float32) of the positions ``windows`` score, through the forward core
    (the same computation as ``mlpmem datastore``, at any layer)."""
    ids, keys = [], []
    for out in forward_windows(lm, tokens, windows, forward_batch, key_layers=[key_layer], device=device):
        ids.append(out.positions)
        keys.append(out.keys[key_layer].float())
    return np.concatenate(ids), torch.cat(keys)


def recompute_keys(
    lm: PreTrainedModel,
    key_layer: str,
    tokens: np.ndarray,
    windows: list[Window],
    entry_ids: np.ndarray,
    device: torch.device,
    forward_batch: int = 8,
) -> torch.Tensor:
    """Keys [n, d] of the given entries (positions), recomputed by running the windows that score them."""
    entry_ids = np.asarray(entry_ids, dtype=np.int64)
    first = np.array([w.first_scored for w in windows])
    needed = np.unique(np.searchsorted(first, entry_ids, side="right") - 1)
    ids, keys = window_keys(lm, key_layer, tokens, [windows[j] for j in needed], device, forward_batch)
    rows = np.searchsorted(ids, entry_ids)  # ids ascend: windows are in order and score disjoint ranges
    if np.any(rows >= len(ids)) or np.any(ids[np.minimum(rows, len(ids) - 1)] != entry_ids):
        raise UsageError("some entries are not scored by the datastore's windows; recompute needs stride < context")
    return keys[torch.from_numpy(rows).to(keys.device)]


class OnlineKeys:
    """Keys recomputed by the frozen LM; a unit is one sliding window that scores at least one training entry."""

    def __init__(self, lm: PreTrainedModel, key_layer: str, tokens: np.ndarray, windows: list[Window], n_train: int):
        self.lm, self.key_layer, self.tokens = lm, key_layer, tokens
        self.lm_device = next(lm.parameters()).device
        self.all_windows = windows
        self.windows = [w for w in windows if w.first_scored < n_train]
        self.n_train = n_train
        self.n_units = len(self.windows)
        self.keys_per_unit = n_train / self.n_units
        self._pool: tuple | None = None  # (pool, computed ids, their keys, batches, owned masks) being drawn

    def batch(
        self, units: np.ndarray, device: torch.device, forward_batch: int | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        chosen = [self.windows[u] for u in np.sort(units)]
        ids, keys = window_keys(
            self.lm, self.key_layer, self.tokens, chosen, self.lm_device, forward_batch or max(1, len(chosen))
        )
        keep = ids < self.n_train  # a window may reach into the held-out entries
        return ids[keep], keys[torch.from_numpy(keep).to(keys.device)].to(device)

    def keys_for(self, entry_ids: np.ndarray, device: torch.device) -> torch.Tensor:
        keys = recompute_keys(self.lm, self.key_layer, self.tokens, self.all_windows, entry_ids, self.lm_device)
        return keys.to(device)

    def training_ids(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training entry ids scored by ``units`` (no forward pass), and each one's slot: its unit's index in
        ``units`` (a window drawn twice, across an epoch boundary, gives its entries twice, in two slots)."""
        spans = [np.arange(w.first_scored, w.first_scored + w.n_scored) for w in (self.windows[u] for u in units)]
        ids = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        slots = np.repeat(np.arange(len(spans)), [len(span) for span in spans])
        keep = ids < self.n_train
        return ids[keep], slots[keep]

    def step_batch(self, step: int, plan: BatchPlan, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
        """Batches drawn across a pool of ``plan.pool_steps`` steps' windows: their keys are computed once (each rank
        its share of the windows), their entries shuffled together and cut into the pool's batches, so that one
        batch mixes many windows instead of holding a few runs of consecutive tokens."""
        pool, j = divmod(step, plan.pool_steps)
        if self._pool is None or self._pool[0] != pool:
            self._pool = None  # free the previous pool's keys before computing the next
            n_steps = min(plan.pool_steps, plan.total_steps - pool * plan.pool_steps)
            units = plan.units(pool * plan.pool_steps, n_steps)
            # forward passes of one step's windows at a time: the activation memory of an unpooled step
            mine, keys = self.batch(units[plan.rank :: plan.world], self.lm_device, plan.per_step)
            ids, slots = self.training_ids(units)
            order = np.random.default_rng([plan.seed, pool]).permutation(len(ids))
            ids, slots = ids[order], slots[order]
            owned = slots % plan.world == plan.rank  # the rank that computed the entry's slot trains it
            self._pool = (pool, mine, keys, np.array_split(ids, n_steps), np.array_split(owned, n_steps))
        _, mine, keys, batches, owned = self._pool
        wanted = np.sort(batches[j][owned[j]])
        rows = torch.from_numpy(np.searchsorted(mine, wanted))  # the rank computed every entry it owns
        return wanted, keys[rows.to(keys.device)].to(device)


@dataclass(frozen=True)
class BatchPlan:
    """How global steps draw their units, and which share is this process's (``rank`` of ``world``).

    Every step takes ``per_step`` units from per-epoch permutations; online batches are drawn across pools of
    ``pool_steps`` consecutive steps (OnlineKeys.step_batch). Pure functions of the step, so a resumed run draws
    exactly the batches an uninterrupted one would.
    """

    per_step: int
    n_units: int
    total_steps: int
    seed: int
    pool_steps: int = 1
    rank: int = 0
    world: int = 1

    def units(self, first_step: int, n_steps: int) -> np.ndarray:
        """Units [n_steps * per_step] of steps first_step .. first_step + n_steps - 1, in draw order."""
        return units_for_step(first_step, self.per_step, self.n_units, self.seed, n_steps)


def units_for_step(step: int, per_step: int, n_units: int, seed: int, n_steps: int = 1) -> np.ndarray:
    """Units [n_steps * per_step] of global steps ``step`` .. ``step + n_steps - 1``: a slice of the concatenation
    of per-epoch permutations."""
    start, parts, per_step = step * per_step, [], per_step * n_steps
    while per_step > 0:
        epoch, offset = divmod(start, n_units)
        take = min(per_step, n_units - offset)
        parts.append(epoch_permutation(seed, epoch, n_units)[offset : offset + take])
        start, per_step = start + take, per_step - take
    return np.concatenate(parts)


@functools.lru_cache(maxsize=2)  # the current epoch's and the next one's (a step may straddle both)
def epoch_permutation(seed: int, epoch: int, n_units: int) -> np.ndarray:
    """The units [n_units] of ``epoch`` in draw order, read-only. Drawn once per epoch, not per step: a
    permutation of 2.7M entries takes ~70 ms, about 30% of an offline step of the full-WikiText-2 memory."""
    order = np.random.default_rng([seed, epoch]).permutation(n_units)
    order.flags.writeable = False
    return order


# targets, validation, checkpoints ----------------------------------------------------------------------------
class Targets:
    """Sparse p_kNN rows and gold tokens of RUN/targets, read for sorted entry ids."""

    def __init__(self, run_dir: Path):
        run = RunDir(run_dir)
        self.tokens = run.array("targets", "tokens")  # [N, w] int32, pad -1
        self.probs = run.array("targets", "probs")  # [N, w] float32, pad 0
        self.gold = run.array("targets", "gold")  # [N] int32

    def rows(
        self, ids: np.ndarray, device: torch.device, keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [n, w], probs [n, w], gold [n] of entries ``ids`` (``keys`` serve searched targets only)."""

        def read(arr: np.ndarray, dtype: type) -> torch.Tensor:
            return torch.from_numpy(np.asarray(arr[ids], dtype=dtype)).to(device)

        return read(self.tokens, np.int64), read(self.probs, np.float32), read(self.gold, np.int64)


class CheckedTargets:
    """Target rows checked before they reach the loss: token ids outside the vocabulary or nan/inf/negative
    probabilities mean a file damaged after it was written, which would otherwise fail inside the loss or read as
    a diverged training (and be answered with a lower --lr)."""

    def __init__(self, run_dir: Path, vocab_size: int):
        manifest = RunDir(run_dir).require("targets")
        self.targets = Targets(run_dir) if manifest.stored else SearchedTargets(run_dir, manifest)
        self.run_dir, self.vocab_size = run_dir, vocab_size
        # searched targets come from the datastore's values (gold and neighbours), stored ones from their files
        self.source = ("targets", "targets") if manifest.stored else ("datastore", "datastore")

    def rows(
        self, ids: np.ndarray, device: torch.device, keys: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [n, w], probs [n, w], gold [n] of entries ``ids``; UsageError naming the first damaged entry."""
        tokens, probs, gold = rows = self.targets.rows(ids, device, keys)
        v = self.vocab_size
        problems = (
            (f"target token ids outside the LM's {v}-token vocabulary", ((tokens < -1) | (tokens >= v)).any(1)),
            ("nan/inf or negative target probabilities", (~torch.isfinite(probs) | (probs < 0)).any(1)),
            (f"a gold token outside the LM's {v}-token vocabulary", (gold < 0) | (gold >= v)),
        )
        for what, bad in problems:
            if bad.any():
                entry = int(ids[int(bad.nonzero()[0, 0])])
                folder, command = self.source
                raise UsageError(
                    f"datastore entry {entry} has {what}: {self.run_dir}/{folder} was damaged after it was written "
                    f"(`mlpmem verify {self.run_dir}` checks every file's hash); remove it and rerun `mlpmem {command}`"
                )
        return rows


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    keys: torch.Tensor,
    ids: np.ndarray,
    targets: CheckedTargets,
    alpha: float,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Mean loss, kl and ce over the held-out entries (keys [n, d] already computed)."""
    model.eval()
    sums = np.zeros(3)
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        with autocast(device, dtype):
            logits = model(keys[i : i + batch_size].to(device))  # [b, V]
        parts = memory_loss(logits, *targets.rows(chunk, device, keys[i : i + batch_size]), alpha)
        sums += np.array([p.item() for p in parts]) * len(chunk)
    model.train()
    loss, kl, ce = sums / max(1, len(ids))
    return {"loss": round(float(loss), 6), "kl": round(float(kl), 6), "ce": round(float(ce), 6)}


# the stage ---------------------------------------------------------------------------------------------------
def check_inputs(ds: DatastoreManifest, tg: TargetsManifest, config: TrainMemoryConfig) -> int:
    """The number of entries, after checking targets and datastore belong together; UsageError otherwise."""
    if tg.stored and tg.entries != ds.entries:
        raise UsageError(
            f"the targets have {tg.entries} rows, the datastore {ds.entries} entries; "
            + RunDir(tg.config.run_dir).rebuild_hint("targets")
        )
    if config.mode == "offline" and "keys" not in ds.arrays:
        raise UsageError(
            "the datastore stores no keys (datastore --keys streamed); use --mode online to recompute them",
            field="mode",
        )
    if config.valid_size >= ds.entries:
        raise UsageError(
            f"valid_size ({config.valid_size}) must be smaller than the datastore ({ds.entries} entries)",
            field="valid_size",
        )
    return ds.entries


def memory_key_layer(config: TrainMemoryConfig, ds: DatastoreManifest, lm: PreTrainedModel | None) -> str:
    """The LM module the memory reads: --key-layer / --key-depth, else the datastore's key layer.

    Offline keys come from the datastore, so another layer needs online mode.
    """
    if config.key_layer is None and config.key_depth is None:
        return ds.key_layer
    layer = key_module_path(lm, config.key_layer, config.key_depth)
    if layer != ds.key_layer and not RunDir(config.run_dir).require("targets").stored:
        raise UsageError(
            f"targets searched per batch need the datastore's key layer ({ds.key_layer}), not {layer}; "
            "store the targets (targets --store true) to train on another layer",
            field="key_layer" if config.key_layer is not None else "key_depth",
        )
    if layer != ds.key_layer and config.mode == "offline":
        raise UsageError(
            f"offline mode reads the datastore's keys ({ds.key_layer}); use --mode online to read {layer}", field="mode"
        )
    return layer


def build_memory(
    config: TrainMemoryConfig,
    ds: DatastoreManifest,
    tg: TargetsManifest,
    lm_fingerprint: str,
    key_layer: str,
    width: int,
    vocab_size: int,
) -> MLPMemory:
    """A fresh memory whose config records the base LM, its key layer, default λ, T and α."""
    torch.manual_seed(config.seed)
    memory_config = MLPMemoryConfig(
        input_dim=width,
        hidden_size=config.hidden_size or width,
        n_blocks=config.n_blocks,
        ffn=config.ffn,
        vocab_size=vocab_size,
        base_model_fingerprint=lm_fingerprint,
        key_layer=key_layer,
        lmbda=config.lmbda,
        knn_temperature=tg.config.knn_temperature,
        alpha=config.alpha,
    )
    return MLPMemory(memory_config)


def make_source(
    config: TrainMemoryConfig, ds: DatastoreManifest, lm: PreTrainedModel | None, key_layer: str
) -> KeySource:
    """The key source of ``config.mode`` over the first N - valid_size entries.

    Online keys come from the LM in float32, as the datastore's did; only the memory runs under autocast.
    """
    n_train = ds.entries - config.valid_size
    if config.mode == "offline":
        return OfflineKeys(Path(config.run_dir), n_train)
    tokens, windows = _online_inputs(Path(config.run_dir), ds)
    return OnlineKeys(lm.requires_grad_(False), key_layer, tokens, windows, n_train)


def train_memory(config: TrainMemoryConfig) -> TrainMemoryManifest:
    """Train (or resume) the MLP memory of a run; returns the complete manifest of RUN/train-memory."""
    run = RunDir(config.run_dir)
    lm_manifest, ds, tg = run.require("train-lm"), run.require("datastore"), run.require("targets")
    inputs = {"train-lm": lm_manifest.fingerprint, "datastore": ds.fingerprint, "targets": tg.fingerprint}
    if (done := run.reusable("train-memory", config, inputs)) is not None:
        return done
    n_entries = check_inputs(ds, tg, config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if dtype == torch.float16:
        raise UsageError(
            "float16 is not supported for training (no loss scaling); use bfloat16 or float32", field="dtype"
        )
    check_launch()
    accelerator = Accelerator(cpu=device.type == "cpu", device_placement=False)
    if accelerator.num_processes > 1:
        device = accelerator.device
    online = config.mode == "online"
    lm = load_lm(run_lm_dir(run.path), device if online else "cpu")
    key_layer = memory_key_layer(config, ds, lm)
    source = make_source(config, ds, lm, key_layer)
    memory = build_memory(
        config, ds, tg, lm_manifest.model_fingerprint, key_layer, key_dim(lm, key_layer), lm.config.vocab_size
    )
    head_from_lm = memory.init_head_from(lm.get_output_embeddings().weight) if config.init_head_from_lm else False
    if not online:
        del lm

    build = begin_stage(run, config, inputs, accelerator)
    memory.to(device).train()
    optimizer = make_optimizer(memory, config.lr, config.weight_decay)
    state = load_checkpoint(build.dir, memory) if build.status == "resume" else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    memory, optimizer = accelerator.prepare(memory, optimizer)
    result = fit(config, build, accelerator, memory, optimizer, source, n_entries, state, device, dtype)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(memory)
        check_weights_finite(model, "train-memory")
        save_pretrained_atomically(model, build.dir / "model")
        build.manifest.timings = {**build.manifest.timings, "train_seconds": round(result["train_seconds"], 2)}
        build.complete(
            key_layer=key_layer,
            train_entries=source.n_train,
            valid_entries=n_entries - source.n_train,
            steps=result["step"],
            parameters=sum(p.numel() for p in model.parameters()),
            head_from_lm=head_from_lm,
            keys_per_s=round(result["keys_seen"] / result["train_seconds"], 1) if result["train_seconds"] else None,
            valid=result["valid"],
            valid_history=result["valid_history"],
        )
    accelerator.wait_for_everyone()
    return run.require("train-memory")


def begin_stage(run: RunDir, config: TrainMemoryConfig, inputs: dict[str, str], accelerator: Accelerator) -> StageBuild:
    """The stage build; only the main process creates it, the others join it."""
    build = run.begin("train-memory", config, inputs) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return build if build is not None else run.join("train-memory")


@dataclass
class LoopState:
    """What a checkpoint carries besides weights and optimizer: the step, timings and validation history."""

    step: int = 0
    train_seconds: float = 0.0
    keys_seen: int = 0
    valid_history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> LoopState:
        if not state:
            return cls()
        return cls(
            int(state["step"]), float(state["train_seconds"]), int(state["keys_seen"]), list(state["valid_history"])
        )

    def saved(self) -> dict:
        return {"train_seconds": self.train_seconds, "keys_seen": self.keys_seen, "valid_history": self.valid_history}


def restore_scheduler(
    scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, state: dict | None
) -> None:
    if state:
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the scheduler's constructor reset the restored lr to that of step 0


def train_step(
    memory: torch.nn.Module,
    keys: torch.Tensor,
    rows: tuple,
    config: TrainMemoryConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler,
    device: torch.device,
    dtype: torch.dtype,
    step: int,
    share: float = 1.0,
):
    """One update on keys [b, d] and their target rows; returns this rank's (loss, kl, ce).

    ``share`` = b · processes / global batch: the gradient averaged over processes is then that of the mean loss
    over the global batch, however unevenly its entries fell to the ranks (1 in one process)."""
    with autocast(device, dtype):
        logits = memory(keys)  # [b, V]
    loss, kl, ce = memory_loss(logits, *rows, config.alpha)
    check_finite(loss, step, "train-memory")
    accelerator.backward(loss * share)
    accelerator.clip_grad_norm_(memory.parameters(), config.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, kl, ce


def bounded_batch_size(batch_size: int, n_train: int, say: bool = True) -> int:
    """The batch, at most the training entries: a larger one would repeat entries within a step and grow memory
    with the batch, not the data (--batch-size 10,000,000 on 69,571 entries held 23 GB)."""
    if batch_size <= n_train:
        return batch_size
    if say:
        log.warning(
            "train-memory: --batch-size %d exceeds the %d training entries; using %d (one step per epoch)",
            batch_size,
            n_train,
            n_train,
        )
    return n_train


def fit(
    config: TrainMemoryConfig,
    build: StageBuild,
    accelerator: Accelerator,
    memory: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: KeySource,
    n_entries: int,
    state: dict | None,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """The training loop, from step 0 or a checkpoint's ``state``; returns step, timings and validation results."""
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    batch_size = bounded_batch_size(config.batch_size, source.n_train, main)
    per_step = max(world, round(batch_size / source.keys_per_unit))  # units per global step
    total_steps = max(1, math.ceil(config.epochs * source.n_units / per_step))
    pool_steps = max(1, round(config.shuffle_keys / batch_size))
    plan = BatchPlan(per_step, source.n_units, total_steps, config.seed, pool_steps, rank, world)
    scheduler = make_scheduler(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    restore_scheduler(scheduler, optimizer, state)
    targets = CheckedTargets(Path(config.run_dir), accelerator.unwrap_model(memory).config.vocab_size)
    valid_ids = np.arange(source.n_train, n_entries)
    valid_keys = source.keys_for(valid_ids, torch.device("cpu")) if len(valid_ids) else None  # [n_valid, d]
    loop = LoopState.from_checkpoint(state)
    metrics = MetricsLog(build.dir, loop.step, enabled=main)

    def run_validation() -> dict[str, float] | None:
        if valid_keys is None:
            return None
        result = validate(memory, valid_keys, valid_ids, targets, config.alpha, batch_size, device, dtype)
        loop.valid_history.append({"step": loop.step, **result})
        metrics.write(loop.step, {f"valid/{k}": v for k, v in result.items()})
        if main:
            log.info("train-memory step %d: valid loss %.4f kl %.4f ce %.4f", loop.step, *result.values())
        return result

    if loop.step == 0:
        run_validation()
    bar = progress(total=total_steps, initial=loop.step, desc="train-memory", unit="step", disable=not main)
    window = StepWindow()
    while loop.step < total_steps:
        t0 = time.perf_counter()
        ids, keys = source.step_batch(loop.step, plan, device)
        lr = scheduler.get_last_lr()[0]
        n_global = int(sum_over_ranks([len(ids)], device)[0]) if world > 1 else len(ids)
        parts = train_step(
            memory,
            keys,
            targets.rows(ids, device, keys),
            config,
            accelerator,
            optimizer,
            scheduler,
            device,
            dtype,
            loop.step,
            share=len(ids) * world / n_global,
        )
        loss, kl, ce = (p.item() for p in parts)
        if world > 1:  # global means, for the log
            loss, kl, ce = (x / n_global for x in sum_over_ranks([v * len(ids) for v in (loss, kl, ce)], device))
        loop.step += 1
        seconds = time.perf_counter() - t0
        loop.train_seconds += seconds
        loop.keys_seen += n_global
        window.add(seconds, n_global, loss=loss, kl=kl, ce=ce)
        bar.update(1)
        rate = f"{loop.keys_seen / loop.train_seconds:,.0f}"
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}", keys_s=rate, refresh=False)
        if metrics_due(loop.step, config.eval_interval, total_steps):
            metrics.write(loop.step, window.line(lr, "keys_per_s"))
        if checkpoint_due(loop.step, config.eval_interval, total_steps):
            if loop.step < total_steps:
                run_validation()
            if main:
                extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **loop.saved()}
                save_checkpoint(build.dir, loop.step, accelerator.unwrap_model(memory), extra)
                build.manifest.valid_history = loop.valid_history
                build.save()
            accelerator.wait_for_everyone()
    bar.close()
    final = run_validation()
    if final is not None:
        check_finite(torch.tensor(final["loss"]), loop.step, "train-memory")
    return {
        "step": loop.step,
        "train_seconds": loop.train_seconds,
        "keys_seen": loop.keys_seen,
        "valid": final,
        "valid_history": loop.valid_history,
    }


def _online_inputs(run_dir: Path, ds: DatastoreManifest) -> tuple[np.ndarray, list[Window]]:
    """The datastore split's tokens and windows; UsageError unless its windows score entries 0 .. N-1 in order."""
    tokens = open_split(run_dir, ds.config.split)
    windows = sliding_windows(len(tokens), ds.context, ds.stride)
    scored = sum(w.n_scored for w in windows)
    if scored != ds.entries or len(tokens) - 1 != ds.entries:
        raise UsageError(
            f"online mode recomputes keys by position, but the datastore's windows (context {ds.context}, "
            f"stride {ds.stride}) score {scored} of {len(tokens) - 1} positions for {ds.entries} entries; "
            "use --mode offline"
        )
    return tokens, windows
