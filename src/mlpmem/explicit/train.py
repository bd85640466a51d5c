"""``mlpmem train-explicit``: continue the warm-up LM (``train-lm``) reading explicit memories, and the same LM
continued for the same steps on the same windows without them (the control).

    mlpmem train-explicit --run-dir runs/demo --max-steps 200

Memory3's second training stage: windows start on chunk boundaries; every chunk of ``chunk_tokens`` (64) of the
train split retrieves one reference with the tokens before it, leaving out references that hold more than
``exclude_overlap`` (90%) of the chunk's own text; each chunk's tokens read the memories of their own and the
previous ``memory_chunks - 1`` (4) chunks. The retrieval of every chunk is done once (``chunk_refs``). The memory
model trains first, then the control, each with its own checkpoints; a killed stage resumes from the last one.
Saved with save_pretrained in RUN/train-explicit/model (an ``ExplicitMemoryLM``) and RUN/train-explicit/control.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from mlpmem.artifacts import METRICS, RunDir, StageBuild
from mlpmem.checkpoints import load_checkpoint, save_checkpoint, save_pretrained_atomically
from mlpmem.config import TrainExplicitConfig
from mlpmem.data.tokens import check_token_ids, source_of
from mlpmem.devices import resolve_device, resolve_dtype
from mlpmem.errors import UsageError
from mlpmem.explicit.model import ExplicitMemoryLM
from mlpmem.explicit.reading import MemoryStore, reading_memory, training_memory
from mlpmem.explicit.retriever import overlapping
from mlpmem.lm.load import load_lm, load_tokenizer, max_positions, run_lm_dir
from mlpmem.manifests import TrainExplicitManifest
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
RETRIEVAL_CHUNK = 4096  # training chunks retrieved per resumable piece


def retrieve_training_chunks(
    build: StageBuild, store: MemoryStore, tokens: np.ndarray, config: TrainExplicitConfig, vocab_size: int
):
    """``chunk_refs`` [n_chunks]: the one reference each chunk of the train split retrieves (resumable); the ids
    of each piece are checked against the LM's ``vocab_size`` as they are read (a query reads the piece before)."""
    n = len(tokens) // config.chunk_tokens
    out = build.add_array("chunk_refs", "int64", (n,))
    same_stream = store.source in ("split:train", "split:memory")  # memory: the train tokens first, then more
    done = build.done_chunks(lambda piece: [out[piece * RETRIEVAL_CHUNK : (piece + 1) * RETRIEVAL_CHUNK]])
    for piece, a in enumerate(progress(range(0, n, RETRIEVAL_CHUNK), desc="retrieve", unit="piece")):
        if piece in done:
            continue
        starts = [c * config.chunk_tokens for c in range(a, min(a + RETRIEVAL_CHUNK, n))]
        check_token_ids(tokens[starts[0] : starts[-1] + config.chunk_tokens], vocab_size, source_of(tokens))
        exclude = None
        if same_stream:
            span = config.chunk_tokens
            exclude = [
                overlapping(store.source_start, store.lengths, s, s + span, config.exclude_overlap) for s in starts
            ]
        out[a : a + len(starts)] = store.search(tokens, starts, 1, exclude)[:, 0]
        out.flush()
        build.mark_chunk(piece, done, [out[a : a + len(starts)]])
    return np.asarray(out)


def window_loss(model, x: torch.Tensor, memory=None) -> torch.Tensor:
    """Mean next-token cross-entropy of windows x [B, context + 1]."""
    logits = model(input_ids=x[:, :-1], memory=memory).logits.float()  # [B, context, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


