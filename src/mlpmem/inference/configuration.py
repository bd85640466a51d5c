"""The joint model's config (``mlpmem.inference.joint``): the base LM's config, the memory's, λ, key layers, kNN-LM.

Apart from the model so that registering it with ``AutoConfig`` imports no modeling code.
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

from mlpmem.errors import UsageError
from mlpmem.systems import MLP_MEMORY

MLPMemoryConfig = MLP_MEMORY.config_class

MODEL_TYPE = "mlpmem"


class MemoryAugmentedConfig(PretrainedConfig):
    """The base LM's config (``text_config``), the memory's (``memory_config``; None: no memory), the memory's
    weight ``lmbda``, the LM modules the memory (``memory_layer``) and kNN-LM read, the kNN-LM settings (``knn``:
    ``run_dir``, ``k``, ``knn_lmbda``, ``knn_temperature``, ``nprobe``, ``key_layer``; None: no kNN-LM), the base
    model's fingerprint (the run's), ``lm_weights_sha256`` and ``memory_weights_sha256`` (of the LM's and the
    memory's tensors, checked at load)."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig, "memory_config": MLPMemoryConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        memory_config: MLPMemoryConfig | dict | None = None,
        lmbda: float = 0.0,
        memory_layer: str | None = None,
        knn: dict[str, Any] | None = None,
        base_model_fingerprint: str | None = None,
        lm_weights_sha256: str | None = None,
        memory_weights_sha256: str | None = None,
        **kwargs: Any,
    ):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        if isinstance(memory_config, dict):
            memory_config = MLPMemoryConfig(**memory_config)
        self.text_config = text_config
        self.memory_config = memory_config
        self.lmbda = float(lmbda)
        self.memory_layer = memory_layer
        self.knn = dict(knn) if knn else None
        self.base_model_fingerprint = base_model_fingerprint
        self.lm_weights_sha256 = lm_weights_sha256
        self.memory_weights_sha256 = memory_weights_sha256
        if text_config is not None:
            self.vocab_size = text_config.vocab_size
        kwargs.setdefault("tie_word_embeddings", False)  # the LM ties its own weights (lm.*)
        super().__init__(**kwargs)
        check_weights(self.lmbda if memory_config is not None else 0.0, float((self.knn or {}).get("knn_lmbda", 0.0)))


def check_weights(lmbda: float, knn_lmbda: float) -> None:
    """UsageError (``field=lmbda``) unless both weights lie in [0, 1] and sum to at most 1."""
    if not (0.0 <= lmbda <= 1.0) or not (0.0 <= knn_lmbda <= 1.0) or lmbda + knn_lmbda > 1.0 + 1e-9:
        raise UsageError(
            f"the memory's λ ({lmbda:g}) and kNN-LM's ({knn_lmbda:g}) must lie in [0, 1] and sum to at most 1",
            field="lmbda",
        )


AutoConfig.register(MemoryAugmentedConfig.model_type, MemoryAugmentedConfig, exist_ok=True)
