"""The generation cache's name in transformers: ``cache`` from 5.24 on, ``past_key_values`` before.

Our models take it under either name and hand it on, and read it back from outputs, under the name the installed
transformers uses (the old name still works there, but logs a deprecation warning on every run).
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# the output field and the forward argument were renamed in the same release
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_ARG = CACHE_FIELD


def pop_cache(kwargs: dict[str, Any], given: Any = None) -> Any:
    """The cache a forward call was handed: ``given``, else whichever name ``kwargs`` holds it under (both removed)."""
    for name in ("cache", "past_key_values"):
        value = kwargs.pop(name, None)
        if given is None:
            given = value
    return given


def cache_of(output: Any) -> Any:
    """The cache of a model output."""
    return getattr(output, CACHE_FIELD, None)
