"""The one tolerance table of the backend conformance suite (tests/test_conformance.py), keyed by
(backend, dtype).

What is measured, always against backend="reference" (full B x C logits, autograd backward) on CPU:
  * ``loss``: max |loss_i - ref_i| over the per-row losses, divided by max(1, max |ref_i|);
  * ``dx``, ``dw``: relative L2 errors ||out - ref|| / ||ref|| (absolute when ref is exactly 0, e.g. every row
    ignored).

Against two references:
  * ``float64`` (every dtype): the ground truth, the reference run in float64 on the same (rounded) inputs,
    i.e. the problem drawn in the storage dtype and upcast. In bf16/fp16 this error is dominated by the API
    itself, not by a backend: every backend's driver stores x/||x|| back in the storage dtype (2^-9 relative
    per element for bf16, 2^-12 for fp16) and the logits multiply the cosines by s (up to 256), so all four
    backends show the same ~1e-2 (bf16) / ~2e-3 (fp16) gradient errors.
    Losses whose negative function jumps at a threshold (``THRESHOLDED_KINDS``: CurricularFace's hard
    negatives c > T, MV-Softmax's c > T, the interclass filter c > a) get their own, looser low-precision
    bound: rounding moves some cosine across the threshold, its logit jumps by O(s * jump) and its dL/dc
    with it, which no accumulation precision can undo (the worst cases below are single flipped elements).
  * ``storage`` (bf16/fp16 only): the reference run on the very same bf16/fp16 tensors (it computes in fp32
    from the same rounded x/||x||, so flips happen in both). This is the tight check of the low-precision
    paths: what remains is fp32 accumulation and the rounding of the returned gradients to the storage dtype
    (each backend, and the reference, returns dx and dW in the storage dtype: a one-ulp difference of the fp32
    values before rounding is 2^-8 relative on that element), plus, for Triton, the rounding of dL/dcos to
    the storage dtype for its tensor-core gradient GEMMs (triton_tiles.grad_mma), which is why Triton's bf16
    bound is ~10x the torch/cpu one.

How the bounds were set: tests/test_conformance.py run with MK_RECORD_ERRORS=<file> records every case's
errors; ``python -m tests.tolerances <file>`` prints the worst case per (backend, dtype, reference, kind of
loss). Each bound is ~2-3x the observed worst case (rounded up to 1, 2, 3, 5 x 10^k), and the observed worst
case is recorded next to it (``observed``: loss, dx, dw; on this repository's CPU machine, Triton in its
interpreter with 16-wide tiles). Observed over: 18 losses on the base shape and 7 losses (one per negative
kind, plus unnormalised Softmax) on the 14 shape variants, fp64/fp32/bf16/fp16 (Triton: the slow ones too).
CUDA fp32/fp64 bounds are not measured (no CUDA device in the session that wrote this table): they are the
bounds the previous test_native_cuda.py used, and say so. CUDA bf16/fp16 bounds are those of the chunk loop's
16-bit gradient-operand path, which the cuda backend takes there, measured by forcing that path on CPU.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from margin_kernels.losses.negatives import NegativeKind

#: negative kinds with a jump at a threshold that low-precision rounding of the cosines can cross
THRESHOLDED_KINDS = frozenset({NegativeKind.CURRICULAR, NegativeKind.MV, NegativeKind.FILTER, NegativeKind.AFFINE})
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Bounds:
    loss: float
    dx: float
    dw: float
    #: worst case measured (loss, dx, dw); None: not measured here
    observed: Optional[tuple]
    reason: str

    def violations(self, errors) -> list:
        return [f"{what} {got:.2e} > {bound:.0e}" for what, got, bound in
                (("loss", errors.loss, self.loss), ("dx", errors.dx, self.dx), ("dw", errors.dw, self.dw))
                if not got <= bound]


@dataclass(frozen=True)
class Tolerance:
    #: against the float64 reference (every loss in fp64/fp32; continuous losses in bf16/fp16)
    float64: Bounds
    #: against the float64 reference, losses of THRESHOLDED_KINDS in bf16/fp16 (None: same as float64)
    float64_thresholded: Optional[Bounds] = None
    #: bf16/fp16 only: against the reference on the same storage-dtype tensors
    storage: Optional[Bounds] = None


F64 = "float64 products and epilogue (no fp32 anywhere on the fp64 path): a few ulps of summation order"
F32 = "fp32 products and epilogue: summation order over d and over class chunks vs the fp64 reference"
F32_TRITON = ("fp32 IEEE products (no TF32) with 16-wide K steps and split partial sums merged at the end: "
              "more partial sums than the chunk loop's single GEMM per chunk")
LP_F64 = "x/||x|| stored in the storage dtype (2^-9 bf16, 2^-12 fp16) times s up to 256: the API's rounding"
LP_THRESH = "a rounded cosine crosses T (CurricularFace, MV, NPCFace) or tau (filter): one logit jumps by O(s)"
LP_STORAGE = ("same rounded inputs as the reference, fp32 math in both: fp32 accumulation order plus dx/dW "
              "rounded to the storage dtype (one ulp = 2^-8 bf16, 2^-11 fp16 relative per element)")
LP_STORAGE_TRITON = ("as torch/cpu, plus dL/dcos rounded to the storage dtype for the tensor-core dx/dW GEMMs "
                     "(triton_backward's dL/dcos buffer; fp16 scaled by one power of two first)")
CUDA_UNMEASURED = "not measured (no CUDA device when this table was written): the old test_native_cuda bound"
CUDA_16BIT = ("dL/dcos rounded to the storage dtype (fp16 scaled first) for the tensor-core dx/dW GEMMs, on top "
              "of the chunk loop's rounding; observed in the CPU emulation of this path "
              "(tests/test_chunk_loop_operands.py, over both its problems), not on a GPU")

# the chunk-loop backends (torch, cpu) share the same low-precision behaviour: inputs upcast to fp32 per chunk
_CHUNK_LOOP_LOW_PRECISION = {
    torch.bfloat16: Tolerance(
        float64=Bounds(4e-3, 3e-2, 3e-2, (1.5e-3, 1.3e-2, 1.2e-2), LP_F64),
        float64_thresholded=Bounds(2e-2, 0.3, 0.5, (8.6e-3, 0.124, 0.198), LP_THRESH),
        storage=Bounds(1e-6, 1.5e-3, 6e-3, (2.5e-7, 4.3e-4, 2.5e-3), LP_STORAGE),
    ),
    torch.float16: Tolerance(
        float64=Bounds(5e-4, 5e-3, 6e-3, (1.8e-4, 1.8e-3, 2.2e-3), LP_F64),
        float64_thresholded=Bounds(6e-3, 0.1, 0.15, (2.3e-3, 4.2e-2, 6.6e-2), LP_THRESH),
        storage=Bounds(1e-6, 5e-4, 1e-3, (2.8e-7, 1.4e-4, 2.9e-4), LP_STORAGE),
    ),
}

#: the Triton backend's fp32 storage under each product mode (margin_kernels.precision), against the float64
#: reference on the same fp32 inputs; observed on ArcFace, Softmax and CurricularFace (B=12, C=50, d=24)
PRODUCT_TOLERANCES = {
    "ieee": Bounds(6e-7, 2e-5, 2e-5, (1.9e-7, 5.8e-7, 5.8e-7), F32_TRITON),
    "tf32": Bounds(5e-4, 5e-3, 6e-3, (1.9e-7, 5.8e-7, 5.8e-7),
                   "TF32 keeps 10 mantissa bits (2^-11 relative per operand), as fp16 storage does; the "
                   "interpreter multiplies TF32 in full fp32, so the observed case is the IEEE one"),
    "bf16": Bounds(8e-3, 3e-2, 3e-2, (2.9e-3, 1.3e-2, 1.3e-2),
                   "operands cast to bf16 in registers (2^-9 relative) times s: as bf16 storage"),
    "fp16": Bounds(3e-4, 2e-3, 2e-3, (7.6e-5, 4.1e-4, 5.0e-4),
                   "operands cast to fp16 in registers (2^-12 relative), dL/dcos scaled before its fp16 rounding"),
}

TOLERANCES = {
    # ---- torch: the portable chunk loop (PyTorch GEMMs, TorchEpilogue) ----
    ("torch", torch.float64): Tolerance(Bounds(2e-15, 1.5e-14, 1e-14, (7.0e-16, 5.1e-15, 2.7e-15), F64)),
    ("torch", torch.float32): Tolerance(Bounds(6e-7, 1e-5, 6e-6, (2.2e-7, 3.5e-6, 1.8e-6), F32)),
    ("torch", torch.bfloat16): _CHUNK_LOOP_LOW_PRECISION[torch.bfloat16],
    ("torch", torch.float16): _CHUNK_LOOP_LOW_PRECISION[torch.float16],
    # ---- cpu: the same chunk loop with MKL GEMMs and the fused C++ epilogues (fp64 epilogue for fp64) ----
    ("cpu", torch.float64): Tolerance(Bounds(2e-15, 2e-14, 2e-14, (7.0e-16, 7.0e-15, 6.9e-15), F64)),
    ("cpu", torch.float32): Tolerance(Bounds(6e-7, 1e-5, 6e-6, (2.2e-7, 3.6e-6, 2.4e-6), F32)),
    ("cpu", torch.bfloat16): _CHUNK_LOOP_LOW_PRECISION[torch.bfloat16],
    ("cpu", torch.float16): _CHUNK_LOOP_LOW_PRECISION[torch.float16],
    # ---- triton: GEMMs with the loss in their epilogues (interpreter on CPU, 16-wide tiles) ----
    ("triton", torch.float64): Tolerance(Bounds(2e-15, 6e-14, 5e-14, (7.0e-16, 2.2e-14, 1.8e-14), F64)),
    ("triton", torch.float32): Tolerance(Bounds(6e-7, 2e-5, 2e-5, (2.4e-7, 7.0e-6, 7.6e-6), F32_TRITON)),
    ("triton", torch.bfloat16): Tolerance(
        float64=Bounds(4e-3, 3e-2, 3.5e-2, (1.5e-3, 1.2e-2, 1.4e-2), LP_F64),
        float64_thresholded=Bounds(2e-2, 0.3, 0.5, (8.6e-3, 0.123, 0.197), LP_THRESH),
        storage=Bounds(1e-6, 5e-2, 3e-2, (2.5e-7, 2.3e-2, 1.1e-2), LP_STORAGE_TRITON),
    ),
    ("triton", torch.float16): Tolerance(
        float64=Bounds(5e-4, 5e-3, 6e-3, (1.8e-4, 1.9e-3, 2.3e-3), LP_F64),
        float64_thresholded=Bounds(6e-3, 0.1, 0.15, (2.3e-3, 4.2e-2, 6.6e-2), LP_THRESH),
        storage=Bounds(1e-6, 5e-3, 1.5e-3, (2.8e-7, 1.8e-3, 5.3e-4), LP_STORAGE_TRITON),
    ),
    # ---- cuda: cuBLAS GEMMs + the CUDA epilogues; unmeasured here ----
    ("cuda", torch.float64): Tolerance(Bounds(1e-10, 1e-10, 1e-10, None, CUDA_UNMEASURED)),
    ("cuda", torch.float32): Tolerance(Bounds(1e-5, 1e-5, 1e-5, None, CUDA_UNMEASURED)),
    ("cuda", torch.bfloat16): Tolerance(
        float64=Bounds(4e-3, 2e-2, 2e-2, (1.5e-3, 6.5e-3, 7.9e-3), CUDA_16BIT),
        float64_thresholded=Bounds(2e-2, 0.3, 0.5, (1.3e-3, 8.3e-3, 1.1e-2), LP_THRESH + "; " + CUDA_16BIT),
        storage=Bounds(1e-6, 1e-2, 1e-2, (1.6e-7, 4.7e-3, 4.4e-3), CUDA_16BIT),
    ),
    ("cuda", torch.float16): Tolerance(
        float64=Bounds(5e-4, 2e-3, 2e-3, (1.3e-4, 6.2e-4, 7.2e-4), CUDA_16BIT),
        float64_thresholded=Bounds(6e-3, 0.1, 0.15, (1.2e-4, 8.6e-4, 1.0e-3), LP_THRESH + "; " + CUDA_16BIT),
        storage=Bounds(1e-6, 1.5e-3, 1e-3, (1.9e-7, 5.5e-4, 4.4e-4), CUDA_16BIT),
    ),
}

# the compile tests compare compiled with eager on one backend: same kernels, so fp32 agreement to 1e-5 is
# generous (observed: bitwise equal or a few ulps where inductor fuses the driver's B-vector math)
COMPILE_VS_EAGER = 1e-5


# the integrations' trajectory tests (tests/test_integration_*.py): N SGD steps of an adapter against a
# transcription of the code it replaces, from the same seed. ``loss``: max over steps of |ours - theirs| /
# max(1, |theirs|); ``dx``: the backbone's (or the features') final parameters, ``dw``: the class weight's, both
# ||ours - theirs|| / ||theirs||. Both codes see the same inputs and the same samples; what differs is the
# summation order of the products and log-sum-exps (chunked here, full logits there), compounded over steps.
TRAJECTORY_TOLERANCES = {
    torch.float64: Bounds(1e-12, 5e-14, 5e-14, (4.1e-15, 1.1e-14, 3.8e-15),
                          "float64 rounding per step, 20 steps of SGD with momentum: no step amplifies it"),
    torch.float32: Bounds(1e-5, 3e-5, 3e-5, (4.2e-6, 9.1e-6, 7.1e-6),
                          "fp32 rounding per step (s = 64 in the logits), compounded over 20 momentum steps; the "
                          "worst case is the interclass filter, where a cosine near tau can fall on either side "
                          "(the losses without a threshold stay below 4e-7 / 9e-7 / 9e-7)"),
}


def bounds(backend: str, dtype: torch.dtype, kind: NegativeKind) -> dict:
    """{reference dtype: Bounds} that a case of ``backend`` in ``dtype`` with a loss of negative ``kind``
    must meet."""
    tol = TOLERANCES[(backend, dtype)]
    against_f64 = tol.float64
    if dtype in LOW_PRECISION and kind in THRESHOLDED_KINDS and tol.float64_thresholded is not None:
        against_f64 = tol.float64_thresholded
    out = {torch.float64: against_f64}
    if tol.storage is not None:
        out[dtype] = tol.storage
    return out


def _summarise(path: str) -> None:
    """Worst case per (backend, dtype, reference, thresholded) of a MK_RECORD_ERRORS file."""
    worst = defaultdict(lambda: [0.0, 0.0, 0.0])
    where = defaultdict(lambda: ["", "", ""])
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            key = (r["backend"], r["dtype"], r["reference"], "thresholded" if r["thresholded"] else "")
            for i, q in enumerate(("loss", "dx", "dw")):
                if r[q] >= worst[key][i]:
                    worst[key][i], where[key][i] = r[q], f"{r['shape']}/{r['loss_name']}"
    for key in sorted(worst):
        print(" ".join(key), " ".join(f"{q}={e:.2e} ({w})" for q, e, w in zip(("loss", "dx", "dw"), worst[key],
                                                                            where[key])))


if __name__ == "__main__":
    _summarise(sys.argv[1])

#: head regularisers (tests/test_regularizers.py, test_distributed_regularizers.py): the fused head with a
#: Center/Ring term against the float64 reference head plus the authors' code transcribed in float64 (and the
#: distributed head against the single-process one). The regularisers' own math is B-vector / B x d work in
#: the accumulation dtype; the transcriptions sum in other orders (pytorch-center-loss expands
#: ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c, which cancels at feature norms ~100). Observed: the worst of the
#: single-process tests over the reference, torch and cpu backends (the gradient figure covers dx, dW, the
#: centers and R alike)
REGULARIZER_TOLERANCES = {
    torch.float64: Bounds(2e-15, 5e-15, 5e-15, (4.4e-16, 1.2e-15, 1.2e-15),
                          "float64 on both sides; only summation orders differ (the expanded squared distance)"),
}

#: fp32 at extreme scales (tests/test_bad_values.py, s = 1e4 and 1e30; CosFace, ArcFace, NormFace; B=12, C=50,
#: d=16), every backend against the float64 reference on the same fp32 inputs. Not a backend's error: a row
#: whose softmax is not saturated moves its p by s * (cosine rounding, 2^-24 relative) ~ 6e-4 at s = 1e4, and
#: torch, cpu and triton show the same errors to two digits (observed dx 4.0e-6, dw 3.1e-5). The backends
#: among themselves agree to 2e-7 (the sharp check there: the cpu bug this guards against was 1e-4 apart).
EXTREME_SCALE_F32 = Bounds(6e-7, 2e-5, 1e-4, (2.2e-7, 4.0e-6, 3.1e-5),
                           "s times the fp32 rounding of the cosines on unsaturated rows, the same in every backend")
#: relative L2 distance between two fp32 backends' gradients at extreme s (observed 1.9e-7)
EXTREME_SCALE_BETWEEN_BACKENDS = 1e-6


def scale_bound(dtype: torch.dtype, scale: float, dim: int) -> float:
    """The error floor of any backend at a large scale s, for the fuzz suite (tests/fuzz_cases.py): a cosine
    carries ~sqrt(d) rounding errors of its dtype's epsilon, and a row whose softmax is not saturated turns
    it into s times as large an error of its p (see EXTREME_SCALE_F32, where s = 1e4 gave 3e-5 at d = 16;
    this bound gives 4 * 1e4 * 4 * 6e-8 = 1e-2 there: it catches NaN and garbage, the sharp checks at extreme
    s live in tests/test_bad_values.py). Added to the table's bound; negligible below s ~ 100."""
    eps = torch.finfo(accumulation_dtype_of(dtype)).eps
    return 4.0 * scale * (dim ** 0.5) * eps


