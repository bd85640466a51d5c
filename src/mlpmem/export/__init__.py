"""``mlpmem export``: a run's LM + memory as one Hugging Face model folder, with its model card."""
