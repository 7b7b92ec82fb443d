"""Scale schedules (margin_kernels.schedules): the schedules' values, a scheduled loss equal to the loss
recomputed at the scheduled scale (every loss with a scale, stateful ones included), stepping as the lambda
annealing does (training calls only, saved in state_dict), and torch.compile of a scheduled head."""
import copy
import math

import pytest
import torch

import margin_kernels as mk
from margin_kernels import reference
from margin_kernels.schedules import has_scale
from tests.helpers import LOSS_NAMES, loss_and_grads, make_loss, random_problem, rel_err
from tests.tolerances import COMPILE_VS_EAGER, FP64_RESUMED_SCHEDULE, TOLERANCES

SCALED = [name for name in LOSS_NAMES if has_scale(make_loss(name))]
STEPS = 3


def test_schedule_values():
    heated = mk.HeatedUp(16.0, 4.0, at=2)
    assert [heated.value(k) for k in range(5)] == [16.0, 16.0, 16.0, 4.0, 4.0]
    linear = mk.LinearScale(64.0, 32.0, steps=4)
    assert [linear.value(k) for k in (0, 1, 4, 9)] == [64.0, 56.0, 32.0, 32.0]
    cosine = mk.CosineScale(64.0, 32.0, steps=4)
    assert cosine.value(0) == 64.0 and cosine.value(4) == 32.0 and cosine.value(8) == 32.0
    assert cosine.value(1) == pytest.approx(32.0 + 16.0 * (1.0 + math.cos(math.pi / 4)))
    assert cosine.value(2) == pytest.approx(48.0)


def test_every_scaled_loss_is_scheduled_and_unscaled_ones_refuse():
    # L-Softmax and SphereFace carry pytorch-metric-learning's scale s (1 by default): schedulable too
    assert "softmax" not in SCALED and "l2softmax" in SCALED
    assert {"arcface", "cosface", "circle", "adaface", "normface", "sphereface", "lsoftmax"} <= set(SCALED)
    with pytest.raises(ValueError, match="no scale"):
        mk.schedule_scale(mk.Softmax(), mk.HeatedUp())
    with pytest.raises(TypeError, match="schedule"):
        mk.schedule_scale(mk.ArcFace(), lambda step: 64.0)
    with pytest.raises(ValueError, match="s_end"):
        mk.LinearScale(64.0, 0.0, steps=10)
    with pytest.raises(ValueError, match="steps"):
        mk.CosineScale(64.0, 30.0, steps=0)
    with pytest.raises(ValueError, match="at"):
        mk.HeatedUp(at=-1)


@pytest.mark.parametrize("name", SCALED)
def test_scheduled_loss_equals_the_loss_at_the_scheduled_scale(name):
    """Training call k runs at value(k) (the iteration advances first, as the lambda annealing): the fused
    scheduled loss equals the float64 reference of a twin (same state) whose s is set to value(k)."""
    scheduled = make_loss(name)
    fixed = copy.deepcopy(scheduled)
    schedule = mk.LinearScale(scheduled.s, 0.5 * scheduled.s, steps=STEPS)
    mk.schedule_scale(scheduled, schedule)
    tol = TOLERANCES[("torch", torch.float64)].float64
    for step in range(1, STEPS + 1):
        x, w, y = random_problem(9, 31, 12, seed=step, ignore_rows=(2,), sub_centers=scheduled.sub_centers)
        fixed.s = schedule.value(step)
        ref = loss_and_grads(lambda a, b: reference.margin_cross_entropy(a, b, y, fixed), x, w)
        out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, y, scheduled, backend="torch",
                                                                  chunk_size=8), x, w)
        assert scheduled.s == fixed.s
        assert abs(out[0].item() - ref[0].item()) <= tol.loss * max(1.0, abs(ref[0].item()))
        assert rel_err(out[1], ref[1]) <= tol.dx and rel_err(out[2], ref[2]) <= tol.dw
    for buffer_name, buffer in fixed.named_buffers():
        assert torch.allclose(dict(scheduled.named_buffers())[buffer_name], buffer), buffer_name


def test_eval_calls_do_not_advance_and_state_dict_resumes():
    x, w, y = random_problem(6, 20, 8)
    head = mk.MarginHead(20, 8, mk.schedule_scale(mk.ArcFace(), mk.HeatedUp(64.0, 32.0, at=2)),
                         dtype=torch.float64, backend="torch")
    for _ in range(2):
        head(x, y)
    assert head.margin.s == 64.0 and int(head.margin.scale_schedule.iteration) == 2
    head.eval()
    head(x, y)
    assert head.margin.s == 64.0 and int(head.margin.scale_schedule.iteration) == 2
    state = head.state_dict()
    assert int(state["margin.scale_schedule.iteration"]) == 2
    resumed = mk.MarginHead(20, 8, mk.schedule_scale(mk.ArcFace(), mk.HeatedUp(64.0, 32.0, at=2)),
                            dtype=torch.float64, backend="torch")
    resumed.load_state_dict(state)
    resumed(x, y)  # iteration 3: past `at`
    assert resumed.margin.s == 32.0 and int(resumed.margin.scale_schedule.iteration) == 3
    expected = mk.MarginHead(20, 8, mk.ArcFace(s=32.0), dtype=torch.float64, backend="torch")
    expected.load_state_dict(head.state_dict(), strict=False)
    assert resumed(x, y).item() == pytest.approx(expected(x, y).item(), rel=FP64_RESUMED_SCHEDULE)


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_compiled_scheduled_head_matches_eager(compiler):
    """fullgraph: the schedule is host arithmetic before the op; every new scale value is a recompile."""
    x, w, y = random_problem(8, 40, 16, dtype=torch.float32)

    def make():
        head = mk.MarginHead(40, 16, mk.schedule_scale(mk.CosFace(), mk.LinearScale(64.0, 32.0, steps=2)),
                             backend="torch")
        with torch.no_grad():
            head.weight.copy_(w)
        return head

    def run(module, head):
        features = x.clone().requires_grad_(True)
        head.weight.grad = None
        loss = module(features, y)
        loss.backward()
        return loss.detach(), features.grad, head.weight.grad.clone()

    eager, compiled_head = make(), make()
    compiled = torch.compile(compiled_head, fullgraph=True, backend=compiler)
    for _ in range(2):
        a, b = run(eager, eager), run(compiled, compiled_head)
        assert abs(a[0].item() - b[0].item()) <= COMPILE_VS_EAGER * max(1.0, abs(a[0].item()))
        assert rel_err(b[1], a[1]) <= COMPILE_VS_EAGER and rel_err(b[2], a[2]) <= COMPILE_VS_EAGER
    assert compiled_head.margin.s == eager.margin.s == 32.0