def accumulation_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: the binary family's learnable bias (tests/test_binary.py): relative error of its gradient, and of the mean
#: loss, against the float64 reference, per storage dtype, for every backend. The gradient is a sum over all
#: B x C sigmoids (no cancellation: every term of SphereFace2's and UniFace's has the sign of g_lse), so it is
#: as accurate as one per-element sigmoid in the accumulation dtype; in bf16/fp16 the cosines themselves are
#: rounded (x/||x|| stored back in the storage dtype, as for every loss), and r = 40 / s = 64 scale that
#: rounding into the logits. Bounds ~3-5x the worst case observed on this machine over the six binary variants
#: on the base shape (torch, cpu, Triton in its interpreter; max of the loss and bias-gradient errors): fp64
#: 2.2e-16, fp32 2.3e-7, bf16 1.1e-3, fp16 1.0e-4. The fp64 bound also covers the shape variants.
SHIFT_GRAD = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 5e-3, torch.float16: 5e-4}

# ---- the fused optimizers (tests/test_fused_optim.py) ----
# A fused step can get two things wrong: the gradient it applies (the backend's chunk rows handed to the update
# sink) and the update it applies with it. The trajectory tests check each against its own reference, so that
# neither compounds through the other: the gradient of every step against the reference's dW at the same
# weight (fused_gradient_bound), and the weight after N steps against torch.optim stepping a copy on the very
# gradients the fused update applied (update_bound).
#
# Why not torch.optim on the reference's gradient at its own weight (a free-running trajectory, the test's
# earlier form, bound 1e-5 after 20 fp32 AdamW steps): any rounding difference in step t moves the weight, so
# step t+1's gradient differs by more than rounding, and AdamW's normalised steps (lr = 1e-2 on N(0, 0.01^2)
# weights: each step moves ||W|| by ~30%) amplify it ~1.3-2x per step. Measured on torch.optim.AdamW alone
# (no fused code), Intel Xeon (AMX), 20 fp32 steps: W0 perturbed by one ulp (6e-8 relative) ends 8.5e-5 apart;
# dW by the torch backend at chunk 48 instead of 64 (another summation order, as another CPU's GEMM
# blocking gives) ends 3.0e-5 apart (1.2e-6 after 5 steps), the cpu backend's dW instead of torch's 5.7e-5;
# SGD with momentum 8e-6. The AMD EPYC failure (3.5e-5 after 20 steps, 3e-7 after 5) is this growth: the
# factor depends on the trajectory, not on the fused code, so no bound on it follows from the arithmetic.


