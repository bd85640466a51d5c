"""``mlpmem prepare``: corpus → tokenizer → token-id memmaps per split, with a manifest.

mlpmem prepare --corpus wikitext-2-slice --train-tokenizer 4096 --run-dir runs/demo
"""

from __future__ import annotations

import logging

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mlpmem.artifacts import PARTIAL, RunDir, fingerprint_obj
from mlpmem.config import PrepareConfig
from mlpmem.data.corpus import SPLITS, load_corpus
from mlpmem.data.tokens import token_dtype
from mlpmem.errors import UsageError
from mlpmem.hub import load_tokenizer
from mlpmem.manifests import PrepareManifest
from mlpmem.progress import progress

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"
LINES_PER_BATCH = 2000


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a tokenizer: its token → id map (independent of file formatting)."""
    return fingerprint_obj(sorted(tokenizer.get_vocab().items()))


def train_bpe(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 style) trained on ``text`` with the `tokenizers` library."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        text.splitlines(keepends=True),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, desc: str) -> np.ndarray:
    """Token ids of ``text`` (line by line, newlines kept), as one 1-D array."""
    lines = text.splitlines(keepends=True)
    parts = []
    with progress(total=len(text), desc=f"tokenize {desc}", unit="char", unit_scale=True) as bar:
        for i in range(0, len(lines), LINES_PER_BATCH):
            batch = lines[i : i + LINES_PER_BATCH]
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            parts.extend(np.asarray(x, dtype=np.int64) for x in ids)
            bar.update(sum(map(len, batch)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def refuse_other_tokenizer(run: RunDir, config: PrepareConfig) -> None:
    """A run whose later stages were built on another corpus/tokenizer is not silently re-prepared."""
    old = run.read("prepare")
    downstream = [
        p.parent.name
        for p in run.path.glob("*/manifest.json")
        if p.parent.name.removesuffix(PARTIAL) != "prepare" and not p.parent.name.startswith(".")
    ]
    if old is not None and old.config.identity() != config.identity() and downstream:
        raise UsageError(
            f"{run.path} was prepared with another corpus or tokenizer and has later stages; use a new --run-dir"
        )


def prepare(config: PrepareConfig) -> PrepareManifest:
    """Tokenize the corpus into RUN/prepare/{train,valid,test}.bin; returns the complete manifest."""
    run = RunDir(config.run_dir)
    refuse_other_tokenizer(run, config)
    build = run.begin("prepare", config, {})
    if build.status == "complete":
        return build.manifest
    corpus = load_corpus(config.corpus, config.valid_fraction, config.test_fraction, config.text_column, config.include)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        tokenizer = train_bpe(corpus.splits["train"], config.train_tokenizer)
    tokenizer.save_pretrained(build.dir / "tokenizer")
    vocab_size = len(tokenizer)
    for split in SPLITS:
        ids = encode(tokenizer, corpus.splits[split], split)
        if len(ids) < 2:
            raise UsageError(f"corpus {config.corpus}: the {split} split has fewer than 2 tokens")
        arr = build.add_array(split, token_dtype(vocab_size).name, (len(ids),))
        arr[:] = ids
        arr.flush()
    return build.complete(
        source=corpus.source,
        vocab_size=vocab_size,
        tokenizer_fingerprint=vocab_fingerprint(tokenizer),
        corpus_fingerprint=fingerprint_obj(corpus.splits),
    )
