"""GPU benchmark of the Triton backend against the other ways to compute plain softmax cross-entropy of a
linear head (B x d features, C x d weights, bf16 by default):

    triton       margin_kernels, backend="triton" (fused GEMM + online LSE; hand-written fused backward)
    torch        margin_kernels, backend="torch" (class-chunked PyTorch, the portable path)
    reference    margin_kernels, backend="reference" (full B x C logits in float64: the ground truth; OOMs early)
    cce          Apple's cut-cross-entropy ``linear_cross_entropy``          (skipped if not installed)
    liger        Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``        (skipped if not installed)
    torch_lce    ``torch.nn.functional.linear_cross_entropy``               (skipped if this torch lacks it)

For each (C, B) it reports the median forward and forward+backward time over CUDA-event-timed repetitions,
the peak memory allocated beyond the inputs during forward+backward (dW included), and the fraction of the
GEMM floor reached: the floor is 4 GEMMs of B x C x d (forward, recompute, dx, dW) timed with cuBLAS in bf16
on class chunks (no B x C matrix), so 1.0 would mean the loss costs no more than its matrix products.

    python bench/bench_triton.py                                    # C = 1e4..1e7, B = 256..2048, d = 512
    python bench/bench_triton.py --classes 100000 --batches 1024 --impls triton cce --out results.jsonl

Needs a CUDA device (exits with a message otherwise). Times include Triton's autotuning only in warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = ("triton", "torch", "reference", "cce", "liger", "torch_lce")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _margin_kernels_impl(backend):
    import margin_kernels as mk
    loss = mk.Softmax()
    return lambda x, w, y: mk.margin_cross_entropy(x, w, y, loss, backend=backend, check_values=False)


def _cce_impl():
    from cut_cross_entropy import linear_cross_entropy
    return lambda x, w, y: linear_cross_entropy(x, w, y)


def _liger_impl():
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, y: loss(w, x, y)


def _torch_lce_impl():
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        raise ImportError("torch.nn.functional.linear_cross_entropy is not in this torch")
    return lambda x, w, y: fn(x, w, y)


def make_impl(name):
    """The loss function of one implementation, or raise ImportError if its package is missing."""
    if name in ("triton", "torch", "reference"):
        return _margin_kernels_impl(name)
    return {"cce": _cce_impl, "liger": _liger_impl, "torch_lce": _torch_lce_impl}[name]()


def _time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_floor_ms(batch: int, num_classes: int, dim: int, dtype, reps: int) -> float:
    """4 x the cuBLAS time of (B x d) @ (d x C), timed on chunks of at most 65536 classes and scaled to C."""
    chunk = min(num_classes, 65536)
    x = torch.randn(batch, dim, device="cuda", dtype=dtype)
    w = torch.randn(chunk, dim, device="cuda", dtype=dtype)
    out = torch.empty(batch, chunk, device="cuda", dtype=dtype)
    ms = _time_ms(lambda: torch.mm(x, w.t(), out=out), warmup=3, reps=reps)
    return 4 * ms * num_classes / chunk


def bench_one(impl, x, w, y, warmup: int, reps: int) -> dict:
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            impl(x, w, y)

    def forward_backward():
        loss = impl(xg, wg, y)
        torch.autograd.grad(loss, [xg, wg])

    fwd = _time_ms(forward, warmup, reps)
    fwd_bwd = _time_ms(forward_backward, 1, reps)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"forward_ms": fwd, "forward_backward_ms": fwd_bwd, "peak_extra_MiB": peak / 2 ** 20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Triton backend vs peers, plain softmax CE of a linear head")
    parser.add_argument("--classes", nargs="+", type=int, default=[10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7])
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="append one JSON line per measurement to this file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton.py needs a CUDA device: torch.cuda.is_available() is False on this machine "
              "(GPU figures are only ever measured, never estimated)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the benchmark times compiled kernels", file=sys.stderr)
        return 2

    impls = {}
    for name in args.impls:
        try:
            impls[name] = make_impl(name)
        except ImportError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    device = torch.cuda.get_device_name()
    print(f"# {device}, d={args.dim}, {args.dtype}, torch {torch.__version__}")
    print(f"{'C':>9} {'B':>5} {'impl':>10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9} {'floor':>6}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for num_classes in args.classes:
        w = torch.randn(num_classes, args.dim, device="cuda", dtype=dtype, generator=gen) * 0.05
        for batch in args.batches:
            x = torch.randn(batch, args.dim, device="cuda", dtype=dtype, generator=gen)
            y = torch.randint(0, num_classes, (batch,), device="cuda", generator=gen)
            floor = gemm_floor_ms(batch, num_classes, args.dim, dtype, args.reps)
            for name, impl in impls.items():
                row = {"device": device, "dtype": args.dtype, "d": args.dim, "C": num_classes, "B": batch,
                       "impl": name, "gemm_floor_ms": floor}
                try:
                    row.update(bench_one(impl, x, w, y, args.warmup, args.reps))
                    row["floor_fraction"] = floor / row["forward_backward_ms"]
                    print(f"{num_classes:>9} {batch:>5} {name:>10} {row['forward_ms']:>9.2f} "
                          f"{row['forward_backward_ms']:>11.2f} {row['peak_extra_MiB']:>9.0f} "
                          f"{row['floor_fraction']:>6.2f}", flush=True)
                except torch.cuda.OutOfMemoryError:
                    row["error"] = "out of memory"
                    print(f"{num_classes:>9} {batch:>5} {name:>10} {'OOM':>9}", flush=True)
                torch.cuda.empty_cache()
                if args.out:
                    with args.out.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
        del w
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
