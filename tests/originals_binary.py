"""Transcriptions of the binary (one-vs-all) losses as their authors' public code computes them, on full B x C
logits, for tests/test_originals_binary.py.

* opensphere (ydwen/opensphere, model/head/sphereface2.py): SphereFace2 with magn_type 'C', 'A', 'M'. Its
  quirks kept: the class weight (stored feat_dim x num_class) is re-normalised in place under no_grad at every
  forward, so the cosine is x_hat . w and the gradient reaching w has no normalisation Jacobian; the
  similarity adjustment and the margins are computed under no_grad (``d_theta``), so the gradient is that of
  r * cos; the loss is F.binary_cross_entropy_with_logits with per-element weights lw * C / r * (alpha or
  1 - alpha), averaged over all B x C elements. ``exact=True`` is its sphereface2c.py (the 'C' adjustment
  differentiated). Labels must all be valid (the code has no ignore index).
* UniFace (CVI-SZU/UniFace, head.py, Unified_Cross_Entropy_Loss): cos from F.normalize(eps=1e-5), the
  positive and negative logits s(c - m) - bias and s c - bias clamped to [-s, s], log(1 + exp(.)) terms, the
  negatives weighted by l, summed over the classes and averaged over the rows. ``partial_index`` (sorted class
  ids, the batch's classes among them) restricts the classes as the authors' training loop does.

Inputs: x (B, d), w (C, d), labels (B,); the bias is passed in (a tensor with requires_grad for its gradient).
"""
import torch
import torch.nn.functional as F


def opensphere_sphereface2(x, w, labels, b, magn_type="C", alpha=0.7, r=40.0, m=0.4, t=3.0, lw=50.0,
                           exact=False):
    num_class = w.shape[0]
    # opensphere's (feat_dim, num_class) parameter, re-normalised in place under no_grad (self.w.data = ...):
    # the value is the unit column, the gradient reaches w unchanged
    weight = (w + (F.normalize(w, dim=1) - w).detach()).t()
    cos_theta = F.normalize(x, dim=1).mm(weight)
    one_hot = torch.zeros_like(cos_theta)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0)
    if exact:  # sphereface2c.py
        g_cos_theta = 2.0 * ((cos_theta + 1.0) / 2.0).pow(t) - 1.0
        g_cos_theta = g_cos_theta - m * (2.0 * one_hot - 1.0)
        logits = r * g_cos_theta + b
    else:
        with torch.no_grad():
            if magn_type == "C":
                g_cos_theta = 2.0 * ((cos_theta + 1.0) / 2.0).pow(t) - 1.0
                g_cos_theta = g_cos_theta - m * (2.0 * one_hot - 1.0)
            elif magn_type == "A":
                theta_m = torch.acos(cos_theta.clamp(-1 + 1e-5, 1.0 - 1e-5))
                theta_m.scatter_(1, labels.view(-1, 1), m, reduce="add")
                theta_m.clamp_(1e-5, 3.14159)
                g_cos_theta = torch.cos(theta_m)
                g_cos_theta = 2.0 * ((g_cos_theta + 1.0) / 2.0).pow(t) - 1.0
            else:  # "M"
                m_theta = torch.acos(cos_theta.clamp(-1 + 1e-5, 1.0 - 1e-5))
                m_theta.scatter_(1, labels.view(-1, 1), m, reduce="multiply")
                m_theta.clamp_(1e-5, 3.14159)
                g_cos_theta = torch.cos(m_theta)
                g_cos_theta = 2.0 * ((g_cos_theta + 1.0) / 2.0).pow(t) - 1.0
            d_theta = g_cos_theta - cos_theta
        logits = r * (cos_theta + d_theta) + b
    weight_ = alpha * one_hot + (1.0 - alpha) * (1.0 - one_hot)
    weight_ = lw * num_class / r * weight_
    return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight_)


def uniface(x, w, labels, bias, s=64.0, m=0.4, l=1.0, partial_index=None):  # noqa: E741
    out_features = w.shape[0]
    if partial_index is None:
        partial_index = torch.arange(out_features)
    cos_theta = F.linear(F.normalize(x, eps=1e-5), F.normalize(w[partial_index], eps=1e-5))
    cos_m_theta_p = s * (cos_theta - m) - bias
    cos_m_theta_n = s * cos_theta - bias
    p_loss = torch.log(1 + torch.exp(-cos_m_theta_p.clamp(min=-s, max=s)))
    n_loss = torch.log(1 + torch.exp(cos_m_theta_n.clamp(min=-s, max=s))) * l
    one_hot = torch.zeros((labels.size(0), out_features), dtype=torch.bool)
    one_hot.scatter_(1, labels.view(-1, 1).long(), 1)
    one_hot = torch.index_select(one_hot, 1, partial_index)
    loss = one_hot * p_loss + (~one_hot) * n_loss
    return loss.sum(dim=1).mean()
