"""The config of ``MoMForCausalLM`` (``mlpmem.lm.mom.model``): a MoM or Gated DeltaNet causal LM.

Apart from the model so that registering it with ``AutoConfig`` imports no modeling code.

    config = MoMLMConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2)          # MoM: 4 memories, top-2, shared
    config = MoMLMConfig.gated_deltanet(vocab_size=1000, hidden_size=64, num_hidden_layers=2)  # one memory, no router
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PretrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

from mlpmem.errors import UsageError

MODEL_TYPE = "mlpmem-mom"


class MoMLMConfig(PretrainedConfig):
    """Sizes of a MoM causal LM: embeddings -> ``num_hidden_layers`` blocks of [RMSNorm -> MoM layer (residual) ->
    RMSNorm -> SwiGLU FFN (residual)] -> RMSNorm -> head (tied to the embeddings unless ``tie_word_embeddings=False``).

    Per layer: ``num_heads`` heads of key width ``head_k_dim`` (default hidden_size // num_heads) and value width
    ``head_v_dim`` (default the same); ``num_memories`` routed memories of which each token uses ``topk``, plus a
    shared one when ``shared_memory``; ``conv_size`` tokens of short convolution; ``chunk_size`` tokens per chunk of
    the training form. ``intermediate_size`` is the FFN width (default 4 * hidden_size rounded to 2/3 for SwiGLU, a
    multiple of 8). The training loss adds ``aux_loss_weight`` times the layers' mean load-balancing loss.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        head_k_dim: int | None = None,
        head_v_dim: int | None = None,
        num_memories: int = 4,
        topk: int = 2,
        shared_memory: bool = True,
        conv_size: int = 4,
        chunk_size: int = 64,
        intermediate_size: int | None = None,
        aux_loss_weight: float = 0.01,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.head_k_dim = head_k_dim if head_k_dim is not None else max(1, hidden_size // num_heads)
        self.head_v_dim = head_v_dim if head_v_dim is not None else self.head_k_dim
        self.num_memories = num_memories
        self.topk = topk
        self.shared_memory = bool(shared_memory)
        self.conv_size = conv_size
        self.chunk_size = chunk_size
        if intermediate_size is None:
            intermediate_size = 8 * ((8 * hidden_size // 3 + 7) // 8)
        self.intermediate_size = intermediate_size
        self.aux_loss_weight = float(aux_loss_weight)
        self.norm_eps = norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
        problems = [
            f"{name}: must be >= 1, got {getattr(self, name)}"
            for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "intermediate_size")
            if getattr(self, name) < 1
        ]
        if self.aux_loss_weight < 0:
            problems.append(f"aux_loss_weight: must be >= 0, got {self.aux_loss_weight}")
        if problems:
            raise UsageError("; ".join(problems), field=problems[0].split(":")[0])

    @classmethod
    def gated_deltanet(cls, **sizes: Any) -> MoMLMConfig:
        """Gated DeltaNet: the same model with one memory that every token uses, no router and no shared memory."""
        return cls(**{**sizes, "num_memories": 1, "topk": 1, "shared_memory": False})

    @property
    def is_gated_deltanet(self) -> bool:
        return self.num_memories == 1 and not self.shared_memory


AutoConfig.register(MoMLMConfig.model_type, MoMLMConfig, exist_ok=True)
