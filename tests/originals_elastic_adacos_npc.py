"""Transcriptions of ElasticFace (fdbtrs/ElasticFace, utils/losses.py), AdaCos and NPCFace (FaceX-Zoo,
head/AdaCos.py and head/NPCFace.py) on full B x C logits, in the style of those heads, quirks included:
ElasticFace's "+" pairs the sorted margins through the descending-cosine permutation itself; AdaCos picks this
batch's scale from this batch at the previous scale, before computing the logits; NPCFace's hard-negative
mask compares with the plain cos(theta + m). Each returns the cross-entropy its training script puts on top
of the head's logits (and the new state where there is one).

Adaptations, none of which changes a value: W is (C, d) here (the heads keep (d, C) or (C, d)); the FaceX-Zoo
heads take the features as given, so the tests pass F.normalize(x) (their cosines are cosines only for unit
features); ``hard_mask`` is built on the logits' device instead of ``.cuda()``; ``margins`` optionally replaces
ElasticFace's torch.normal draw."""
import math

import torch
import torch.nn.functional as F


def _l2_norm(t, axis=1):
    return torch.div(t, torch.norm(t, 2, axis, True))


def elastic(x, w, label, arc, s, m, std=0.0125, plus=False, margins=None):
    embbedings = _l2_norm(x, axis=1)
    kernel_norm = _l2_norm(w.t(), axis=0)
    cos_theta = torch.mm(embbedings, kernel_norm)
    cos_theta = cos_theta.clamp(-1, 1)
    index = torch.where(label != -1)[0]
    m_hot = torch.zeros(index.size()[0], cos_theta.size()[1], device=cos_theta.device)
    if margins is None:
        margin = torch.normal(mean=m, std=std, size=label[index, None].size(), device=cos_theta.device)
    else:
        margin = margins[index, None].float()
    if plus:
        with torch.no_grad():
            distmat = cos_theta[index, label.view(-1)].detach().clone()
            _, idicate_cosie = torch.sort(distmat, dim=0, descending=True)
            margin, _ = torch.sort(margin, dim=0)
        m_hot.scatter_(1, label[index, None], margin[idicate_cosie])
    else:
        m_hot.scatter_(1, label[index, None], margin)
    if arc:
        cos_theta = cos_theta.acos()
        cos_theta[index] += m_hot
        logits = cos_theta.cos() * s
    else:
        cos_theta[index] -= m_hot
        logits = cos_theta * s
    return F.cross_entropy(logits, label, ignore_index=-1)


def adacos(feats, w, labels, scale, dynamic=True):
    """Returns (loss, the scale the head holds afterwards). ``scale`` is the head's ``self.scale`` (a float at
    first: sqrt(2) log(C - 1)); ``dynamic=False`` skips the update (the paper's fixed AdaCos)."""
    W = F.normalize(w)
    logits = F.linear(feats, W)
    theta = torch.acos(torch.clamp(logits, -1.0 + 1e-7, 1.0 - 1e-7))
    one_hot = torch.zeros_like(logits)
    one_hot.scatter_(1, labels.view(-1, 1).long(), 1)
    if dynamic:
        with torch.no_grad():
            B_avg = torch.where(one_hot < 1, torch.exp(scale * logits), torch.zeros_like(logits))
            B_avg = torch.sum(B_avg) / feats.size(0)
            theta_med = torch.median(theta[one_hot == 1])
            scale = torch.log(B_avg) / torch.cos(torch.min(math.pi / 4 * torch.ones_like(theta_med), theta_med))
    output = scale * logits
    return F.cross_entropy(output, labels), scale


def npcface(x, w, label, margin=0.5, scale=64.0, m0=0.40, m1=0.20, t=1.10, a=0.20):
    """Returns (loss, mean hard-negative cosine per row)."""
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    kernel_norm = F.normalize(w.t(), dim=0)
    cos_theta = torch.mm(x, kernel_norm)
    cos_theta = cos_theta.clamp(-1, 1)
    batch_size = label.size(0)
    gt = cos_theta[torch.arange(0, batch_size), label].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(gt, 2))
    cos_theta_m = gt * cos_m - sin_theta * sin_m
    with torch.no_grad():
        hard_mask = (cos_theta > cos_theta_m).to(cos_theta.dtype)
        hard_mask.scatter_(1, label.data.view(-1, 1), 0)
        hard_cos = torch.where(hard_mask > 0, cos_theta, torch.zeros_like(cos_theta))
        sum_hard_cos = torch.sum(hard_cos, dim=1).view(-1, 1)
        sum_hard_mask = torch.sum(hard_mask, dim=1).view(-1, 1)
        sum_hard_mask = sum_hard_mask.clamp(1, w.shape[0])
        avg_hard_cos = sum_hard_cos / sum_hard_mask
        newm = m0 + m1 * avg_hard_cos
        cos_newm = torch.cos(newm)
        sin_newm = torch.sin(newm)
    final_gt = torch.where(gt > 0, gt * cos_newm - sin_theta * sin_newm, gt)
    cos_theta = torch.where(cos_theta > cos_theta_m, t * cos_theta + a, cos_theta)
    cos_theta.scatter_(1, label.data.view(-1, 1), final_gt)
    cos_theta *= scale
    return F.cross_entropy(cos_theta, label), avg_hard_cos.view(-1)
