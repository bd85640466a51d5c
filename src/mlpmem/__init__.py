"""mlpmem: give a causal language model a retriever-pretrained MLP memory (arXiv 2508.01832).

    import mlpmem
    mlm = mlpmem.MemoryAugmentedLM.from_run("runs/demo")              # text in, text out
    from transformers import AutoModelForCausalLM, AutoModel
    model = AutoModelForCausalLM.from_pretrained("exports/demo")      # `mlpmem export`: the joint model
    memory = AutoModel.from_pretrained("runs/demo/train-memory/model")  # an MLPMemory

The public names are imported on first use (``import mlpmem`` stays light: ``mlpmem --help`` imports no torch);
the model classes are registered with transformers' Auto classes on import (``mlpmem.hf_auto``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module defining it
_PUBLIC = {
    "MemoryAugmentedLM": "mlpmem.inference.generation",
    "MemoryAugmentedForCausalLM": "mlpmem.inference.joint",
    "MemoryAugmentedConfig": "mlpmem.inference.configuration",
    "MLPMemory": "mlpmem.memory.model",
    "MLPMemoryConfig": "mlpmem.memory.configuration",
    "mix_log_probs": "mlpmem.inference.mixing",
    "KnnRetriever": "mlpmem.knn.retriever",
    "MoMForCausalLM": "mlpmem.lm.mom.model",
    "MoMLMConfig": "mlpmem.lm.mom.configuration",
    "RunDir": "mlpmem.artifacts",
    "UsageError": "mlpmem.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlpmem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


def _register() -> None:
    from mlpmem.hf_auto import watch

    watch()


_register()
