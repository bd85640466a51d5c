"""kNN targets against a brute-force numpy computation; self dropped by id; resume is byte-identical."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import mlpmem.knn.targets as targets_mod
from mlpmem.artifacts import RunDir, read_json
from mlpmem.config import IndexConfig, TargetsConfig
from mlpmem.errors import UsageError
from mlpmem.knn.index import build_index
from mlpmem.knn.targets import build_targets, drop_self

from knn_helpers import random_datastore, write_datastore

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap

ARRAYS = ("tokens", "probs", "gold", "self_found")


def brute_force_targets(keys, values, k, temperature, width):
    """Per entry: neighbours by exact distance (self excluded by id), p_kNN per token, top width, renormalised."""
    keys = keys.astype(np.float64)
    d = ((keys[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # [N, N]
    rows = []
    for i in range(len(keys)):
        order = [j for j in np.argsort(d[i], kind="stable") if j != i][:k]
        w = np.exp(-(d[i, order] - d[i, order].min()) / temperature)
        p = {}
        for j, wj in zip(order, w / w.sum()):
            p[int(values[j])] = p.get(int(values[j]), 0.0) + wj
        top = sorted(p.items(), key=lambda tp: (-tp[1], tp[0]))[:width]
        total = sum(q for _, q in top)
        rows.append([(t, q / total) for t, q in top])
    return rows


def check_against(run, rows, width):
    tokens, probs = RunDir(run).array("targets", "tokens"), RunDir(run).array("targets", "probs")
    assert tokens.shape == probs.shape == (len(rows), width)
    for i, row in enumerate(rows):
        assert tokens[i, : len(row)].tolist() == [t for t, _ in row], i
        np.testing.assert_allclose(probs[i, : len(row)], [q for _, q in row], rtol=1e-4, atol=1e-6)
        assert (tokens[i, len(row) :] == -1).all() and (probs[i, len(row) :] == 0).all()


def make_run(run, keys, values):
    write_datastore(run, keys, values)
    build_index(IndexConfig(run_dir=run))
    return run


def test_targets_equal_brute_force(tmp_path):
    keys, values = random_datastore(n=200, d=8, vocab=12)
    run = make_run(tmp_path, keys, values)
    manifest = build_targets(TargetsConfig(run_dir=run, k=10, knn_temperature=3.0, width=4, chunk_size=64))
    assert manifest.width == 4 and manifest.entries == 200 and manifest.self_found == 200 and manifest.nprobe is None
    check_against(run, brute_force_targets(keys, values, 10, 3.0, 4), 4)
    np.testing.assert_array_equal(RunDir(run).array("targets", "gold"), values)


def test_width_is_capped_by_k(tmp_path):
    keys, values = random_datastore(n=120, d=8, vocab=40)
    run = make_run(tmp_path, keys, values)
    manifest = build_targets(TargetsConfig(run_dir=run, k=6, knn_temperature=5.0, width=128))
    assert manifest.width == 6
    check_against(run, brute_force_targets(keys, values, 6, 5.0, 6), 6)


def test_self_is_dropped_by_id_among_exact_duplicates(tmp_path):
    """Every key appears 3 times with 3 distinct values: the entry's own value must not be counted."""
    base, _ = random_datastore(n=40, d=8)
    keys = np.repeat(base, 3, axis=0)  # entries 3g, 3g+1, 3g+2 share a key
    values = np.arange(120, dtype=np.int32)  # all distinct, so each neighbour is a token of its own
    run = make_run(tmp_path, keys, values)
    manifest = build_targets(TargetsConfig(run_dir=run, k=5, knn_temperature=2.0, width=5))
    assert manifest.self_found == 120  # k + 1 = 6 neighbours always include all 3 twins, itself among them
    tokens = RunDir(run).array("targets", "tokens")
    for i in range(120):
        row = set(tokens[i].tolist())
        assert i not in row
        assert {3 * (i // 3) + j for j in range(3)} - {i} <= row  # both twins are neighbours
    check_against(run, brute_force_targets(keys, values, 5, 2.0, 5), 5)


def test_drop_self_by_id_else_last():
    dists = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    ids = np.array([[7, 3, 9], [4, 8, 2]])
    d, i, found = drop_self(dists, ids, np.array([3, 5]))
    assert i.tolist() == [[7, 9], [4, 8]] and d.tolist() == [[0.0, 2.0], [0.0, 0.0]]
    assert found.tolist() == [True, False]


class Killed(Exception):
    pass


def test_killed_and_resumed_is_byte_identical(tmp_path, monkeypatch):
    keys, values = random_datastore(n=300, d=8, vocab=20)
    whole, killed = make_run(tmp_path / "whole", keys, values), make_run(tmp_path / "killed", keys, values)
    config = dict(k=8, knn_temperature=4.0, width=5, chunk_size=40)  # 8 chunks
    build_targets(TargetsConfig(run_dir=whole, **config))
    kill_after_three_chunks(killed, config, monkeypatch)
    assert read_json(killed / "targets.partial" / "progress.json")["done"] == [0, 1, 2]
    assert not (killed / "targets").exists()
    manifest = build_targets(TargetsConfig(run_dir=killed, **config))
    assert manifest.status == "complete" and manifest.self_found == 300
    for name in ARRAYS:
        assert (killed / "targets" / f"{name}.bin").read_bytes() == (whole / "targets" / f"{name}.bin").read_bytes(), (
            name
        )


def kill_after_three_chunks(run, config, monkeypatch) -> None:
    real, calls = targets_mod.sparse_distribution, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(targets_mod, "sparse_distribution", dying)
    with pytest.raises(Killed):
        build_targets(TargetsConfig(run_dir=run, **config))
    monkeypatch.setattr(targets_mod, "sparse_distribution", real)


def test_a_chunk_zeroed_after_it_was_written_is_computed_again(tmp_path, monkeypatch):
    """Before, the resume trusted progress.json and the stage ended complete with a chunk of zeros."""
    keys, values = random_datastore(n=300, d=8, vocab=20)
    whole, killed = make_run(tmp_path / "whole", keys, values), make_run(tmp_path / "killed", keys, values)
    config = dict(k=8, knn_temperature=4.0, width=5, chunk_size=40)
    build_targets(TargetsConfig(run_dir=whole, **config))
    kill_after_three_chunks(killed, config, monkeypatch)
    with open(killed / "targets.partial" / "tokens.bin", "r+b") as fh:
        fh.seek(40 * 5 * 4)  # chunk 1: rows 40..79 of [300, 5] int32
        fh.write(bytes(40 * 5 * 4))
    build_targets(TargetsConfig(run_dir=killed, **config))
    for name in ARRAYS:
        assert (killed / "targets" / f"{name}.bin").read_bytes() == (whole / "targets" / f"{name}.bin").read_bytes()


def test_a_resume_refuses_a_partial_file_linked_out_of_the_run(tmp_path, monkeypatch):
    """targets.partial/tokens.bin replaced by a link: the resume would write the rows it computes through it."""
    keys, values = random_datastore(n=300, d=8, vocab=20)
    run = make_run(tmp_path / "run", keys, values)
    config = dict(k=8, knn_temperature=4.0, width=5, chunk_size=40)
    kill_after_three_chunks(run, config, monkeypatch)
    victim = tmp_path / "victim.bin"
    victim.write_bytes((run / "targets.partial" / "tokens.bin").read_bytes())
    (run / "targets.partial" / "tokens.bin").unlink()
    (run / "targets.partial" / "tokens.bin").symlink_to(victim)
    before = victim.read_bytes()
    with pytest.raises(UsageError, match=r"tokens.bin is a link to .*victim.bin.*remove .*targets.partial") as err:
        build_targets(TargetsConfig(run_dir=run, **config))
    assert "\n" not in str(err.value) and victim.read_bytes() == before and not (run / "targets").exists()


def test_bad_inputs_are_one_line(tmp_path):
    keys, values = random_datastore(n=50, d=8)
    run = make_run(tmp_path, keys, values)
    with pytest.raises(UsageError, match=r"k \(50\) must be smaller than the datastore \(50 entries") as err:
        build_targets(TargetsConfig(run_dir=run, k=50))
    assert err.value.field == "k" and "\n" not in err.value.for_cli()
    assert not (run / "targets.partial").exists()  # refused before any write
    write_datastore(run, keys[:40], values[:40], tag="rebuilt")  # the index now describes another datastore
    with pytest.raises(UsageError, match="index was built from another version of datastore") as err:
        build_targets(TargetsConfig(run_dir=run, k=5))
    assert "\n" not in str(err.value)


def damaged_values_run(tmp_path, vocab: int = 12):
    """A run whose prepare stage records a ``vocab``-token vocabulary and whose datastore values hold one id
    beyond it (entry 77: in the second chunk of 64, and every entry is some query's neighbour under k = 8)."""
    from mlpmem.config import PrepareConfig

    prepare = RunDir(tmp_path).begin("prepare", PrepareConfig(corpus="synthetic", train_tokenizer=300), {})
    prepare.add_array("train", "uint16", (2,))[:] = 0
    prepare.complete(vocab_size=vocab)
    keys, values = random_datastore(n=200, d=8, vocab=vocab)
    values[77] = vocab + 5
    return make_run(tmp_path, keys, values)


def test_a_datastore_value_outside_the_vocabulary_is_one_line_naming_its_file(tmp_path):
    from mlpmem.knn.retriever import load_knn
    from mlpmem.knn.targets import SearchedTargets

    run = damaged_values_run(tmp_path)
    values_path = run / "datastore" / "values.bin"
    expected = f"{values_path} holds token id 17, outside the vocabulary [0, 12)"
    for store in (True, False):
        with pytest.raises(UsageError, match=re.escape(expected)) as err:
            targets = build_targets(TargetsConfig(run_dir=run, k=8, store=store, chunk_size=64))
            SearchedTargets(run, targets).rows(np.arange(200), "cpu", torch.zeros(200, 8))  # store false
        assert "\n" not in err.value.for_cli() and err.value.for_cli().endswith("rerun `mlpmem datastore`")
    retriever, _ = load_knn(RunDir(run), "synthetic", k=8)
    queries = RunDir(run).array("datastore", "keys")[70:90]  # entry 77's own key finds it
    with pytest.raises(UsageError, match=re.escape(expected)):
        retriever.gold_log_probs(queries, np.zeros(20, dtype=np.int64), [1.0])
    with pytest.raises(UsageError, match=re.escape(expected)):
        retriever.log_probs(torch.tensor(queries), 12)
