"""MarginHead: initialisation, equivalence with the functional call, dtype handling under AMP."""
import io

import torch

import margin_kernels as mk
from tests.helpers import loss_and_grads, random_problem, rel_err
from tests.tolerances import BF16_FEATURE_GRAD, FP32_GRAD, FP32_LOSS, FP64_END_TO_END, FP64_SAME_SUMS


def test_weight_initialisation_matches_insightface():
    torch.manual_seed(0)
    head = mk.MarginHead(20_000, 64, mk.ArcFace())
    assert head.weight.shape == (20_000, 64) and head.weight.dtype == torch.float32
    assert abs(head.weight.std().item() - 0.01) < 2e-4 and abs(head.weight.mean().item()) < 2e-4


def test_forward_equals_functional_call():
    x, w, labels = random_problem(8, 30, 16, dtype=torch.float32, ignore_rows=(2,))
    head = mk.MarginHead(30, 16, mk.CosFace(), backend="torch", dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(w)
    out = head(x, labels)
    ref = mk.margin_cross_entropy(x, w, labels, mk.CosFace(), backend="reference")
    assert abs(out.item() - ref.item()) < FP32_LOSS


def test_low_precision_features_are_cast_to_the_weight_dtype():
    """Under AMP the backbone hands bf16 features to an fp32 head: they are upcast (B x d) and the feature
    gradient comes back in bf16."""
    x, w, labels = random_problem(8, 30, 16, dtype=torch.float32)
    head = mk.MarginHead(30, 16, mk.ArcFace(), backend="torch")
    with torch.no_grad():
        head.weight.copy_(w)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    loss = head(xb, labels)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="reference"),
                         xb.detach().double(), w.double())
    assert abs(loss.item() - ref[0].item()) < FP32_GRAD
    assert rel_err(head.weight.grad, ref[2]) < FP32_GRAD
    assert rel_err(xb.grad, ref[1]) < BF16_FEATURE_GRAD  # the gradient is rounded to bf16 on the way back


# ---- one head surface -------------------------------------------------------------------------------------
import inspect  # noqa: E402

import pytest  # noqa: E402

from margin_kernels.distributed import DistributedMarginHead  # noqa: E402

HEADS = {"MarginHead": mk.MarginHead, "DistributedMarginHead": DistributedMarginHead}


def test_both_heads_take_the_same_arguments():
    single = inspect.signature(mk.MarginHead.__init__).parameters
    sharded = inspect.signature(DistributedMarginHead.__init__).parameters
    assert set(sharded) - set(single) == {"process_group", "ddp_backbone"}
    assert set(single) <= set(sharded)
    for name in single:
        assert single[name].default == sharded[name].default, name
    for name in ("sample_rate", "seed", "check_values", "grad_filter", "backend", "dtype", "device"):
        assert name in single


@pytest.mark.parametrize("kwargs, exc, needle", [
    (dict(backend="bogus"), ValueError, "backend must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(dtype=torch.int64), TypeError, "dtype must be one of"),
    (dict(sample_rate=0.0), ValueError, "sample_rate must be a number in (0, 1]"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(grad_filter=2.0), ValueError, "grad_filter must be a number in [0, 1)"),
    (dict(ignore_index=3), ValueError, "ignore_index must be an int outside [0, num_classes=10)"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(check_values="yes"), TypeError, "check_values must be a bool"),
    (dict(margin="arcface"), TypeError, "margin must be a margin_kernels loss"),
    (dict(num_classes=0), ValueError, "num_classes must be a positive int"),
    (dict(embedding_dim=-4), ValueError, "embedding_dim must be a positive int"),
])
@pytest.mark.parametrize("head", list(HEADS))
def test_bad_arguments_fail_at_construction_with_one_wording(head, kwargs, exc, needle):
    args = dict(num_classes=10, embedding_dim=4, margin=mk.ArcFace())
    args.update(kwargs)
    with pytest.raises(exc) as info:
        HEADS[head](args.pop("num_classes"), args.pop("embedding_dim"), args.pop("margin"), **args)
    assert needle in str(info.value)


@pytest.mark.parametrize("head", list(HEADS))
def test_an_unusable_backend_fails_at_construction(head):
    reason = mk.available_backends()["cuda"]
    if reason is None:
        pytest.skip("the cuda backend runs here: nothing to refuse")
    with pytest.raises(RuntimeError, match="cuda"):
        HEADS[head](10, 4, mk.ArcFace(), backend="cuda")


@pytest.mark.parametrize("head", list(HEADS))
def test_auto_is_resolved_at_construction_for_the_weight_device(head):
    module = HEADS[head](10, 4, mk.ArcFace())
    assert module.resolved_backend == mk.backends.resolve_backend("auto", torch.device("cpu"))
    assert module.resolved_backend in ("cpu", "torch")


def test_functional_call_and_head_word_a_bad_reduction_alike():
    x, w, labels = random_problem(4, 10, 4, dtype=torch.float32)
    with pytest.raises(ValueError) as functional:
        mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), reduction="avg")
    with pytest.raises(ValueError) as head:
        mk.MarginHead(10, 4, mk.ArcFace(), reduction="avg")
    assert str(functional.value) == str(head.value)


