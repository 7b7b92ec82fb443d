"""Transcriptions of the codes the loss modes are named after (docs/losses.md, "Which code each mode
reproduces"), on full B x C logits, in the style of the original repositories, quirks included:

* FaceX-Zoo's ``ArcFace`` and ``MagFace`` heads (head/ArcFace.py, head/MagFace.py): the class weight is stored
  (feat_dim, num_class), normalised along dim 0; past pi - m the target falls back to ``cos_theta -
  margin_am``; MagFace's training loop adds ``mean(lamda * loss_g)`` to the cross-entropy;
* PaddlePaddle's ``margin_cross_entropy`` (what PLSC's ``MarginLoss`` calls): the target becomes
  cos(m1 acos(x) + m2) - m3 in the forward kernel, and the backward kernel multiplies the target column's
  gradient by m1 sin(m1 acos(x) + m2) / sqrt(1 - x^2), the exact derivative, with no clamp.

Inputs: x (B, d) raw features, w (C, d) raw class weights (transposed here where the original stores (d, C)),
labels (B,)."""
import math

import torch
import torch.nn.functional as F


def facexzoo_arcface(x, w, labels, margin_arc=0.35, margin_am=0.0, scale=32.0):
    weight = w.t()  # FaceX-Zoo's Parameter is (feat_dim, num_class)
    kernel_norm = F.normalize(weight, dim=0)
    feats = F.normalize(x)
    cos_theta = torch.mm(feats, kernel_norm).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * math.cos(margin_arc) - sin_theta * math.sin(margin_arc)
    cos_theta_m = torch.where(cos_theta > math.cos(math.pi - margin_arc), cos_theta_m, cos_theta - margin_am)
    return F.cross_entropy(_facexzoo_output(cos_theta, cos_theta_m, labels, scale), labels)


def _facexzoo_output(cos_theta, cos_theta_m, labels, scale):
    """The tail both FaceX-Zoo heads share: the target column from cos_theta_m, the rest cos_theta, scaled."""
    index = torch.zeros_like(cos_theta)
    index.scatter_(1, labels.data.view(-1, 1), 1)
    index = index.byte().bool()
    output = cos_theta * 1.0
    output[index] = cos_theta_m[index]
    output *= scale
    return output


def facexzoo_magface(x, w, labels, margin_am=0.0, scale=32.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8,
                     lamda=20.0):
    weight = w.t()
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_margin - l_margin) / (u_a - l_a) * (x_norm - l_a) + l_margin
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    loss_g = 1 / (u_a ** 2) * x_norm + 1 / x_norm
    kernel_norm = F.normalize(weight, dim=0)
    cos_theta = torch.mm(F.normalize(x), kernel_norm).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    min_cos_theta = torch.cos(math.pi - ada_margin)
    cos_theta_m = torch.where(cos_theta > min_cos_theta, cos_theta_m, cos_theta - margin_am)
    output = _facexzoo_output(cos_theta, cos_theta_m, labels, scale)
    # FaceX-Zoo's train.py: loss = criterion(outputs, labels) + torch.mean(lamda * loss_g)
    return F.cross_entropy(output, labels) + torch.mean(lamda * loss_g)


class _PaddleMarginCrossEntropy(torch.autograd.Function):
    """paddle.nn.functional.margin_cross_entropy on one device: forward and backward kernels as written."""

    @staticmethod
    def forward(ctx, logits, labels, m1, m2, m3, s):
        logits_in = logits
        logits = logits.clone()
        rows = torch.arange(logits.shape[0])
        x = logits[rows, labels]
        if abs(m1 - 1.0) > 1e-8 or abs(m2) > 1e-8:
            theta = torch.acos(x)
            if abs(m1 - 1.0) > 1e-8:
                theta = theta * m1
            if abs(m2) > 1e-8:
                theta = theta + m2
            x = torch.cos(theta)
        if abs(m3) > 1e-8:
            x = x - m3
        logits[rows, labels] = x
        logits = logits * s
        log_softmax = logits - logits.max(dim=1, keepdim=True).values
        log_softmax = log_softmax - torch.log(torch.exp(log_softmax).sum(dim=1, keepdim=True))
        loss = -log_softmax[rows, labels]
        ctx.save_for_backward(logits_in, labels, torch.exp(log_softmax))
        ctx.margins = (m1, m2, s)
        return loss

    @staticmethod
    def backward(ctx, loss_grad):
        logits, labels, softmax = ctx.saved_tensors
        m1, m2, s = ctx.margins
        grad = softmax * loss_grad[:, None]
        rows = torch.arange(logits.shape[0])
        target = (softmax[rows, labels] - 1.0) * loss_grad
        if abs(m1 - 1.0) > 1e-8 or abs(m2) > 1e-8:
            x = logits[rows, labels]
            target = target * (m1 * torch.sin(m1 * torch.acos(x) + m2) / torch.sqrt(1.0 - x * x))
        grad[rows, labels] = target
        if abs(s - 1.0) > 1e-8:
            grad = grad * s
        return grad, None, None, None, None, None


def paddle_margin_cross_entropy(x, w, labels, m1=1.0, m2=0.5, m3=0.0, s=64.0):
    """PLSC's MarginLoss: ``F.margin_cross_entropy(logits, label, m1, m2, m3, s, reduction=None).mean()`` on
    the normalised logits of its FC layer."""
    logits = F.linear(F.normalize(x), F.normalize(w))
    return _PaddleMarginCrossEntropy.apply(logits, labels, m1, m2, m3, s).mean()
