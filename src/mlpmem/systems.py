"""THE registry of memory systems that plug into the shared commands through ``mlpmem.memory_system.MemorySystem``.

``mlpmem evaluate``, ``generate`` and ``bench`` iterate over ``SYSTEMS`` and import no system package themselves;
adding a system is its package (exporting one ``MemorySystem``) plus one entry here.

kNN-LM and the MLP memory are not entries yet: the joint model (``mlpmem.inference.joint``) mixes them token by
token, and evaluate and bench still reach their packages directly.
"""

from __future__ import annotations

from mlpmem.explicit.system import EXPLICIT
from mlpmem.memory_system import MemorySystem, SystemName

SYSTEMS: tuple[MemorySystem, ...] = (EXPLICIT,)


def component_labels() -> dict[SystemName, str]:
    """How errors name every component a registered system scores."""
    return {name: label for system in SYSTEMS for name, label in system.components.items()}