def test_partial_fc_sampling_on_one_process_matches_the_reference_on_the_drawn_classes():
    x, w, labels = random_problem(12, 200, 16, dtype=torch.float64, ignore_rows=(4,))
    head = mk.MarginHead(200, 16, mk.CosFace(), sample_rate=0.1, seed=7, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    loss = head(x, labels)
    index = head.sampled_classes
    positives = labels[labels >= 0].unique()
    assert index.numel() == max(20, positives.numel()) and torch.isin(positives, index).all()
    remapped = torch.where(labels >= 0, torch.searchsorted(index, labels.clamp_min(0)), labels)
    ref = mk.margin_cross_entropy(x, w, remapped, mk.CosFace(), backend="reference", class_index=index)
    assert abs(loss.item() - ref.item()) < FP64_SAME_SUMS
    # reproducible from the seed, and eval mode uses every class
    again = mk.MarginHead(200, 16, mk.CosFace(), sample_rate=0.1, seed=7, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        again.weight.copy_(w)
    again(x, labels)
    assert again.sampled_classes.equal(index)
    head.eval()
    full = head(x, labels)
    assert head.sampled_classes is None
    full_ref = mk.margin_cross_entropy(x, w, labels, mk.CosFace(), backend="reference")
    assert abs(full.item() - full_ref.item()) < FP64_SAME_SUMS


def test_partial_fc_draws_resume_from_a_checkpoint():
    """The sampler's generator is in state_dict: a head reloaded after step 1 (round trip through torch.save)
    draws step 2's classes as the uninterrupted run, and a different seed's head adopts the saved stream. A
    checkpoint without the extra state (weight and loss state only, as saved before) still loads strictly."""
    x = torch.randn(6, 8)
    labels = torch.randint(0, 100, (6,))
    run = mk.MarginHead(100, 8, mk.ArcFace(), sample_rate=0.2, seed=3, backend="torch")
    run(x, labels)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    run(x, labels)
    uninterrupted = run.sampled_classes
    resumed = mk.MarginHead(100, 8, mk.ArcFace(), sample_rate=0.2, seed=11, backend="torch")
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    resumed(x, labels)
    assert resumed.sampled_classes.equal(uninterrupted)
    fresh = mk.MarginHead(100, 8, mk.ArcFace(), sample_rate=0.2, seed=3, backend="torch")
    fresh(x, labels)
    assert not fresh.sampled_classes.equal(uninterrupted)  # the stream did advance: the test can fail
    old = {k: v for k, v in run.state_dict().items() if k != "_extra_state"}
    assert not fresh.load_state_dict(old).missing_keys
    with pytest.raises(ValueError, match="not a margin_kernels head checkpoint"):
        fresh.load_state_dict(dict(old, _extra_state={}))
    with pytest.raises(ValueError, match="checkpoint is for 100 classes x 8, this head has 100 x 16"):
        mk.MarginHead(100, 16, mk.ArcFace()).set_extra_state(run.get_extra_state())


def test_a_single_process_checkpoint_crosses_to_any_world_size_and_back():
    """A MarginHead's state_dict is the one-shard checkpoint of the distributed head: a world-size-1
    DistributedMarginHead loads it as it is (and draws the same classes next), reshard_state_dicts cuts it into
    two ranks' shards (weight rows, Center loss centers, the loss's buffers; no generator state for a new
    range), and the shards rejoin into a MarginHead equal to the original."""
    from margin_kernels.distributed import DistributedMarginHead, reshard_state_dicts
    x, labels = torch.randn(6, 8), torch.randint(0, 30, (6,))

    def build(cls, seed):
        return cls(30, 8, mk.CurricularFace(), sample_rate=0.5, seed=seed, backend="torch",
                   regularizers=[mk.CenterLoss(0.01)])
    single = build(mk.MarginHead, 1)
    single(x, labels).backward()
    state = single.state_dict()
    world_one = build(DistributedMarginHead, 9)
    world_one.load_state_dict(state)
    single(x, labels)
    world_one(x, labels)
    assert world_one.sampled_classes.equal(single.sampled_classes)
    pieces = [reshard_state_dicts([state], rows) for rows in ((17, 30), (0, 17))]
    assert pieces[1]["weight"].equal(state["weight"][:17]) and pieces[0]["weight"].equal(state["weight"][17:])
    centers = "regularizers.0.centers"
    assert pieces[0][centers].equal(state[centers][17:]) and pieces[1]["margin.t"].equal(state["margin.t"])
    assert all(p["_extra_state"]["sampler_state"] is None for p in pieces)
    rejoined = build(mk.MarginHead, 5)
    rejoined.load_state_dict(reshard_state_dicts(pieces, (0, 30)))
    for key, value in state.items():
        if key != "_extra_state":
            assert rejoined.state_dict()[key].equal(value), key


def test_a_generator_state_of_another_device_type_is_refused_with_a_warning():
    """A head built on a GPU saves a CUDA generator's state (16 bytes); one built on the CPU (e.g. to evaluate)
    cannot continue that stream: it loads, keeps its own draws and says so."""
    head = mk.MarginHead(100, 8, mk.ArcFace(), sample_rate=0.2, seed=3, backend="torch")
    before = head.sampler.get_state().clone()
    state = dict(head.state_dict(), _extra_state=dict(head.get_extra_state(),
                                                      sampler_state=torch.zeros(16, dtype=torch.uint8)))
    with pytest.warns(UserWarning, match="does not fit this head's cpu generator"):
        head.load_state_dict(state)
    assert head.sampler.get_state().equal(before)


def test_sampling_head_still_checks_labels_against_every_class():
    head = mk.MarginHead(50, 8, mk.ArcFace(), sample_rate=0.2, backend="torch")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        head(x, torch.tensor([1, 2, 50]))


def test_head_grad_filter_reaches_the_backward():
    x, w, labels = random_problem(8, 400, 16, dtype=torch.float32, seed=2)
    head = mk.MarginHead(400, 16, mk.ArcFace(), backend="torch", chunk_size=16, grad_filter=0.5)
    with torch.no_grad():
        head.weight.copy_(w)
    mk.reset_grad_filter_stats()
    head(x, labels).backward()
    stats = mk.grad_filter_stats()
    assert stats["total_tiles"] == 25 and stats["skipped_tiles"] > 0


def test_target_pair_is_computed_once_per_call(monkeypatch):
    from margin_kernels import ops
    calls = []
    original = ops.target_pairs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "target_pairs", counting)
    x, w, labels = random_problem(6, 30, 8, dtype=torch.float64)
    out = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="torch"), x, w)
    ref = loss_and_grads(lambda a, b: mk.margin_cross_entropy(a, b, labels, mk.ArcFace(), backend="reference"), x, w)
    assert len(calls) == 1  # the op's forward and backward reuse the pair computed before it
    assert rel_err(out[1], ref[1]) < FP64_END_TO_END and rel_err(out[2], ref[2]) < FP64_END_TO_END


def test_distributed_head_all_reduces_b_values_with_gradient(monkeypatch):
    """The target pair travels without gradient (2 x B, once); the differentiable all-reduce carries only the
    B shifted exponentials."""
    from margin_kernels.distributed import head as dhead
    sizes = []

    def recording(tensor, group):
        sizes.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(dhead, "all_reduce_replicated", recording)
    x, w, labels = random_problem(6, 30, 8, dtype=torch.float64)
    module = DistributedMarginHead(30, 8, mk.ArcFace(), backend="torch", dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(w)
    module(x, labels).backward()
    assert sizes == [(6,)]
