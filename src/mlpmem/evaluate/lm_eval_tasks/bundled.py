"""The data of the lm-eval tasks shipped with mlpmem, read from the package (so they run from any folder)."""

from __future__ import annotations

from typing import Any


def wikitext2_slice_test(**_: Any) -> Any:
    """The bundled WikiText-2 slice's test split as one document (``{"test": Dataset}`` with a ``text`` column)."""
    import datasets

    from mlpmem.data.corpus import bundled_wikitext2

    text = bundled_wikitext2().splits["test"]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [text]})})
