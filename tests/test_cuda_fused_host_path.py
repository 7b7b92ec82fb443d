"""The chunk loop's fused branch (``fused=True``: the cuda backend's CUTLASS path, chosen by cuda_variant.select)
on the CPU: every chunk goes through the epilogue's fused_forward / fused_backward instead of the GEMM and the
tile epilogue, and the backward continues on the 16-bit dL/dcos path (the dx GEMM, the fused dW GEMM with
finish_dw and the column sums in its epilogue, the sinks).

No GPU here, so the fused calls are emulated with the kernels' contract (csrc/cutlass/margin_sm90.h): the
product x.w^T in fp32, then the torch epilogue on it (forward: the rows' pairs merged in place; backward:
dL/dcos with 1/|w_j| and the fp16 factor in the operand dtype, per-class sums as per-row-tile partials; dW:
grad^T x in fp32, the partials summed in tile order, finish_dw into the sink's rows). What this checks is the host
side the GPU will run around the kernels: the per-chunk inverse norms and labels, the 16-bit path after the
fused backward, weight.grad accumulation and the fused optimizer sink, against the float64 reference. The
kernels themselves: bench/gpu_session.sh on the first lent sm_90 GPU."""
from __future__ import annotations

import pytest
import torch

from margin_kernels.backends import chunk_loop, torch_backend
from margin_kernels.backends.chunk_loop import _matmul_acc, mixed_mm
from tests.helpers import LOSS_NAMES, compare_with_references, make_loss
from tests.tolerances import bounds

DTYPES = (torch.bfloat16, torch.float16)
SINGLE_ROW = [name for name in LOSS_NAMES if make_loss(name).sub_centers == 1]
#: the recompute GEMM's partials: one per 64-row tile and class, the classes padded to its 128-column tile
PART_ROWS, PART_COLS = 64, 128


