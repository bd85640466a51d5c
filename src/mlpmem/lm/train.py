"""``mlpmem train-lm``: train a GPT-2, MoM or Gated DeltaNet from scratch, or continue training any HF causal LM,
on a prepared run.

    mlpmem train-lm --run-dir runs/demo --n-layer 4 --n-embd 256 --max-steps 1000
    mlpmem train-lm --run-dir runs/mom --arch mom --n-memories 4 --top-k 2 --max-steps 1000

Resumes from its last checkpoint after a kill; multi-GPU through `accelerate launch` (each rank draws its own
windows). Saved with save_pretrained to RUN/train-lm/model, so AutoModelForCausalLM.from_pretrained loads it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from mlpmem.artifacts import RunDir, StageBuild
from mlpmem.checkpoints import load_checkpoint, save_checkpoint, save_pretrained_atomically
from mlpmem.config import TrainLMConfig
from mlpmem.data.prepare import vocab_fingerprint
from mlpmem.data.tokens import check_token_ids, open_split, source_of, tokenizer_dir
from mlpmem.devices import resolve_device, resolve_dtype
from mlpmem.distributed import begin_shared
from mlpmem.errors import UsageError
from mlpmem.lm.load import hub_revision, load_lm, load_tokenizer, max_positions, model_fingerprint, require_model
from mlpmem.manifests import PrepareManifest, TrainLMManifest
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
    safe_exp,
)

log = logging.getLogger(__name__)


def random_windows(
    tokens: np.ndarray, context: int, batch_size: int, rng: np.random.Generator, vocab_size: int
) -> torch.Tensor:
    """[batch_size, context + 1] random slices of ``tokens`` (inputs and shifted labels in one), their ids checked
    against the model's ``vocab_size``."""
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    x = np.stack([tokens[s : s + context + 1].astype(np.int64) for s in starts])
    check_token_ids(x, vocab_size, source_of(tokens))
    return torch.from_numpy(x)


def gpt2_model(config: TrainLMConfig, vocab_size: int) -> PreTrainedModel:
    gpt2 = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.context,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.ffn_size,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(gpt2)


def mom_model(config: TrainLMConfig, vocab_size: int) -> PreTrainedModel:
    """MoM (``arch mom``) or its one-memory case Gated DeltaNet (``arch gated-deltanet``)."""
    from mlpmem.lm.mom.configuration import MoMLMConfig
    from mlpmem.lm.mom.model import MoMForCausalLM

    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_heads=config.n_head,
        head_k_dim=config.head_dim,
        head_v_dim=config.head_dim,
        intermediate_size=config.ffn_size,
        aux_loss_weight=config.aux_loss_weight,
        bos_token_id=0,
        eos_token_id=0,
    )
    if config.arch == "gated-deltanet":
        return MoMForCausalLM(MoMLMConfig.gated_deltanet(**sizes))
    mom = MoMLMConfig(num_memories=config.n_memories, topk=config.top_k, shared_memory=config.shared_memory, **sizes)
    return MoMForCausalLM(mom)


ARCHITECTURES = {"gpt2": gpt2_model, "mom": mom_model, "gated-deltanet": mom_model}


def build_model(config: TrainLMConfig, vocab_size: int, prepared_tokenizer_fp: str) -> PreTrainedModel:
    """A fresh model of the configured architecture and size, or the given HF model checked against the prepared
    tokenizer."""
    if config.model is None:
        torch.manual_seed(config.seed)
        return ARCHITECTURES[config.arch](config, vocab_size)
    if vocab_fingerprint(load_tokenizer(config.model)) != prepared_tokenizer_fp:
        raise UsageError(
            f"the run was prepared with another tokenizer than {config.model}'s; "
            f"prepare a new run with --tokenizer {config.model}"
        )
    model = load_lm(config.model, "cpu").train()
    positions = max_positions(model)
    if positions is not None and config.context > positions:
        raise UsageError(f"context {config.context} exceeds {config.model}'s {positions} positions", field="context")
    return model


def source_model_input(config: TrainLMConfig) -> dict[str, str]:
    """``{"model": content hash}`` of a local --model folder, so that its weights changing is not taken for the
    LM trained from it (a hub id is named in the config)."""
    if config.model is None or not Path(config.model).expanduser().exists():
        return {}
    return {"model": model_fingerprint(require_model(config.model))}


