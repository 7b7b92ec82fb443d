"""The contract between a head and its regularisers, and the class-row gather they share.

A head calls every regulariser once per forward with the whole batch (``BatchRows``: in the model-parallel head
the *global* batch, gathered for a consumer replicated on every rank, so each rank computes the same terms and
runs backward from the same gradient). A regulariser that keeps per-class state (Center loss) holds only the
rows of the head's class shard and fetches the B rows of the batch with ``owned_rows`` + one all-reduce of
B x d values (each row from the rank that owns its class); nothing C x d is ever built besides the state itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class BatchRows:
    """What a regulariser sees, one entry per row of the (global) batch.

    ``features`` are the head's input features (cast to the weight's dtype; None when no regulariser of the
    head asks for them), ``feature_norm`` their norms in ``acc`` dtype; both differentiable. ``labels`` are
    global class ids, -1 on ignored rows; ``valid`` marks the others. ``distributed`` is True in the
    model-parallel head, whose ``group`` (None: the default group) the regularisers reduce over; a
    ``MarginHead`` never communicates, even in a process where torch.distributed is initialised."""

    features: Optional[torch.Tensor]
    feature_norm: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    acc: torch.dtype
    distributed: bool = False
    group: Optional[object] = None

    def sum_replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of per-rank contributions, for a consumer replicated on every rank (identity
        backward); unchanged in one process."""
        if not self.distributed:
            return tensor
        from ..distributed.comm import all_reduce_replicated  # only model-parallel heads import distributed code
        return all_reduce_replicated(tensor, self.group)

    def sum_values_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor without gradient; unchanged in one process."""
        if not self.distributed:
            return tensor
        from ..distributed.comm import all_reduce_sum_
        return all_reduce_sum_(tensor, self.group)


class Regularizer(nn.Module):
    """Base of the head regularisers. ``bind`` is called once by the head that takes it (state sized for its
    class shard); ``per_row`` returns a (B,) term in ``rows.acc`` dtype (any value on ignored rows: the head
    zeroes them)."""

    #: whether ``per_row`` needs ``BatchRows.features`` (the distributed head then gathers the raw B x d rows)
    needs_features: bool = False
    #: names of the state tensors whose rows are the head's classes (sharded and resharded like the weight)
    class_rows: tuple = ()

    def __init__(self):
        super().__init__()
        self.bound = False

    def bind(self, **head) -> None:
        """``head``: num_classes, embedding_dim, shard_range, seed, dtype, device of the head taking it."""
        self.bound = True

    def per_row(self, rows: BatchRows) -> torch.Tensor:
        raise NotImplementedError


def single_process_rows(features: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        class_index: Optional[torch.Tensor] = None) -> BatchRows:
    """The regularisers' view of a one-process batch: class ids (through ``class_index`` when the labels index
    into it), -1 on rows whose label is ``ignore_index``; feature norms in the accumulation dtype."""
    valid = labels != ignore_index
    classes = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if class_index is not None:
        classes = class_index.long()[classes]
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    return BatchRows(features, features.to(acc).norm(dim=1), torch.where(valid, classes, -torch.ones_like(classes)),
                     valid, acc)


def check_regularizers(regularizers) -> list:
    """The head's ``regularizers`` argument as a list; TypeError/ValueError naming the argument otherwise."""
    if regularizers is None:
        return []
    if isinstance(regularizers, Regularizer):
        regularizers = [regularizers]
    if not isinstance(regularizers, (list, tuple)):
        raise TypeError(f"regularizers must be a list of margin_kernels regularizers (CenterLoss, RingLoss), got "
                        f"{type(regularizers).__name__}")
    for item in regularizers:
        if not isinstance(item, Regularizer):
            raise TypeError(f"regularizers must hold margin_kernels regularizers (CenterLoss, RingLoss), got "
                            f"{type(item).__name__}")
        if item.bound:
            raise ValueError(f"regularizers: {type(item).__name__} is already used by another head (its state is "
                             "sized for that head's classes); pass a new one")
    if len({id(item) for item in regularizers}) != len(regularizers):
        raise ValueError("regularizers: the same regularizer is listed twice")
    return list(regularizers)


def regularizer_rows(regularizers, rows: BatchRows) -> Optional[torch.Tensor]:
    """The sum of every regulariser's per-row term, or None without regularisers."""
    total = None
    for regularizer in regularizers:
        term = regularizer.per_row(rows)
        total = term if total is None else total + term
    return total


def sum_by_row(values: torch.Tensor, index: torch.Tensor):
    """(the distinct ``index`` values, the sum of ``values`` rows per distinct value in ``values``' dtype, the
    count of each). One index_put_ with accumulate=True (sorted, deterministic on every device) into a U x d
    buffer, so duplicates are summed in the accumulation dtype, never in the low-precision storage."""
    unique, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
    sums = values.new_zeros((unique.shape[0],) + tuple(values.shape[1:]))
    sums.index_put_((inverse,), values, accumulate=True)
    return unique, sums, counts


class _OwnedRows(torch.autograd.Function):
    """rows[i] = table[local[i]] where ``owned[i]``, else 0; the backward writes the B rows' summed gradient
    into a zero table gradient (deterministic, accumulated in the gradient's dtype before the one write)."""

    @staticmethod
    def forward(ctx, table, local, owned, acc):
        ctx.save_for_backward(local, owned)
        ctx.table_shape, ctx.table_dtype, ctx.acc = table.shape, table.dtype, acc
        rows = table.index_select(0, torch.where(owned, local, torch.zeros_like(local)))
        return torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))

    @staticmethod
    def backward(ctx, grad):
        local, owned = ctx.saved_tensors
        table_grad = grad.new_zeros(ctx.table_shape, dtype=ctx.table_dtype)
        if owned.any():
            unique, sums, _ = sum_by_row(grad[owned].to(ctx.acc), local[owned])
            table_grad.index_copy_(0, unique, sums.to(ctx.table_dtype))
        return table_grad, None, None, None


def owned_rows(table: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, d) rows of this shard's ``table`` at ``local`` (row ids into the shard) where ``owned``, zero
    elsewhere; differentiable in ``table`` when it requires grad."""
    if table.requires_grad and torch.is_grad_enabled():
        return _OwnedRows.apply(table, local, owned, acc)
    rows = table.index_select(0, torch.where(owned, local, torch.zeros_like(local)))
    return torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))
