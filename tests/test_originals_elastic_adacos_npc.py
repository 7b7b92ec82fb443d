"""ElasticFace, AdaCos and NPCFace against transcriptions of their authors' code
(tests/originals_elastic_adacos_npc.py): loss value, dx and dW, and the state over several steps."""
import math

import pytest
import torch
import torch.nn.functional as F

import margin_kernels as mk
from tests import originals_elastic_adacos_npc as originals
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import FP64_FEW_ULPS, ORIGINALS_GRAD, ORIGINALS_LOSS

BACKENDS = ["torch", "cpu"]


def fused(margin, labels, backend="torch", chunk=7):
    return lambda x, w: mk.margin_cross_entropy(x, w, labels, margin, backend=backend, chunk_size=chunk)


def assert_same(ours, theirs):
    assert abs(ours[0].item() - theirs[0].item()) < ORIGINALS_LOSS * max(1.0, abs(theirs[0].item()))
    assert rel_err(ours[1], theirs[1]) < ORIGINALS_GRAD, "dx"
    assert rel_err(ours[2], theirs[2]) < ORIGINALS_GRAD, "dW"


# ---- ElasticFace ---------------------------------------------------------------------------------------------
ELASTIC = {
    "arc": (mk.ElasticArcFace, dict(arc=True, s=64.0, m=0.5)),
    "cos": (mk.ElasticCosFace, dict(arc=False, s=64.0, m=0.35)),
}


@pytest.mark.parametrize("plus", [False, True], ids=["plain", "plus"])
@pytest.mark.parametrize("which", list(ELASTIC))
def test_elastic_matches_original_over_steps(which, plus):
    """Same global-RNG draws (torch.manual_seed before each side), three steps, a std large enough that the
    rows' margins and the "+" reordering matter."""
    cls, kwargs = ELASTIC[which]
    margin = cls(s=kwargs["s"], m=kwargs["m"], std=0.2, plus=plus)
    for step in range(3):
        x, w, labels = random_problem(10, 30, 24, seed=50 + step)
        torch.manual_seed(100 + step)
        ours = loss_and_grads(fused(margin, labels), x, w)
        torch.manual_seed(100 + step)
        theirs = loss_and_grads(lambda a, b: originals.elastic(a, b, labels, std=0.2, plus=plus, **kwargs), x, w)
        assert_same(ours, theirs)


def test_elastic_ignored_rows_draw_one_margin_per_labelled_row():
    x, w, labels = random_problem(10, 30, 24, seed=57, ignore_rows=(2, 7))
    torch.manual_seed(5)
    ours = loss_and_grads(fused(mk.ElasticArcFace(std=0.2), labels), x, w)
    torch.manual_seed(5)
    theirs = loss_and_grads(lambda a, b: originals.elastic(a, b, labels, arc=True, s=64.0, m=0.5, std=0.2), x, w)
    assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_elastic_explicit_margins_match_original(backend):
    x, w, labels = random_problem(10, 30, 24, seed=58)
    margins = torch.linspace(0.2, 0.8, 10, dtype=torch.float64).float().double()  # fp32-exact values
    for plus in (False, True):
        ours = loss_and_grads(fused(mk.ElasticArcFace(plus=plus, margins=margins).eval(), labels, backend), x, w)
        theirs = loss_and_grads(lambda a, b: originals.elastic(a, b, labels, arc=True, s=64.0, m=0.5, plus=plus,
                                                               margins=margins), x, w)
        assert_same(ours, theirs)


def test_elastic_plus_orders():
    """"code" pairs as the authors' indexing does; "paper" gives the k-th largest cosine the k-th smallest
    margin (so the margins decrease as the target cosine grows)."""
    x, w, labels = random_problem(10, 30, 24, seed=59)
    margins = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    rows = mk.losses.RowInputs(F.normalize(x).mul(F.normalize(w)[labels]).sum(1), x.norm(dim=1),
                               torch.ones(10, dtype=torch.float64), labels >= 0)
    paper = mk.ElasticArcFace(plus=True, plus_order="paper", margins=margins)
    paper.begin_call(rows)
    order = torch.argsort(rows.cos, descending=True)
    assert torch.equal(paper.row_margins(rows)[order], margins)
    code = mk.ElasticArcFace(plus=True, margins=margins)
    code.begin_call(rows)
    assert torch.equal(code.row_margins(rows), margins[order])
    assert not torch.equal(code.row_margins(rows), paper.row_margins(rows))


def test_elastic_seed_is_reproducible_and_lives_in_state_dict():
    x, w, labels = random_problem(10, 30, 24, seed=60)
    a, b = mk.ElasticArcFace(std=0.2, seed=3), mk.ElasticArcFace(std=0.2, seed=3)
    first = [loss_and_grads(fused(a, labels), x, w)[0] for _ in range(2)]
    assert not torch.equal(first[0], first[1])  # a new draw per call
    saved = {k: v.clone() for k, v in a.state_dict().items()}
    assert [loss_and_grads(fused(b, labels), x, w)[0] for _ in range(2)] == first
    c = mk.ElasticArcFace(std=0.2, seed=99)
    c.load_state_dict(saved)
    assert torch.equal(loss_and_grads(fused(c, labels), x, w)[0], loss_and_grads(fused(a, labels), x, w)[0])
    gen1, gen2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(loss_and_grads(fused(mk.ElasticCosFace(generator=gen1), labels), x, w)[0],
                       loss_and_grads(fused(mk.ElasticCosFace(generator=gen2), labels), x, w)[0])
    # eval mode: every row gets m, i.e. ArcFace's target without the easy-margin / th-mm rules
    torch.testing.assert_close(loss_and_grads(fused(a.eval(), labels), x, w)[0],
                               loss_and_grads(fused(mk.ElasticArcFace(std=0.0).eval(), labels), x, w)[0])


