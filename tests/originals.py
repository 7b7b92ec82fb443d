"""Transcriptions of the losses as their authors' public code computes them, on full B x C logits.

Written for these tests in the style of the original repositories (insightface arcface_torch, CurricularFace,
FaceX-Zoo MV-Softmax, MagFace, AdaFace, a SphereFace/A-Softmax PyTorch port, lsoftmax-pytorch and class-level
Circle loss) including their quirks (in-place edits under no_grad, straight-through margins, masks computed
from the margin-adjusted target). The fused loss must agree with these on value and on gradients.
Inputs: x (B, d) raw features, w (C, d) raw class weights, labels (B,), -1 = ignored (insightface only)."""
import math

import torch
import torch.nn.functional as F


def _cos(x, w):
    return F.linear(F.normalize(x), F.normalize(w))


def insightface_combined(x, w, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.0):
    """arcface_torch's CombinedMarginLoss (tests/originals_insightface.py) on the clamped cosines, then
    cross-entropy."""
    from tests.originals_insightface import CombinedMarginLoss
    logits = CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold)(_cos(x, w).clamp(-1, 1), labels)
    return F.cross_entropy(logits, labels, ignore_index=-1)


def insightface_arcface(x, w, labels, s=64.0, margin=0.5, easy_margin=False):
    logits = _cos(x, w).clamp(-1, 1)
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    theta, sinmm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    index = torch.where(labels != -1)[0]
    target_logit = logits[index, labels[index].view(-1)]
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * cos_m - sin_theta * sin_m
    if easy_margin:
        final_target_logit = torch.where(target_logit > 0, cos_theta_m, target_logit)
    else:
        final_target_logit = torch.where(target_logit > theta, cos_theta_m, target_logit - sinmm)
    logits = logits.clone()
    logits[index, labels[index].view(-1)] = final_target_logit
    return F.cross_entropy(logits * s, labels, ignore_index=-1)