def fused_gradient_bound(dtype: torch.dtype, scale: float, dim: int, classes: int, batch: int) -> float:
    """Relative L2 error of one fused step's dW (the rows the update sink received) against the reference's dW
    on the same weight and features: fp64 for fp32/fp64 storage, the reference on the same 16-bit tensors for
    bf16/fp16 (dW rounded to the storage dtype there, one rounding of u_storage per element).

    Worst-case first-order rounding, every error aligned, for any summation order (so for any CPU's GEMM
    blocking: MKL/oneDNN's AVX-512 or AMX kernels, Triton's 16-wide K steps), relative to the gradient's size,
    u the accumulation dtype's unit roundoff (2^-24 fp32, 2^-53 fp64):
      * a cosine x.w/(|x||w|) is a dot product of ``dim`` terms plus the two norms: (dim + 3) u absolute;
        the logit multiplies it by ``scale``, and exp(logit - lse) turns that absolute error into a relative
        error of p: scale * (dim + 3) u;
      * the log-sum-exp sums ``classes`` exponentials: classes * u relative, absolute on lse;
      * dW_j sums ``batch`` rows of dL/dlogit_ij * x_i: batch * u (no cancellation assumed: a weight row's
        gradient is dominated by the rows whose target it is, or by same-signed softmax terms).
    ArcFace, s = 64, d = 16, C = 300, B = 24: 1540 u = 9.2e-5 fp32, 1.7e-13 fp64. Observed (Intel Xeon, AMX;
    max over 20 steps of every trajectory): fp32 4.6e-6 (cpu backend), 2.8e-6 (torch); fp64 6.2e-15; the
    statistical estimate (errors adding in quadrature, scale * sqrt(dim + 3) u) is 1.8e-5 fp32, so the worst
    case is ~5x that and 20x the observation, and far below a wrong gradient (one class row of 300 missing:
    ~6e-2). bf16 adds the reference's rounding of dW to bf16, 2^-8 = 3.9e-3 (observed 1.8e-3)."""
    u = torch.finfo(accumulation_dtype_of(dtype)).eps / 2
    bound = (scale * (dim + 3) + classes + batch) * u
    if dtype in LOW_PRECISION:
        bound += torch.finfo(dtype).eps / 2
    return bound


