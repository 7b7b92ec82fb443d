"""Autograd-aware collectives for a loss that every rank computes identically from gathered inputs.

The distributed head's forward is *replicated*: each rank ends with the same loss, and each runs backward from
the same upstream gradient. A gathered tensor is then consumed in one of two ways, which decides its backward:

* by a computation that differs per rank (the rank's own class shard, ``sum_grads=True``): each rank holds a
  partial gradient for every row, and the row's owner needs their sum -> reduce-scatter;
* by a computation repeated identically on every rank (the loss tail, ``sum_grads=False``): every rank already
  holds the whole gradient, so the owner keeps its own rows and nothing is communicated (summing would count
  it ``world`` times).

``all_reduce_replicated`` sums per-rank contributions (each rank's contribution computed only on that rank)
for a replicated consumer: its backward is the identity. With one process (or torch.distributed not
initialised) every function here is a no-op without communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the single-tensor collectives; older versions only have the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


class CollectiveError(RuntimeError):
    """A collective of the head failed on this rank: a peer died, raised outside the head, or did not reach
    the collective within the process group's timeout. The backend's own error is the ``__cause__``."""


def _collective(fn, *args, **kwargs):
    """Run one torch.distributed call; a failure becomes a CollectiveError saying which rank saw it and what
    it means (gloo's own message names a peer's address, not its rank)."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        group = kwargs.get("group")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveError(
            f"margin_kernels.distributed: {getattr(fn, '__name__', 'a collective')} failed on rank {rank} of "
            f"{world}: another rank died, raised outside the head, or did not reach this collective within the "
            f"process group's timeout (init_process_group(timeout=...)). Backend error: {exc}") from exc


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process_group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherStacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, rank, world, sum_grads):
        ctx.group, ctx.rank, ctx.world, ctx.sum_grads = group, rank, world, sum_grads
        tensor = tensor.contiguous()
        out = tensor.new_empty((world,) + tuple(tensor.shape))
        _collective(_all_gather_single, out.view((world * tensor.shape[0],) + tuple(tensor.shape[1:])), tensor,
                    group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        if not ctx.sum_grads:
            return grad[ctx.rank], None, None, None, None
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        _collective(_reduce_scatter_single, out, grad.view((ctx.world * grad.shape[1],) + tuple(grad.shape[2:])),
                    group=ctx.group)
        return out, None, None, None, None


def all_gather_stacked(tensor: torch.Tensor, group, *, sum_grads: bool) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape everywhere, at least 1-D) stacked: (world, *shape). See the module
    docstring for ``sum_grads``."""
    rank, world = group_rank_and_size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    return _GatherStacked.apply(tensor, group, rank, world, sum_grads)


@dataclass(frozen=True)
class RowLayout:
    """How a batch is split over ranks: rank r contributes ``sizes[r]`` rows (may differ, may be 0)."""

    sizes: tuple
    rank: int
    group: Optional[object] = None

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """First row of this rank's rows in the gathered batch."""
        return sum(self.sizes[:self.rank])


def gather_rows(tensor: torch.Tensor, layout: RowLayout, *, sum_grads: bool) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) in rank order: (layout.total, *rest). Uneven row counts are
    padded to the largest for the collective and stripped after (differentiably)."""
    if layout.world == 1:
        return tensor
    most = max(layout.sizes)
    pad = most - tensor.shape[0]
    if pad:
        tensor = torch.cat([tensor, tensor.new_zeros((pad,) + tuple(tensor.shape[1:]))])
    stacked = all_gather_stacked(tensor, layout.group, sum_grads=sum_grads)
    if all(n == most for n in layout.sizes):
        return stacked.reshape((layout.total,) + tuple(stacked.shape[2:]))
    return torch.cat([stacked[r, :n] for r, n in enumerate(layout.sizes)])


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone(memory_format=torch.contiguous_format)
        _collective(dist.all_reduce, out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_replicated(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of each rank's ``tensor``, for a consumer replicated on every rank (identity backward)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return tensor
    return _AllReduceReplicated.apply(tensor, group)


def all_reduce_sum_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over ranks, no autograd (values computed under no_grad)."""
    if group_rank_and_size(group)[1] > 1:
        _collective(dist.all_reduce, tensor, group=group)
    return tensor


def all_gather_objects(obj, group) -> list:
    """Every rank's picklable ``obj``, in rank order (slow; for error reports and one-off config checks)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return [obj]
    out = [None] * world
    _collective(dist.all_gather_object, out, obj, group=group)
    return out


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged forward; its gradient multiplied by ``factor`` backward."""
    return tensor if factor == 1 else _ScaleGradient.apply(tensor, factor)


def max_shift(lse_local: torch.Tensor, group) -> torch.Tensor:
    """Per-row max over ranks of the per-shard log-sum-exps (no gradient: any constant shift gives the same
    log-sum-exp and the same gradient), 0 where every shard is -inf. One all-reduce of B values."""
    shift = lse_local.detach().clone()
    if group_rank_and_size(group)[1] > 1:
        _collective(dist.all_reduce, shift, op=dist.ReduceOp.MAX, group=group)
    return torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)


def lse_from_shifted_sum(shift: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``shift + log(total)`` where ``total`` is the all-reduced sum of ``exp(lse_r - shift)``: the log-sum-exp
    over every shard's negatives; -inf where there is none (total 0), with a zero (not NaN) gradient there."""
    has = ~(total <= 0)  # NaN (a non-finite weight on some shard) counts as "has": it must reach the loss
    safe = torch.where(has, total, torch.ones_like(total))
    return torch.where(has, shift + torch.log(safe), torch.full_like(total, float("-inf")))


class _SumGradsAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        _collective(dist.all_reduce, grad, group=ctx.group)
        return grad, None


def sum_grads_across_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """``tensor`` itself forward; backward sums its gradient over the ranks. For a parameter replicated on
    every rank that each rank feeds into its own shard's share of the loss (the binary family's logit shift):
    every rank then holds the full gradient, so the replicas stay equal."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return tensor
    return _SumGradsAcrossRanks.apply(tensor, group)


@dataclass(frozen=True)
class GroupSums:
    """The two sums over ``group`` a regulariser needs (``regularizers.base.BatchRows.collectives``)."""

    group: Optional[object] = None

    def sum_replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_replicated(tensor, self.group)

    def sum_values_(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum_(tensor, self.group)
