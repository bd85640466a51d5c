"""The MLP memory as the shared commands see it: ``MLP_MEMORY``, the package's ``MemorySystem`` (registered in
``mlpmem.systems``).

    mlpmem evaluate --run-dir runs/demo     # rows mlp-memory and, with kNN-LM, mlp-memory+knn-lm
    mlpmem generate --run-dir runs/demo --prompt "The history of"
    mlpmem export --run-dir runs/demo --out exports/demo

Its one component, ``mlp-memory``, is the memory's distribution on the LM's keys at its key layer
(``MemoryComponent``); evaluate mixes it with the LM (λ tuned) and, when the run has kNN-LM, with both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mlpmem.memory.configuration import MLPMemoryConfig
from mlpmem.memory_system import KeyComponentsEvaluation, MixedThroughTheJointModel, ResultRow, SystemName
from mlpmem.progress import progress

STAGE = "train-memory"


@dataclass
class MemoryComponent:
    """log p_mem from keys [..., d]: ``memory`` is any module mapping keys to logits (an ``MLPMemory``, or a
    quantised / compiled copy of one) reading the LM module ``layer``."""

    memory: nn.Module
    layer: str

    def log_probs(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        return torch.log_softmax(self.memory(keys).float(), dim=-1)  # [..., V]

    def gold_log_probs(self, keys: np.ndarray, gold: np.ndarray) -> np.ndarray:
        return memory_log_prob(self.memory, keys, gold)


@torch.inference_mode()
def memory_log_prob(memory: torch.nn.Module, keys: np.ndarray, gold: np.ndarray, batch: int = 4096) -> np.ndarray:
    """log p_mem(gold) [N] float32 from keys [N, d] (on the memory's device)."""
    param = next(memory.parameters())
    out = np.empty(len(gold), dtype=np.float32)
    for i in progress(range(0, len(gold), batch), desc="memory", unit="batch"):
        k = torch.from_numpy(np.asarray(keys[i : i + batch], dtype=np.float32)).to(param.device, param.dtype)
        log_probs = torch.log_softmax(memory(k).float(), dim=-1)  # [b, V]
        g = torch.from_numpy(gold[i : i + batch]).to(param.device)
        out[i : i + batch] = log_probs.gather(-1, g[:, None])[:, 0].cpu().numpy()
    return out


class MemorySystem(MixedThroughTheJointModel):
    """The MLP memory: an MLP trained to imitate kNN-LM's distribution from the LM's keys."""

    name = "mlp-memory"
    components = {SystemName.MLP_MEMORY: "the memory"}
    key_components = frozenset({SystemName.MLP_MEMORY})
    config_class = MLPMemoryConfig  # the joint model's ``memory_config``

    # the joint model's memory slot ---------------------------------------------------------------------------
    def module(self, config: MLPMemoryConfig) -> nn.Module:
        """An (untrained) memory of ``config``: the joint model's ``memory.*`` weights load into it."""
        from mlpmem.memory.model import MLPMemory

        return MLPMemory(config)

    def saveable(self, module: nn.Module) -> bool:
        """Whether ``module`` can be written to an exported folder (a float ``MLPMemory``)."""
        from mlpmem.memory.model import MLPMemory

        return isinstance(module, MLPMemory)

    def component(self, module: nn.Module, layer: str) -> MemoryComponent:
        return MemoryComponent(module, layer)

    def quantize(self, module: nn.Module, dtype: str) -> nn.Module:
        """``mlpmem.memory.quantize.quantize_memory``: the memory with fp32 / bf16 / int8 Linear weights."""
        from mlpmem.memory.quantize import quantize_memory

        return quantize_memory(module, dtype)

    def bench_memory(self, run, lm, model_fp: str, blocks: int, seed: int, device) -> tuple[nn.Module, str, bool]:
        """The run's trained memory (paired with the LM), or a random-init one of ``blocks`` blocks:
        (memory, the LM module it reads, trained)."""
        from mlpmem.lm.keys import key_dim, key_module_path
        from mlpmem.memory.model import MLPMemory

        if run.complete(STAGE) is not None:
            memory, layer = self.load(run, lm, model_fp, device)
            return memory, layer, True
        torch.manual_seed(seed)
        layer = key_module_path(lm)
        d = key_dim(lm, layer)
        cfg = MLPMemoryConfig(
            input_dim=d, hidden_size=d, n_blocks=blocks, vocab_size=lm.config.vocab_size, key_layer=layer
        )
        return MLPMemory(cfg).to(device).eval(), layer, False

    def load(self, run, lm, model_fp: str, device, memory_dtype: str = "fp32") -> tuple[nn.Module, str]:
        """The run's memory at ``memory_dtype``, paired with ``lm`` (its model, module, width, vocabulary):
        (the memory, the LM module it reads)."""
        from mlpmem.memory.model import check_pairing, load_memory
        from mlpmem.memory.quantize import quantize_memory

        memory = quantize_memory(load_memory(run.path, device), memory_dtype)
        return memory, check_pairing(memory.config, lm, model_fp)

    # mlpmem evaluate ------------------------------------------------------------------------------------------
    def evaluation_inputs(self, config, run, model_fp) -> dict[str, str] | None:
        """On the run's own tokens only (``--corpus`` leaves it out)."""
        if not config.memory or config.corpus is not None or run.complete(STAGE) is None:
            return None
        return {STAGE: run.require(STAGE).fingerprint}

    def built_from(self, run) -> str | None:
        """The split of the datastore whose targets it imitates."""
        return run.require("datastore").config.split

    def open_evaluation(self, config, run, device, lm, model_fp) -> KeyComponentsEvaluation:
        memory, layer = self.load(run, lm, model_fp, device, config.memory_dtype)
        return KeyComponentsEvaluation({SystemName.MLP_MEMORY: MemoryComponent(memory, layer)})

    def result_rows(self, components: set[str], tuned_on: str | None) -> list[ResultRow]:
        """The memory mixed with the LM, and with the LM and kNN-LM when the run has both (the memory imitates
        kNN-LM's distribution; the two are complementary)."""
        if SystemName.MLP_MEMORY not in components:
            return []
        rows = [ResultRow(SystemName.MLP_MEMORY, SystemName.BASE, (SystemName.MLP_MEMORY,))]
        if SystemName.KNN_LM in components:
            both = (SystemName.MLP_MEMORY, SystemName.KNN_LM)
            rows.append(ResultRow(SystemName.MLP_MEMORY_KNN_LM, SystemName.BASE, both))
        return rows

    # scoring models, generate, export ----------------------------------------------------------------------
    def scoring_models(self, run, evaluated, device) -> dict[SystemName, nn.Module]:
        return {}  # its rows are mixtures on the base LM's keys (the joint model)

    def joint_component(self, run, lm, model_fp, options) -> dict[str, Any] | None:
        """The memory, its layer and λ (``options["lmbda"]``, else tuned by evaluate, else the memory's own)."""
        if not options.get("use_memory", True):
            return None
        memory, layer = self.load(run, lm, model_fp, options["device"], options.get("memory_dtype", "fp32"))
        knn = options["parts"].get("knn")  # kNN-LM's part, when it joins: T defaults to the memory's target T
        if knn is not None and options.get("knn_temperature_open") and memory.config.knn_temperature:
            knn.temperature = memory.config.knn_temperature
        lmbda = options.get("lmbda")
        if lmbda is None:
            tuned = options["tuned"].lmbda
            lmbda = tuned if tuned is not None else memory.config.lmbda
        return {"memory": memory, "lmbda": lmbda, "memory_layer": layer}


MLP_MEMORY = MemorySystem()