def curricularface(x, w, labels, t, s=64.0, m=0.5):
    """Returns (loss, new t). The paper's code keeps the kernel as (d, C); same product."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    threshold, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    cos_theta = torch.mm(F.normalize(x), F.normalize(w, dim=1).t()).clamp(-1, 1)
    target_logit = cos_theta[torch.arange(0, x.size(0)), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * cos_m - sin_theta * sin_m
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > threshold, cos_theta_m, target_logit - mm)
    hard_example = cos_theta[mask]
    with torch.no_grad():
        t = target_logit.mean() * 0.01 + (1 - 0.01) * t
    cos_theta = cos_theta.clone()
    cos_theta[mask] = hard_example * (t + hard_example)
    cos_theta.scatter_(1, labels.view(-1, 1).long(), final_target_logit)
    return F.cross_entropy(cos_theta * s, labels), t


def mv_softmax(x, w, labels, s=32.0, margin=0.35, mv_weight=1.12, is_am=True):
    cos_theta = torch.mm(F.normalize(x), F.normalize(w).t()).clamp(-1, 1)
    batch_size = labels.size(0)
    gt = cos_theta[torch.arange(0, batch_size), labels].view(-1, 1)
    if is_am:
        mask = cos_theta > gt - margin
        final_gt = torch.where(gt > margin, gt - margin, gt)
    else:
        sin_theta = torch.sqrt(1.0 - torch.pow(gt, 2))
        cos_theta_m = gt * math.cos(margin) - sin_theta * math.sin(margin)
        mask = cos_theta > cos_theta_m
        final_gt = torch.where(gt > 0.0, cos_theta_m, gt)
    hard_example = cos_theta[mask]
    cos_theta = cos_theta.clone()
    cos_theta[mask] = mv_weight * hard_example + mv_weight - 1.0
    cos_theta.scatter_(1, labels.data.view(-1, 1), final_gt)
    return F.cross_entropy(cos_theta * s, labels)


def magface(x, w, labels, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True):
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    loss_g = 1 / (u_a ** 2) * x_norm + 1 / x_norm
    cos_theta = torch.mm(F.normalize(x), F.normalize(w).t()).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    if easy_margin:
        cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        mm = torch.sin(math.pi - ada_margin) * ada_margin
        threshold = torch.cos(math.pi - ada_margin)
        cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = torch.zeros_like(cos_theta).scatter_(1, labels.view(-1, 1), 1.0)
    output = (one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta) * s
    return F.cross_entropy(output, labels) + lambda_g * loss_g.mean()


def adaface(x, w, labels, state, m=0.4, h=0.333, s=64.0, t_alpha=1.0):
    """``state`` = [batch_mean, batch_std] tensors, updated in place as the AdaFace code does."""
    eps = 1e-3
    norms = torch.norm(x, 2, 1, True)
    cosine = torch.mm(x / norms, F.normalize(w).t()).clamp(-1 + eps, 1 - eps)
    safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
    with torch.no_grad():
        mean, std = safe_norms.mean().detach(), safe_norms.std().detach()
        state[0] = mean * t_alpha + (1 - t_alpha) * state[0]
        state[1] = std * t_alpha + (1 - t_alpha) * state[1]
    margin_scaler = (safe_norms - state[0]) / (state[1] + eps)
    margin_scaler = torch.clip(margin_scaler * h, -1, 1)
    m_arc = torch.zeros(labels.size()[0], cosine.size()[1], dtype=x.dtype)
    m_arc.scatter_(1, labels.reshape(-1, 1), 1.0)
    g_angular = m * margin_scaler * -1
    m_arc = m_arc * g_angular
    theta = cosine.acos()
    theta_m = torch.clip(theta + m_arc, min=eps, max=math.pi - eps)
    cosine = theta_m.cos()
    m_cos = torch.zeros(labels.size()[0], cosine.size()[1], dtype=x.dtype)
    m_cos.scatter_(1, labels.reshape(-1, 1), 1.0)
    g_add = m + (m * margin_scaler)
    m_cos = m_cos * g_add
    cosine = cosine - m_cos
    return F.cross_entropy(cosine * s, labels)


def sphereface(x, w, labels, it, m=4):
    """AngleLinear + AngleLoss of the A-Softmax PyTorch port: lambda = max(5, 1500 / (1 + 0.1 it)), it += 1
    first. Returns (loss, it)."""
    mlambda = [lambda c: c ** 0, lambda c: c, lambda c: 2 * c ** 2 - 1, lambda c: 4 * c ** 3 - 3 * c,
               lambda c: 8 * c ** 4 - 8 * c ** 2 + 1, lambda c: 16 * c ** 5 - 20 * c ** 3 + 5 * c]
    ww = F.normalize(w, dim=1)
    xlen = x.pow(2).sum(1).pow(0.5)
    cos_theta = (x.mm(ww.t()) / xlen.view(-1, 1)).clamp(-1, 1)
    cos_m_theta = mlambda[m](cos_theta)
    theta = cos_theta.data.acos()
    k = (m * theta / 3.14159265).floor()
    n_one = k * 0.0 - 1
    phi_theta = (n_one ** k) * cos_m_theta - 2 * k
    cos_theta = cos_theta * xlen.view(-1, 1)
    phi_theta = phi_theta * xlen.view(-1, 1)
    it += 1
    lamb = max(5.0, 1500.0 / (1 + 0.1 * it))
    index = torch.zeros_like(cos_theta).scatter_(1, labels.view(-1, 1), 1).bool()
    output = cos_theta * 1.0
    output[index] -= cos_theta[index] * (1.0 + 0) / (1 + lamb)
    output[index] += phi_theta[index] * (1.0 + 0) / (1 + lamb)
    return F.cross_entropy(output, labels), it


def lsoftmax(x, w, labels, m=2, beta=100.0):
    """lsoftmax-pytorch's training branch with a fixed beta (its schedule multiplies beta by a constant)."""
    logit = x.mm(w.t())
    idx = torch.arange(x.size(0))
    logit_target = logit[idx, labels]
    w_target_norm = w[labels].norm(p=2, dim=1)
    x_norm = x.norm(p=2, dim=1)
    cos_theta_target = logit_target / (w_target_norm * x_norm + 1e-10)
    coeffs = [(-1) ** n * math.comb(m, 2 * n) for n in range(m // 2 + 1)]
    sin2 = 1 - cos_theta_target ** 2
    cos_m_theta = sum(c * cos_theta_target ** (m - 2 * n) * sin2 ** n for n, c in enumerate(coeffs))
    eps = 1e-7
    cos_theta_target_c = cos_theta_target.clamp(-1 + eps, 1 - eps)
    k = (m * cos_theta_target_c.acos() / math.pi).floor().detach()
    logit_target_updated = w_target_norm * x_norm * (((-1) ** k * cos_m_theta) - 2 * k)
    logit_target_updated_beta = (logit_target_updated + beta * logit[idx, labels]) / (1 + beta)
    logit = logit.clone()
    logit[idx, labels] = logit_target_updated_beta
    return F.cross_entropy(logit, labels)


def circle_classification(x, w, labels, gamma=256.0, m=0.25):
    sim = _cos(x, w)
    one_hot = F.one_hot(labels, w.shape[0]).bool()
    sp, sn = sim[one_hot].view(-1, 1), sim[~one_hot].view(x.shape[0], -1)
    ap = torch.clamp_min(-sp.detach() + 1 + m, min=0.0)
    an = torch.clamp_min(sn.detach() + m, min=0.0)
    logit_p = -ap * (sp - (1 - m)) * gamma
    logit_n = an * (sn - m) * gamma
    return F.softplus(torch.logsumexp(logit_n, dim=1) + torch.logsumexp(logit_p, dim=1)).mean()
