"""The contract between a head and its regularisers, and the class-row gather they share.

A head calls every regulariser once per forward with the whole batch (``BatchRows``: in the model-parallel head
the *global* batch, gathered for a consumer replicated on every rank, so each rank computes the same terms and
runs backward from the same gradient). A regulariser that keeps per-class state (Center loss) holds only the
rows of the head's class shard and fetches the B rows of the batch with ``owned_rows`` + one all-reduce of
B x d values (each row from the rank that owns its class); nothing C x d is ever built besides the state itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..norms import row_norms


@dataclass
class BatchRows:
    """What a regulariser sees, one entry per row of the (global) batch.

    ``features`` are the head's input features (cast to the weight's dtype; None when no regulariser of the
    head asks for them), ``feature_norm`` their norms in ``acc`` dtype; both differentiable. ``labels`` are
    global class ids, -1 on ignored rows; ``valid`` marks the others. ``collectives`` is the model-parallel
    head's pair of sums over its group (``distributed.comm.GroupSums``); None in a ``MarginHead``, which never
    communicates, even in a process where torch.distributed is initialised (and regularisers never import
    distributed code)."""

    features: Optional[torch.Tensor]
    feature_norm: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    acc: torch.dtype
    collectives: Optional[object] = None

    def sum_replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of per-rank contributions, for a consumer replicated on every rank (identity
        backward); unchanged in one process."""
        return tensor if self.collectives is None else self.collectives.sum_replicated(tensor)

    def sum_values_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor without gradient; unchanged in one process."""
        return tensor if self.collectives is None else self.collectives.sum_values_(tensor)


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


def check_nonnegative(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def single_process_rows(features: torch.Tensor, columns: torch.Tensor,
                        class_index: Optional[torch.Tensor] = None) -> BatchRows:
    """The regularisers' view of a one-process batch from its safe column ids (``functional.safe_columns``: -1
    on rows without a usable label): class ids (through ``class_index`` when the columns index into it), -1
    on those rows; feature norms in the accumulation dtype."""
    valid = columns >= 0
    classes = columns.clamp_min(0)
    if class_index is not None:
        classes = class_index.long()[classes]
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    return BatchRows(features, row_norms(features, acc), torch.where(valid, classes, -torch.ones_like(classes)),
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


def class_totals(values: torch.Tensor, local: torch.Tensor, owned: torch.Tensor):
    """Per row: the sum of ``values`` over the owned rows of its class, and their count (0 and 0 on rows not
    owned). A B x B same-class product in ``values``' dtype (the accumulation dtype), so duplicates are summed
    there, never in low-precision storage, in a fixed order, with static shapes (no unique: torch.compile
    traces it); O(B^2 d), small next to the loss's O(B C d)."""
    same = (local.unsqueeze(1) == local.unsqueeze(0)) & owned.unsqueeze(1) & owned.unsqueeze(0)
    same = same.to(values.dtype)
    return same @ values, same.sum(dim=1)


class _OwnedRows(torch.autograd.Function):
    """rows[i] = table[local[i]] where ``owned[i]``, else 0. The backward writes each class's summed gradient
    (``class_totals``) once into a zero table gradient; rows not owned write zeros into one spare row past the
    end, so every write is deterministic (duplicates write identical values)."""

    @staticmethod
    def forward(ctx, table, local, owned, acc):
        ctx.save_for_backward(local, owned)
        ctx.table_shape, ctx.table_dtype, ctx.acc = table.shape, table.dtype, acc
        rows = table.index_select(0, torch.where(owned, local, torch.zeros_like(local)))
        return torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))

    @staticmethod
    def backward(ctx, grad):
        local, owned = ctx.saved_tensors
        totals, _ = class_totals(grad.to(ctx.acc), local, owned)
        spare = ctx.table_shape[0]
        table_grad = grad.new_zeros((spare + 1,) + tuple(ctx.table_shape[1:]), dtype=ctx.table_dtype)
        table_grad.index_put_((torch.where(owned, local, torch.full_like(local, spare)),),
                              totals.to(ctx.table_dtype))
        return table_grad[:spare], None, None, None


def owned_rows(table: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(B, d) rows of this shard's ``table`` at ``local`` (row ids into the shard) where ``owned``, zero
    elsewhere; differentiable in ``table`` when it requires grad."""
    if table.requires_grad and torch.is_grad_enabled():
        return _OwnedRows.apply(table, local, owned, acc)
    rows = table.index_select(0, torch.where(owned, local, torch.zeros_like(local)))
    return torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))