def window_loss(model: PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows x [B, context + 1] (fp32 logits)."""
    out = model(input_ids=x[:, :-1])
    logits = out.logits.float()  # [B, context, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
    aux = getattr(out, "aux_loss", None)  # MoM's load-balancing loss, weighted by its config
    weight = getattr(getattr(model, "module", model).config, "aux_loss_weight", 0.0)
    if aux is not None and model.training and weight:
        loss = loss + weight * aux.float()
    return loss


@torch.no_grad()
def validation_loss(model: PreTrainedModel, tokens: np.ndarray, config: TrainLMConfig, device: torch.device) -> float:
    """Mean token loss on the first eval_batches × batch_size disjoint windows of the valid split."""
    model.eval()
    n_windows = max(1, min(config.eval_batches * config.batch_size, (len(tokens) - 1) // config.context))
    context = min(config.context, len(tokens) - 1)
    starts = np.arange(n_windows) * context
    losses = []
    for i in range(0, n_windows, config.batch_size):
        batch = np.stack([tokens[s : s + context + 1].astype(np.int64) for s in starts[i : i + config.batch_size]])
        check_token_ids(batch, getattr(model, "module", model).config.vocab_size, source_of(tokens))
        losses.append(window_loss(model, torch.from_numpy(batch).to(device)).item())
    model.train()
    return float(np.mean(losses))


def check_inputs(config: TrainLMConfig, train: np.ndarray) -> None:
    if len(train) <= config.context + 1:
        raise UsageError(
            f"the train split has {len(train)} tokens, fewer than context {config.context} + 2", field="context"
        )
    if config.model is None and config.n_embd % config.n_head:
        raise UsageError(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})", field="n_embd")
    if config.model is None and config.arch == "mom" and config.top_k > config.n_memories:
        raise UsageError(f"top_k ({config.top_k}) must not exceed n_memories ({config.n_memories})", field="top_k")
    if config.model is None and config.arch == "gpt2" and config.head_dim not in (None, config.n_embd // config.n_head):
        raise UsageError(
            "--head-dim applies to arch mom and gated-deltanet (a GPT-2 head is n_embd // n_head)", field="head_dim"
        )
    if config.model is not None and config.arch != "gpt2":
        raise UsageError(f"--arch {config.arch} builds a new LM; it cannot be combined with --model", field="arch")


def train_lm(config: TrainLMConfig) -> TrainLMManifest:
    """Train (or resume) the run's base LM; returns the complete manifest of RUN/train-lm."""
    run = RunDir(config.run_dir)
    prep: PrepareManifest = run.require("prepare")
    inputs = {"prepare": prep.fingerprint, **source_model_input(config)}
    if (done := run.reusable("train-lm", config, inputs)) is not None:
        return done
    run.refuse_replacing("train-lm", config, inputs)  # the datastore, memory... were built from the finished LM
    train, valid = open_split(config.run_dir, "train"), open_split(config.run_dir, "valid")
    check_inputs(config, train)
    model = build_model(config, prep.vocab_size, prep.tokenizer_fingerprint).train()  # validates before any write
    device = resolve_device(config.device)
    precision = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        resolve_dtype(config.dtype, device)
    ]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    build = begin_shared(run, "train-lm", config, inputs, accelerator)  # the main process begins, the others join
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    step = 0
    if build.status == "resume" and (state := load_checkpoint(build.dir, model)) is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        build.manifest.history = list(state["history"])  # the manifest may lag behind a checkpoint saved before a kill
    model, optimizer = accelerator.prepare(model, optimizer)
    fit(config, build, accelerator, model, optimizer, scheduler, train, valid, step)
    if not accelerator.is_main_process:
        return build.manifest
    final = accelerator.unwrap_model(model)
    check_weights_finite(final, "train-lm")
    save_pretrained_atomically(final, build.dir / "model", load_tokenizer(tokenizer_dir(config.run_dir)))
    history = build.manifest.history
    return build.complete(
        model_fingerprint=model_fingerprint(build.dir / "model"),
        base_revision=hub_revision(config.model) if config.model and not Path(config.model).exists() else None,
        parameters=sum(p.numel() for p in final.parameters()),
        steps=config.max_steps,
        train_tokens=config.max_steps
        * config.batch_size
        * config.grad_accum
        * config.context
        * accelerator.num_processes,
        valid_loss=history[-1]["valid_loss"] if history else None,
    )


def fit(
    config: TrainLMConfig,
    build: StageBuild,
    accelerator: Accelerator,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: np.ndarray,
    valid: np.ndarray,
    step: int,
) -> None:
    """The training loop from ``step``: validation and a checkpoint at every interval and after the last step."""
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = config.batch_size * config.grad_accum * config.context * world
    bar = progress(
        total=config.max_steps, initial=step, desc="train-lm", unit="step", disable=not accelerator.is_main_process
    )
    metrics = MetricsLog(build.dir, step, enabled=accelerator.is_main_process)
    t_train, n_trained = 0.0, 0
    window = StepWindow()
    vocab_size = accelerator.unwrap_model(model).config.vocab_size
    while step < config.max_steps:
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(config.grad_accum):
            rng = np.random.default_rng([config.seed, step, micro, rank])
            x = random_windows(train, config.context, config.batch_size, rng, vocab_size).to(accelerator.device)
            loss = window_loss(model, x) / config.grad_accum
            check_finite(loss, step, "train-lm")
            accelerator.backward(loss)
            step_loss += loss.item()
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - t0
        t_train += seconds
        n_trained += tokens_per_step
        window.add(seconds, tokens_per_step, loss=step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{n_trained / t_train:,.0f}", refresh=False)
        if metrics_due(step, config.eval_interval, config.max_steps):
            metrics.write(step, window.line(lr, "tokens_per_s"))
        if checkpoint_due(step, config.eval_interval, config.max_steps):
            val = validation_loss(model, valid, config, accelerator.device)
            check_finite(torch.tensor(val), step, "train-lm")
            build.manifest.history = [
                *build.manifest.history,
                {"step": step, "train_loss": round(step_loss, 4), "valid_loss": round(val, 4)},
            ]
            metrics.write(step, {"valid/loss": val, "valid/ppl": safe_exp(val)})
            if accelerator.is_main_process:
                log.info("train-lm step %d: valid loss %.4f (ppl %.2f)", step, val, safe_exp(val))
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": build.manifest.history,
                }
                save_checkpoint(build.dir, step, accelerator.unwrap_model(model), state)
                if t_train:
                    build.manifest.train_tokens_per_s = round(n_trained / t_train, 1)
                build.save()
            accelerator.wait_for_everyone()
    bar.close()