def update_bound(kind: str, options: dict, dtype: torch.dtype, steps: int, weight_path: float,
                 step_path: float) -> float:
    """Relative L2 distance, after ``steps`` steps, between the fused update's weight and torch.optim's (SGD,
    AdamW, SparseAdam) stepping a copy on the same gradients. ``weight_path``: sum over the steps of ||W_t||,
    ``step_path``: of ||W_t - W_{t-1}||, both over ||W_N|| (the reference trajectory's, measured by the test:
    a bound relative to the final weight must know how large the weights and steps on the way were).

    Both sides evaluate torch's formulas operation by operation on the same inputs; torch's fused kernel
    (``torch._fused_sgd_`` / ``_fused_adamw_``, which the fused update runs) and torch.optim's op-by-op path
    can round each operation differently (vectorised FMA contraction, scalars such as lr / (1 - beta1^t)
    rounded in double or in the math dtype), one unit roundoff u of the math dtype per operation, and each
    step starts from the previous step's difference (carried with factor 1 - lr * weight_decay <= 1). Per
    element and step, counting roundings that can differ:
      * the weight's own: the decay product and the final addition, 2 u |w|; 16-bit weights are stored
        rounded after every step (the reference rounds its copy the same way), and where the fp32 values
        differ the rounding can land one storage ulp apart: + u_storage |w| (2^-8 bf16);
      * the step's: SGD: the decay add, the buffer update (2), the Nesterov add, the lr product: 5 u, plus the
        buffer's carried error, 2 u a step decaying by ``momentum``: 2 u / (1 - momentum); AdamW: the
        bias-corrected step size, sqrt(v), its division and + eps, m / denom and the lr product: 5 u, plus
        the carried state: m's 2 u a step decaying by beta1 (2 u / (1 - beta1)), v's 2 u a step decaying by
        beta2 (at most 2 u * min(N, 1 / (1 - beta2))), of which sqrt(v) keeps half.
    Summed over the steps: (k_w u sum ||W_t|| + k_step u sum ||dW_t||) / ||W_N||. fp32 AdamW here (lr 1e-2,
    betas (0.8, 0.99), 20 steps; ||W|| 0.69 -> 3.16, path 14.7 and 1.8): 91 u = 5.4e-6. Observed (Intel Xeon,
    AMX): SGD 0 (the kernel rounds every operation as the ops do), AdamW 1.2e-8 fp32, 2.2e-17 fp64, bf16 0:
    the two paths round almost every operation identically on this CPU, and the bound assumes that none does.
    Emulating a CPU where they differ, every weight element moved one ulp up or down at random after every
    fused AdamW step: 3.1e-7, ~1/18 of the bound (which counts ~6 such roundings a step, all aligned).
    What it must catch is far above it: lr 1% off gives 1.0e-2, AdamW without bias correction 1.7, one row
    left unupdated 5.6e-2 (tests/test_fused_optim.py, test_a_wrong_update_fails_the_bound)."""
    u = torch.finfo(accumulation_dtype_of(dtype)).eps / 2
    k_weight = 2 * u + (torch.finfo(dtype).eps / 2 if dtype in LOW_PRECISION else 0.0)
    if kind == "sgd":
        k_step = 5 + 2 / (1 - options.get("momentum", 0.0))
    else:
        beta1, beta2 = options["betas"]
        k_step = 5 + 2 / (1 - beta1) + min(steps, 1 / (1 - beta2))
    return k_weight * weight_path + k_step * u * step_path


