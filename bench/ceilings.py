"""``python -m bench ceilings``: the ceilings the roofline model of bench/kernels.py assumes, measured on this
device, and the ``cuda`` backend's estimate re-evaluated at the measured values.

The model's least certain constant is ``L2_TBPS``, what an epilogue pass over an L2-resident tile costs: the
``cuda`` backend's distance from the floor hinges on it and on the launch time (kernels.py's docstring:
1.6x needs >= 12 TB/s, against the 5.5 assumed, and the launches hidden). The first GPU session measures it
(bench/gpu_session.sh runs this job); the launch time shows in the session's cuda timings.

Measured, each the median of ``--repeats`` timed batches after one warm-up batch:

* the dense GEMM rate of a large square product (the floor's ``PEAK_TFLOPS``) and of the chunk loop's own
  product shape (B x d by d x chunk at B = d = 512, the ``cuda`` chunk), 2 M N K FLOP per product;
* the copy bandwidth of a buffer pair that fits in a quarter of the L2 each (``L2_TBPS``) and of a pair far
  larger than it (``HBM_TBPS``), 2 x the buffer size per copy (read + write).

On a CPU it runs too (fp32 products, a 1 MiB pair for the cache): what it measures there is the machine's,
not the H100 the model describes, and no estimate is printed for it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .kernels import HBM_TBPS, L2_TBPS, PEAK_TFLOPS, cuda_estimate_s, floor_s
from margin_kernels.bench.timing import synchronize

#: the estimate's problem, as kernels.roofline's
BATCH, DIM, CLASSES = 512, 512, 10 ** 6
SQUARE = {"cuda": 8192, "cpu": 1024}
LARGE_COPY_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
CPU_CACHE_COPY_BYTES = 1 << 20


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int, inner: int) -> float:
    """Median over ``repeats`` batches of ``inner`` calls, after one warm-up batch."""
    for _ in range(inner):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def gemm_tflops(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    flop = 2.0 * m * n * k
    inner = max(1, int(2e11 // flop)) if device.type == "cuda" else 1
    return flop / seconds_per_call(lambda: torch.mm(a, b.t(), out=out), device, repeats, inner) / 1e12


def copy_tbps(nbytes: int, device: torch.device, repeats: int) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    inner = max(1, (8 << 30) // (2 * nbytes)) if device.type == "cuda" else max(1, (1 << 30) // (2 * nbytes))
    return 2.0 * src.numel() * 4 / seconds_per_call(lambda: dst.copy_(src), device, repeats, inner) / 1e12


def l2_copy_bytes(device: torch.device) -> int:
    """Each buffer of the cache-resident pair: a quarter of the L2 on a GPU."""
    if device.type == "cuda":
        # torch's device properties carry the L2 size (50 MiB on an H100/H200); an H100's if a build lacks it
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) // 4
    return CPU_CACHE_COPY_BYTES


def measure(device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    from margin_kernels.backends.chunk_loop import default_chunk_size
    kind = "cuda" if device.type == "cuda" else "cpu"
    chunk = default_chunk_size(BATCH, "cuda")
    square = SQUARE[kind]
    out = {"device": torch.cuda.get_device_name(device) if kind == "cuda" else "cpu", "dtype": str(dtype),
           "square_gemm_tflops": gemm_tflops(square, square, square, dtype, device, repeats),
           "chunk_gemm_tflops": gemm_tflops(BATCH, chunk, DIM, dtype, device, repeats),
           "cache_copy_bytes": l2_copy_bytes(device), "large_copy_bytes": LARGE_COPY_BYTES[kind]}
    out["cache_copy_tbps"] = copy_tbps(out["cache_copy_bytes"], device, repeats)
    out["large_copy_tbps"] = copy_tbps(out["large_copy_bytes"], device, repeats)
    out["shapes"] = {"square": square, "chunk": [BATCH, chunk, DIM]}
    return out


def estimates(peak_tflops: float, l2_tbps: float, hbm_tbps: float) -> dict:
    """The ``cuda`` estimate as a multiple of the floor at these ceilings (kernels.cuda_estimate_s)."""
    floor = floor_s(BATCH, DIM, CLASSES, peak_tflops)
    cuda_s, _ = cuda_estimate_s(BATCH, DIM, CLASSES, 2, peak_tflops, l2_tbps, hbm_tbps)
    return {"floor_ms": floor * 1e3, "cuda_ms": cuda_s * 1e3, "cuda_x_floor": cuda_s / floor}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ceilings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="the GEMMs' dtype (default bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the figures as JSON to this path (- = stdout)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device in this process")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device: {device.type} is not measured (cuda or cpu)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    report = measure(device, dtype, args.repeats)
    report["model"] = {"peak_tflops": PEAK_TFLOPS, "l2_tbps": L2_TBPS, "hbm_tbps": HBM_TBPS,
                       **estimates(PEAK_TFLOPS, L2_TBPS, HBM_TBPS)}
    if device.type == "cuda":
        report["measured"] = estimates(report["square_gemm_tflops"], report["cache_copy_tbps"],
                                       report["large_copy_tbps"])
    stream = sys.stderr if args.json == "-" else sys.stdout
    print(f"{report['device']}, {dtype}: GEMM {report['square_gemm_tflops']:.3g} TFLOP/s (square "
          f"{report['shapes']['square']}), {report['chunk_gemm_tflops']:.3g} TFLOP/s (chunk "
          f"{'x'.join(map(str, report['shapes']['chunk']))}); copy {report['cache_copy_tbps']:.3g} TB/s "
          f"({report['cache_copy_bytes'] >> 20} MiB pair in cache), {report['large_copy_tbps']:.3g} TB/s "
          f"({report['large_copy_bytes'] >> 20} MiB pair)", file=stream)
    model = report["model"]
    print(f"model: {PEAK_TFLOPS} TFLOP/s, L2 {L2_TBPS} TB/s, HBM {HBM_TBPS} TB/s -> cuda "
          f"{model['cuda_x_floor']:.2f}x the floor", file=stream)
    if "measured" in report:
        print(f"at the measured ceilings: cuda {report['measured']['cuda_x_floor']:.2f}x the floor", file=stream)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
