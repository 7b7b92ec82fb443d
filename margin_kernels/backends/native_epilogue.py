"""The fused C++/CUDA epilogues (csrc/) plugged into the chunk loop, and the backend built on them.

The loop (GEMMs by torch.mm: MKL on CPU, cuBLAS on CUDA) is ``chunk_loop``'s; the epilogue reads each B x chunk
tile once: forward divides by |w_j|, applies the negative function and scale, masks the target and merges
into the running max/sum; backward turns the recomputed tile into dL/d(x.w) with sum_i dc*c per class (in
place, or on CUDA with 16-bit operands into a half-size bf16/fp16 copy that the tensor-core GEMMs read), and
the dW normalisation backward is one pass over the dW GEMM's output (on CUDA also unscaling it and storing it
in the gradient's dtype). ``cpu_backend`` and ``cuda_backend`` are
instances of ``NativeBackend``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from ..losses.negatives import NegativeSpec
from ..losses.reductions import ReductionKind
from . import chunk_loop
from .chunk_loop import product_operand_dtype
from .contract import OpInputs, RowGrads
from .epilogue import TileGrad
from .gradient_scale import chunk_operand_scale


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take row-major matrices with any row stride; anything else is copied."""
    return t if t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) else t.contiguous()


def _tma_rows(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit operand of the CUTLASS kernels: unit column stride and 16-byte aligned rows (TMA), else copied."""
    aligned = t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) % 8 == 0) and t.data_ptr() % 16 == 0
    return t if aligned else t.contiguous()


class NativeEpilogue:
    """chunk_loop.Epilogue over the compiled extension ``ext`` (margin_kernels._C or _C_cuda)."""

    def __init__(self, ext):
        self._ext = ext

    def inv_norms(self, w, acc_dtype):
        if not w.is_cuda and w.dtype != acc_dtype:  # the CPU kernel reads fp32/fp64 (the loop converts anyway)
            w = w.to(acc_dtype)
        out = self._ext.inv_norms(_unit_stride_rows(w), _stream(w))
        return out if out.dtype == acc_dtype else out.to(acc_dtype)

    def forward_tile(self, cos, inv_norm, labels, col0, row_params, spec: NegativeSpec, run_max, run_sum, shift=None):
        self._ext.forward_tile(cos, inv_norm, labels, col0, row_params, int(spec.kind), spec.scale, spec.a, spec.b,
                               run_max, run_sum, _stream(cos), int(spec.reduction), spec.clamp, shift)

    def backward_tile(self, cos, inv_norm, labels, col0, row_params, spec: NegativeSpec, lse, g_lse, g_cos_target,
                      want_max_abs, grad_dtype=None, shift=None) -> TileGrad:
        col_dot = None if inv_norm is None else torch.empty(cos.shape[1], dtype=cos.dtype, device=cos.device)
        max_abs = torch.empty(1, dtype=cos.dtype, device=cos.device) if want_max_abs else None
        binary = spec.reduction == ReductionKind.SOFTPLUS_SUM
        # the binary reduction: per-class sums of dL/dz, summed here in a fixed order (the shift's gradient)
        col_shift = torch.empty(cos.shape[1], dtype=cos.dtype, device=cos.device) if binary else None
        grad, factor, inv_factor = cos, None, None
        if grad_dtype is not None:  # CUDA only: the kernel writes the scaled 16-bit copy, the tile is only read
            grad = torch.empty(cos.shape, dtype=grad_dtype, device=cos.device)
            factor, inv_factor = chunk_operand_scale(grad_dtype, spec, row_params, g_lse, g_cos_target, inv_norm)
        self._ext.backward_tile(cos, inv_norm, labels, col0, row_params, int(spec.kind), spec.scale, spec.a, spec.b,
                                lse, g_lse, g_cos_target, col_dot, max_abs,
                                grad_out=None if grad_dtype is None else grad, factor=factor, stream=_stream(cos),
                                reduction=int(spec.reduction), clamp=spec.clamp, shift=shift, col_shift=col_shift)
        return TileGrad(grad, col_dot, max_abs, inv_factor, None if col_shift is None else col_shift.sum().reshape(1))

    # the cuda backend's epilogue-fused CUTLASS GEMMs (cuda_variant.select chose them): the chunk's product x.w^T
    # and its epilogue in one kernel, the B x chunk fp32 tile never written
    def fused_forward(self, x, w, inv_norm, labels, col0, row_params, spec: NegativeSpec, run_max, run_sum,
                      shift=None, inv_norm_out=None):
        """The fused forward GEMM of one chunk. ``inv_norm_out`` (w's rows floats, ``inv_norm`` None): the kernel
        forms the inverse norms from the W tiles it multiplies (margin_sm90.h), writes them there and uses them."""
        self._ext.fused_forward(_tma_rows(x), _tma_rows(w), inv_norm, labels, col0, row_params, int(spec.kind),
                                spec.scale, spec.a, spec.b, run_max, run_sum, _stream(x), int(spec.reduction),
                                spec.clamp, shift, inv_norm_out)

    def fused_backward(self, x, w, inv_norm, labels, col0, row_params, spec: NegativeSpec, lse, g_lse,
                       g_cos_target, shift=None, col_parts: bool = False) -> TileGrad:
        """The recompute GEMM with the backward epilogue: dL/dcos in the operand dtype (with 1/|w_j| and the fp16
        factor, as backward_tile's 16-bit copy), per-class sum_i dc c and, for the binary reduction, dL/dz.
        ``col_parts`` (the next dW GEMM is ``fused_dw``): ``col_dot`` is the (row tiles, padded n, 2) partials
        of (sum dc c, sum dz) per 64-row tile, which fused_dw sums in its epilogue (no kernel in between)."""
        rows, cols = x.shape[0], w.shape[0]
        acc = row_params.dtype
        binary = spec.reduction == ReductionKind.SOFTPLUS_SUM
        col_dot = None if inv_norm is None or col_parts else torch.empty(cols, dtype=acc, device=x.device)
        col_shift = torch.empty(cols, dtype=acc, device=x.device) if binary and not col_parts else None
        # TMA stores rows of 16 bytes: the row stride rounded up to 8 elements, the view n wide
        grad = torch.empty(rows, -(-cols // 8) * 8, dtype=w.dtype, device=x.device)[:, :cols]
        factor, inv_factor = chunk_operand_scale(w.dtype, spec, row_params, g_lse, g_cos_target, inv_norm)
        parts = self._ext.fused_backward(_tma_rows(x), _tma_rows(w), inv_norm, labels, col0, row_params,
                                         int(spec.kind), spec.scale, spec.a, spec.b, lse, g_lse, g_cos_target,
                                         col_dot, grad, factor=factor, stream=_stream(x),
                                         reduction=int(spec.reduction), clamp=spec.clamp, shift=shift,
                                         col_shift=col_shift, col_parts=col_parts)
        if col_parts:
            shift_grad = parts[:, :cols, 1].sum().reshape(1) if binary else None
            return TileGrad(grad, None if inv_norm is None else parts, None, inv_factor, shift_grad)
        return TileGrad(grad, col_dot, None, inv_factor, None if col_shift is None else col_shift.sum().reshape(1))

    def fused_dw(self, grad, x, w, col_dot, inv_norm, inv_factor, out):
        """The chunk's dW GEMM grad^T x with finish_dw in its epilogue, into ``out`` (the sink's rows: the
        operand dtype or fp32); ``w`` the chunk's stored rows (the operand dtype); ``col_dot`` a vector or
        fused_backward's partials."""
        self._ext.fused_dw(grad, _tma_rows(x), _tma_rows(w), col_dot, inv_norm, inv_factor, out, _stream(out))

    def finish_dw(self, dw, w, col_dot, inv_norm, inv_factor=None, out=None):
        self._ext.finish_dw(dw, _unit_stride_rows(w), col_dot, inv_norm, out=out, inv_factor=inv_factor,
                            stream=_stream(dw))

    # sub-centers (used by subcenter_epilogue.SubCenterEpilogue): one fused pass each way over the chunk's tile
    def sub_center_max(self, cos, inv_norm, sub_centers):
        return self._ext.sub_center_max(cos, inv_norm, sub_centers, _stream(cos))

    def sub_center_scatter(self, grad, values, winner, inv_norm, sub_centers, out):
        col_dot = None if inv_norm is None else torch.empty(out.shape[1], dtype=out.dtype, device=out.device)
        self._ext.sub_center_scatter(grad, values, winner, inv_norm, sub_centers, out, col_dot, _stream(out))
        return out, col_dot


class NativeBackend:
    """A backend module's three functions over the chunk loop with the native epilogue.

    ``device_type`` is where its kernels run ("cpu" or "cuda"); inputs elsewhere get a ValueError naming the
    argument. Per-row inputs are made contiguous in the accumulation dtype once per call, not per tile.
    """

    def __init__(self, name: str, device_type: str):
        self.name, self.device_type = name, device_type

    def unavailable_reason(self) -> Optional[str]:
        if self.device_type == "cuda":
            if torch.version.cuda is None:
                return "the 'cuda' backend needs a CUDA build of torch (this torch is CPU-only)"
            if not torch.cuda.is_available():
                return "the 'cuda' backend needs a CUDA device (torch.cuda.is_available() is False)"
        return _native.load(with_cuda=self.device_type == "cuda")[1]

    def _epilogue(self) -> NativeEpilogue:
        ext, reason = _native.load(with_cuda=self.device_type == "cuda")
        if ext is None:
            raise RuntimeError(f"the {self.name!r} backend is unavailable: {reason}")
        return NativeEpilogue(ext)

    def _check(self, x, weight, labels, row_params, class_index):
        for arg, t in (("features", x), ("weight", weight), ("labels", labels), ("row_params", row_params)):
            if t.device.type != self.device_type:
                raise ValueError(f"backend={self.name!r} computes on {self.device_type} tensors, but {arg} is on "
                                 f"{t.device}")
        if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise ValueError(f"features {tuple(x.shape)} and weight {tuple(weight.shape)} must be (B, d) and (C, d)")
        if x.dtype != weight.dtype:
            raise TypeError(f"features ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if row_params.dtype not in (torch.float32, torch.float64) or tuple(row_params.shape) != (x.shape[0], 2):
            raise ValueError(f"row_params must be ({x.shape[0]}, 2) float32/float64, got {tuple(row_params.shape)} "
                             f"{row_params.dtype}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        if class_index is not None and class_index.device != weight.device:
            raise ValueError(f"class_index is on {class_index.device} but weight is on {weight.device}")

    @staticmethod
    def _row_vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).contiguous()

    def _inputs(self, inputs: OpInputs) -> OpInputs:
        """The inputs checked, with int64 ids and contiguous row parameters (once per call, not per tile)."""
        self._check(*inputs)
        x, weight, labels, row_params, class_index = inputs
        return OpInputs(x, weight, labels.long().contiguous(), row_params.contiguous(),
                        None if class_index is None else class_index.long())

    def lse_forward(self, inputs, config, state, fused: bool = False):
        """``fused``: the cuda backend's CUTLASS GEMMs (its caller decides, cuda_variant.select)."""
        inputs = self._inputs(inputs)
        return chunk_loop.chunked_forward(inputs, config, state, self._epilogue(),
                                          product_operand_dtype(config.product, inputs.x), fused=fused)

    def lse_backward(self, inputs, config, grads, state, fused: bool = False):
        inputs = self._inputs(inputs)
        epilogue = self._epilogue()
        grads = RowGrads(*(self._row_vector(t, inputs.row_params.dtype) for t in grads))
        return chunk_loop.chunked_backward(inputs, config, grads, state, epilogue,
                                           product_operand_dtype(config.product, inputs.x), fused=fused)