#: free-running trajectories (tests/test_fused_distributed.py, test_fused_limits.py): a fused head against an
#: unfused head stepped by torch.optim, each on its own gradient. Every rounding difference feeds the next
#: step's gradient and grows (see above: one ulp of W0 grew to 8.5e-5 in 20 fp32 AdamW steps, 5.8e-6 in 5,
#: 1.0e-6 in 5 SGD steps), so these bounds hold only where a growth factor of ~10^3 (20 AdamW steps) keeps
#: the result below them:
FUSED_TRAJECTORY = {
    # fp64: a gradient difference of at most fused_gradient_bound (~2e-13 relative) per step grown 10^3x is
    # 2e-10 at worst, and more typically ~1e-12 (observed <= 1.6e-13, the bound 1e-10)
    torch.float64: (1e-10, "float64 rounding per step (<= 2e-13 relative), grown <= 10^3x over 20 steps"),
    # fp32: used only for short runs: 4 SGD steps of the 16-bit product path, and a scalar fp32 parameter
    # (SphereFace2's bias) stepped unfused beside a float64 weight for 6 steps: one ulp of an fp32 weight
    # grows to ~1e-6 in 5 SGD steps
    torch.float32: (1e-5, "fp32 rounding (6e-8) grown over <= 6 steps (observed 1.0e-6 from one ulp, 5 SGD steps)"),
}


