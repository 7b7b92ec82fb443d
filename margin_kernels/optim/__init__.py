"""Optimizers fused into a head's backward pass: dW is never allocated (see ``fused``)."""
from .fused import FusedAdamW, FusedOptimizer, FusedSGD

__all__ = ["FusedAdamW", "FusedOptimizer", "FusedSGD"]
