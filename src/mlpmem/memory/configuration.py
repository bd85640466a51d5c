"""The MLP memory's config: its shape and the identity of the base LM whose keys it reads.

Apart from the model (``mlpmem.memory.model``) so that registering it with ``AutoConfig`` imports no modeling code.
"""

from __future__ import annotations

import math

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

from mlpmem.errors import UsageError

FFN_TYPES = ("gelu", "swiglu")


def ffn_width(hidden_size: int, ffn: str) -> int:
    """Inner width of a block: 4h for GELU; 8h/3 (rounded up to a multiple of 8) for SwiGLU: both ~8h² weights."""
    if ffn == "gelu":
        return 4 * hidden_size
    return 8 * math.ceil(8 * hidden_size / 3 / 8)


class MLPMemoryConfig(PretrainedConfig):
    """Shape of an MLP memory and the identity of the base LM whose keys it reads."""

    model_type = "mlp-memory"

    def __init__(
        self,
        input_dim: int = 768,
        hidden_size: int = 768,
        n_blocks: int = 4,
        ffn: str = "gelu",
        intermediate_size: int | None = None,
        vocab_size: int = 50257,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        base_model_fingerprint: str | None = None,
        tokenizer_fingerprint: str | None = None,
        key_layer: str | None = None,
        lmbda: float = 0.25,
        knn_temperature: float | None = None,
        alpha: float = 0.5,
        weight_dtype: str = "float32",
        **kwargs,
    ):
        if ffn not in FFN_TYPES:
            raise UsageError(f"ffn must be one of {', '.join(FFN_TYPES)}, got {ffn!r}")
        self.input_dim = input_dim  # width of the keys (the base LM's hidden size)
        self.hidden_size = hidden_size
        self.n_blocks = n_blocks
        self.ffn = ffn
        self.intermediate_size = intermediate_size or ffn_width(hidden_size, ffn)
        self.vocab_size = vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.base_model_fingerprint = base_model_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.key_layer = key_layer  # module path of the base LM whose output is the key
        self.lmbda = lmbda  # default mixing weight of the memory at inference
        self.knn_temperature = knn_temperature  # T of the p_kNN targets it was trained on
        self.alpha = alpha  # KL share of the training loss
        if weight_dtype not in ("float32", "bfloat16", "int8"):
            raise UsageError(f"weight_dtype must be float32, bfloat16 or int8, got {weight_dtype!r}")
        self.weight_dtype = weight_dtype  # of its Linear layers (inference copies: mlpmem.memory.quantize)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


AutoConfig.register(MLPMemoryConfig.model_type, MLPMemoryConfig, exist_ok=True)