def subnormal_bounds(dtype: torch.dtype, weight_norm: float, scale: float) -> tuple:
    """(loss, dx, dw) added to a backend's bounds for weight rows of norm N = ``weight_norm``
    (tests/test_huge_norms.py; errors in the rows' own units, dL/dw_j * ||w_j||). Past 1/tiny (~8.5e37 in
    fp32) the inverse norm 1/N that every kernel multiplies by, and the dL/dcos / N folded into the gradient
    GEMMs, are subnormal in the accumulation dtype, with an absolute spacing of 2^-149 (fp32): a relative error
    up to 2^-149 N on each cosine of that row, which the logits multiply by s; times 8 for the several such
    roundings a value goes through (cosine, dL/dcos, dW's radial term). dW_j itself is ~s / N: stored in bf16
    it is subnormal there (spacing 2^-133, ~5 significant bits at N = 3e38), which the dw bound takes from the
    storage dtype's spacing instead (then it claims little beyond finiteness: the dtype cannot hold more).
    0 below 1/tiny."""
    acc = accumulation_dtype_of(dtype)

    def spacing(t):  # the smallest subnormal: the absolute rounding step below the smallest normal
        return torch.finfo(t).smallest_normal * torch.finfo(t).eps

    if weight_norm * torch.finfo(acc).tiny <= 1.0:
        return 0.0, 0.0, 0.0
    computed = 8.0 * abs(scale) * weight_norm * spacing(acc)
    return computed, computed, 8.0 * abs(scale) * weight_norm * max(spacing(acc), spacing(dtype))


