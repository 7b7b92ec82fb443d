"""Sub-centers in the chunk loop: an epilogue adapter that turns a chunk's (B, n K) tile of dot products into the
(B, n) per-class cosines any epilogue (PyTorch's, the fused C++/CUDA ones) already handles, and the per-class
gradient back into the (B, n K) operand of the dx / dW GEMMs.

The chunk's n classes own its n K weight rows (chunk boundaries fall on whole classes). Forward: normalise,
take each class's max (``subcenters.max_over_sub_centers``; the native epilogues' fused ``sub_center_max``,
csrc/margin_math.h's ``sub_center_best`` per element) and hand the (B, n) maxima to the inner epilogue
as already-normalised cosines. Backward: the same maxima and winners, the inner epilogue's dL/dc (B, n), then
dL/dc at each winning row and 0 at the others, written into the chunk's own GEMM buffer, and the per-row
sum_i dL/dc_ij c_ij of the normalisation backward. O(B n K) elementwise work per chunk, next to its
4 B n K d GEMM FLOPs; no B x C x K tensor.
"""
from __future__ import annotations

from ..subcenters import max_over_sub_centers, scatter_to_winners
from .epilogue import TileGrad


class SubCenterEpilogue:
    """chunk_loop.Epilogue over ``inner`` for losses with ``sub_centers`` > 1 rows per class."""

    def __init__(self, inner, sub_centers: int):
        self.inner, self.sub_centers = inner, sub_centers

    def inv_norms(self, w, acc_dtype):
        return self.inner.inv_norms(w, acc_dtype)

    def _class_cosines(self, cos, inv_norm):
        native = getattr(self.inner, "sub_center_max", None)  # the fused C++/CUDA pass (native_epilogue)
        if native is not None:
            return native(cos, inv_norm, self.sub_centers)
        if inv_norm is not None:
            cos.mul_(inv_norm)
        values, winner = max_over_sub_centers(cos, self.sub_centers)
        return values.contiguous(), winner

    def _row_gradient(self, grad, kept, winner, inv_norm, out):
        """(dL/d(x . w) over the n K rows, written into ``out``; per-row sum_i dL/dc c, or None)."""
        native = getattr(self.inner, "sub_center_scatter", None)
        if native is not None:
            return native(grad, kept, winner, inv_norm, self.sub_centers, out)
        col_dot = None
        if inv_norm is not None:
            col_dot = scatter_to_winners(grad * kept, winner, self.sub_centers).sum(dim=0)
        out = scatter_to_winners(grad, winner, self.sub_centers, out=out)
        if inv_norm is not None:
            out.mul_(inv_norm)
        return out, col_dot

    def forward_tile(self, cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift=None):
        values, _ = self._class_cosines(cos, inv_norm)
        self.inner.forward_tile(values, None, labels, col0, row_params, spec, run_max, run_sum, shift)

    def backward_tile(self, cos, inv_norm, labels, col0, row_params, spec, lse, g_lse, g_cos_target,
                      want_max_abs, grad_dtype=None, shift=None) -> TileGrad:
        if grad_dtype is not None:  # the chunk loop keeps sub-centers on its fp32 path
            raise ValueError("the sub-center epilogue writes the fp32 row gradient only (grad_dtype must be None)")
        values, winner = self._class_cosines(cos, inv_norm)
        kept = values.clone() if inv_norm is not None else None  # the native epilogues overwrite their tile
        tile = self.inner.backward_tile(values, None, labels, col0, row_params, spec, lse, g_lse, g_cos_target,
                                        want_max_abs)
        grad, col_dot = self._row_gradient(tile.grad, kept, winner, inv_norm, cos)
        return TileGrad(grad, col_dot, tile.max_abs)

    def finish_dw(self, dw, w_acc, col_dot, inv_norm, inv_factor=None, out=None):
        self.inner.finish_dw(dw, w_acc, col_dot, inv_norm, inv_factor, out=out)
