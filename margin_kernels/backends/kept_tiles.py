"""Kept tiles: what the forward hands to the backward so that the backward can skip its recompute GEMM.

The backward of the loss needs the B x C dot products x_i . w_j again. Without a memory budget every backend
recomputes them, chunk by chunk (four B x C x d GEMMs per step: forward, recompute, dx, dW). With a budget
(``margin_kernels.memory_budget``) the forward writes the tiles of the first ``keep_cols`` columns into one
flat buffer, an output of the custom op (``ops.margin_lse``) saved for its backward, and the backward reads
them instead of recomputing: three GEMMs for the kept columns, four for the rest.

One flat buffer, because a custom op's outputs are a fixed list of tensors of sizes known from its arguments
(``torch.compile`` traces the op through its fake implementation): ``numel`` is a formula of (B, columns,
keep_cols, normalise), whatever is kept. Layout, in the accumulation dtype (fp32; fp64 for fp64 inputs):

    [ 1/||w_j|| for every column (normalised losses, backends.stores_norms) | kept tiles, B * keep_cols ]

The kept columns are stored chunk-major: a backend walks the columns in chunks of ``chunk`` (the same steps
in forward and backward) and, of the ``keep_cols`` columns the buffer has room for, uses the whole chunks
(``KeptTiles.use_chunk``: the chunk boundaries, so the order of every accumulation, do not depend on the
budget; all columns when they all fit); the tile of chunk [col0, col1) is one contiguous row-major
B x (col1 - col0) block starting at element B * col0 of the tile part. A chunked backend's GEMM
writes straight into it and reads it back as a plain matrix; the Triton kernels address the same layout.
What a tile holds is the backend's own: the chunk loop keeps the raw GEMM output x . w (its epilogue divides
by ||w||), the Triton kernels the normalised cosine. The chunk loop writes the inverse norms once per call
in forward and reads them in backward (never recomputed per chunk); the Triton forward writes them only when
it keeps tiles (its backward forms them from the W tile it loads anyway when it recomputes), so for Triton
the buffer has the norm part only under a budget (``backends.stores_norms`` decides, for the op and its fake).

The tiles are kept in the accumulation dtype, not rounded to the storage dtype: they are the GEMM's fp32
output, and rounding them would make the budgeted gradients differ from the recomputed ones. The decision
recompute-or-reuse is ``KeptTiles.tile`` (None: recompute), here and nowhere else.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


def keep_columns(budget_bytes: int, batch: int, num_cols: int, acc_dtype: torch.dtype) -> int:
    """How many columns' B x 1 tiles fit in ``budget_bytes`` (all of them, at most)."""
    if budget_bytes <= 0 or batch <= 0:
        return 0
    itemsize = torch.finfo(acc_dtype).bits // 8
    return max(0, min(num_cols, budget_bytes // (batch * itemsize)))


def saved_numel(batch: int, num_cols: int, keep_cols: int, normalize: bool) -> int:
    """Elements of the flat buffer (the fake implementation of the op allocates exactly this)."""
    return (num_cols if normalize else 0) + batch * keep_cols


def kept_whole_chunks(keep_cols: int, num_cols: int, chunk: int) -> int:
    """The columns actually kept: every column if all fit, else the whole chunks among the first keep_cols."""
    return num_cols if keep_cols >= num_cols else keep_cols // chunk * chunk


def chunks(num_cols: int, chunk: int) -> Iterator[tuple]:
    """(col0, col1) of every chunk of a pass."""
    for col0 in range(0, num_cols, chunk):
        yield col0, min(col0 + chunk, num_cols)


class KeptTiles:
    """A view of the op's flat buffer: ``inv_norm`` (or None) and the kept tiles (see the module docstring)."""

    def __init__(self, flat: torch.Tensor, batch: int, num_cols: int, keep_cols: int, normalize: bool):
        norms = num_cols if normalize else 0
        assert flat.numel() == saved_numel(batch, num_cols, keep_cols, normalize), "kept-tile buffer size"
        self.flat, self.batch, self.num_cols, self.keep_cols = flat, batch, num_cols, keep_cols
        #: the columns whose tiles are kept, once the backend has said its chunk (``use_chunk``)
        self.kept = 0
        self.inv_norm: Optional[torch.Tensor] = flat[:norms] if normalize else None
        self._tiles = flat[norms:]

    @classmethod
    def allocate(cls, batch: int, num_cols: int, keep_cols: int, normalize: bool, dtype: torch.dtype,
                 device) -> "KeptTiles":
        flat = torch.empty(saved_numel(batch, num_cols, keep_cols, normalize), dtype=dtype, device=device)
        return cls(flat, batch, num_cols, keep_cols, normalize)

    def use_chunk(self, chunk: int) -> int:
        """Called by a backend at the start of each pass with its chunk; returns the kept column count."""
        self.kept = kept_whole_chunks(self.keep_cols, self.num_cols, chunk)
        return self.kept

    def tile(self, col0: int, col1: int) -> Optional[torch.Tensor]:
        """The B x (col1 - col0) kept tile of the chunk [col0, col1), or None: recompute it."""
        if col1 > self.kept:
            return None
        return self._tiles[self.batch * col0: self.batch * col1].view(self.batch, col1 - col0)

    @property
    def tiles(self) -> torch.Tensor:
        """The tile part as one flat vector (the Triton kernels address it themselves)."""
        return self._tiles
