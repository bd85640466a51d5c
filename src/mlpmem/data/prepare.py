"""``mlpmem prepare``: corpus → tokenizer → token-id memmaps per split, with a manifest.

mlpmem prepare --corpus wikitext-2-slice --train-tokenizer 4096 --run-dir runs/demo
mlpmem prepare --corpus facts --train-tokenizer 2048 --run-dir runs/facts   # + the memory split and probes.json
"""

from __future__ import annotations

import logging

import numpy as np
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mlpmem.artifacts import RunDir, atomic_write_bytes, fingerprint_obj
from mlpmem.config import PrepareConfig
from mlpmem.data.corpus import Corpus, load_corpus
from mlpmem.data.facts import PROBES, check_feasible, generate_facts
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


def load_source(config: PrepareConfig) -> Corpus:
    return load_corpus(config.corpus, config.valid_fraction, config.test_fraction, config.text_column, config.include)


def local_source(config: PrepareConfig) -> bool:
    """Whether the corpus is the user's own text (a file or folder), which may be edited after prepare."""
    return config.corpus not in ("wikitext-2-slice", "wikitext-2", "facts") and not config.corpus.startswith("hf:")


def corpus_inputs(run: RunDir, corpus: Corpus | None) -> dict[str, str]:
    """The stage's inputs: the fingerprint of a local corpus's split texts, so that an edited file is not taken
    for the prepared one. A stage prepared before the text was an input keeps its inputs when its recorded
    ``corpus_fingerprint`` is the text's."""
    if corpus is None:
        return {}
    fingerprint = fingerprint_obj(corpus.splits)
    old = run.read("prepare")
    if old is not None and "corpus" not in old.inputs and old.corpus_fingerprint == fingerprint:
        return {}
    return {"corpus": fingerprint}


def prepare(config: PrepareConfig) -> PrepareManifest:
    """Tokenize the corpus into RUN/prepare/{train,valid,test}.bin (a facts corpus: also memory.bin and
    probes.json); returns the complete manifest."""
    run = RunDir(config.run_dir)
    if config.facts is not None:
        check_feasible(config.facts)  # before anything is written
    corpus = load_source(config) if local_source(config) else None  # read first: its text is an input
    inputs = corpus_inputs(run, corpus)
    run.refuse_replacing("prepare", config, inputs)  # later stages built on another corpus/tokenizer/text
    build = run.begin("prepare", config, inputs)
    if build.status == "complete":
        return build.manifest
    probes = None
    if config.facts is not None:  # --corpus facts: generated from its settings, with a fourth split and probes
        facts = generate_facts(config.facts)
        corpus, probes = Corpus(facts.splits, "synthetic biographies (--corpus facts)"), facts.probes
    corpus = corpus or load_source(config)
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    else:
        tokenizer = train_bpe(corpus.splits["train"], config.train_tokenizer)
    tokenizer.save_pretrained(build.dir / "tokenizer")
    vocab_size = len(tokenizer)
    for split in corpus.splits:  # train, valid, test (and memory)
        ids = encode(tokenizer, corpus.splits[split], split)
        if len(ids) < 2:
            raise UsageError(f"corpus {config.corpus}: the {split} split has fewer than 2 tokens")
        arr = build.add_array(split, token_dtype(vocab_size).name, (len(ids),))
        arr[:] = ids
        arr.flush()
    if probes is not None:
        atomic_write_bytes(build.dir / PROBES, probes.model_dump_json().encode())
    return build.complete(
        source=corpus.source,
        vocab_size=vocab_size,
        tokenizer_fingerprint=vocab_fingerprint(tokenizer),
        corpus_fingerprint=fingerprint_obj(corpus.splits),
        probes=None if probes is None else len(probes.probes),
    )
