"""Stateful losses: state advances once per training call, identically in every backend, and is saved."""
import pytest
import torch

import margin_kernels as mk
from tests.helpers import random_problem, twin
from tests.tolerances import CURRICULAR_T_FIRST_STEP, FP32_STATE, FP64_END_TO_END

STATEFUL = {
    "curricularface": (lambda: mk.CurricularFace(), ("t",)),
    "adaface": (lambda: mk.AdaFace(t_alpha=0.3), ("batch_mean", "batch_std")),
    "sphereface": (lambda: mk.SphereFace(m=4), ("iteration",)),
    "lsoftmax": (lambda: mk.LSoftmax(m=2), ("iteration",)),
    "adacos": (lambda: mk.AdaCos(num_classes=30), ("scale",)),
    "adacos_lagged": (lambda: mk.AdaCos(num_classes=30, update="lagged"), ("scale",)),
    "elastic_arc": (lambda: mk.ElasticArcFace(std=0.1, seed=1), ("rng_state",)),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_state_after_n_steps_equals_reference(name):
    factory, buffers = STATEFUL[name]
    fused, ref = factory(), factory()
    for step in range(5):
        x, w, labels = random_problem(8, 30, 16, seed=10 + step, ignore_rows=(step % 8,))
        a = mk.margin_cross_entropy(x, w, labels, fused, backend="torch", chunk_size=7)
        b = mk.margin_cross_entropy(x, w, labels, ref, backend="reference")
        assert abs(a.item() - b.item()) < FP64_END_TO_END, f"step {step}"
        for buf in buffers:
            assert torch.allclose(getattr(fused, buf).double(), getattr(ref, buf).double(), rtol=0, atol=FP32_STATE)
    initial = factory()
    for buf in buffers:
        assert not torch.equal(getattr(fused, buf), getattr(initial, buf)), f"{buf} never moved"


def test_state_is_frozen_in_eval_and_saved_in_state_dict():
    margin = mk.CurricularFace()
    x, w, labels = random_problem(8, 30, 16, seed=3)
    mk.margin_cross_entropy(x, w, labels, margin, backend="torch")
    t_after_train = margin.t.clone()
    assert t_after_train.item() != 0.0
    margin.eval()
    mk.margin_cross_entropy(x, w, labels, margin, backend="torch")
    assert torch.equal(margin.t, t_after_train)
    head = mk.MarginHead(30, 16, mk.AdaFace(), backend="torch")
    head(x.float(), labels)
    state = head.state_dict()
    assert set(state) == {"weight", "margin.batch_mean", "margin.batch_std", "_extra_state"}  # + the sampler
    restored = mk.MarginHead(30, 16, mk.AdaFace(), backend="torch")
    restored.load_state_dict(state)
    assert torch.equal(restored.margin.batch_mean, head.margin.batch_mean)
    assert restored.margin.batch_mean.item() != 20.0


def test_curricular_t_follows_the_paper_update():
    margin = mk.CurricularFace()
    x, w, labels = random_problem(6, 20, 8, seed=4, ignore_rows=(2,))
    ref = twin(margin)
    logits, valid, _ = mk.reference.margin_logits(x, w, labels, ref)
    cos = (torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(w).t())
    target = cos[torch.arange(6), labels.clamp_min(0)][valid]
    mk.margin_cross_entropy(x, w, labels, margin, backend="torch")
    assert abs(margin.t.item() - 0.01 * target.mean().item()) < CURRICULAR_T_FIRST_STEP


def test_adaface_keeps_std_with_one_valid_row():
    margin = mk.AdaFace()
    x, w, labels = random_problem(3, 10, 8, seed=5, ignore_rows=(0, 1))
    loss = mk.margin_cross_entropy(x, w, labels, margin, backend="torch")
    assert torch.isfinite(loss)
    assert margin.batch_std.item() == 100.0 and margin.batch_mean.item() != 20.0
