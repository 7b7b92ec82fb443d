"""Transcriptions of the head regularisers as their authors' public code computes them.

Written for these tests in the style of the original repositories: KaiyangZhou/pytorch-center-loss (the
center loss from the full B x C distance matrix, with its clamp, centers trained by an optimizer on gradients
divided by the loss weight), ydwen/caffe-face's CenterLossLayer (the alpha update: per class, the sum of
c_j - x_i over its rows divided by 1 + its count, applied by the solver with the layer's learning rate),
wuyuebupt/caffe-face's Center-invariant layer (R the mean squared center norm, loss sum / (4 B)) and
Paralysis/ringloss (the three variants). Loops and dense matrices on purpose: they are the originals' shape,
not the fused one. Inputs: x (B, d), centers (C, d), labels (B,) without ignored rows.
"""
import torch
import torch.nn.functional as F


def kaiyang_center_loss(x, centers, labels):
    """pytorch-center-loss CenterLoss.forward: (1/B) sum of the masked B x C distance matrix, clamped."""
    batch_size, num_classes = x.size(0), centers.size(0)
    distmat = torch.pow(x, 2).sum(dim=1, keepdim=True).expand(batch_size, num_classes) + \
        torch.pow(centers, 2).sum(dim=1, keepdim=True).expand(num_classes, batch_size).t()
    distmat = torch.addmm(distmat, x, centers.t(), beta=1, alpha=-2)
    classes = torch.arange(num_classes, device=x.device).long()
    mask = labels.unsqueeze(1).expand(batch_size, num_classes).eq(classes.expand(batch_size, num_classes))
    dist = distmat * mask.to(distmat.dtype)
    return dist.clamp(min=1e-12, max=1e+12).sum() / batch_size


def kaiyang_train_step(x, centers, labels, weight_cent, lr_cent):
    """main.py's center update: loss = weight_cent * center_loss; the centers' gradient is divided by
    weight_cent (so lr_cent alone sets their step) and plain SGD (no momentum) applies it. Returns
    (loss, new centers)."""
    centers = centers.detach().clone().requires_grad_(True)
    loss = kaiyang_center_loss(x, centers, labels) * weight_cent
    grad, = torch.autograd.grad(loss, [centers])
    with torch.no_grad():
        new = centers - lr_cent * grad * (1.0 / weight_cent)
    return loss.detach(), new


def caffe_face_forward_backward(x, centers, labels):
    """CenterLossLayer Forward/Backward (loss_weight 1): loss = sum ||x_i - c_{y_i}||^2 / (2M), the bottom
    diff (x_i - c_{y_i}) / M, and the center diff: per class n, -sum_{y_m = n} (x_m - c_n) / (count + 1)."""
    m, k = x.shape
    distance = x - centers[labels]
    loss = (distance * distance).sum() / m / 2
    center_diff = torch.zeros_like(centers)
    for n in range(centers.shape[0]):
        count, variation_sum = 0, torch.zeros(k, dtype=x.dtype)
        for i in range(m):
            if int(labels[i]) == n:
                count += 1
                variation_sum = variation_sum - distance[i]
        center_diff[n] += variation_sum / (count + 1.0)
    return loss, distance / m, center_diff


def caffe_face_alpha_steps(xs, centers, labels_per_step, alpha):
    """Several solver steps of the center blob with learning rate alpha (lr_mult), no decay: c -= alpha diff.
    Returns the centers after each step."""
    out = []
    for x, labels in zip(xs, labels_per_step):
        _, _, center_diff = caffe_face_forward_backward(x, centers, labels)
        centers = centers - alpha * center_diff
        out.append(centers.clone())
    return out


def wu_center_invariant(centers, labels):
    """The Center-invariant layer: tau = (1/N) sum_j ||c_j||^2, lambda_i = ||c_{y_i}||^2 - tau,
    loss = sum lambda_i^2 / M / 4; its gradient to c_{y_i}, lambda_i (1 - 1/N) c_{y_i} / M per row (the
    layer's per-class sample-count divisor set to 1)."""
    n, m = centers.shape[0], labels.shape[0]
    tau = sum(float(torch.dot(centers[j], centers[j])) for j in range(n)) / n
    lam = torch.stack([torch.dot(centers[int(labels[i])], centers[int(labels[i])]) - tau for i in range(m)])
    loss = torch.dot(lam, lam) / m / 4
    grad = torch.zeros_like(centers)
    for i in range(m):
        label = int(labels[i])
        grad[label] += lam[i] * (1.0 - 1.0 / n) * centers[label] / m
    return loss, grad


def paralysis_ring_loss(x, radius, kind, loss_weight):
    """ringloss.py RingLoss.forward with a radius already set (the first call sets it to the mean norm)."""
    x = x.pow(2).sum(dim=1).pow(0.5)
    if kind == "l1":
        loss1 = F.smooth_l1_loss(x, radius.expand_as(x)).mul(loss_weight)
        loss2 = F.smooth_l1_loss(radius.expand_as(x), x).mul(loss_weight)
        return loss1 + loss2
    if kind == "auto":
        diff = x.sub(radius.expand_as(x)) / (x.mean().detach().clamp(min=0.5))
        return torch.pow(torch.abs(diff), 2).mean().mul(loss_weight)
    diff = x.sub(radius.expand_as(x))
    return torch.pow(torch.abs(diff), 2).mean().mul(loss_weight)