# ---- every other comparison with a reference (one name per kind of comparison; the tests import these) -----
# u = 2^-53 (fp64) / 2^-24 (fp32) is the unit roundoff; s <= 64 the scales of the tests' losses. "Observed" is
# the worst case seen on this repository's machine (Intel Xeon with AMX) where it was measured; where none is
# given, the bound was set from the arithmetic alone.

#: float64 loss and gradients of the package against the float64 reference, or of two float64 paths of the
#: package (chunked vs full logits, ranks vs one process, sub-centers, the auto backend's fallback): the same
#: formulas in another summation order. The logits carry s * (d + 3) u of rounding (~1e-13 at s = 64, d <= 200)
#: and p = exp(z - lse) turns it into a relative error of p; where 1 - p_target cancels (a confident row) the
#: gradient's relative error grows by 1 / (1 - p_target), so the bound keeps three orders of room over 1e-13
#: (the conformance table's tight fp64 bounds are for its fixed, well-conditioned problems).
FP64_END_TO_END = 1e-10
#: two float64 computations of the same quantity that share every large sum and differ in a few operations
#: (a loss that is the mean of the same per-row losses, an integration's adapter against the code it replaces
#: on the same logits, the resumed step of a resharded checkpoint, row statistics from the same cosines):
#: a few ulps of values up to ~100 (losses at s = 64), so 1e-12 relative is ~50 ulps
FP64_SAME_SUMS = 1e-12
#: the resumed run of a LR/margin schedule against the one that kept going: the same steps, the schedule's
#: value recomputed from the step count (pow / cos in float64, one rounding each) instead of carried
FP64_RESUMED_SCHEDULE = 1e-13
#: a float64 scalar of a few operations over at most B values (a mean of feature norms, a bench's head-free
#: composition of the same loss): B u ~ 1e-14 for B <= 64
FP64_SHORT_SUM = 1e-14
#: one float64 formula evaluated twice in a different association (AdaCos's scale, the shifted-sum LSE of
#: two ranks): a few roundings, 1e-15 ~ 5 ulps
FP64_FEW_ULPS = 1e-15

#: a float64 transcription of the authors' code (tests/originals*.py) against ours, in float64: loss and the
#: scalar state (batch mean/std, AdaCos's scale) to 1e-9, gradients, weights after steps and CurricularFace's t
#: to 1e-7. Not rounding: the authors' clamps and epsilons (acos clamped to 1 - 1e-7, F.normalize's eps,
#: + 1e-10 in denominators, theta clamped to [1e-5, pi]) move elements next to them by ~1e-8 relative, which our
#: formulas do not have; everything else agrees to rounding (~1e-13)
ORIGINALS_LOSS = 1e-9
ORIGINALS_GRAD = 1e-7
#: the binary losses' learnable bias is an fp32 parameter (the authors' ``Parameter(Tensor(1))``) in a
#: float64 problem: its gradient is summed in fp32 over B x C terms (~1e-6 relative with C u at C ~ 10^1..10^4),
#: its value after steps to 1e-5 (an fp32 value of ~1..10 moved by lr * gradient, a few ulps a step)
ORIGINALS_FP32_PARAMETER_GRAD = 1e-6
ORIGINALS_FP32_PARAMETER = 1e-5

#: fp32 inputs through any backend against the float64 reference, for the checks outside the conformance suite
#: (the bench's accuracy columns, the head, packaging smoke tests): the loss to 1e-5 relative (s (d + 3) u
#: ~ 1e-4 absolute on logits of ~64, averaged over the rows) and the gradients to 1e-4 (the conformance suite's
#: fp32 bounds, 1e-5..2e-5, hold for its problems; these cover bigger problems, d up to 512, with ~5x room)
FP32_LOSS = 1e-5
FP32_GRAD = 1e-4
#: fp32 buffers of a stateful loss (CurricularFace's t, MagFace/AdaFace's batch statistics) updated from fp32
#: cosines vs the float64 reference's: a mean of B cosines in fp32, ~(d + B) u ~ 2e-6 absolute, with ~0.5 of
#: momentum carried over 5 steps
FP32_STATE = 1e-6
#: bf16 features: their gradient comes back rounded to bf16 (2^-8 relative per element) on top of the fp32
#: math, so ~2^-8 / sqrt(3) ~ 2.3e-3 relative L2 typically and 3.9e-3 at worst per element; the bound is 5x that
#: worst case because the reference's float64 gradient is compared with a gradient of the bf16-rounded inputs
#: (x/||x|| rounded too: LP_F64 above)
BF16_FEATURE_GRAD = 2e-2

