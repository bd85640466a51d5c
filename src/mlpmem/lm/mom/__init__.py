"""MoM (Mixture-of-Memories) and Gated DeltaNet token mixers in plain PyTorch (shared/DESIGN.md §9)."""

from mlpmem.lm.mom.layer import MoMConfig, MoMLayer, MoMOutput, MoMState, load_balancing_loss

__all__ = ["MoMConfig", "MoMLayer", "MoMOutput", "MoMState", "load_balancing_loss"]