@pytest.mark.parametrize("bad, match", [(dict(margins=torch.zeros(3)), "margins must be a floating-point tensor"),
                                        (dict(margins=torch.full((10,), math.nan)), "margins must be finite")])
def test_elastic_bad_margins_raise(bad, match):
    x, w, labels = random_problem(10, 30, 24, seed=61)
    with pytest.raises(ValueError, match=match):
        mk.margin_cross_entropy(x, w, labels, mk.ElasticArcFace(**bad), backend="torch")


@pytest.mark.parametrize("kwargs, match", [(dict(plus_order="sorted"), "plus_order"), (dict(seed=-1), "seed"),
                                           (dict(std=-0.1), "std"), (dict(plus=1), "plus")])
def test_elastic_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.ElasticCosFace(**kwargs)


def unit(original):
    """FaceX-Zoo's heads take the features as given (cosines only for unit features): feed them F.normalize(x),
    so the gradient reaching x goes through the same normalisation as ours."""
    return lambda a, *args, **kwargs: original(F.normalize(a), *args, **kwargs)


adacos, npcface = unit(originals.adacos), unit(originals.npcface)


# ---- AdaCos ----------------------------------------------------------------------------------------------------
def _adacos_steps(seed0, steps=3):
    for step in range(steps):
        x, w, labels = random_problem(10, 30, 24, seed=seed0 + step)
        yield x, w, labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_adacos_faithful_matches_original_over_steps(backend):
    margin = mk.AdaCos(num_classes=30)
    scale = math.sqrt(2) * math.log(30 - 1)
    assert margin.scale.item() == pytest.approx(scale, rel=FP64_FEW_ULPS)
    for x, w, labels in _adacos_steps(70):
        ours = loss_and_grads(fused(margin, labels, backend), x, w)
        theirs = loss_and_grads(lambda a, b: adacos(a, b, labels, scale)[0], x, w)
        scale = adacos(x, w, labels, scale)[1]
        assert_same(ours, theirs)
        assert abs(margin.scale.item() - scale.item()) < ORIGINALS_LOSS * scale.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adacos_lagged_uses_the_previous_batch(backend):
    """Lagged: step t runs at s_t; s_{t+1} is the original's update computed from batch t at s_t."""
    margin = mk.AdaCos(update="lagged")  # num_classes from the first call's weight
    scale = math.sqrt(2) * math.log(30 - 1)
    for x, w, labels in _adacos_steps(80):
        ours = loss_and_grads(fused(margin, labels, backend), x, w)
        theirs = loss_and_grads(lambda a, b: adacos(a, b, labels, scale, dynamic=False)[0], x, w)
        assert_same(ours, theirs)
        scale = adacos(x, w, labels, scale)[1]
        assert abs(margin.scale.item() - scale.item()) < ORIGINALS_LOSS * scale.item()


def test_adacos_fixed_and_eval_keep_the_scale():
    fixed, dynamic = mk.AdaCos(num_classes=30, dynamic=False), mk.AdaCos(num_classes=30).eval()
    scale = math.sqrt(2) * math.log(29)
    for x, w, labels in _adacos_steps(90, 2):
        for margin in (fixed, dynamic):
            ours = loss_and_grads(fused(margin, labels), x, w)
            theirs = loss_and_grads(lambda a, b: adacos(a, b, labels, scale, dynamic=False)[0], x, w)
            assert_same(ours, theirs)
            assert margin.scale.item() == pytest.approx(scale, rel=FP64_FEW_ULPS)


def test_adacos_scale_is_module_state():
    margin = mk.AdaCos()
    x, w, labels = random_problem(10, 30, 24, seed=95)
    mk.margin_cross_entropy(x, w, labels, margin, backend="torch")
    restored = mk.AdaCos()
    restored.load_state_dict(margin.state_dict())
    assert torch.equal(restored.scale, margin.scale) and math.isfinite(margin.scale.item())


@pytest.mark.parametrize("kwargs, match", [(dict(num_classes=2), "num_classes"), (dict(update="eager"), "update"),
                                           (dict(dynamic="yes"), "dynamic")])
def test_adacos_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.AdaCos(**kwargs)


# ---- NPCFace ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_npcface_matches_original(backend):
    for seed in (100, 101):
        x, w, labels = random_problem(10, 30, 24, seed=seed)
        hard_mean = npcface(x, w, labels)[1]
        assert (hard_mean > 0).any() and (hard_mean != 0).sum() >= 3, "the case must have hard negatives"
        ours = loss_and_grads(fused(mk.NPCFace(), labels, backend), x, w)
        theirs = loss_and_grads(lambda a, b: npcface(a, b, labels)[0], x, w)
        assert_same(ours, theirs)
