"""The registry of memory systems (``mlpmem.systems``): every entry has the interface the shared commands call,
and names its components and rows in the one vocabulary (``SystemName``)."""

from __future__ import annotations

import inspect

import pytest

from mlpmem.manifests import SystemResult
from mlpmem.memory_system import MemorySystem, ResultRow, SystemName
from mlpmem.systems import SYSTEMS


@pytest.mark.parametrize("system", SYSTEMS, ids=lambda s: s.name)
def test_entry_has_the_interface(system):
    for name, member in inspect.getmembers(MemorySystem):
        if not name.startswith("_") and callable(member):
            impl = getattr(system, name)
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(member).parameters)[1:], name
    assert all(isinstance(n, SystemName) for n in system.components)
    assert len({s.name for s in SYSTEMS}) == len(SYSTEMS)  # bench.json sections are keyed by it


@pytest.mark.parametrize("system", SYSTEMS, ids=lambda s: s.name)
def test_rows_only_use_scored_components(system):
    everything = {*SystemName}
    rows = system.result_rows(everything, "valid")
    assert all(isinstance(r, ResultRow) for r in rows)
    for row in rows:
        assert {row.part, *row.mixed_with} <= everything
    assert system.result_rows(set(), None) == []  # a run without the system adds no row


def test_explicit_rows():
    from mlpmem.explicit.system import EXPLICIT

    e, c, m = SystemName.EXPLICIT_MEMORY, SystemName.EXPLICIT_CONTROL, SystemName.MLP_MEMORY
    assert [r.name for r in EXPLICIT.result_rows({SystemName.BASE, e}, None)] == [e]
    assert [r.name for r in EXPLICIT.result_rows({SystemName.BASE, e, c}, None)] == [e, c]
    mixed = EXPLICIT.result_rows({SystemName.BASE, e, c, m}, "valid")[-1]
    assert mixed == ResultRow(SystemName.EXPLICIT_MEMORY_MLP_MEMORY, e, m)


def test_result_names_are_the_vocabulary():
    assert SystemResult(name="knn-lm").name is SystemName.KNN_LM
    assert SystemResult(name="knn-lm").model_dump(mode="json")["name"] == "knn-lm"
    with pytest.raises(ValueError):
        SystemResult(name="lm")  # the old component name is not a system
