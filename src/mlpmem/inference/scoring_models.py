"""One scoring model per evaluate row, each a Hugging Face causal LM: ``input_ids`` [B, T] -> ``logits`` [B, T, V]
whose log_softmax is that row's next-token log-probs, with the weights (λ, T) evaluate tuned.

    from mlpmem.inference.scoring_models import scoring_models
    models = scoring_models("runs/demo")      # {SystemName.BASE: ..., SystemName.KNN_LM: ..., ...}
    log_p = torch.log_softmax(models[SystemName.MLP_MEMORY](input_ids=ids).logits.float(), -1)

``base`` is the run's LM; a row mixing components on the base LM's keys (``knn-lm``, ``mlp-memory``,
``mlp-memory+knn-lm``) is the joint model (``mlpmem.inference.joint``) with that row's weights and T; a row that
is a model of its own comes from its system (``MemorySystem.scoring_models``: ``explicit-memory``,
``explicit-control``). Left out: a row mixing a system's own model with components on the base LM's keys
(``explicit-memory+mlp-memory``: two LMs), and kNN-LM re-ranked by stored keys (the joint model searches the
index only).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mlpmem.artifacts import RunDir
from mlpmem.devices import resolve_device
from mlpmem.inference.generation import joint_model_from_run
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.memory_system import SystemName
from mlpmem.systems import SYSTEMS, key_components


def scoring_models(run_dir: str | Path, device: str | torch.device = "cpu") -> dict[SystemName, nn.Module]:
    """The scoring model of every row of the run's complete evaluate stage that has one (see the module doc)."""
    run = RunDir(run_dir)
    evaluated = run.require("evaluate")
    device = resolve_device(device) if isinstance(device, str) else device
    models: dict[SystemName, nn.Module] = {SystemName.BASE: load_lm(run_lm_dir(run.path), device)}
    on_keys = key_components()
    config = evaluated.config
    for row in evaluated.systems:
        weights = row.weights or ({row.name: row.lmbda} if row.name in on_keys else None)
        if not weights or not set(weights) <= on_keys:
            continue
        models[row.name] = joint_model_from_run(
            run.path,
            lmbda=weights.get(SystemName.MLP_MEMORY, 0.0),
            use_memory=SystemName.MLP_MEMORY in weights,
            use_knn=SystemName.KNN_LM in weights,
            k=config.k,
            knn_temperature=row.temperature,
            knn_lmbda=weights.get(SystemName.KNN_LM, 0.0),
            nprobe=config.nprobe,
            device=device,
            memory_dtype=config.memory_dtype,
        )
    for system in SYSTEMS:
        models.update(system.scoring_models(run, evaluated, device))
    return models
