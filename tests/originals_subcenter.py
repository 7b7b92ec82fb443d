"""Transcriptions of sub-center ArcFace as its authors' public code computes it, on full B x C K cosines.

Written for these tests, following the computation (not the text) of:
  * pytorch-metric-learning's ``SubCenterArcFaceLoss`` (a subclass of its ArcFaceLoss /
    LargeMarginSoftmaxLoss): a parameter W of shape (embedding_size, num_classes * sub_centers), cosine
    similarity of the embeddings with W's columns viewed as (B, num_classes, sub_centers) and maxed over the
    last axis, the margin in degrees added to the clamped angle of the target column only (through a one-hot
    mask and a "diff"), cross-entropy of the scaled logits averaged over the batch; and its ``get_outliers``;
  * insightface's SubCenter-ArcFace (MXNet, recognition/SubCenter-ArcFace): L2-normalised weight of shape
    (num_classes * loss_K, emb_size) and embeddings, a fully connected layer, reshape (-1, C, K) and max over
    K, then its combined margin (arccos of the one-hot-masked cosines, + m2, cos, masked diff) times s, and the
    softmax cross-entropy whose gradient the training module rescales by 1/batch (a mean).
Inputs: x (B, d) raw features, labels (B,) in [0, C). Weights as each code stores them (documented per
function)."""
import math

import torch
import torch.nn.functional as F


class PMLSubCenterArcFaceLoss(torch.nn.Module):
    """pytorch-metric-learning's SubCenterArcFaceLoss: ``W`` is (embedding_size, num_classes * sub_centers)."""

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3):
        super().__init__()
        self.num_classes, self.sub_centers = num_classes, sub_centers
        self.margin = math.radians(margin)  # ArcFaceLoss.init_margin: degrees to radians
        self.scale = scale
        self.W = torch.nn.Parameter(torch.randn(embedding_size, num_classes * sub_centers))

    def get_cosine(self, embeddings):
        # CosineSimilarity distance: both sides normalised, then the (B, C K) matrix viewed per class
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.W.t(), dim=1).t()
        cosine = cosine.view(-1, self.num_classes, self.sub_centers)
        cosine, _ = cosine.max(axis=2)
        return cosine

    def get_angles(self, cosine_of_target_classes):
        return torch.acos(torch.clamp(cosine_of_target_classes, -1 + 1e-7, 1 - 1e-7))

    def forward(self, embeddings, labels):
        mask = torch.zeros(labels.size(0), self.num_classes, dtype=embeddings.dtype)
        mask[torch.arange(labels.size(0)), labels] = 1
        cosine = self.get_cosine(embeddings)
        cosine_of_target_classes = cosine[mask == 1]
        modified = torch.cos(self.get_angles(cosine_of_target_classes) + self.margin)
        diff = (modified - cosine_of_target_classes).unsqueeze(1)
        cosine = cosine + (mask * diff)
        losses = F.cross_entropy(cosine * self.scale, labels, reduction="none")
        return losses.mean()  # MeanReducer

    @torch.no_grad()
    def get_outliers(self, embeddings, labels, threshold=75):
        """(outlier indices, dominant centers (embedding_size, num_classes)); classes absent from ``labels``
        keep zeros here (PML allocates an uninitialised tensor)."""
        cos_threshold = math.cos(math.radians(threshold))
        outliers = []
        dominant_centers = torch.zeros(self.W.shape[0], self.num_classes, dtype=self.W.dtype)
        for label in range(self.num_classes):
            target_samples = labels == label
            if not target_samples.any():
                continue
            target_indices = target_samples.nonzero()
            target_embeddings = embeddings[target_samples]
            sub_centers = self.W[:, label * self.sub_centers:(label + 1) * self.sub_centers]
            distances = F.normalize(target_embeddings, dim=1) @ F.normalize(sub_centers.t(), dim=1).t()
            max_sub_center_idxs = torch.argmax(distances, axis=1)
            max_sub_center_count = torch.bincount(max_sub_center_idxs)
            dominant_idx = torch.argmax(max_sub_center_count)
            dominant_centers[:, label] = sub_centers[:, dominant_idx]
            drop_dists = distances[:, dominant_idx] < cos_threshold
            outliers.extend(target_indices[drop_dists].detach().tolist())
        return torch.tensor(outliers, dtype=torch.long).flatten(), dominant_centers


def insightface_subcenter(x, weight, labels, num_classes, loss_K=3, s=64.0, m1=1.0, m2=0.5, m3=0.0):
    """insightface SubCenter-ArcFace's fc7 symbol and softmax loss; ``weight`` is (num_classes * loss_K, d)."""
    nweight = F.normalize(weight, dim=1)
    nembedding = F.normalize(x, dim=1)
    fc7 = nembedding @ nweight.t()
    if loss_K > 1:
        fc7 = fc7.reshape(-1, num_classes, loss_K).max(dim=2).values
    gt_one_hot = F.one_hot(labels, num_classes).to(fc7.dtype)
    fc7_onehot = fc7 * gt_one_hot
    t = torch.arccos(fc7_onehot)  # elementwise on the masked matrix, as the symbol does
    if m1 != 1.0:
        t = t * m1
    if m2 != 0.0:
        t = t + m2
    margin_cos = torch.cos(t)
    if m3 != 0.0:
        margin_cos = margin_cos - m3
    diff = margin_cos * gt_one_hot - fc7_onehot
    fc7 = (fc7 + diff) * s
    return F.cross_entropy(fc7, labels)  # the module's softmax - one_hot gradient, rescaled by 1/batch
