"""How far an index's compressed (PQ) distances are from the exact ones, and what that does to the kNN teacher.

    python benchmarks/pq_distance_error.py --run-dir runs/arch/gpt2 [--samples 4000] [--k 64] [--nprobe 8]
    python benchmarks/pq_distance_error.py --run-dir runs/arch/gpt2 --index runs/wt2-light-pq64/index/index.faiss

A disk-light run keeps no keys, so its targets use the index's PQ distances where a stored-keys run re-ranks with
exact ones. On a run with stored keys and an IVF-PQ index this searches a seeded sample of train keys, drops each
key's own entry, and over the same neighbours compares the PQ distances with the exact squared L2 distances: the
spread of the error relative to the spread of the exact distances (median over queries), and the mean KL from the
exact p_kNN (at the run's target temperature) to the PQ one at several temperatures. ``--index`` compares another
index over the same keys instead (a disk-light run's, built by the same LM over the same split).
"""

from __future__ import annotations

import argparse

import faiss
import numpy as np

from mlpmem.artifacts import RunDir


def knn_distribution(dists: np.ndarray, tokens: np.ndarray, temperature: float, vocab: int) -> np.ndarray:
    """p_kNN over the vocabulary: softmax(-d / T) of the neighbours, summed per next token."""
    weights = np.exp(-(dists - dists.min()) / temperature)
    p = np.zeros(vocab)
    np.add.at(p, tokens, weights / weights.sum())
    return p


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--temperatures", type=float, nargs="+", default=[5.0, 7.0, 10.0, 14.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", default=None, help="an index file over the same entries (default: the run's)")
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)
    store = run.require("datastore")
    if "keys" not in store.arrays:
        raise SystemExit(f"{args.run_dir}: its datastore keeps no keys (streamed): nothing exact to compare with")
    keys, values = (store.arrays[n].open(run.folder("datastore")) for n in ("keys", "values"))
    index = faiss.read_index(args.index or str(run.folder("index") / "index.faiss"))
    if index.ntotal != len(values):
        raise SystemExit(f"the index holds {index.ntotal:,} entries, the datastore {len(values):,}")
    faiss.extract_index_ivf(index).nprobe = args.nprobe
    temperature = run.require("targets").config.knn_temperature if run.complete("targets") else 10.0
    vocab = int(values.max()) + 1
    rng = np.random.default_rng(args.seed)
    positions = np.sort(rng.choice(len(values), min(args.samples, len(values)), replace=False))
    queries = np.asarray(keys[positions], dtype=np.float32)
    pq_dists, ids = index.search(queries, args.k + 1)
    spread, kl = [], {t: [] for t in args.temperatures}
    for row, position in enumerate(positions):
        keep = (ids[row] != position) & (ids[row] >= 0)
        nearest, pq = ids[row][keep][: args.k], pq_dists[row][keep][: args.k]
        exact = ((np.asarray(keys[nearest], dtype=np.float32) - queries[row]) ** 2).sum(1)
        spread.append(np.std(pq - exact) / max(float(np.std(exact)), 1e-9))
        reference = knn_distribution(exact, values[nearest], temperature, vocab)
        seen = reference > 0
        for t in args.temperatures:
            approx = knn_distribution(pq, values[nearest], t, vocab)
            kl[t].append(float((reference[seen] * np.log(reference[seen] / np.maximum(approx[seen], 1e-12))).sum()))
    where = args.index or run.folder("index") / "index.faiss"
    print(f"{len(positions)} train keys, k = {args.k}, nprobe {args.nprobe}, index {where}")
    print(f"std(PQ distance - exact) / std(exact), median over queries: {np.median(spread):.3f}")
    for t in args.temperatures:
        print(f"KL(exact p_kNN at T {temperature:g} || PQ p_kNN at T {t:g}): {np.mean(kl[t]):.4f}")


if __name__ == "__main__":
    main()
