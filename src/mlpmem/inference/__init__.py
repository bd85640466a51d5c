"""Joint inference: log-space mixing of the LM with the MLP memory and/or kNN-LM, and generation."""
