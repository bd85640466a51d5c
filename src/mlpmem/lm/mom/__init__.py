"""MoM (Mixture-of-Memories) and Gated DeltaNet token mixers in plain PyTorch (shared/DESIGN.md §9), and the causal
LM built on them (``MoMForCausalLM``, configured by ``MoMLMConfig``).

The names are imported on first use, so registering the config with ``AutoConfig`` (``mlpmem.hf_auto``) imports
``mlpmem.lm.mom.configuration`` alone.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "MoMConfig": "mlpmem.lm.mom.layer",
    "MoMLayer": "mlpmem.lm.mom.layer",
    "MoMOutput": "mlpmem.lm.mom.layer",
    "MoMState": "mlpmem.lm.mom.layer",
    "load_balancing_loss": "mlpmem.lm.mom.layer",
    "MoMLMConfig": "mlpmem.lm.mom.configuration",
    "MoMCache": "mlpmem.lm.mom.model",
    "MoMForCausalLM": "mlpmem.lm.mom.model",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlpmem.lm.mom' has no attribute {name!r}")
