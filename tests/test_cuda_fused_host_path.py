"""The chunk loop's fused branch (``fused=True``: the cuda backend's CUTLASS path, chosen by cuda_variant.select)
on the CPU: every chunk goes through the epilogue's fused_forward / fused_backward instead of the GEMM and the
tile epilogue, and the backward continues on the 16-bit dL/dcos path (the dx GEMM, the fused dW GEMM with
finish_dw and the column sums in its epilogue, the sinks).

No GPU here, so the fused calls are emulated with the kernels' contract (csrc/cutlass/margin_sm90.h): the
product x.w^T in fp32, then the torch epilogue on it (forward: with 16-bit storage the inverse norms formed from
the chunk's rows in the kernel's order of summation, written to the store's slice and used; the rows' pairs
merged in place; backward:
dL/dcos with 1/|w_j| and the fp16 factor in the operand dtype, per-class sums as per-row-tile partials; dW:
grad^T x in fp32, the partials summed in tile order, finish_dw into the sink's rows). What this checks is the host
side the GPU will run around the kernels: the per-chunk inverse norms and labels, the 16-bit path after the
fused backward, weight.grad accumulation and the fused optimizer sink, against the float64 reference. The
kernels themselves: bench/gpu_session.sh on the first lent sm_90 GPU."""
from __future__ import annotations

import pytest
import torch

from margin_kernels import norms
from margin_kernels.backends import chunk_loop, torch_backend
from margin_kernels.backends.chunk_loop import _matmul_acc, mixed_mm
from tests.helpers import LOSS_NAMES, compare_with_references, make_loss
from tests.tolerances import NATIVE_INV_NORM_F32, bounds

DTYPES = (torch.bfloat16, torch.float16)
SINGLE_ROW = [name for name in LOSS_NAMES if make_loss(name).sub_centers == 1]
#: the recompute GEMM's partials: one per 64-row tile and class, the classes padded to its 128-column tile
PART_ROWS, PART_COLS = 64, 128
#: the fused forward's K steps, each summed in two halves (margin_sm90.h mk_sm90_forward's inv_norm_out)
NORM_K_STEP, NORM_HALF = 64, 32


