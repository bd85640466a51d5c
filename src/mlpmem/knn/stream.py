"""Where the index and targets stages get datastore keys: the stored memmap, or the LM (disk-light datastore).

``mlpmem datastore --keys streamed`` stores values only; its keys are recomputed on demand by the frozen LM
through the forward core, exactly as extraction computes them (same windows, layer and float32 arithmetic):

  * ``mlpmem index`` trains the IVF-PQ quantizers on the keys of a seeded random sample of windows (spread over the
    whole split, so the sample is not one topic's; it costs one forward over the sample only), then streams the
    keys of every window, chunk by chunk, straight into the index: they are never stored.
  * ``mlpmem targets`` recomputes each chunk's keys as its queries (distances are the index's PQ distances).

Both sources hand out float32 keys; entry ids are datastore positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlpmem.artifacts import RunDir
from mlpmem.data.tokens import open_split
from mlpmem.data.windows import Window, sliding_windows
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.lm.forward import forward_windows
from mlpmem.lm.load import load_lm, run_lm_dir
from mlpmem.manifests import DatastoreManifest


class StoredKeys:
    """Keys read from RUN/datastore/keys [N, d]."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys  # [N, d] memmap
        self.n, self.d = keys.shape

    def sample(self, n_train: int, seed: int) -> np.ndarray:
        """A seeded random sample of keys [n_train, d] float32 (rows read in ascending order)."""
        rows = np.sort(np.random.default_rng(seed).choice(self.n, n_train, replace=False))
        return self.finite(np.ascontiguousarray(self.keys[rows], dtype=np.float32), rows)

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """Entry ranges [a, b) of about ``size`` entries, in order, covering 0 .. N-1."""
        return [(a, min(self.n, a + size)) for a in range(0, self.n, size)]

    def range(self, a: int, b: int) -> np.ndarray:
        """Keys [b - a, d] float32 of entries a .. b-1."""
        return self.finite(np.ascontiguousarray(self.keys[a:b], dtype=np.float32), np.arange(a, b))

    def finite(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``keys`` [n, d] of entries ``rows``; UsageError when one holds nan/inf. The datastore refused such keys
        when it wrote them, so the file was damaged since: no FAISS setting is at fault."""
        bad = ~np.isfinite(keys).all(axis=1)
        if bad.any():
            path = Path(getattr(self.keys, "filename", None) or "datastore/keys.bin")
            raise UsageError(
                f"datastore entry {int(rows[np.argmax(bad)])} ({int(bad.sum())} of the {len(rows)} read) holds nan/inf "
                f"keys: {path} was damaged after it was written (`mlpmem verify {path.parent.parent}` checks every "
                f"file's hash); remove {path.parent} and rerun `mlpmem datastore`"
            )
        return keys


class StreamedKeys:
    """Keys recomputed by the frozen LM over the datastore's windows (see module docstring)."""

    def __init__(self, lm, key_layer: str, tokens: np.ndarray, windows: list[Window], d: int, device, batch_size: int):
        self.lm, self.key_layer, self.tokens, self.windows = lm, key_layer, tokens, windows
        self.device, self.batch_size = device, batch_size
        self.first = np.array([w.first_scored for w in windows])  # [W] ascending
        self.n, self.d = len(tokens) - 1, d

    def _keys(self, windows: list[Window]) -> tuple[np.ndarray, np.ndarray]:
        """Positions [n] (ascending) and keys [n, d] float32 of the positions ``windows`` score."""
        ids, keys = [], []
        with torch.no_grad():
            for out in forward_windows(
                self.lm, self.tokens, windows, self.batch_size, key_layers=[self.key_layer], device=self.device
            ):
                k = out.keys[self.key_layer].float()  # [b, d]
                if not torch.isfinite(k).all():
                    raise UsageError("the LM produced nan/inf keys; its weights are probably broken (retrain it)")
                ids.append(out.positions)
                keys.append(k.cpu().numpy())
        ids, keys = np.concatenate(ids), np.concatenate(keys)
        order = np.argsort(ids, kind="stable")
        return ids[order], keys[order]

    def sample(self, n_train: int, seed: int) -> np.ndarray:
        """Keys [n_train, d] of random entries of a seeded random set of windows (one forward over them)."""
        perm = np.random.default_rng(seed).permutation(len(self.windows))
        scored = np.cumsum([self.windows[j].n_scored for j in perm])
        take = np.sort(perm[: int(np.searchsorted(scored, n_train)) + 1])
        _, keys = self._keys([self.windows[j] for j in take])
        rows = np.sort(np.random.default_rng([seed, 1]).choice(len(keys), min(n_train, len(keys)), replace=False))
        return np.ascontiguousarray(keys[rows])

    def ranges(self, size: int) -> list[tuple[int, int]]:
        """Entry ranges [a, b) of whole windows, about ``size`` entries each, in order."""
        per = max(1, size // max(1, int(np.median([w.n_scored for w in self.windows]))))
        starts = [self.windows[j].first_scored for j in range(0, len(self.windows), per)]
        return list(zip(starts, [*starts[1:], self.n]))

    def range(self, a: int, b: int) -> np.ndarray:
        """Keys [b - a, d] float32 of entries a .. b-1 (the windows scoring them are run whole)."""
        lo = int(np.searchsorted(self.first, a, side="right")) - 1
        hi = int(np.searchsorted(self.first, b - 1, side="right"))
        ids, keys = self._keys(self.windows[lo:hi])
        return keys[(ids >= a) & (ids < b)]


def key_source(run_dir: Path, datastore: DatastoreManifest, device: str = "auto", batch_size: int = 8):
    """The datastore's keys: a memmap when stored, else the run's LM recomputing them (loaded here)."""
    run = RunDir(run_dir)
    if "keys" in datastore.arrays:
        return StoredKeys(run.array("datastore", "keys", datastore))
    device = resolve_device(device)
    lm = load_lm(run_lm_dir(run.path), device).requires_grad_(False)
    tokens = open_split(run.path, datastore.config.split)  # [n_tokens]
    windows = sliding_windows(len(tokens), datastore.context, datastore.stride)
    return StreamedKeys(lm, datastore.key_layer, tokens, windows, datastore.key_dim, device, batch_size)
