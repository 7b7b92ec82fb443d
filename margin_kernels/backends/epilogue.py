"""The epilogue contract of the chunk loop (``chunk_loop``): the elementwise work on a (B x chunk) tile of fp32 dot
products, written once per backend (``torch_backend.TorchEpilogue``, ``native_epilogue.NativeEpilogue``) and
wrapped for sub-centers (``subcenter_epilogue``). Its own module so that the loop and the adapters import it
from below, not from each other."""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from ..losses.negatives import NegativeSpec


class TileGrad(NamedTuple):
    """What the backward epilogue hands back to the loop for one tile."""

    grad: torch.Tensor  #: dL/d(x_i . w_j), the operand of the dx and dW GEMMs (includes 1/|w_j| when normalised)
    #: sum_i dL/dc_ij * c_ij per class (normalised weights only); from a fused_backward(col_parts=True), its
    #: (row tiles, padded n, 2) partials instead, which only the epilogue's fused_dw reads
    col_dot: Optional[torch.Tensor]
    max_abs: Optional[torch.Tensor]  #: max |dL/dc_ij| over the tile (only when asked: gradient filtering)
    #: 1/factor when ``grad`` was multiplied by a power of two before rounding to fp16 (gradient_scale), else None
    inv_factor: Optional[torch.Tensor] = None
    #: the binary reduction: sum over the tile's negatives of dL/dz_ij, the tile's share of the shift's gradient
    shift_grad: Optional[torch.Tensor] = None


class Epilogue(Protocol):
    """The elementwise work of the loop. ``inv_norm`` is None when the loss uses raw weights; ``cos`` holds
    the raw dot products x_i . w_j (the epilogue divides by |w_j| itself) and may be overwritten."""

    def inv_norms(self, w: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
        """1 / max(|w_j|, eps) for the rows of a chunk of W, in acc_dtype."""

    def forward_tile(self, cos: torch.Tensor, inv_norm: Optional[torch.Tensor], labels: torch.Tensor, col0: int,
                     row_params: torch.Tensor, spec: NegativeSpec, run_max: torch.Tensor,
                     run_sum: torch.Tensor, shift: Optional[torch.Tensor] = None) -> None:
        """Merge logits of the negatives of this tile into the running max/sum (in place); for the binary
        reduction add the tile's softplus terms of z + shift to run_sum (run_max stays unused)."""

    def backward_tile(self, cos: torch.Tensor, inv_norm: Optional[torch.Tensor], labels: torch.Tensor, col0: int,
                      row_params: torch.Tensor, spec: NegativeSpec, lse: torch.Tensor, g_lse: torch.Tensor,
                      g_cos_target: torch.Tensor, want_max_abs: bool,
                      grad_dtype: Optional[torch.dtype] = None, shift: Optional[torch.Tensor] = None) -> TileGrad:
        """dL/dcos for this tile (target column: g_cos_target), ready for the GEMMs: in place in the tile, or,
        with ``grad_dtype`` (a 16-bit GEMM operand dtype), a new tile in that dtype, scaled for fp16 as
        ``gradient_scale`` says (the factor includes the 1/|w_j| folded into it); for the binary reduction also
        the tile's sum of dL/dz (``shift_grad``)."""

    def finish_dw(self, dw: torch.Tensor, w: torch.Tensor, col_dot: Optional[torch.Tensor],
                  inv_norm: Optional[torch.Tensor], inv_factor: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None) -> None:
        """The dW GEMM output's epilogue: dw_j * inv_factor - col_dot_j / |w_j|^2 * w_j (the normalisation
        backward; no col_dot: raw weights), in place, or written to ``out`` (the gradient's rows, in their
        dtype). Without inv_factor and out (the fp32 path) ``w`` is in dw's dtype and col_dot is given."""
