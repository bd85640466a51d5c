"""References and their retrievers: the cut, BM25 and dense retrieval against independent references, the query
protocol (no token retrieves with its own future), and the explicit-memories stage (layout, resume)."""

import json
import re

import numpy as np
import pytest
import torch

from mlpmem.artifacts import RunDir
from mlpmem.config import ExplicitMemoriesConfig, ReferencesConfig
from mlpmem.errors import UsageError
from mlpmem.explicit import memories as memories_mod
from mlpmem.explicit.encode import encode_batch
from mlpmem.explicit.memories import build_explicit_memories
from mlpmem.explicit.references import build_references, cut
from mlpmem.explicit.retriever import BM25_DIR, BM25Retriever, overlapping, queries_before, retrieve
from mlpmem.lm.load import load_lm

from explicit_inputs import explicit_run

pytestmark = pytest.mark.numeric  # compares numbers: `make test-cpus` runs it under every CPU cap


@pytest.fixture
def run(tmp_path):
    return explicit_run(tmp_path / "run")


def test_cut_covers_the_stream_in_order():
    assert cut(330, 128).tolist() == [0, 128, 256, 330]
    assert cut(300, 128).tolist() == [0, 128, 256]  # a last piece under half a reference is dropped


def test_references_are_the_split_in_pieces_and_bm25_finds_a_chunk_s_own_reference(run):
    manifest = build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, query_tokens=16, recall_samples=40))
    r = RunDir(run)
    ids, offsets = r.array("references", "ids"), r.array("references", "offsets")
    train = r.array("prepare", "train")
    assert offsets.tolist() == [*range(0, len(train) - 16 + 1, 32), len(train)]  # 1200 tokens: 37 x 32 + 16
    np.testing.assert_array_equal(ids, train[: offsets[-1]])
    assert set(manifest.recall) == {"recall@5/self", "recall@5/before", "recall@5/next"}
    assert all(0.0 <= v <= 1.0 for v in manifest.recall.values())
    assert (
        build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, query_tokens=16, recall_samples=40)) == manifest
    )


def test_bm25_against_a_hand_computed_score(tmp_path):
    """Three references of token ids; BM25 (k1=1.5, b=0.75, Lucene idf) computed here ranks them as the library."""
    refs = [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8, 5]), np.array([1, 9, 9, 10])]
    query = np.array([9, 1])
    got = BM25Retriever.build(refs, tmp_path / "bm25").search([query], 3)[0]
    avg = np.mean([len(r) for r in refs])

    def score(doc):
        s = 0.0
        for t in query:
            df = sum(t in r for r in refs)
            idf = np.log(1 + (len(refs) - df + 0.5) / (df + 0.5))
            tf = (doc == t).sum()
            s += idf * tf * 2.5 / (tf + 1.5 * (1 - 0.75 + 0.75 * len(doc) / avg))
        return s

    assert got.tolist() == list(np.argsort([-score(r) for r in refs], kind="stable"))


