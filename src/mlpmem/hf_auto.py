"""Register mlpmem's classes with transformers' Auto classes, without making ``import mlpmem`` import transformers.

After ``import mlpmem``, ``AutoConfig`` / ``AutoModel`` load memory folders (``mlp-memory``), ``AutoConfig`` /
``AutoModel`` / ``AutoModelForCausalLM`` / ``pipeline`` load exported joint models (``mlpmem``), and ``AutoConfig`` /
``AutoModelForCausalLM`` load MoM and Gated DeltaNet LMs (``mlpmem-mom``) and explicit-memory LMs
(``mlpmem-explicit``, registered once ``modeling_auto`` and GPT-2's modules have loaded).

Importing transformers and torch costs seconds, which ``mlpmem --help`` must not pay, so ``watch`` registers
each Auto class right after transformers defines it: when the module holding it (``configuration_auto``,
``modeling_auto``) has finished loading, or at once when it is already loaded. The configs live in their own
modules (``*/configuration.py``) so the first registration imports no modeling code. Each module registers its
own classes when it loads (so a module that transformers' loading reaches while it is itself loading registers
at its end). GPT-2's config class is defined under a decorator that imports ``modeling_auto``, so the
explicit-memory classes (GPT-2 subclasses) wait until no GPT-2 module is half-loaded.
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
GPT2_MODULES = ("transformers.models.gpt2.configuration_gpt2", "transformers.models.gpt2.modeling_gpt2")
_explicit_registered = False
_FINISHED: set[str] = set()  # watched modules whose code has run to the end (import still marks them loading)


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
    register_explicit()


def _half_loaded(name: str) -> bool:
    """Whether module ``name`` is being executed right now (in sys.modules, its code not run to the end)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False)) and name not in _FINISHED


def register_explicit() -> None:
    """AutoConfig / AutoModelForCausalLM: the explicit-memory LM, once ``modeling_auto`` and GPT-2 are loadable.

    Called when any of those modules finishes loading; does nothing until all of them can be imported whole.
    """
    global _explicit_registered
    if _explicit_registered or MODELING_AUTO not in sys.modules:
        return
    if any(_half_loaded(name) for name in (MODELING_AUTO, *GPT2_MODULES)):
        return
    _explicit_registered = True
    importlib.import_module("mlpmem.explicit.configuration")
    importlib.import_module("mlpmem.explicit.model")


class _RunAfter(importlib.abc.Loader):
    """A loader running ``callbacks`` once the wrapped loader has executed the module."""

    def __init__(self, loader: Any, callbacks: list[Callable[[], None]]):
        self.loader, self.callbacks = loader, callbacks

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _FINISHED.add(module.__name__)
        for callback in self.callbacks:
            try:
                callback()
            except Exception as err:  # never break the user's import of transformers
                log.warning("mlpmem: could not register its models with transformers' Auto classes: %s", err)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename ... of the wrapped loader
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of a watched module so its callbacks run after it loads."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.callbacks:
            return None
        callbacks = self.callbacks.pop(name)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfter(spec.loader, callbacks)
                return spec
        return None


_FINDER = _AfterImport()


def watch() -> None:
    """Register each Auto class now if transformers already defined it, else right after it does."""
    watched = ((CONFIG_AUTO, register_configs), (MODELING_AUTO, register_models))
    watched += tuple((name, register_explicit) for name in GPT2_MODULES)
    for module, callback in watched:
        if module in sys.modules:
            callback()
        else:
            _FINDER.callbacks.setdefault(module, []).append(callback)
    if _FINDER.callbacks and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
