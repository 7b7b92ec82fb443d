"""Gradient sinks: where a backward hands each class chunk's finished dW rows.

A backend's backward stores a chunk's dW rows into the dense C x d gradient (``DenseSink``, the default). Given
another sink (``CallState.sink``) it calls ``sink.store(col0, col1, dw)`` instead, with the rows of columns
[col0, col1) in a chunk-sized buffer (the accumulation dtype; the sink may overwrite it), and allocates no
C x d tensor: ``AccumulateSink`` adds them into an existing ``weight.grad`` in place, and a fused optimizer's
``optim.sink.UpdateSink`` applies its update to those rows. Both take the B target rows' norm gradient, which
the op computes outside the backend, into the chunks holding them (``ExtraRowsSink``).
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch

from ..subcenters import class_rows


def chunk_row_ids(class_index: Optional[torch.Tensor], col0: int, col1: int, sub_centers: int = 1):
    """Which weight rows columns [col0, col1) are (K adjacent rows per class with sub-centers): a (start, stop)
    pair without a class subset (a contiguous block), else their row ids."""
    if class_index is None:
        return col0 * sub_centers, col1 * sub_centers
    return class_rows(class_index[col0:col1], sub_centers)


class ChunkSink:
    """Where the loop puts each chunk's finished dW rows (K per class with sub-centers): the dense dW by default
    (``DenseSink``); a fused optimizer's update or an in-place add into an existing ``weight.grad``
    (``optim.sink``) otherwise, handed the rows in a chunk-sized accumulation-dtype buffer it may overwrite.
    ``class_index`` and ``sub_centers`` say which weight rows a chunk's columns are (``weight_rows``)."""

    def __init__(self, class_index: Optional[torch.Tensor], sub_centers: int = 1):
        self.class_index, self.sub_centers = class_index, sub_centers

    def weight_rows(self, col0: int, col1: int):
        """The weight rows of columns [col0, col1) (``chunk_row_ids``)."""
        return chunk_row_ids(self.class_index, col0, col1, self.sub_centers)

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        raise NotImplementedError

    def acc_buffer(self, col0: int, col1: int, scratch, dim: int) -> torch.Tensor:
        """Where the fp32 path's dW GEMM writes the chunk's rows."""
        return scratch.get("dw", (col1 - col0) * self.sub_centers, dim)

    def rows_buffer(self, col0: int, col1: int, w_stored: torch.Tensor, scratch) -> torch.Tensor:
        """Where the 16-bit path's finish_dw writes the chunk's rows (K = 1 there)."""
        return scratch.get("dw", col1 - col0, w_stored.shape[1])

    def skip(self, col0: int, col1: int, scratch, dim: int) -> None:
        """A filtered-out chunk: its gradient is zero (an update still runs it: decay and momentum)."""
        self.store(col0, col1, self.acc_buffer(col0, col1, scratch, dim).zero_())


class DenseSink(ChunkSink):
    """The default gradient sink: the dense dW (C x d, the weight's dtype), written chunk by chunk."""

    def __init__(self, weight: torch.Tensor, class_index: Optional[torch.Tensor], acc: torch.dtype,
                 sub_centers: int):
        super().__init__(class_index, sub_centers)
        # with a class subset only the sampled rows are written; the rest of dW must read as zero
        self.dweight = torch.empty_like(weight) if class_index is None else torch.zeros_like(weight)
        # the dW GEMM can write straight into dweight's rows (no copy) when they are a plain fp32/fp64 slice
        self.in_place = class_index is None and weight.dtype == acc and self.dweight.is_contiguous()

    def acc_buffer(self, col0: int, col1: int, scratch, dim: int) -> torch.Tensor:
        if self.in_place:
            return self.dweight[col0 * self.sub_centers:col1 * self.sub_centers]
        return super().acc_buffer(col0, col1, scratch, dim)

    def rows_buffer(self, col0: int, col1: int, w_stored: torch.Tensor, scratch) -> torch.Tensor:
        return self.dweight[col0:col1] if self.class_index is None else torch.empty_like(w_stored)

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        rows = self.weight_rows(col0, col1)
        if not isinstance(rows, tuple):
            self.dweight.index_copy_(0, rows, dw.to(self.dweight.dtype))
        elif dw.data_ptr() != self.dweight[rows[0]:rows[1]].data_ptr():
            self.dweight[rows[0]:rows[1]].copy_(dw)

    def skip(self, col0: int, col1: int, scratch, dim: int) -> None:
        """A filtered-out chunk: zero rows (with a class subset dW is zero already)."""
        if self.class_index is None:
            self.dweight[col0 * self.sub_centers:col1 * self.sub_centers].zero_()


class ExtraRowsSink(ChunkSink):
    """A sink that adds the op's B target-norm gradient rows to the chunks holding them before using them.
    ``positions`` are the rows' places in the loop's row order (column * K + sub-center): sorted once, with
    their values, and their chunk boundaries found by bisection on the host, so a chunk costs no device work
    and no synchronisation (one host copy of B ints per backward) unless it holds a target row."""

    def __init__(self, class_index: Optional[torch.Tensor], positions: torch.Tensor, values: torch.Tensor,
                 sub_centers: int):
        super().__init__(class_index, sub_centers)
        positions, order = torch.sort(positions, stable=True)  # stable: equal rows keep the batch order
        self.positions, self.values = positions, values[order]
        self._host_positions = positions.tolist()

    def _extra_range(self, col0: int, col1: int) -> tuple:
        row0, row1 = col0 * self.sub_centers, col1 * self.sub_centers
        return row0, bisect.bisect_left(self._host_positions, row0), bisect.bisect_left(self._host_positions, row1)

    def chunk_gradient(self, col0: int, col1: int, dw: torch.Tensor) -> torch.Tensor:
        """The chunk's dW rows with the target-norm rows that fall in it added (deterministic accumulation)."""
        row0, lo, hi = self._extra_range(col0, col1)
        if lo < hi:
            dw.index_put_((self.positions[lo:hi] - row0,), self.values[lo:hi].to(dw.dtype), accumulate=True)
        return dw

    def finish(self) -> None:
        """Called once after the loop."""


class AccumulateSink(ExtraRowsSink):
    """No optimizer, but ``weight.grad`` already holds a gradient (micro-batch accumulation, or
    ``zero_grad(set_to_none=False)``): each chunk's rows are added into it in place (beta = 1), instead of
    autograd receiving a fresh C x d dW and adding it."""

    def __init__(self, grad: torch.Tensor, class_index: Optional[torch.Tensor], positions: torch.Tensor,
                 values: torch.Tensor, sub_centers: int = 1):
        super().__init__(class_index, positions, values, sub_centers)
        self.grad = grad

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        dw = self.chunk_gradient(col0, col1, dw)
        rows = self.weight_rows(col0, col1)
        if isinstance(rows, tuple):
            self.grad[rows[0]:rows[1]].add_(dw)
        else:
            self.grad.index_put_((rows,), dw.to(self.grad.dtype), accumulate=True)

    def skip(self, col0: int, col1: int, scratch, dim: int) -> None:
        """A filtered-out chunk adds nothing (its target-norm rows still count)."""
        _, lo, hi = self._extra_range(col0, col1)
        if lo < hi:
            super().skip(col0, col1, scratch, dim)
