"""mlpmem: give a causal language model a retriever-pretrained MLP memory (arXiv 2508.01832)."""

__version__ = "0.1.0"
