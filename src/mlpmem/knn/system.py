"""kNN-LM as the shared commands see it: ``KNN_LM``, the package's ``MemorySystem`` (registered in
``mlpmem.systems``).

    mlpmem evaluate --run-dir runs/demo                     # the knn-lm row (λ and T tuned on valid)
    mlpmem generate --run-dir runs/demo --knn --prompt "The history of"
    mlpmem export --run-dir runs/demo --out exports/demo --knn

Its one component, ``knn-lm``, is p_kNN from a search of the run's index with the LM's keys at the datastore's
layer (``KnnComponent``); evaluate scores it over a grid of temperatures and tunes T with λ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlpmem.memory_system import KeyComponentsEvaluation, MixedThroughTheJointModel, ResultRow, SystemName
from mlpmem.progress import progress

DATASTORE, INDEX = "datastore", "index"


def knn_log_prob(
    retriever, keys: np.ndarray, gold: np.ndarray, temperatures: list[float], batch: int = 4096
) -> np.ndarray:
    """log p_kNN(gold) [N, len(temperatures)] float32 through a ``KnnRetriever`` (one search per query)."""
    out = np.empty((len(gold), len(temperatures)), dtype=np.float32)
    for i in progress(range(0, len(gold), batch), desc="knn", unit="batch"):
        out[i : i + batch] = retriever.gold_log_probs(keys[i : i + batch], gold[i : i + batch], temperatures)
    return out


@dataclass
class KnnComponent:
    """p_kNN from keys [..., d] of the LM module ``layer`` through a ``KnnRetriever`` (at its temperature; in
    evaluate over ``temperatures``, one column each)."""

    retriever: Any  # a KnnRetriever
    layer: str
    temperatures: list[float] = field(default_factory=list)

    def log_probs(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        flat = self.retriever.log_probs(keys.reshape(-1, keys.shape[-1]), vocab)  # [Q, V]
        return flat.view(*keys.shape[:-1], vocab)

    def gold_log_probs(self, keys: np.ndarray, gold: np.ndarray) -> np.ndarray:
        return knn_log_prob(self.retriever, keys, gold, self.temperatures or [self.retriever.temperature])


class KnnSystem(MixedThroughTheJointModel):
    """kNN-LM: p_kNN from the nearest stored keys, mixed with the LM."""

    name = "knn-lm"
    components = {SystemName.KNN_LM: "kNN-LM"}
    key_components = frozenset({SystemName.KNN_LM})

    def component(self, retriever: Any, layer: str) -> KnnComponent:
        return KnnComponent(retriever, layer)

    @property
    def pq_choices(self) -> tuple[int, ...]:
        """The product-quantiser sub-vector counts an index may use (``mlpmem.knn.index.PQ_CHOICES``)."""
        from mlpmem.knn.index import PQ_CHOICES

        return tuple(PQ_CHOICES)

    def retriever(self, index: Any, values: np.ndarray, **kwargs: Any) -> Any:
        """A ``KnnRetriever`` over any index and values (bench's synthetic stores)."""
        from mlpmem.knn.retriever import KnnRetriever

        return KnnRetriever(index, values, **kwargs)

    def load(self, run, model_fp: str, k: int, nprobe: int | None = None, **kwargs: Any):
        """``mlpmem.knn.retriever.load_knn``: (the retriever, the datastore manifest), checked against the LM."""
        from mlpmem.knn.retriever import load_knn

        return load_knn(run, model_fp, k, nprobe, **kwargs)

    # mlpmem evaluate ------------------------------------------------------------------------------------------
    def evaluation_inputs(self, config, run, model_fp) -> dict[str, str] | None:
        """On the run's own tokens only, when its datastore and index are complete and built with this LM."""
        if not config.knn or config.corpus is not None or run.complete(DATASTORE) is None:
            return None
        datastore = run.require(DATASTORE)
        if run.complete(INDEX) is None:
            return None
        index = run.require(INDEX)
        from mlpmem.knn.retriever import check_datastore

        check_datastore(datastore, model_fp, config.k)
        return {DATASTORE: datastore.fingerprint, INDEX: index.fingerprint}

    def built_from(self, run) -> str | None:
        return run.require(DATASTORE).config.split

    def open_evaluation(self, config, run, device, lm, model_fp) -> KeyComponentsEvaluation:
        """The retriever, its queries from the datastore's key layer of ``lm`` (width checked)."""
        from mlpmem.errors import UsageError
        from mlpmem.lm.keys import key_dim, key_module_path

        retriever, datastore = self.load(run, model_fp, config.k, config.nprobe, rerank=config.rerank)
        layer = key_module_path(lm, datastore.key_layer)
        if key_dim(lm, layer) != datastore.key_dim:
            raise UsageError(
                f"the datastore holds keys of width {datastore.key_dim}, "
                f"but {layer!r} of the LM gives {key_dim(lm, layer)}"
            )
        component = KnnComponent(retriever, layer, list(config.knn_temperatures))
        return KeyComponentsEvaluation({SystemName.KNN_LM: component})

    def result_rows(self, components: set[str], tuned_on: str | None) -> list[ResultRow]:
        """kNN-LM mixed with the LM (its T chosen with λ)."""
        if SystemName.KNN_LM not in components:
            return []
        return [ResultRow(SystemName.KNN_LM, SystemName.BASE, (SystemName.KNN_LM,))]

    # scoring models, generate, export ----------------------------------------------------------------------
    def scoring_models(self, run, evaluated, device) -> dict[SystemName, Any]:
        return {}  # its row is a mixture on the base LM's keys (the joint model)

    def joint_component(self, run, lm, model_fp, options) -> dict[str, Any] | None:
        """The run's retriever, its layer, T and λ (given, else tuned by evaluate, else the T the run's memory was
        trained with or that of its targets, and λ = 0.25), and what an exported folder records to reopen it
        (``knn_settings``)."""
        if not options.get("use_knn", False):
            return None
        from mlpmem.lm.keys import key_module_path

        tuned, nprobe = options["tuned"], options.get("nprobe")
        knn, datastore = self.load(run, model_fp, options["k"], nprobe)
        knn.temperature = options.get("knn_temperature") or tuned.knn_temperature
        if not knn.temperature:  # the memory's target T when the run's memory joins (its part follows), else this
            knn.temperature, options["knn_temperature_open"] = targets_temperature(run), True
        knn_lmbda = options.get("knn_lmbda")
        if knn_lmbda is None:
            knn_lmbda = tuned.knn_lmbda if tuned.knn_lmbda is not None else DEFAULT_KNN_LMBDA
        return {
            "knn": knn,
            "knn_lmbda": knn_lmbda,
            "knn_layer": key_module_path(lm, datastore.key_layer),
            "knn_settings": {"run_dir": str(run.path.resolve()), "nprobe": nprobe},
        }

    def attach(self, settings: dict[str, Any], model_fp: str | None) -> Any:
        """The retriever an exported folder's ``knn`` settings name (its run's datastore and index, checked)."""
        from mlpmem.artifacts import RunDir
        from mlpmem.errors import UsageError

        if not settings.get("run_dir"):
            raise UsageError("this model mixes in kNN-LM but names no run holding its datastore (knn.run_dir)")
        retriever, _ = self.load(
            RunDir(settings["run_dir"]),
            model_fp,
            int(settings["k"]),
            settings.get("nprobe"),
            temperature=float(settings["knn_temperature"]),
        )
        return retriever


DEFAULT_KNN_LMBDA = 0.25


def targets_temperature(run) -> float:
    """T of the run's kNN targets (the memory was trained on them), else the default."""
    from mlpmem.knn.retriever import DEFAULT_KNN_TEMPERATURE

    targets = run.complete("targets")
    return float(targets.config.knn_temperature) if targets is not None else DEFAULT_KNN_TEMPERATURE


KNN_LM = KnnSystem()
