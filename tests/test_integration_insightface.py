"""margin_kernels.integrations.insightface against a transcription of arcface_torch's PartialFC_V2 and
CombinedMarginLoss (tests/originals_insightface.py): 20-step training trajectories (losses, head weight,
backbone) from the same seed, in float64 and float32, full and sampled classes, in one process and in a
2-process gloo world; checkpoints crossing between the two codes; the DistCrossEntropy floor; the margin
modules' own forward on logits; the state dict insightface expects."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import margin_kernels as mk
from margin_kernels.integrations import insightface as ours
from tests import distributed_scenarios as D, insightface_scenarios as S, originals_insightface as theirs
from tests.helpers import rel_err
from tests.tolerances import FP64_SAME_SUMS, TRAJECTORY_TOLERANCES

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this torch build")


def assert_same_trajectory(a, b, dtype):
    bound = TRAJECTORY_TOLERANCES[dtype]
    loss_err = ((a["losses"] - b["losses"]).abs() / b["losses"].abs().clamp_min(1.0)).max().item()
    assert loss_err <= bound.loss, f"loss {loss_err:.2e} > {bound.loss:.0e}"
    assert rel_err(a["backbone"], b["backbone"]) <= bound.dx
    assert rel_err(a["weight"], b["weight"]) <= bound.dw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("margin, sample_rate", [("arcface", 1.0), ("arcface", 0.3), ("cosface", 0.5),
                                                 ("filter", 0.5)])
def test_trajectory_matches_insightface(margin, sample_rate, dtype):
    a = S.trajectory(ours, margin, sample_rate, dtype)
    b = S.trajectory(theirs, margin, sample_rate, dtype)
    assert a["losses"].shape == (S.STEPS,) and not torch.equal(a["weight"], S.trajectory(ours, margin, sample_rate,
                                                                                          dtype, steps=1)["weight"])
    assert_same_trajectory(a, b, dtype)


@pytest.mark.parametrize("first, then", [(theirs, ours), (ours, theirs)], ids=["theirs_to_ours", "ours_to_theirs"])
def test_checkpoint_crosses_between_the_codes(first, then):
    """train_v2.py's checkpoint (backbone, state_dict_softmax_fc, optimizer) written by one code resumes in the
    other and continues the same trajectory as insightface alone."""
    crossed = S.resumed(first, then, "arcface", 0.5, torch.float64)
    alone = S.resumed(theirs, theirs, "arcface", 0.5, torch.float64)
    assert crossed["keys"] == alone["keys"] == ["weight"]
    assert_same_trajectory(crossed, alone, torch.float64)


def test_state_dict_and_parameters_are_insightfaces():
    with S.default_dtype(torch.float64):
        torch.manual_seed(3)
        a = ours.PartialFC_V2(ours.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 13, 0.5)
        torch.manual_seed(3)
        b = theirs.PartialFC_V2(theirs.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 13, 0.5)
    assert list(a.state_dict()) == list(b.state_dict()) == ["weight"]
    assert torch.equal(a.weight, b.weight)  # the same draw from the same global generator
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    assert (a.num_local, a.class_start, a.num_sample, a.embedding_size) == (b.num_local, b.class_start,
                                                                            b.num_sample, b.embedding_size)


def test_probability_floor_of_dist_cross_entropy():
    """Rows whose target probability is below 1e-30 report -log(1e-30) = 69.08, as DistCrossEntropy; the
    gradient is the unfloored one in both codes."""
    with S.default_dtype(torch.float64):
        results = []
        for code in (ours, theirs):
            torch.manual_seed(0)
            pfc = code.PartialFC_V2(code.CombinedMarginLoss(64, 1.0, 0.0, 0.4), 8, 5, 1.0,
                                    **({"backend": "torch"} if code is ours else {}))
            labels = torch.tensor([0, 1, 2, 3])
            # rows 0 and 1 point at classes 2 and 3 and away from their own: p_y ~ exp(-64 * 1.5) < 1e-30;
            # rows 2 and 3 point at their own classes
            weight = pfc.weight.detach()
            x = 100 * (weight[[2, 3, 2, 3]] - torch.cat([weight[[0, 1]], torch.zeros(2, 8)]))
            x.requires_grad_(True)
            loss = pfc(x, labels.clone())
            loss.backward()
            results.append((loss.detach(), x.grad, pfc.weight.grad))
    (la, dxa, dwa), (lb, dxb, dwb) = results
    ref = mk.margin_cross_entropy(x.detach(), pfc.weight.detach(), labels, mk.CosFace(64.0, 0.4), reduction="none")
    assert (ref[:2] > ours.LOSS_CAP).all() and (ref[2:] < ours.LOSS_CAP).all()
    assert abs(la.item() - lb.item()) < FP64_SAME_SUMS * lb.item()
    assert abs(la.item() - (2 * ours.LOSS_CAP + ref[2:].sum().item()) / 4) < FP64_SAME_SUMS * lb.item()
    assert rel_err(dxa, dxb) < FP64_SAME_SUMS and rel_err(dwa, dwb) < FP64_SAME_SUMS


@pytest.mark.parametrize("make_ours, make_theirs", [
    (lambda: ours.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.2), lambda: theirs.CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.2)),
    (lambda: ours.CombinedMarginLoss(64, 1.0, 0.0, 0.35), lambda: theirs.CombinedMarginLoss(64, 1.0, 0.0, 0.35)),
    # arcface_torch's ArcFace and CosFace classes compute what these two CombinedMarginLoss settings do
    (lambda: ours.ArcFace(64.0, 0.5), lambda: theirs.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)),
    (lambda: ours.CosFace(64.0, 0.4), lambda: theirs.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4)),
], ids=["combined_filter", "combined_cosface", "arcface", "cosface"])
def test_margin_modules_forward_on_logits(make_ours, make_theirs):
    gen = torch.Generator().manual_seed(4)
    cos = (torch.rand(7, 11, generator=gen, dtype=torch.float64) * 2 - 1).clamp(-0.999, 0.999)
    labels = torch.randint(0, 11, (7, 1), generator=gen)
    labels[2] = -1  # a row whose class is on another rank
    a_in, b_in = cos.clone().requires_grad_(True), cos.clone().requires_grad_(True)
    a = make_ours()(a_in, labels)
    b = make_theirs()(b_in * 1.0, labels)  # insightface edits its input in place
    weights = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert torch.allclose(a, b, rtol=0, atol=FP64_SAME_SUMS)
    assert torch.allclose(a_in.grad, b_in.grad, rtol=0, atol=FP64_SAME_SUMS)


def test_bad_margin_loss_is_named():
    with pytest.raises(TypeError, match="margin_loss"):
        ours.PartialFC_V2(theirs.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10)
    with pytest.raises(ValueError, match="mode='paddle'"):
        ours.CombinedMarginLoss(64, 0.9, 0.4, 0.0)


# ---- a 2-process gloo world: each rank runs both codes ------------------------------------------------------
@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return D.run_world(2, str(tmp_path_factory.mktemp("insightface_world2")), list(S.SCENARIOS),
                       module=S.__name__)


@needs_gloo
@pytest.mark.parametrize("scenario, dtype", [("world_arcface_fp64", torch.float64),
                                             ("world_arcface_sampled_fp64", torch.float64),
                                             ("world_cosface_sampled_fp32", torch.float32),
                                             ("world_resume_fp64", torch.float64)])
def test_world_of_two_matches_insightface(world2, scenario, dtype):
    for rank, result in enumerate(world2[scenario]):
        if "error" in result:
            pytest.fail(f"{scenario} failed on rank {rank}:\n{result['error']}")
        other = result["ours_from_theirs"] if "ours_from_theirs" in result else result["ours"]
        assert_same_trajectory(other, result["theirs"], dtype)
    # every rank reports the same loss (the global batch's), and owns its own class rows
    first, second = (r.get("ours", r.get("ours_from_theirs")) for r in world2[scenario])
    assert torch.equal(first["losses"], second["losses"])
    assert first["weight"].shape[0] + second["weight"].shape[0] == S.CLASSES
