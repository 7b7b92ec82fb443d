"""The gradient sink of a fused backward: where a backend hands each class chunk's finished dW rows.

A backend's backward normally stores a chunk's dW rows into the dense C x d gradient. Given a sink
(``lse_backward(..., sink=...)``) it calls ``sink.store(col0, col1, dw)`` instead, with the rows of columns
[col0, col1) in a chunk-sized buffer (the accumulation dtype; the sink may overwrite it), and allocates no
C x d tensor. ``UpdateSink`` adds the B target rows' norm gradient that the op computes outside the backend,
applies the optimizer's update to those weight rows and their state, and (dense mode with a class subset)
updates the rows no chunk visited with a zero gradient when ``finish()`` is called.
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch

from ..backends.chunk_loop import ChunkSink

#: rows per block when updating the rows outside the step's class set (O(block x d) temporaries)
UNVISITED_BLOCK_ROWS = 8192


class _ExtraRowsSink(ChunkSink):
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


class AccumulateSink(_ExtraRowsSink):
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


class UpdateSink(_ExtraRowsSink):
    """A fused optimizer's update of each chunk's weight rows and their state (``FusedOptimizer.apply_rows``)."""

    def __init__(self, optimizer, param: torch.Tensor, class_index: Optional[torch.Tensor],
                 positions: torch.Tensor, values: torch.Tensor, sub_centers: int = 1):
        super().__init__(class_index, positions, values, sub_centers)
        self.optimizer, self.param = optimizer, param
        self.group, self.state, self.step = optimizer.begin_update(param)
        dense_rest = class_index is not None and not optimizer.is_sparse(param)
        self.visited = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device) if dense_rest else None

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        dw = self.chunk_gradient(col0, col1, dw)
        rows = self.weight_rows(col0, col1)
        self.optimizer.apply_rows(self.param, self.group, self.state, self.step, rows, dw)
        if self.visited is not None:
            self.visited[rows] = True

    def finish(self) -> None:
        """Dense mode with a class subset: torch's step with a zero gradient on every row no chunk visited, a
        block of rows at a time. Where at most half of a block was visited (Partial FC's usual sample rates)
        the update runs on the whole contiguous block, one pass without gathers, with the visited rows of the
        weight and state (already stepped) put aside before and put back after; otherwise only the unvisited
        rows are gathered and updated."""
        if self.visited is None:
            return
        num_rows, dim = self.param.shape
        dtype = self.optimizer.math_dtype_for(self.param)
        tensors = self.optimizer.row_tensors(self.param, self.group, self.state)
        for start in range(0, num_rows, UNVISITED_BLOCK_ROWS):
            stop = min(start + UNVISITED_BLOCK_ROWS, num_rows)
            visited = self.visited[start:stop]
            kept = visited.nonzero().squeeze(1)
            if kept.numel() == stop - start:
                continue
            if 2 * kept.numel() > stop - start:
                rows = (~visited).nonzero().squeeze(1) + start
                zeros = torch.zeros((rows.numel(), dim), dtype=dtype, device=self.param.device)
                self.optimizer.apply_rows(self.param, self.group, self.state, self.step, rows, zeros)
                continue
            saved = [t[start:stop].index_select(0, kept) for t in tensors]
            zeros = torch.zeros((stop - start, dim), dtype=dtype, device=self.param.device)
            self.optimizer.apply_rows(self.param, self.group, self.state, self.step, (start, stop), zeros)
            for t, rows in zip(tensors, saved):
                t[start:stop].index_copy_(0, kept, rows)
