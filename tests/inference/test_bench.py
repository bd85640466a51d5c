"""``mlpmem bench`` end to end on a tiny run (no timing assertions: only what it writes and how it is shaped)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlpmem.bench.report import format_table, ms_text
from mlpmem.bench.synthetic import build_synthetic_index, cached_synthetic_index, datastore_bytes, ivfpq_geometry
from mlpmem.cli import main
from mlpmem.measure import Spread, added_ms

from gen_inputs import KNN_LAYER, MEMORY_LAYER, generation_run, generation_run_template  # noqa: F401

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


def test_synthetic_index_has_the_recipe_geometry_and_finds_neighbours():
    assert ivfpq_geometry(50_000_000, 256, 1024, 32) == (32768, 32)  # ≈ 4·sqrt(N) lists, 32-byte codes
    assert ivfpq_geometry(10_000, 256, 1024, 32)[0] == 256  # capped: 32 probed lists hold >= k entries
    index, factory = build_synthetic_index(3000, 32, 64, 8, seed=1, chunk=1000)
    assert index.ntotal == 3000 and factory == "IVF256,PQ16" and index.nprobe == 8
    dists, ids = index.search(np.random.default_rng(0).standard_normal((4, 32), dtype=np.float32) * 4, 64)
    assert (ids >= 0).all() and (np.diff(dists, axis=1) >= 0).all()
    assert datastore_bytes(10, 32) == 10 * (32 * 2 + 4)


def test_a_kept_synthetic_index_is_read_back_by_the_next_bench_unchanged(tmp_path):
    built, factory, path, reused = cached_synthetic_index(tmp_path, 3000, 32, 64, 8, seed=1)
    assert not reused and path.is_file() and not list(tmp_path.glob("*.partial"))
    read, factory_read, path_read, reused = cached_synthetic_index(tmp_path, 3000, 32, 64, 8, seed=1)
    assert reused and (factory_read, path_read, read.nprobe) == (factory, path, built.nprobe)
    queries = np.random.default_rng(0).standard_normal((20, 32), dtype=np.float32) * 4
    for a, b in zip(built.search(queries, 16), read.search(queries, 16), strict=True):
        np.testing.assert_array_equal(a, b)
    other = cached_synthetic_index(tmp_path, 3000, 32, 64, 8, seed=2)
    assert not other[3] and other[2] != path  # another seed is another store


def test_bench_quick_writes_json_plot_and_table(generation_run, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--quick",
            "--run-dir",
            str(generation_run),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--datastore-sizes",
            "[2000, 5000]",
            "--k",
            "64",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--optimisations",
            "[int8]",
            "--score-batch",
            "2",
            "--score-context",
            "16",
            "--threads",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0 and not (out / "work").exists()
    rows = report["results"]
    for row in rows:
        assert {"system", "datastore_size", "synthetic", "ms_per_token", "tokens_per_s", "bytes"} <= set(row)
        assert row["ms_per_token"] > 0 and row["bytes"] > 0
    systems = {r["system"] for r in rows}
    assert {"base", "mlp-memory", "decoder-equal-params", "knn-lm"} <= systems
    variants = {v["variant"]: v for v in report["memory_variants"]}
    assert set(variants) == {"eager", "plain", "int8"} and variants["int8"]["ms_per_token"] > 0
    assert variants["plain"]["max_abs_log_prob_diff"] < 1e-4  # plain is the same function
    # a variant runs end to end only when faithful (mean KL <= 1e-3); this tiny memory's peaked head may not be
    knn = [(r["datastore_size"], r["synthetic"]) for r in rows if r["system"] == "knn-lm"]
    assert knn == [(799, False), (2000, True), (5000, True)]  # the run's own store, then synthetic ones
    assert (
        report["models"]["memory_trained"]
        and report["models"]["decoder_equal_params"] > report["models"]["base_params"]
    )
    assert report["config"]["new_tokens"] == 4 and report["config"]["prompt_tokens"] == 16  # set flags beat --quick
    assert "x base" in printed and "crossover" in printed and "hooks + mixing" in printed
    assert f"wrote {out / 'bench.json'}" in printed
    # the free memory was timed through its own timing wrapper; every step of it went through the mixing hook
    overhead = report["summary"]["mixing_overhead"]
    assert overhead["in_hook_ms"] > 0 and "hooks+mixing only" in report["decode_ms_all"]
    assert overhead["share_of_memory_step"] == pytest.approx(
        overhead["in_hook_ms"] / report["decode_ms_all"]["mlp-memory"], abs=1e-4
    )
    # the memory reads block 0, the kNN-LM queries block 1 (the run's datastore layer)
    assert (report["models"]["memory_layer"], report["models"]["knn_layer"]) == (MEMORY_LAYER, KNN_LAYER)
    decoder = next(r for r in rows if r["system"] == "decoder-equal-params")
    assert (
        decoder["params"] == report["models"]["decoder_equal_params"]
        and decoder["layers"] > report["models"]["base_layers"]
    )
    own = next(r for r in rows if r["system"] == "knn-lm" and not r["synthetic"])
    assert own["k"] == 64 and own["index"] == "Flat"
    for row in rows:  # the spread over rounds travels with every decode timing
        low, median, high = row["ms_spread"]
        assert low <= median == row["ms_per_token"] <= high and isinstance(row["noisy"], bool)
    added = [v.get("decode_ms_added") for v in report["memory_variants"]] + [overhead["step_difference_ms"]]
    assert all(a is None or a > 0 for a in added)  # an added cost is never negative


def test_spread_over_rounds_and_added_costs_that_are_never_negative():
    steady, loaded = Spread.of([2.0, 2.1, 2.05]), Spread.of([2.0, 3.5, 2.2])
    assert (loaded.min, loaded.median, loaded.max) == (2.0, 2.2, 3.5)
    assert not steady.noisy and loaded.noisy  # 1.5 ms of spread on a 2.2 ms median
    base = Spread.of([1.0, 1.02, 1.01])
    assert added_ms(steady, base) == pytest.approx(1.04)
    assert added_ms(base, steady) is None  # faster than its reference: not a negative cost
    assert added_ms(Spread.of([1.0, 1.2, 1.1]), base) is None  # 0.09 ms inside 0.2 ms of spread: not measurable
    rows = [
        {
            "system": "base",
            "datastore_size": None,
            "synthetic": False,
            "ms_per_token": 1.0,
            "ms_spread": [1, 1, 1],
            "noisy": False,
            "tokens_per_s": 100.0,
            "bytes": 10,
        },
        {
            "system": "mlp-memory",
            "datastore_size": None,
            "synthetic": False,
            "ms_per_token": 2.2,
            "ms_spread": [2.0, 2.2, 3.5],
            "noisy": True,
            "tokens_per_s": 50.0,
            "bytes": 5,
        },
    ]
    table = format_table(rows, 1.0, 100.0)
    assert "2.00-3.50" in table and "~2.20" in table and "rerun when idle" in table
    assert ms_text(None) == "<noise" and ms_text(0.25) == "0.250"


def test_bench_refuses_prompt_and_new_tokens_beyond_positions_before_timing(generation_run, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--run-dir",
            str(generation_run),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--prompt-tokens",
            "40",
            "--new-tokens",
            "40",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "64 positions" in err and err.count("\n") == 1 and not out.exists()
