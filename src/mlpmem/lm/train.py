"""``mlpmem train-lm``: train a GPT-2 from scratch, or continue training any HF causal LM, on a prepared run.

    mlpmem train-lm --run-dir runs/demo --n-layer 4 --n-embd 256 --max-steps 1000

Resumes from RUN/lm/checkpoints/last after a kill; multi-GPU through `accelerate launch` (each rank draws its
own windows). Saved with save_pretrained to RUN/lm/model, so AutoModelForCausalLM.from_pretrained loads it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from mlpmem.artifacts import Stage
from mlpmem.checkpoints import load_checkpoint, save_checkpoint, save_pretrained_atomically
from mlpmem.config import TrainLMConfig
from mlpmem.data.prepare import vocab_fingerprint
from mlpmem.data.tokens import open_split, tokenizer_dir
from mlpmem.devices import resolve_device, resolve_dtype
from mlpmem.errors import UsageError
from mlpmem.lm.load import load_lm, load_tokenizer, max_positions, model_fingerprint

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then linear decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_ratio) * progress


def random_windows(tokens: np.ndarray, context: int, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
    """[batch_size, context + 1] random slices of ``tokens`` (inputs and shifted labels in one)."""
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + context + 1].astype(np.int64) for s in starts]))


def build_model(config: TrainLMConfig, vocab_size: int, prepared_tokenizer_fp: str) -> PreTrainedModel:
    """A fresh GPT-2 of the configured size, or the given HF model checked against the prepared tokenizer."""
    if config.model is None:
        torch.manual_seed(config.seed)
        gpt2 = GPT2Config(
            vocab_size=vocab_size, n_positions=config.context, n_embd=config.n_embd, n_layer=config.n_layer,
            n_head=config.n_head, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            bos_token_id=0, eos_token_id=0,
        )
        if config.n_embd % config.n_head:
            raise UsageError(f"--n-embd ({config.n_embd}) must be divisible by --n-head ({config.n_head})")
        return GPT2LMHeadModel(gpt2)
    if vocab_fingerprint(load_tokenizer(config.model)) != prepared_tokenizer_fp:
        raise UsageError(
            f"the run was prepared with another tokenizer than {config.model}'s; "
            f"prepare a new run with --tokenizer {config.model}"
        )
    model = load_lm(config.model, "cpu").train()
    positions = max_positions(model)
    if positions is not None and config.context > positions:
        raise UsageError(f"--context {config.context} exceeds {config.model}'s {positions} positions")
    return model


def window_loss(model: PreTrainedModel, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows x [B, context + 1] (fp32 logits)."""
    logits = model(input_ids=x[:, :-1]).logits.float()  # [B, context, V]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


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
        losses.append(window_loss(model, torch.from_numpy(batch).to(device)).item())
    model.train()
    return float(np.mean(losses))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_lm(config: TrainLMConfig) -> dict:
    """Train (or resume) the run's base LM; returns the complete manifest of RUN/lm."""
    from mlpmem.artifacts import require_stage

    prep = require_stage(config.run_dir, "prepare", f"mlpmem prepare --run-dir {config.run_dir}")
    stage = Stage(config.run_dir, "lm")
    status = stage.begin(config.model_dump(mode="json", exclude={"run_dir", "device"}), {"prepare": prep["fingerprint"]})
    if status == "complete":
        return stage.manifest
    device = resolve_device(config.device)
    precision = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(config.dtype, device)]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    train, valid = open_split(config.run_dir, "train"), open_split(config.run_dir, "valid")
    if len(train) <= config.context + 1:
        raise UsageError(f"the train split has {len(train)} tokens, fewer than --context {config.context} + 2")

    model = build_model(config, prep["vocab_size"], prep["tokenizer_fingerprint"]).train()
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps, config.min_lr_ratio)
    )
    step = 0
    if status == "resume" and (state := load_checkpoint(stage.dir, model)) is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    tokens_per_step = config.batch_size * config.grad_accum * config.context * world
    history = stage.manifest.setdefault("history", [])
    bar = tqdm(total=config.max_steps, initial=step, desc="train-lm", unit="step", disable=not accelerator.is_main_process)
    t_train, n_trained = 0.0, 0
    while step < config.max_steps:
        t0 = time.perf_counter()
        for micro in range(config.grad_accum):
            rng = np.random.default_rng([config.seed, step, micro, rank])
            x = random_windows(train, config.context, config.batch_size, rng).to(accelerator.device)
            loss = window_loss(model, x) / config.grad_accum
            accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        t_train += time.perf_counter() - t0
        n_trained += tokens_per_step
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item() * config.grad_accum:.3f}", tok_s=f"{n_trained / t_train:,.0f}")
        if step % config.eval_interval == 0 or step == config.max_steps:
            val = validation_loss(model, valid, config, accelerator.device)
            history.append({"step": step, "train_loss": round(loss.item() * config.grad_accum, 4), "valid_loss": round(val, 4)})
            bar.write(f"step {step}: valid loss {val:.4f} (ppl {math.exp(val):.2f})")
            if accelerator.is_main_process:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(stage.dir, step, accelerator.unwrap_model(model), state)
                stage.save()
            accelerator.wait_for_everyone()
    bar.close()
    if not accelerator.is_main_process:
        return stage.manifest
    final = accelerator.unwrap_model(model)
    save_pretrained_atomically(final, stage.dir / "model", load_tokenizer(tokenizer_dir(config.run_dir)))
    shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    rate = n_trained / t_train if t_train else None
    return stage.complete(
        {"steps": step, "parameters": sum(p.numel() for p in final.parameters()), "train_tokens": step * tokens_per_step},
        model_fingerprint=model_fingerprint(stage.dir / "model"),
        tokenizer_fingerprint=prep["tokenizer_fingerprint"],
        vocab_size=prep["vocab_size"],
        context=config.context,
        train_tokens_per_s=round(rate, 1) if rate else None,
        valid_loss=history[-1]["valid_loss"] if history else None,
    )
