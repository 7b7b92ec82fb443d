"""Regularisers a head adds to its margin loss (``MarginHead(..., regularizers=[...])``): Center loss and its
Center-invariant term (``CenterLoss``), Ring loss (``RingLoss``). Each returns a per-row term that the head adds
to the per-row cross-entropy before the reduction, so "mean" averages both over the non-ignored rows."""
from .base import BatchRows, Regularizer, check_regularizers, regularizer_rows, single_process_rows
from .center import CenterLoss
from .ring import RingLoss

__all__ = ["BatchRows", "CenterLoss", "Regularizer", "RingLoss", "check_regularizers", "regularizer_rows",
           "single_process_rows"]
