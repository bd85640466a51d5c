"""The config of ``ExplicitMemoryLM`` (``mlpmem.explicit.model``): a GPT-2 whose first layers read explicit memories.

Apart from the model so that registering it with ``AutoConfig`` imports no modeling code.
"""

from __future__ import annotations

from typing import Any

from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.gpt2.configuration_gpt2 import GPT2Config

MODEL_TYPE = "mlpmem-explicit"


class ExplicitMemoryConfig(GPT2Config):
    """A GPT-2 config plus what reading explicit memories needs: the memory layers (block indices, default the first
    half), the tokens kept per reference and head (``keep_tokens``), the reference marker ids put before a reference
    when it is encoded, and the fingerprint of the LM whose weights it started from."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        memory_layers: list[int] | None = None,
        keep_tokens: int = 8,
        marker_ids: list[int] | None = None,
        base_model_fingerprint: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.memory_layers = list(range(self.n_layer // 2 or 1)) if memory_layers is None else list(memory_layers)
        self.keep_tokens = keep_tokens
        self.marker_ids = list(marker_ids or [])
        self.base_model_fingerprint = base_model_fingerprint

    @classmethod
    def from_gpt2(cls, gpt2: GPT2Config, **memory: Any) -> ExplicitMemoryConfig:
        """The explicit-memory config of a GPT-2 config (same sizes), with the memory settings given."""
        data = {
            k: v for k, v in gpt2.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")
        }
        return cls(**data, **memory)


AutoConfig.register(MODEL_TYPE, ExplicitMemoryConfig, exist_ok=True)