#: torch.autograd.gradcheck in float64 (finite differences with step eps against the analytic Jacobian):
#: central differences err by eps^2 * f''' ~ 1e-12 and by u / eps ~ 1e-10 of rounding; atol 1e-6 / rtol 1e-5 are
#: 10x / 100x tighter than gradcheck's defaults and far above both
GRADCHECK = dict(eps=1e-6, atol=1e-6, rtol=1e-5)

#: the negative functions of each backend (native C++/CUDA, Triton) against losses/negatives.py at their branch
#: points and over the cosine range: value and derivative of one elementwise formula (a few roundings, pow/exp
#: to ~1 ulp): fp32 1e-6 ~ 8 u, fp64 1e-15 ~ 9 u
NEGATIVE_FUNCTION = {torch.float32: 1e-6, torch.float64: 1e-15}
#: margin_math.h's per-element backward (run-time kind, tests/test_margin_math_runtime_kind.py) against float64,
#: relative, per unit of s + the tile's largest |logit| z: p = exp(z - lse) turns z's absolute error into that
#: relative error (z = s g(c): NEGATIVE_FUNCTION's ~8 u on g, whose terms reach ~3 where they cancel, times s),
#: plus exp's ~2 ulp and three products: under 8 u (s + |z|) in fp32 (1e-6) and fp64 (1e-15)
RUNTIME_KIND_GRAD = {torch.float32: 1e-6, torch.float64: 1e-15}
#: the native epilogues' own transcendental functions against torch's: exp_eval (a polynomial after range
#: reduction: ~2 ulp fp32), SLEEF's exp in fp64 against libm (1 ulp)
NATIVE_EXP_F32 = 3e-7
NATIVE_EXP_F64 = 1e-15
#: the power negatives' value 2((c+1)/2)^t - 1 (+ 0.2) with |value| <= 1.2 (~4 ulp fp32 through pow), and their
#: derivative relative to itself (pow's relative error times t, up to ~16 ulp)
NATIVE_POWER_VALUE = 5e-7
NATIVE_POWER_DERIVATIVE = 2e-6
#: the native (C++) epilogue against the torch epilogue on the same tile: fp32 1e-5, fp64 1e-12 relative (the
#: same formulas, exp/log from different libraries); raw tiles with |c| up to 3.3 reach logits of ~800 in the
#: power kinds, where exp(z - lse) carries |z| u ~ 5e-5 of relative error in fp32
NATIVE_VS_TORCH = {torch.float32: 1e-5, torch.float64: 1e-12}
NATIVE_VS_TORCH_LARGE_LOGITS_F32 = 2e-4
#: 1/||w|| computed by the native epilogue in fp32 against torch's (a norm of d terms and a reciprocal)
NATIVE_INV_NORM_F32 = 1e-6

#: torch's fused optimizer kernel against the op-by-op transcription, one step, per element: 4 eps of the
#: element's magnitude (clamped below at 1e-3: for elements near 0 the error is relative to the step's size)
FUSED_KERNEL_EPS = 4
#: merging two (max, sum) log-sum-exp partials in the native code against torch.logaddexp: a log, an exp and
#: an addition (fp32 1e-6 ~ 8 u; fp64 1e-14 leaves room for libm's log near 1, where the result cancels)
NATIVE_LSE_MERGE = {torch.float32: 1e-6, torch.float64: 1e-14}

#: fp32 steps (the distributed head in fp32 or under autocast, a parameter kept in fp32) against the float64
#: reference on the tests' small problems: the conformance suite's torch/cpu fp32 bound on dx (1e-5), for
#: loss and gradients alike
FP32_END_TO_END = TOLERANCES[("torch", torch.float32)].float64.dx
#: a smoke test in a fresh process or an installed wheel (the cpu backend, a JIT build): one fp32 loss
#: against float64, 1e-4 relative: catches a wrong build or a wrong fallback, not rounding (FP32_GRAD)
FP32_SMOKE = 1e-4
#: random extremes in float64 (tests/test_torch_backend.py's hypothesis case: unnormalised Softmax with
#: |x| ~ 100, losses ~ 0): the reference's softmax - onehot cancels (1 - p_target), so the gradients are
#: measured against an absolute floor of 1e-2 and bounded at 1e-9 (u / (1 - p) with 1 - p down to ~1e-7);
#: the loss to 1e-12
FP64_RANDOM_EXTREMES = Bounds(1e-12, 1e-9, 1e-9, None, "1 - p_target cancelling in float64")
#: an integration adapter against the library code it replaces, float64, the same inputs (pytorch-metric-
#: learning's losses): summation order through chunked vs full logits; gradients to 1e-9 where 1 - p cancels
INTEGRATION_LOSS = 1e-10
INTEGRATION_GRAD = 1e-9
#: CurricularFace's t after one step from 0 is 0.01 * the mean target cosine (|t| <= 0.01): a mean of B fp32
#: cosines, 1e-7 absolute (~1e-5 relative of t; (d + B) u ~ 3e-6 relative at worst)
CURRICULAR_T_FIRST_STEP = 1e-7
