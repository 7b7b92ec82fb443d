"""The per-row negative statistics (margin_kernels/row_statistics.py): the chunked pass every fused backend
uses against the full-cosine one of the reference, for both kinds, with ignored rows, Partial FC and chunks
that do not divide C."""
import pytest
import torch
import torch.nn.functional as F

from margin_kernels import row_statistics as rs
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec
from tests.helpers import class_subset, random_problem
from tests.tolerances import FP64_SAME_SUMS


def _request(kind, batch, dtype):
    gen = torch.Generator().manual_seed(1)
    if kind == rs.NEGATIVE_LSE:  # AdaCos' kind: a per-row scale in U
        params = torch.stack([torch.zeros(batch), torch.rand(batch, generator=gen) * 20 + 1], dim=1)
        return rs.StatisticsRequest(kind, NegativeSpec(NegativeKind.ROW_SCALE, 1.0), params.to(dtype))
    params = torch.stack([torch.rand(batch, generator=gen) * 0.6 - 0.3, torch.zeros(batch)], dim=1)
    return rs.StatisticsRequest(kind, NegativeSpec(NegativeKind.AFFINE, 64.0, 1.1, 0.2), params.to(dtype))


@pytest.mark.parametrize("subset", [False, True], ids=["all_classes", "class_index"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", [rs.NEGATIVE_LSE, rs.HARD_NEGATIVES])
def test_chunked_statistics_equal_the_full_cosine_ones(kind, backend, subset):
    x, w, labels = random_problem(9, 41, 12, ignore_rows=(4,))
    index = None
    if subset:
        index, labels = class_subset(41, labels, 0)
    x_eff = F.normalize(x)
    request = _request(kind, 9, torch.float64)
    ours = rs.chunked(x_eff, w, labels, index, request, True, backend, 5, "storage")
    cols = w if index is None else w[index]
    cos = x_eff @ F.normalize(cols).t()
    is_target = F.one_hot(labels.clamp_min(0), cos.shape[1]).bool() & (labels >= 0).unsqueeze(1)
    ref = rs.from_cosines(cos, is_target, request)
    assert torch.allclose(ours, ref, rtol=FP64_SAME_SUMS, atol=FP64_SAME_SUMS)
    if kind == rs.HARD_NEGATIVES:
        assert (ref[:, 1] > 0).any() and (ref[:, 1] < cos.shape[1] - 1).any()  # the mask selects, not all/none
