"""``mlpmem references``: cut a knowledge corpus into references of at most ``chunk_tokens`` tokens and build the
retriever over them.

    mlpmem references --run-dir runs/demo                        # the run's train split, BM25
    mlpmem references --run-dir runs/demo --retriever dense      # FAISS over the LM's mean-pooled states
    mlpmem references --run-dir runs/demo --corpus notes/         # another corpus, with the run's tokenizer

References are consecutive pieces of the token stream (a final piece shorter than half a reference is dropped).
Also measures the retriever's recall@5 on ``recall_samples`` chunks of ``query_tokens`` tokens of the cut split:
``recall@5/self`` (the chunk as its own query finds the reference holding it), ``recall@5/before`` (the tokens
before the chunk, the query protocol, find the reference holding the chunk; the query often lies in that same
reference) and ``recall@5/next`` (for chunks that start a reference, so the query shares no token with it: the
reference holding the continuation is found from the text before it).
"""

from __future__ import annotations

import numpy as np

from mlpmem.artifacts import RunDir, StageBuild
from mlpmem.config import ReferencesConfig
from mlpmem.data.tokens import check_token_ids, open_split, source_of, token_dtype, tokenizer_dir
from mlpmem.devices import resolve_device
from mlpmem.errors import UsageError
from mlpmem.explicit.retriever import (
    BM25_DIR,
    BM25Retriever,
    DenseRetriever,
    Retriever,
    embed,
    queries_before,
    retrieve,
)
from mlpmem.manifests import ReferencesManifest
from mlpmem.progress import progress

COPY_BLOCK = 1 << 24  # tokens copied (and checked) at a time from the cut stream into ids


def cut(n_tokens: int, chunk_tokens: int) -> np.ndarray:
    """Offsets [n_refs + 1] of consecutive references; a last piece under half a reference is dropped."""
    offsets = np.arange(0, n_tokens + 1, chunk_tokens, dtype=np.int64)
    if n_tokens - offsets[-1] >= chunk_tokens // 2:
        offsets = np.append(offsets, n_tokens)
    return offsets


def source_tokens(config: ReferencesConfig, run: RunDir, prepare) -> tuple[np.ndarray, str]:
    """The token stream to cut and its description."""
    if config.corpus is None:
        return open_split(run.path, config.split, prepare), f"split:{config.split}"
    from mlpmem.data.corpus import load_corpus
    from mlpmem.data.prepare import encode
    from mlpmem.lm.load import load_tokenizer

    corpus = load_corpus(config.corpus)
    return encode(load_tokenizer(tokenizer_dir(run.path)), corpus.splits["train"], "references"), config.corpus


def build_references(config: ReferencesConfig) -> ReferencesManifest:
    """Cut the references and build the retriever; returns the complete manifest of RUN/references."""
    run = RunDir(config.run_dir)
    prepare = run.require("prepare")
    inputs = {"prepare": prepare.fingerprint}
    if config.retriever == "dense":
        inputs["train-lm"] = run.require("train-lm").fingerprint
    if (done := run.reusable("references", config, inputs)) is not None:
        return done
    tokens, source = source_tokens(config, run, prepare)
    offsets = cut(len(tokens), config.chunk_tokens)
    if len(offsets) < 2:
        raise UsageError(f"{source} has {len(tokens)} tokens: not one reference of {config.chunk_tokens}")
    build = run.begin("references", config, inputs)
    ids = build.add_array("ids", token_dtype(prepare.vocab_size).name, (int(offsets[-1]),))
    for a in range(0, len(ids), COPY_BLOCK):  # each block's ids checked as it is copied
        block = np.asarray(tokens[a : min(a + COPY_BLOCK, len(ids))])
        check_token_ids(block, prepare.vocab_size, source_of(tokens))
        ids[a : a + len(block)] = block
    ids.flush()
    for name, data in (("offsets", offsets), ("source_start", offsets[:-1])):
        array = build.add_array(name, "int64", data.shape)
        array[:] = data
        array.flush()
    references = [ids[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]
    if config.retriever == "bm25":
        retriever: Retriever = BM25Retriever.build(references, build.dir / BM25_DIR)
        fields = {}
    else:
        retriever, fields = dense_embeddings(config, run, build, references), {}
        fields["model_fingerprint"] = run.require("train-lm").model_fingerprint
    recall = measure_recall(retriever, np.asarray(ids), offsets, config)
    return build.complete(source=source, recall=recall, **fields)


def dense_embeddings(config: ReferencesConfig, run: RunDir, build: StageBuild, references) -> DenseRetriever:
    """``embeddings`` [n_refs, d] float16, written chunk by chunk (resumable); the retriever over them."""
    from mlpmem.lm.load import load_lm, run_lm_dir

    lm = load_lm(run_lm_dir(run.path), resolve_device(config.device))
    out = build.add_array("embeddings", "float16", (len(references), lm.config.n_embd))
    starts = range(0, len(references), config.chunk_refs)
    done = build.done_chunks(lambda c: [out[starts[c] : starts[c] + config.chunk_refs]])
    for c, a in enumerate(progress(starts, desc="embed references", unit="chunk")):
        if c not in done:
            out[a : a + config.chunk_refs] = embed(lm, references[a : a + config.chunk_refs], config.batch_size)
            out.flush()
            build.mark_chunk(c, done, [out[a : a + config.chunk_refs]])
    return DenseRetriever(np.asarray(out, dtype=np.float32), lm, config.batch_size)


def measure_recall(retriever: Retriever, ids: np.ndarray, offsets: np.ndarray, config: ReferencesConfig) -> dict:
    """recall@5 of the reference holding a sampled chunk: queried by the chunk itself, and by the tokens before it."""
    q = config.query_tokens
    starts = np.arange(q, len(ids) - q + 1, q)
    if not config.recall_samples or not len(starts):
        return {}
    rng = np.random.default_rng(config.seed)
    starts = np.sort(rng.choice(starts, size=min(config.recall_samples, len(starts)), replace=False))
    gold = np.searchsorted(offsets, starts, side="right") - 1  # the reference holding each chunk's first token
    own = [np.asarray(ids[s : s + q], dtype=np.int64) for s in starts]
    found_self = retrieve(retriever, own, 5)
    found_before = retrieve(retriever, queries_before(ids, starts, q), 5)
    # chunks starting a reference: the query (the tokens before) shares no token with the reference holding them
    firsts = offsets[1:-1][offsets[1:-1] >= q]
    firsts = np.sort(rng.choice(firsts, size=min(config.recall_samples, len(firsts)), replace=False))
    found_next = retrieve(retriever, queries_before(ids, firsts, q), 5)
    hit = lambda found, want: round(float((found == want[:, None]).any(1).mean()), 4) if len(want) else None  # noqa: E731
    recall = {
        "recall@5/self": hit(found_self, gold),
        "recall@5/before": hit(found_before, gold),
        "recall@5/next": hit(found_next, np.searchsorted(offsets, firsts, side="right") - 1),
    }
    return {k: v for k, v in recall.items() if v is not None}
