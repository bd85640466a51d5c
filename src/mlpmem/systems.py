"""THE registry of memory systems that plug into the shared commands through ``mlpmem.memory_system.MemorySystem``.

``mlpmem evaluate``, ``generate``, ``bench`` and ``export`` iterate over ``SYSTEMS`` and import no system package
themselves; adding a system is its package (exporting one ``MemorySystem``) plus one entry here. The order is the
order of the evaluate table's rows (a row may use a component an earlier row chose a setting for: the
``mlp-memory+knn-lm`` mixture takes kNN-LM's tuned T).

``KNN_LM`` and ``MLP_MEMORY`` are also named: the joint model's exported folder (``mlpmem.inference.joint``) has a
slot for each (the memory's weights and config, kNN-LM's settings).
"""

from __future__ import annotations

from mlpmem.explicit.system import EXPLICIT
from mlpmem.knn.system import KNN_LM
from mlpmem.memory.system import MLP_MEMORY
from mlpmem.memory_system import MemorySystem, SystemName

SYSTEMS: tuple[MemorySystem, ...] = (KNN_LM, MLP_MEMORY, EXPLICIT)

__all__ = ["EXPLICIT", "KNN_LM", "MLP_MEMORY", "SYSTEMS", "component_labels", "key_components"]


def component_labels() -> dict[SystemName, str]:
    """How errors name every component a registered system scores."""
    return {name: label for system in SYSTEMS for name, label in system.components.items()}


def key_components() -> frozenset[SystemName]:
    """Every component read from the evaluated LM's keys (mixed with it; -inf allowed, NaN refused)."""
    return frozenset().union(*(system.key_components for system in SYSTEMS))
