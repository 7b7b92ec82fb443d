"""The gradient sink of a fused backward: where a backend hands each class chunk's finished dW rows.

A backend's backward normally stores a chunk's dW rows into the dense C x d gradient. Given a sink
(``lse_backward(..., sink=...)``) it calls ``sink.store(col0, col1, dw)`` instead, with the rows of columns
[col0, col1) in a chunk-sized buffer (the accumulation dtype; the sink may overwrite it), and allocates no
C x d tensor. ``UpdateSink`` adds the B target rows' norm gradient that the op computes outside the backend,
applies the optimizer's update to those weight rows and their state, and (dense mode with a class subset)
updates the rows no chunk visited with a zero gradient when ``finish()`` is called.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends.chunk_loop import ChunkSink

#: rows per block when updating the rows outside the step's class set (O(block x d) temporaries)
UNVISITED_BLOCK_ROWS = 8192


def add_extra_rows(dw: torch.Tensor, col0: int, col1: int, columns: torch.Tensor, values: torch.Tensor) -> None:
    """Add the ``values`` rows whose ``columns`` fall in [col0, col1) to the chunk's dW rows (deterministic)."""
    inside = (columns >= col0) & (columns < col1)
    if bool(inside.any()):
        dw.index_put_((columns[inside] - col0,), values[inside].to(dw.dtype), accumulate=True)


class AccumulateSink(ChunkSink):
    """No optimizer, but ``weight.grad`` already holds a gradient (micro-batch accumulation, or
    ``zero_grad(set_to_none=False)``): each chunk's rows are added into it in place (beta = 1), instead of
    autograd receiving a fresh C x d dW and adding it."""

    def __init__(self, grad: torch.Tensor, class_index: Optional[torch.Tensor], extra_columns: torch.Tensor,
                 extra_values: torch.Tensor):
        self.grad, self.class_index = grad, class_index
        self.extra_columns, self.extra_values = extra_columns, extra_values

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        add_extra_rows(dw, col0, col1, self.extra_columns, self.extra_values)
        if self.class_index is None:
            self.grad[col0:col1].add_(dw)
        else:
            self.grad.index_put_((self.class_index[col0:col1],), dw.to(self.grad.dtype), accumulate=True)

    def skip(self, col0: int, col1: int, scratch, dim: int) -> None:
        """A filtered-out chunk adds nothing."""


class UpdateSink(ChunkSink):
    def __init__(self, optimizer, param: torch.Tensor, class_index: Optional[torch.Tensor],
                 extra_columns: torch.Tensor, extra_values: torch.Tensor):
        """``extra_columns``/``extra_values``: gradient rows to add to the given columns (the target norms')."""
        self.optimizer, self.param, self.class_index = optimizer, param, class_index
        self.group, self.state, self.step = optimizer.begin_update(param)
        self.extra_columns, self.extra_values = extra_columns, extra_values
        dense_rest = class_index is not None and not optimizer.is_sparse(param)
        self.visited = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device) if dense_rest else None

    def store(self, col0: int, col1: int, dw: torch.Tensor) -> None:
        add_extra_rows(dw, col0, col1, self.extra_columns, self.extra_values)
        rows = (col0, col1) if self.class_index is None else self.class_index[col0:col1]
        self.optimizer.apply_rows(self.param, self.group, self.state, self.step, rows, dw)
        if self.visited is not None:
            self.visited[rows] = True

    def finish(self) -> None:
        """Dense mode with a class subset: torch's step with a zero gradient on every row not visited."""
        if self.visited is None:
            return
        dtype = self.optimizer.math_dtype_for(self.param)
        for start in range(0, self.param.shape[0], UNVISITED_BLOCK_ROWS):
            stop = min(start + UNVISITED_BLOCK_ROWS, self.param.shape[0])
            rows = (~self.visited[start:stop]).nonzero().squeeze(1) + start
            if rows.numel():
                zeros = torch.zeros((rows.numel(), self.param.shape[1]), dtype=dtype, device=self.param.device)
                self.optimizer.apply_rows(self.param, self.group, self.state, self.step, rows, zeros)
