"""Transcriptions of pytorch-metric-learning's classification losses (``losses/large_margin_softmax_loss.py``,
``arcface_loss.py``, ``cosface_loss.py``, ``sphereface_loss.py``, ``normalized_softmax_loss.py``) as its
current public code computes them with the defaults: ``CosineSimilarity`` / ``DotProductSimilarity``
distances (both normalise their inputs), no miner (weights 1), no regularisers, the ``MeanReducer`` (the mean
of the per-row losses). ``W`` is pml's (embedding_size, num_classes) parameter; margins as pml takes them
(degrees for ArcFace, an integer for L-Softmax / SphereFace). Quirks kept: ArcFace's fallback
``cos(theta) - margin * sin(margin)`` where theta > pi - margin (pml's "keep the cost function monotonically
decreasing"), L-Softmax's cos(m theta) by the multiple-angle sum, k = floor(theta / (pi / m))."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def _cosine(embeddings, W):
    # CosineSimilarity()(embeddings, W.t()): both sides normalised (F.normalize, p=2)
    return torch.matmul(F.normalize(embeddings, p=2, dim=1), F.normalize(W.t(), p=2, dim=1).t())


def _mask(embeddings, labels, num_classes):
    mask = torch.zeros(labels.size(0), num_classes, dtype=embeddings.dtype, device=embeddings.device)
    mask[torch.arange(labels.size(0)), labels] = 1
    return mask


def _angles(cosine_of_target_classes):
    return torch.acos(torch.clamp(cosine_of_target_classes, -1, 1))


def _cos_with_margin(cosine, margin):
    """Equation 7 of the L-Softmax paper: cos(m theta) = sum_n (-1)^n C(m, 2n) c^(m-2n) (1 - c^2)^n."""
    n_range = torch.tensor([n for n in range(0, margin // 2 + 1)], dtype=cosine.dtype)
    margin_choose_n = torch.tensor([math.comb(margin, 2 * n) for n in range(0, margin // 2 + 1)], dtype=cosine.dtype)
    cos_powers = torch.tensor([margin - 2 * n for n in range(0, margin // 2 + 1)], dtype=cosine.dtype)
    alternating = torch.tensor([(-1) ** n for n in range(0, margin // 2 + 1)], dtype=cosine.dtype)
    cosine = cosine.unsqueeze(1)
    terms = alternating * margin_choose_n * cosine ** cos_powers * (1 - cosine ** 2) ** n_range
    return torch.sum(terms, dim=1)


def _loss(embeddings, labels, W, modify, scale_logits):
    """LargeMarginSoftmaxLoss.compute_loss + MeanReducer with pluggable target and scaling (the subclasses)."""
    mask = _mask(embeddings, labels, W.shape[1])
    cosine = _cosine(embeddings, W)
    cosine_of_target_classes = cosine[mask == 1]
    modified = modify(cosine_of_target_classes)
    diff = (modified - cosine_of_target_classes).unsqueeze(1)
    logits = scale_logits(cosine + (mask * diff))
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none").mean()


def _lsoftmax_target(margin):
    """LargeMarginSoftmaxLoss.modify_cosine_of_target_classes (SphereFaceLoss inherits it)."""
    def modify(c):
        cos_with_margin = _cos_with_margin(c, margin)
        angles = _angles(c)
        with torch.no_grad():
            k = (angles / (math.pi / margin)).floor()
        return ((-1) ** k) * cos_with_margin - (2 * k)
    return modify


def large_margin_softmax(embeddings, labels, W, margin=4, scale=1):
    def scale_logits(logits):
        product_of_magnitudes = torch.norm(W, p=2, dim=0).unsqueeze(0) * torch.norm(embeddings, p=2, dim=1).unsqueeze(1)
        return logits * product_of_magnitudes * scale

    return _loss(embeddings, labels, W, _lsoftmax_target(margin), scale_logits)


def sphereface(embeddings, labels, W, margin=4, scale=1):
    # SphereFaceLoss.scale_logits: the embedding norm only (its weights are normalised)
    return _loss(embeddings, labels, W, _lsoftmax_target(margin),
                 lambda logits: logits * torch.norm(embeddings, p=2, dim=1).unsqueeze(1) * scale)


def arcface(embeddings, labels, W, margin=28.6, scale=64):
    margin = np.radians(margin)

    def modify(c):
        angles = _angles(c)
        cos_theta_plus_margin = torch.cos(angles + margin)
        cos_theta = torch.cos(angles)
        return torch.where(angles <= np.deg2rad(180) - margin, cos_theta_plus_margin,
                           cos_theta - margin * np.sin(margin))

    return _loss(embeddings, labels, W, modify, lambda logits: logits * scale)


def cosface(embeddings, labels, W, margin=0.35, scale=64):
    return _loss(embeddings, labels, W, lambda c: c - margin, lambda logits: logits * scale)


def normalized_softmax(embeddings, labels, W, temperature=0.05):
    normalized_W = F.normalize(W, p=2, dim=0)
    # DotProductSimilarity()(embeddings, normalized_W.t()): normalises the embeddings too
    exponent = torch.matmul(F.normalize(embeddings, p=2, dim=1), F.normalize(normalized_W.t(), p=2, dim=1).t())
    exponent = exponent / temperature
    return torch.nn.functional.cross_entropy(exponent, labels, reduction="none").mean()
