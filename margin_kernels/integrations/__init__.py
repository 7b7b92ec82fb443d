"""Drop-in adapters for the code people already train with: ``integrations.insightface`` (arcface_torch's
losses and PartialFC_V2) and ``integrations.pml`` (pytorch-metric-learning's classification losses). Neither
needs the package it imitates, nor Triton; each is imported on its own (``from margin_kernels.integrations
import insightface``)."""
