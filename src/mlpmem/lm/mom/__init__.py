"""MoM (Mixture-of-Memories) and Gated DeltaNet token mixers in plain PyTorch (shared/DESIGN.md §9), and the causal
LM built on them: ``rule`` (the gated delta rule), ``layer`` (``MoMLayer``, ``MoMConfig``), ``configuration``
(``MoMLMConfig``, importable without torch, so registering it with ``AutoConfig`` stays light) and ``model``
(``MoMForCausalLM``, ``MoMCache``). The public names are exported by ``mlpmem``.
"""
