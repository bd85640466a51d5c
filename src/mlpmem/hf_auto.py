"""Register mlpmem's classes with transformers' Auto classes, without making ``import mlpmem`` import transformers.

After ``import mlpmem``, ``AutoConfig`` / ``AutoModel`` load memory folders (``mlp-memory``), ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` / ``pipeline`` load exported joint models (``mlpmem``), and ``AutoConfig`` /
``AutoModelForCausalLM`` load MoM and Gated DeltaNet LMs (``mlpmem-mom``) and explicit-memory LMs
(``mlpmem-explicit``, registered once ``modeling_auto`` has loaded).

Importing transformers and torch costs seconds, which ``mlpmem --help`` must not pay, so ``watch`` registers
each Auto class right after transformers defines it: when the module holding it (``configuration_auto``,
``modeling_auto``) has finished loading, or at once when it is already loaded. The configs live in their own
modules (``*/configuration.py``) so the first registration imports no modeling code. Each module registers its
own classes when it loads (so a module that transformers' loading reaches while it is itself loading registers
at its end).
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_configs() -> None:
    """AutoConfig: ``mlp-memory``, ``mlpmem`` and ``mlpmem-mom`` (each module registers its classes when it loads)."""
    importlib.import_module("mlpmem.memory.configuration")
    importlib.import_module("mlpmem.inference.configuration")
    importlib.import_module("mlpmem.lm.mom.configuration")


def register_models() -> None:
    """AutoModel: the memory and the joint model; AutoModelForCausalLM: the joint model and the MoM LM."""
    importlib.import_module("mlpmem.memory.model")
    importlib.import_module("mlpmem.inference.joint")
    importlib.import_module("mlpmem.lm.mom.model")
    # the explicit-memory config subclasses GPT2Config, whose import reads modeling_auto: registered with the models
    importlib.import_module("mlpmem.explicit.configuration")
    importlib.import_module("mlpmem.explicit.model")


class _RunAfter(importlib.abc.Loader):
    """A loader running ``callback`` once the wrapped loader has executed the module."""

    def __init__(self, loader: Any, callback: Callable[[], None]):
        self.loader, self.callback = loader, callback

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        try:
            self.callback()
        except Exception as err:  # never break the user's import of transformers
            log.warning("mlpmem: could not register its models with transformers' Auto classes: %s", err)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename ... of the wrapped loader
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of a watched module so a callback runs after it loads."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[], None]] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.callbacks:
            return None
        callback = self.callbacks.pop(name)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfter(spec.loader, callback)
                return spec
        return None


_FINDER = _AfterImport()


def watch() -> None:
    """Register each Auto class now if transformers already defined it, else right after it does."""
    for module, callback in ((CONFIG_AUTO, register_configs), (MODELING_AUTO, register_models)):
        if module in sys.modules:
            callback()
        else:
            _FINDER.callbacks[module] = callback
    if _FINDER.callbacks and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
