"""Bad sizes name the argument (issue 25 point 7): ``ArcFaceLoss(-1, 8)`` (pml adapter) once raised torch's
"negative dimension" and ``save_sharded(MarginHead(...), folder)`` an AttributeError on ``process_group``.
Every public constructor and function that takes a size, given a negative, zero, fractional, bool or string
one, raises a ValueError/TypeError whose message names the argument; and ``save_sharded`` takes the
single-process head (its state_dict is the one-shard checkpoint of the distributed head)."""
from __future__ import annotations

import pytest
import torch

import margin_kernels as mk
from margin_kernels import distributed
from margin_kernels.integrations import insightface, pml

BAD_SIZES = [-1, 0, 2.5, True, "3"]


def _margin_ce(chunk_size):
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    return mk.margin_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), mk.ArcFace(), chunk_size=chunk_size)


#: (what, argument, call(bad value)); every other argument valid
CASES = [
    ("MarginHead", "num_classes", lambda v: mk.MarginHead(v, 8, mk.ArcFace())),
    ("MarginHead", "embedding_dim", lambda v: mk.MarginHead(10, v, mk.ArcFace())),
    ("MarginHead", "chunk_size", lambda v: mk.MarginHead(10, 8, mk.ArcFace(), chunk_size=v)),
    ("DistributedMarginHead", "num_classes", lambda v: mk.DistributedMarginHead(v, 8, mk.ArcFace())),
    ("DistributedMarginHead", "embedding_dim", lambda v: mk.DistributedMarginHead(10, v, mk.ArcFace())),
    ("margin_cross_entropy", "chunk_size", _margin_ce),
    ("PartialFCSampler", "num_local", lambda v: distributed.PartialFCSampler(v, 0.5)),
    ("num_sampled", "num_local", lambda v: distributed.num_sampled(v, 0.5)),
    ("shard_range", "num_classes", lambda v: distributed.shard_range(v, 0, 2)),
    ("shard_range", "world_size", lambda v: distributed.shard_range(10, 0, v)),
    ("shard_ranges", "num_classes", lambda v: distributed.shard_ranges(v, 2)),
    ("shard_ranges", "world_size", lambda v: distributed.shard_ranges(10, v)),
    ("shard_size", "num_classes", lambda v: distributed.shard_size(v, 0, 2)),
    ("shard_size", "world_size", lambda v: distributed.shard_size(10, 0, v)),
    ("max_shard_size", "num_classes", lambda v: distributed.max_shard_size(v, 2)),
    ("max_shard_size", "world_size", lambda v: distributed.max_shard_size(10, v)),
    ("SubCenterArcFace", "sub_centers", lambda v: mk.SubCenterArcFace(sub_centers=v)),
    ("AdaCos", "num_classes", lambda v: mk.AdaCos(num_classes=v)),
    ("SphereFace2", "num_class", lambda v: mk.SphereFace2(num_class=v)),
    ("UniFace", "out_features", lambda v: mk.UniFace(out_features=v)),
    ("LSoftmax", "m", lambda v: mk.LSoftmax(m=v)),
    ("PartialFC_V2", "embedding_size", lambda v: insightface.PartialFC_V2(insightface.ArcFace(), v, 10)),
    ("PartialFC_V2", "num_classes", lambda v: insightface.PartialFC_V2(insightface.ArcFace(), 8, v)),
] + [(cls.__name__, arg, (lambda c, i: lambda v: c(*[v if j == i else 6 for j in range(2)]))(cls, i))
     for cls in (pml.ArcFaceLoss, pml.CosFaceLoss, pml.LargeMarginSoftmaxLoss, pml.SphereFaceLoss,
                 pml.NormalizedSoftmaxLoss, pml.SubCenterArcFaceLoss)
     for i, arg in enumerate(("num_classes", "embedding_size"))] + [
    ("SubCenterArcFaceLoss", "sub_centers", lambda v: pml.SubCenterArcFaceLoss(6, 6, sub_centers=v)),
    ("ArcFaceLoss", "chunk_size", lambda v: pml.ArcFaceLoss(6, 6, chunk_size=v)),
]


@pytest.mark.parametrize("bad", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("what,arg,call", CASES, ids=[f"{w}.{a}" for w, a, _ in CASES])
def test_a_bad_size_names_the_argument(what, arg, call, bad):
    with pytest.raises((ValueError, TypeError)) as info:
        call(bad)
    assert arg in str(info.value), f"{what}({arg}={bad!r}): {type(info.value).__name__}: {info.value}"


def test_save_sharded_takes_a_single_process_head(tmp_path):
    head = mk.MarginHead(10, 8, mk.ArcFace(), seed=1)
    path = distributed.save_sharded(head, str(tmp_path))
    assert path.endswith(".pt")
    loaded = mk.MarginHead(10, 8, mk.ArcFace(), seed=2)
    distributed.load_sharded(loaded, str(tmp_path))
    assert torch.equal(loaded.weight, head.weight)
    sharded = mk.DistributedMarginHead(10, 8, mk.ArcFace(), seed=3)  # world size 1: the same one shard
    distributed.load_sharded(sharded, str(tmp_path))
    assert torch.equal(sharded.weight, head.weight)
    with pytest.raises(TypeError, match="head"):
        distributed.save_sharded(torch.nn.Linear(2, 2), str(tmp_path))