class Batches:
    """Training windows (chunk-aligned, the same for both models) and their memories."""

    def __init__(
        self, config: TrainExplicitConfig, tokens: np.ndarray, store: MemoryStore, chunk_refs, context: int, vocab_size
    ):
        self.config, self.tokens, self.store, self.chunk_refs, self.context = config, tokens, store, chunk_refs, context
        self.vocab_size = vocab_size  # the LM's: every window's ids are checked against it
        self.n_chunks = -(-context // config.chunk_tokens)
        self.last_first = (len(tokens) - context - 1) // config.chunk_tokens

    def __call__(self, step: int, with_memory: bool):
        rng = np.random.default_rng([self.config.seed, step])
        first = rng.integers(0, self.last_first + 1, size=self.config.batch_size)  # first chunk of each window
        starts = first * self.config.chunk_tokens
        x = np.stack([self.tokens[s : s + self.context + 1].astype(np.int64) for s in starts])
        check_token_ids(x, self.vocab_size, source_of(self.tokens))
        x = torch.from_numpy(x)
        if not with_memory:
            return x, None
        c = self.config
        return x, training_memory(self.store, self.chunk_refs, first, self.n_chunks, c.chunk_tokens, c.memory_chunks)


@torch.no_grad()
def validation(model, store: MemoryStore | None, valid: np.ndarray, config: TrainExplicitConfig, context: int):
    """(mean token loss, mean attention mass on memory) on the first disjoint windows of valid; windows read the
    memories their chunks retrieve (5 per chunk) when ``store`` is given."""
    model.eval()
    device = next(model.parameters()).device
    n = max(1, min(config.eval_batches * config.batch_size, (len(valid) - 1) // context))
    losses, mass = [], []
    for w in range(n):
        x = valid[w * context : w * context + context + 1].astype(np.int64)
        check_token_ids(x, getattr(model, "module", model).config.vocab_size, source_of(valid))
        x = torch.from_numpy(x)[None].to(device)
        memory = None
        if store is not None:
            memory = reading_memory(store, valid, w * context, context, 5, config.chunk_tokens)
            memory.kv, memory.mass = memory.kv.to(device), []
        losses.append(window_loss(model, x, memory).item())
        if memory is not None:
            mass.extend(m for m in memory.mass if math.isfinite(m))
    model.train()
    return float(np.mean(losses)), (float(np.mean(mass)) if mass else None)


def train_one(
    name: str, model, batches: Batches, with_memory: bool, build: StageBuild, config, valid, context, accelerator
) -> None:
    """Train ``model`` for max_steps (resuming from its checkpoints), then save it to STAGE/``name``."""
    folder = build.dir / "checkpoints" / name
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if (state := load_checkpoint(folder, model)) is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    (build.dir / "logs" / name).mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(build.dir / "logs" / name, step)
    window, bar = (
        StepWindow(),
        progress(total=config.max_steps, initial=step, desc=f"train-explicit {name}", unit="step"),
    )
    store = batches.store if with_memory else None
    while step < config.max_steps:
        t0 = time.perf_counter()
        x, memory = batches(step, with_memory)
        if memory is not None:
            memory.kv = memory.kv.to(accelerator.device)
        loss = window_loss(model, x.to(accelerator.device), memory)
        check_finite(loss, step, "train-explicit")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(time.perf_counter() - t0, x.numel() - len(x), loss=loss.item())
        bar.update(1)
        if metrics_due(step, config.eval_interval, config.max_steps):
            metrics.write(step, window.line(lr, "tokens_per_s"))
        if checkpoint_due(step, config.eval_interval, config.max_steps):
            val, mass = validation(model, store, valid, config, context)
            metrics.write(step, {"valid/loss": val, **({"valid/memory_mass": mass} if mass is not None else {})})
            log.info("train-explicit %s step %d: valid loss %.4f", name, step, val)
            save_checkpoint(
                folder,
                step,
                accelerator.unwrap_model(model),
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            )
    bar.close()
    final = accelerator.unwrap_model(model)
    check_weights_finite(final, "train-explicit")
    save_pretrained_atomically(final, build.dir / name, load_tokenizer(run_lm_dir(build.run.path)))


def train_explicit(config: TrainExplicitConfig) -> TrainExplicitManifest:
    """Train the explicit-memory LM and its control; returns the complete manifest of RUN/train-explicit."""
    run = RunDir(config.run_dir)
    names = ("prepare", "train-lm", "references", "explicit-memories")
    manifests = {n: run.require(n) for n in names}
    inputs = {n: m.fingerprint for n, m in manifests.items()}
    if (done := run.reusable("train-explicit", config, inputs)) is not None:
        return done
    device = resolve_device(config.device)
    lm = load_lm(run_lm_dir(run.path), "cpu")
    context = config.context or manifests["train-lm"].config.context
    if (positions := max_positions(lm)) is not None and context > positions:
        raise UsageError(f"context {context} exceeds the LM's {positions} positions", field="context")
    if config.chunk_tokens > context:
        raise UsageError(
            f"chunk_tokens ({config.chunk_tokens}) exceeds the training window ({context} tokens), which must hold "
            f"at least one chunk; use --chunk-tokens {context} or less",
            field="chunk_tokens",
        )
    train, valid = run.array("prepare", "train"), run.array("prepare", "valid")
    if len(train) < context + 2 or len(valid) < context + 1:
        raise UsageError(f"the train and valid splits need more than context ({context}) tokens", field="context")
    mem = manifests["explicit-memories"]
    store = MemoryStore.open(run, lm)
    build = run.begin("train-explicit", config, inputs)
    chunk_refs = retrieve_training_chunks(build, store, train, config, lm.config.vocab_size)
    batches = Batches(config, train, store, chunk_refs, context, lm.config.vocab_size)
    precision = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        resolve_dtype(config.dtype, device)
    ]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    settings = dict(
        memory_layers=mem.memory_layers,
        keep_tokens=mem.config.keep_tokens,
        marker_ids=mem.marker_ids,
        base_model_fingerprint=manifests["train-lm"].model_fingerprint,
    )
    plan = [("model", True)] + ([("control", False)] * config.control)
    for name, with_memory in plan:
        if not (build.dir / name / "model.safetensors").is_file():
            torch.manual_seed(config.seed)
            model = ExplicitMemoryLM.from_lm(load_lm(run_lm_dir(run.path), "cpu"), **settings).train()
            train_one(name, model, batches, with_memory, build, config, valid, context, accelerator)
    return build.complete(
        context=context,
        steps=config.max_steps,
        parameters=sum(p.numel() for p in lm.parameters()),
        train_tokens=config.max_steps * config.batch_size * context,
        chunks_with_reference=round(float((chunk_refs >= 0).mean()), 4) if len(chunk_refs) else 0.0,
        history=summarise_history(build.dir, [n for n, _ in plan]),
    )


def summarise_history(folder: Path, names: list[str]) -> list[dict[str, float]]:
    """Validation lines of each model's metrics, merged by step: ``{step, model_loss, model_mass, control_loss}``."""
    rows: dict[int, dict[str, float]] = {}
    for name in names:
        for r in MetricsLog.read(folder / "logs" / name / METRICS):
            if "valid/loss" in r:
                row = rows.setdefault(r["step"], {"step": r["step"]})
                row[f"{name}_valid_loss"] = r["valid/loss"]
                if r.get("valid/memory_mass") is not None:
                    row[f"{name}_memory_mass"] = r["valid/memory_mass"]
    return [rows[s] for s in sorted(rows)]
