"""Speed benchmarks: decode latency, scoring throughput and storage of base, MLP memory, kNN-LM and an
equal-parameter decoder (``mlpmem bench``)."""