class _FusedOnCpu:
    """The torch epilogue with fused_forward / fused_backward emulated by an fp32 product and its tile calls."""

    def __init__(self, inner):
        self._inner = inner
        self.calls = {"forward": 0, "backward": 0, "dw": 0}
        self.widths = {"forward": [], "backward": []}  # each call's chunk of classes

    def __getattr__(self, name):
        return getattr(self._inner, name)

    # on CPU the loop hands fp32 copies of the 16-bit operands (_gemm_operand): their values are 16-bit ones
    def _check(self, x, w, row_params, which):
        assert self.storage in DTYPES, "the fused kernels take 16-bit operands"
        assert torch.equal(x, x.to(self.storage).to(x.dtype)) and torch.equal(w, w.to(self.storage).to(w.dtype))
        # the binding reads row_params as two contiguous columns: the loop hands it column-major once per call
        assert row_params[:, 0].is_contiguous() and row_params[:, 1].is_contiguous()
        self.calls[which] += 1
        self.widths[which].append(w.shape[0])

    def fused_forward(self, x, w, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift=None):
        self._check(x, w, row_params, "forward")
        cos = _matmul_acc(x, w.t(), row_params.dtype)
        self._inner.forward_tile(cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift)

    def fused_backward(self, x, w, inv_norm, labels, col0, row_params, spec, lse, g_lse, g_cos_target, shift=None,
                       col_parts=False):
        self._check(x, w, row_params, "backward")
        cos = _matmul_acc(x, w.t(), row_params.dtype)
        tile = self._inner.backward_tile(cos, inv_norm, labels, col0, row_params, spec, lse, g_lse, g_cos_target,
                                         False, grad_dtype=self.storage, shift=shift)
        if not col_parts or tile.col_dot is None:
            return tile
        # the kernel's partials: (ceil(B / 64) row tiles, n rounded up to 128, (sum dc c, sum dz)); any split
        # over the row tiles is the contract (fused_dw sums them in tile order), here all in tile 0
        rows, cols = cos.shape
        parts = torch.zeros(-(-rows // PART_ROWS), -(-cols // PART_COLS) * PART_COLS, 2, dtype=cos.dtype)
        parts[0, :cols, 0] = tile.col_dot
        return tile._replace(col_dot=parts)

    def fused_dw(self, grad, x, w, col_dot, inv_norm, inv_factor, out):
        # the kernel's contract (margin_sm90.h mk_sm90_dw): w the stored 16-bit rows, out the operand dtype or fp32
        assert w.dtype == self.storage and grad.dtype == self.storage and out.dtype in (self.storage, torch.float32)
        self.calls["dw"] += 1
        if col_dot is not None and col_dot.dim() == 3:  # the partials, summed in row-tile order
            tiles = col_dot[:, :w.shape[0], 0]
            col_dot = tiles[0].clone()
            for t in range(1, tiles.shape[0]):
                col_dot += tiles[t]
        dw = mixed_mm(grad.t(), x, torch.float32)
        self._inner.finish_dw(dw, w, col_dot, inv_norm, inv_factor, out=out)


@pytest.fixture
def fused_torch_backend(monkeypatch):
    """backend="torch" with the chunk loop's fused branch taken (the cuda backend's, as on an sm_90 GPU)."""
    epilogue = _FusedOnCpu(torch_backend._TORCH_EPILOGUE)

    def forward(inputs, config, state):
        epilogue.storage = inputs.weight.dtype
        return chunk_loop.chunked_forward(inputs, config, state, epilogue, None, fused=True)

    def backward(inputs, config, grads, state):
        epilogue.storage = inputs.weight.dtype
        return chunk_loop.chunked_backward(inputs, config, grads, state, epilogue, None, fused=True)

    monkeypatch.setattr(torch_backend, "lse_forward", forward)
    monkeypatch.setattr(torch_backend, "lse_backward", backward)
    return epilogue


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SINGLE_ROW)
def test_fused_branch_matches_reference(fused_torch_backend, name, dtype):
    kind = make_loss(name).negative_spec().kind
    # 83 classes in chunks of 32: a short last chunk (its col0 and inverse norms), raw and normalised weights
    errors = compare_with_references("torch", name, dtype, reference_dtypes=(torch.float64, dtype))
    assert fused_torch_backend.calls["forward"] and fused_torch_backend.calls["backward"]
    assert fused_torch_backend.calls["dw"] == fused_torch_backend.calls["backward"]  # 16-bit storage: fused dW
    for ref_dtype, bound in bounds("cuda", dtype, kind).items():
        assert not bound.violations(errors[ref_dtype]), (ref_dtype, errors[ref_dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_branch_accumulates_into_weight_grad(fused_torch_backend, dtype):
    import margin_kernels as mk
    torch.manual_seed(0)
    head = mk.MarginHead(40, 16, make_loss("arcface"), backend="torch", chunk_size=16, dtype=dtype)
    x = torch.randn(6, 16, dtype=dtype)
    labels = torch.randint(0, 40, (6,))
    head(x, labels).sum().backward()
    first = head.weight.grad.clone()
    head(x, labels).sum().backward()
    assert fused_torch_backend.calls["backward"] == 2 * 3  # 40 classes in chunks of 16, two calls
    assert fused_torch_backend.calls["dw"] == 2 * 3  # the fused dW GEMM into the sink's fp32 rows
    # the second backward adds the same gradient: 2 g within the storage dtype's rounding of the sum
    assert torch.allclose(head.weight.grad.float(), 2 * first.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["arcface", "sphereface2"])  # an LSE and a binary-family loss
def test_fused_branch_sums_dx_over_several_groups(fused_torch_backend, name, dtype):
    from margin_kernels.backends.chunk_loop import DX_GROUP
    # 83 classes in chunks of 2: 42 chunks, so the grouped dx sum flushes two full groups and a partial one
    errors = compare_with_references("torch", name, dtype, chunk_size=2, reference_dtypes=(torch.float64, dtype))
    assert fused_torch_backend.calls["backward"] == 42 > 2 * DX_GROUP
    kind = make_loss(name).negative_spec().kind
    for ref_dtype, bound in bounds("cuda", dtype, kind).items():
        assert not bound.violations(errors[ref_dtype]), (ref_dtype, errors[ref_dtype])


def test_fused_chunk_widths():
    """The fused path's default chunks (chunk_loop.fused_chunk_sizes): the backward's 16-bit dL/dcos chunk is
    FUSED_GRAD_BYTES (32 MiB, in L2) within its bounds; the forward spans C = 1e6 in one launch at B = 512
    (its partials: 8 bytes per row and 256 columns, 64 MiB at most); Partial FC's forward gathers per chunk."""
    from margin_kernels.backends.chunk_loop import fused_chunk_sizes
    assert fused_chunk_sizes(512) == (1 << 22, 32768)  # 512 x 32768 x 2 B = 32 MiB; 512 x 2^22 / 256 x 8 B = 64 MiB
    assert fused_chunk_sizes(1024) == (1 << 21, 16384)
    assert fused_chunk_sizes(256)[1] == fused_chunk_sizes(64)[1] == 65536  # FUSED_MAX_CHUNK
    assert fused_chunk_sizes(8192)[1] == 4096  # FUSED_MIN_CHUNK (the dL/dcos chunk is then 64 MiB)
    assert fused_chunk_sizes(512, partial_fc=True) == (32768, 32768)


def test_default_chunks_are_the_fused_widths(fused_torch_backend, monkeypatch):
    """Without a chunk_size the fused branch runs the forward in one chunk and the backward in
    fused_chunk_sizes' chunks (here shrunk to 32 classes: 12 rows x 32 x 2 bytes), each with the call's
    column-major row_params (checked in _FusedOnCpu._check)."""
    monkeypatch.setattr(chunk_loop, "FUSED_GRAD_BYTES", 12 * 32 * 2)
    monkeypatch.setattr(chunk_loop, "FUSED_MIN_CHUNK", 8)
    errors = compare_with_references("torch", "arcface", torch.bfloat16, chunk_size=None,
                                     reference_dtypes=(torch.float64,))
    assert fused_torch_backend.widths == {"forward": [83], "backward": [32, 32, 19]}
    for ref_dtype, bound in bounds("cuda", torch.bfloat16, make_loss("arcface").negative_spec().kind).items():
        if ref_dtype in errors:
            assert not bound.violations(errors[ref_dtype]), (ref_dtype, errors[ref_dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["arcface", "cosface", "combined", "curricularface", "adaface"])
def test_partial_fc_through_the_fused_branch(fused_torch_backend, name, dtype):
    """Partial FC on the fused path: each chunk's sampled rows gathered (the kernels read the copy), the dW rows
    scattered back by the sink, against the reference on the same class subset."""
    errors = compare_with_references("torch", name, dtype, class_index=True, reference_dtypes=(torch.float64, dtype))
    assert fused_torch_backend.calls["forward"] and fused_torch_backend.calls["dw"]
    kind = make_loss(name).negative_spec().kind
    for ref_dtype, bound in bounds("cuda", dtype, kind).items():
        assert not bound.violations(errors[ref_dtype]), (ref_dtype, errors[ref_dtype])


@pytest.mark.parametrize("sample_rate", [1.0, 0.4])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_optimizer_sink_through_the_fused_branch(fused_torch_backend, kind, sample_rate):
    """A fused optimizer's sink fed by the fused dW GEMM (bf16 weights, fp32 state; Partial FC at 0.4): the
    trajectory of tests/test_fused_optim.py within its bounds."""
    from tests.test_fused_optim import ADAMW, SGD_CASES, assert_trajectory
    options = ADAMW if kind == "adamw" else SGD_CASES["momentum"]
    assert_trajectory(kind, options, backend="torch", dtype=torch.bfloat16, steps=4, sample_rate=sample_rate)
    assert fused_torch_backend.calls["dw"] >= 4