def kernel_inverse_norms(w: torch.Tensor) -> torch.Tensor:
    """1/max(||w_j||, eps) as the fused forward forms it (margin_sm90.h, inv_norm_out): in fp32, s_j = h0 + h1
    with h_b the running sum of w_jk^2 over k = 64 t + 32 b + i (t = 0, 1, .., i = 0 .. 31, in that order; the
    zero padding of the last step adds nothing), then margin_math.h's inv_norm_from_sumsq; a row whose s_j is
    inf takes the rescue: inv_norm_rescaled(max |w_jk|, sum_k (w_jk / max)^2 in k order)."""
    rows, dim = w.shape
    padded = torch.zeros(rows, -(-dim // NORM_K_STEP) * NORM_K_STEP, dtype=torch.float32)
    padded[:, :dim] = w.float()
    halves = padded.view(rows, -1, 2, NORM_HALF).transpose(1, 2).reshape(rows, 2, -1)
    h = torch.zeros(rows, 2, dtype=torch.float32)
    for k in range(halves.shape[2]):  # one fp32 add per step, in the kernel's order (each square is exact)
        h += halves[:, :, k] * halves[:, :, k]
    sumsq = h[:, 0] + h[:, 1]
    inv = 1.0 / torch.sqrt(sumsq).clamp_min(norms.NORM_EPS)
    for j in torch.nonzero(torch.isinf(sumsq)).flatten().tolist():  # the rescue (rare: ||w|| > ~1.8e19)
        top = w[j].float().abs().max()
        if torch.isinf(top):
            inv[j] = 0.0
            continue
        unit = torch.zeros((), dtype=torch.float32)
        for v in w[j].float() / top:
            unit = unit + v * v
        inv[j] = (1.0 / torch.sqrt(unit)) / top
    return inv


class _FusedOnCpu:
    """The torch epilogue with fused_forward / fused_backward emulated by an fp32 product and its tile calls."""

    def __init__(self, inner):
        self._inner = inner
        self.calls = {"forward": 0, "backward": 0, "dw": 0}
        self.widths = {"forward": [], "backward": []}  # each call's chunk of classes
        self.norm_passes = 0  # the epilogue's own inverse-norm passes (inv_norms), whatever the phase
        self.formed = []  # the forward's inv_norm_out of each chunk (views of the op's store)
        self.read = []  # the inverse norms each backward chunk was handed (copies)

    def inv_norms(self, weight, acc):
        self.norm_passes += 1
        return self._inner.inv_norms(weight, acc)

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

    def fused_forward(self, x, w, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift=None,
                      inv_norm_out=None):
        self._check(x, w, row_params, "forward")
        if inv_norm_out is not None:  # the kernel forms the norms of its rows, stores them, then uses them
            assert inv_norm is None and inv_norm_out.shape == (w.shape[0],)
            inv_norm_out.copy_(kernel_inverse_norms(w))
            inv_norm = inv_norm_out
            self.formed.append(inv_norm_out)
        cos = _matmul_acc(x, w.t(), row_params.dtype)
        self._inner.forward_tile(cos, inv_norm, labels, col0, row_params, spec, run_max, run_sum, shift)

    def fused_backward(self, x, w, inv_norm, labels, col0, row_params, spec, lse, g_lse, g_cos_target, shift=None,
                       col_parts=False):
        self._check(x, w, row_params, "backward")
        self.read.append(None if inv_norm is None else inv_norm.clone())
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


@pytest.mark.parametrize("value", [None, 1e20, 1e30, 3e38], ids=["plain", "1e20", "1e30", "3e38"])
def test_fused_forward_forms_the_norms_the_backward_reads(fused_torch_backend, value):
    """16-bit storage: the fused forward's kernel forms each chunk's inverse norms (no separate pass over W, no
    per-chunk pass either), the op's store holds them (1/||w_j|| within the native fp32 bound, the rescued
    huge rows included: a bf16 row of norm 1e20 and more sums its squares to inf in fp32), and the backward
    reads exactly those; loss and gradients against the float64 reference (test_huge_norms' problem and bounds)."""
    from tests.test_huge_norms import _errors, _problem, _run
    from tests.tolerances import subnormal_bounds
    x, w, y, rows = _problem("arcface", "weight", 1.0 if value is None else value, torch.bfloat16)
    out = _run("torch", "arcface", x, w, y)
    assert fused_torch_backend.calls["forward"] == 1 and fused_torch_backend.norm_passes == 0
    (formed,) = fused_torch_backend.formed
    want = norms.inverse_norms(w.float(), torch.float32)
    assert torch.all((formed - want).abs() <= NATIVE_INV_NORM_F32 * want.abs()), (formed, want)
    if value is not None:  # the scaled rows took the rescue: the plain sum is inf
        assert torch.isinf((w[rows].float() ** 2).sum(1)).all() and torch.all(formed[rows] > 0)
    assert fused_torch_backend.read and all(torch.equal(r, formed) for r in fused_torch_backend.read)
    ref = _run("reference", "arcface", x.double(), w.double(), y)
    margin = make_loss("arcface")
    bound = bounds("cuda", torch.bfloat16, margin.negative_kind)[torch.float64]
    extra = subnormal_bounds(torch.bfloat16, 0.0 if value is None else value, margin.s)
    loss_err, dx_err, dw_err = _errors(out, ref, x.double(), w.double())
    assert loss_err <= bound.loss + extra[0] and dx_err <= bound.dx + extra[1] and dw_err <= bound.dw + extra[2], \
        (loss_err, dx_err, dw_err)


def test_fp32_storage_keeps_its_norm_pass(fused_torch_backend):
    """fp32 storage under a 16-bit product: the kernel would see the rounded copy, so the norms stay those of
    the stored fp32 rows, formed by the loop's own pass and handed to the kernel (no inv_norm_out)."""
    epilogue = fused_torch_backend
    epilogue.storage = torch.bfloat16  # the product's dtype (_check: the operands hold its values)
    torch.manual_seed(0)
    x = torch.randn(6, 16).bfloat16().float()
    w = torch.randn(40, 16).bfloat16().float()
    labels = torch.randint(0, 40, (6,))
    from margin_kernels.backends.contract import CallState, OpConfig, OpInputs
    from margin_kernels.backends.kept_tiles import KeptTiles
    spec = make_loss("arcface").negative_spec()
    store = KeptTiles.allocate(6, 40, 0, True, torch.float32, "cpu")
    row_params = torch.zeros(6, 2)
    config = OpConfig(spec=spec, normalize_weight=True, chunk_size=16)
    chunk_loop.chunked_forward(OpInputs(x, w, labels, row_params, None), config, CallState(store=store), epilogue,
                               None, fused=True)
    assert epilogue.norm_passes >= 1 and not epilogue.formed
    assert torch.allclose(store.inv_norm, norms.inverse_norms(w, torch.float32), rtol=NATIVE_INV_NORM_F32, atol=0)
