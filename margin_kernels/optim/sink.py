"""The gradient sink of a fused optimizer (``backends.sinks`` says what a sink is): ``UpdateSink`` adds the B
target rows' norm gradient that the op computes outside the backend, applies the optimizer's update to those
weight rows and their state, and (dense mode with a class subset) updates the rows no chunk visited with a zero
gradient when ``finish()`` is called. ``FusedUpdate`` is the factory one head call hands the op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends.sinks import ExtraRowsSink

#: rows per block when updating the rows outside the step's class set (O(block x d) temporaries)
UNVISITED_BLOCK_ROWS = 8192


class UpdateSink(ExtraRowsSink):
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


class FusedUpdate:
    """The op's ``sink_factory`` for one call of a head with a fused optimizer: makes that call's
    ``UpdateSink`` when its backward starts, and remembers that it did (``applied``), so the head can refuse a
    second call whose backward would share one pass with this one before anything is written."""

    def __init__(self, optimizer, param: torch.Tensor):
        self.optimizer, self.param, self.applied = optimizer, param, False

    def __call__(self, class_index, positions, values, sub_centers: int) -> UpdateSink:
        self.applied = True
        return UpdateSink(self.optimizer, self.param, class_index, positions, values, sub_centers)
