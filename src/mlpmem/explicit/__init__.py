"""Memory3-style explicit memory: references, retriever, sparse key-value memories, and an LM that reads them."""