def test_a_planted_reference_is_not_retrieved_before_its_tokens_are_scored(tmp_path):
    """A reference holding exactly the tokens of one chunk (ids found nowhere else) is not found by the query of
    that chunk (the tokens before it), and is found by the query of the next chunk (once they were scored)."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, 50, 512)
    text[256:320] = rng.integers(100, 200, 64)  # the chunk at 256: tokens no other reference holds
    refs = [rng.integers(0, 50, 64) for _ in range(20)] + [text[256:320].copy()]
    retriever = BM25Retriever.build(refs, tmp_path / "bm25")
    planted = len(refs) - 1
    before, after = retrieve(retriever, queries_before(text, [256, 320], 64), 5)
    assert planted not in before and after[0] == planted
    assert retrieve(retriever, queries_before(text, [0], 64), 5).tolist() == [[-1] * 5]  # nothing before: no query


def test_overlap_exclusion_drops_only_references_holding_the_chunk():
    starts, lengths = np.array([0, 128, 256]), np.array([128, 128, 128])
    assert overlapping(starts, lengths, 64, 128).tolist() == [0]
    assert overlapping(starts, lengths, 100, 164).tolist() == []  # 28 and 36 of 64 tokens: neither holds > 90%
    found = retrieve(_Fixed([[0, 1, 2]]), [np.array([1])], 2, exclude=[np.array([0])])
    assert found.tolist() == [[1, 2]]


class _Fixed:
    def __init__(self, rows):
        self.rows = np.array(rows)

    def search(self, queries, k):
        return self.rows[:, :k]


def test_dense_embeddings_are_the_lm_s_normalised_mean_state(run):
    build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, retriever="dense", recall_samples=0, device="cpu"))
    r = RunDir(run)
    emb, ids = r.array("references", "embeddings"), r.array("references", "ids")
    lm = load_lm(run / "train-lm" / "model")
    with torch.no_grad():
        h = lm(torch.from_numpy(ids[32:64].astype(np.int64))[None], output_hidden_states=True).hidden_states[-1]
    want = torch.nn.functional.normalize(h[0].mean(0), dim=0).numpy()
    np.testing.assert_allclose(emb[1].astype(np.float32), want, atol=2e-3)


class Killed(Exception):
    pass


def test_memories_stage_layout_and_a_killed_build_resumes_byte_identically(tmp_path, monkeypatch):
    config = dict(keep_tokens=4, chunk_refs=8, device="cpu")
    runs = {name: explicit_run(tmp_path / name) for name in ("whole", "killed")}
    for path in runs.values():
        build_references(ReferencesConfig(run_dir=path, chunk_tokens=32, recall_samples=0))
    whole = build_explicit_memories(ExplicitMemoriesConfig(run_dir=runs["whole"], **config))
    assert whole.arrays["memories"].shape == [38, 1, 2, 2, 4, 16] and whole.memory_layers == [0]

    real, calls = memories_mod.encode_references, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(memories_mod, "encode_references", dying)
    with pytest.raises(Killed):
        build_explicit_memories(ExplicitMemoriesConfig(run_dir=runs["killed"], **config))
    monkeypatch.setattr(memories_mod, "encode_references", real)
    resumed = build_explicit_memories(ExplicitMemoriesConfig(run_dir=runs["killed"], **config))
    assert (runs["killed"] / "explicit-memories" / "memories.bin").read_bytes() == (
        runs["whole"] / "explicit-memories" / "memories.bin"
    ).read_bytes()
    assert resumed.files["memories.bin"].sha256 == whole.files["memories.bin"].sha256

    r = RunDir(runs["whole"])
    lm = load_lm(runs["whole"] / "train-lm" / "model")
    ids = torch.from_numpy(r.array("references", "ids")[64:96].astype(np.int64))[None]
    want = encode_batch(lm, ids, whole.marker_ids, [0], 4)[0].numpy().astype(np.float16)
    np.testing.assert_array_equal(r.array("explicit-memories", "memories")[2], want)


def test_a_memory_layer_the_lm_lacks_is_refused(run):
    build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, recall_samples=0))
    with pytest.raises(UsageError) as err:
        build_explicit_memories(ExplicitMemoriesConfig(run_dir=run, memory_layers=[5], device="cpu"))
    assert err.value.field == "memory_layers"


def test_a_reference_that_does_not_fit_the_lm_s_positions_with_its_marker_is_refused(run):
    build_references(ReferencesConfig(run_dir=run, chunk_tokens=64, recall_samples=0))  # the LM has 64 positions
    with pytest.raises(UsageError) as err:
        build_explicit_memories(ExplicitMemoriesConfig(run_dir=run, device="cpu"))
    assert err.value.field == "marker"


def damage(path, dtype, every: int, value: int) -> None:
    """Every ``every``-th id of a raw token file set to ``value`` (after its stage completed: not re-hashed)."""
    data = np.memmap(path, dtype=dtype, mode="r+")
    data[5::every] = value
    data.flush()


def test_an_id_outside_the_vocabulary_is_one_line_naming_its_file(run, bit_rot):
    """references/ids.bin read by explicit-memories, and prepare/train.bin copied into references: the file named,
    not an IndexError inside the LM's embedding."""
    build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, recall_samples=0))
    ids_path = run / "references" / "ids.bin"
    damage(ids_path, np.uint16, 300, 500)
    with pytest.raises(UsageError) as err:
        build_explicit_memories(ExplicitMemoriesConfig(run_dir=run, keep_tokens=4, device="cpu"))
    message = err.value.for_cli()
    assert message.startswith(f"{ids_path} holds token id 500, outside the vocabulary [0, 96)") and "\n" not in message
    assert message.endswith("rerun `mlpmem references`")

    damage(run / "prepare" / "train.bin", np.uint16, 300, 500)
    with pytest.raises(UsageError, match=re.escape(f"{run / 'prepare' / 'train.bin'} holds token id 500")):
        build_references(ReferencesConfig(run_dir=run, chunk_tokens=16, recall_samples=0))


def forge_file(run, stage: str, name: str, write) -> None:
    """Replace a stage's file by ``write(path)`` and record the new file in its manifest, checksum included (a
    manifest forged to match: what a content hash cannot catch)."""
    from mlpmem.artifacts import checksum, file_sha256, read_json

    folder = RunDir(run).folder(stage)
    write(folder / name)
    manifest = read_json(folder / "manifest.json")
    manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    manifest["checksum"] = checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    RunDir(run).require(stage)  # the forged manifest passes its own checks


@pytest.mark.parametrize(
    "array, write",
    [
        ("data", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)),
        ("indices", lambda p: np.save(p, np.load(p) + 10_000)),  # reference ids beyond the 38 references
        ("indptr", lambda p: np.save(p, np.load(p)[::-1].copy())),  # term pointers that descend
    ],
)
def test_a_bm25_index_that_is_not_one_is_refused_in_one_line(run, array, write):
    """An object array (a pickle) behind a forged manifest is never unpickled; numeric arrays that do not form
    the index are refused too, instead of an IndexError at the first query."""
    build_references(ReferencesConfig(run_dir=run, chunk_tokens=32, recall_samples=0))
    forge_file(run, "references", f"{BM25_DIR}/{array}.csc.index.npy", write)
    with pytest.raises(UsageError, match="is not a readable BM25 index") as err:
        BM25Retriever.load(RunDir(run).file("references", BM25_DIR))
    assert "\n" not in err.value.for_cli() and "rerun `mlpmem references`" in str(err.value)
