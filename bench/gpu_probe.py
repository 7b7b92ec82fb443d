"""``python -m bench gpu-probe --out DIR``: what a first GPU session measures to falsify the GPU model
(bench/gpu_model.py), in one process (bench/gpu_session.sh runs it; a few minutes on an H100).

1. versions: torch, Triton, the ptxas Triton uses, the driver (nvidia-smi);
2. the card's ceilings (bench/ceilings.py: GEMM TFLOP/s, L2 and HBM copy TB/s);
3. each Triton kernel alone, from torch.profiler over one step (B = 512, C = 1e6, d = 512, bf16, ArcFace),
   gradient filtering off and on, beside a plain cuBLAS GEMM of its shape;
4. the step's host time against its device time, per backward chunk (profiler CPU vs CUDA totals);
5. the peers on the same card where installed (Cut Cross-Entropy, Liger-Kernel) at the published shapes;
6. correctness at C x d > 2^31 (C = 4.2e6, d = 512, 16 rows): labels at the first and last class, at backward
   chunk and class-tile edges, dW accumulated in bf16 into an existing ``.grad``, against a float64
   reference of the same rows;
7. the model's uncertain constants re-fitted from 2 (peak, L2, HBM) and from 3 (``triton_mma``: the measured
   forward over its modelled MMA term), and model vs measured per kernel at the re-fitted constants.

Writes DIR/50_probe.json and DIR/51_model_vs_measured.md. Without CUDA every GPU step is skipped with its
reason (the CPU dry run of the plumbing) and the exit status is 0.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

B, C, D = 512, 10 ** 6, 512
BIG_C, BIG_ROWS = 4_200_000, 16
KERNELS = ("lse_forward_kernel", "dcos_kernel", "dweight_kernel", "dx_kernel")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
        from triton.backends.nvidia.compiler import get_ptxas
        out["ptxas"] = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        out["triton_error"] = f"{type(exc).__name__}: {exc}"
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        out["driver"] = f"unavailable: {type(exc).__name__}"
    return out


def _step(grad_filter: float = 0.0, classes: int = C, rows: int = B):
    import margin_kernels as mk
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.01 * torch.randn(classes, D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, classes, (rows,), device="cuda")

    def run():
        x.grad = w.grad = None
        kwargs = {"grad_filter": grad_filter} if grad_filter else {}
        mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="triton", **kwargs).backward()
    return run


def profile_step(grad_filter: float) -> dict:
    """Per-kernel CUDA ms (summed over launches) and the step's CPU vs CUDA totals, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile
    run = _step(grad_filter)
    run(), run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels, device_total = {}, 0.0
    for e in prof.key_averages():
        cuda_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.key in KERNELS:
            kernels[e.key] = {"ms": cuda_us / 1e3, "launches": e.count}
    for e in prof.events():
        if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
            device_total += e.device_time if hasattr(e, "device_time") else 0.0
    cpu_total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    return {"grad_filter": grad_filter, "wall_ms": wall * 1e3, "kernels": kernels, "host_cpu_ms": cpu_total,
            "device_ms": device_total / 1e3}


def gemm_ms(m: int, n: int, k: int) -> float:
    from .ceilings import seconds_per_call
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    return seconds_per_call(lambda: a @ b, torch.device("cuda"), 3, 2) * 1e3


def peers() -> dict:
    out = {}
    try:
        from cut_cross_entropy import linear_cross_entropy
        e = torch.randn(8192, 2304, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        c = (0.01 * torch.randn(256000, 2304, device="cuda")).to(torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, 256000, (8192,), device="cuda")
        out["cce_loss_grad_filter_off_ms"] = _time(lambda: linear_cross_entropy(e, c, t, filter_eps=None).backward())
        out["cce_loss_ms"] = _time(lambda: linear_cross_entropy(e.detach(), c.detach(), t))
        del e, c
    except Exception as exc:  # noqa: BLE001 - a peer that is absent or fails is a line
        out["cce"] = f"skipped: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss()
        h = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (0.01 * torch.randn(128256, 4096, device="cuda")).to(torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, 128256, (4096,), device="cuda")
        out["liger_flce_ms"] = _time(lambda: loss(w, h, t).backward())
    except Exception as exc:  # noqa: BLE001
        out["liger"] = f"skipped: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def _time(fn, repeats: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def big_correctness() -> dict:
    """C x d > 2^31: 16 rows, C = 4.2e6, d = 512, labels at class, tile and chunk edges; dW added into an existing
    bf16 .grad; loss, dx and the touched dW rows against a float64 reference of the same rows."""
    import margin_kernels as mk
    from margin_kernels.backends import triton_configs as configs
    assert BIG_C * D > 2 ** 31
    chunk = configs.backward_chunk(configs.default_backward(2), BIG_ROWS, BIG_C, 2, interpret=False)
    labels = [0, BIG_C - 1, chunk - 1, chunk, 2 * chunk, 63, 64, 127, 128, BIG_C // 2, BIG_C - 64, BIG_C - 65,
              2 ** 31 // D, 2 ** 31 // D - 1, 2 ** 31 // D + 1, 12345]
    y = torch.tensor(labels[:BIG_ROWS], device="cuda")
    x = torch.randn(BIG_ROWS, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.01 * torch.randn(BIG_C, D, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    w.grad = torch.full_like(w, 0.5)
    loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="triton")
    loss.backward()
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = mk.margin_cross_entropy(x64, w64, y, mk.ArcFace(), backend="reference")
    ref.backward()
    rows = y.unique()
    dw = (w.grad[rows].double() - 0.5)
    scale_dw = w64.grad[rows].abs().max().item()
    return {"classes": BIG_C, "dim": D, "c_times_d": BIG_C * D, "labels": labels[:BIG_ROWS],
            "loss_abs_err": abs(loss.item() - ref.item()),
            "dx_rel_err": ((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item(),
            "dw_rel_err_label_rows": ((dw - w64.grad[rows]).abs().max() / scale_dw).item(),
            "dw_other_rows_moved_from_0.5": (w.grad[1:chunk - 1][:1000].double() - 0.5).abs().max().item()}


def model_vs_measured(ceilings: dict, measured: dict) -> dict:
    """Re-fit the model's constants from the ceilings and the forward's measured time; the model per kernel at
    them beside the profiler's time."""
    from . import calibration, gpu_model as gm, kernel_facts
    h100 = gm.GPUS["H200" if "H200" in ceilings.get("device", "") else "H100"]
    fitted = gm.with_constants(h100, peak_tflops=ceilings["square_gemm_tflops"],
                               hbm_tbps=ceilings["large_copy_tbps"], l2_tbps=ceilings["cache_copy_tbps"])
    gm.GPUS["measured"] = fitted
    try:
        est = calibration.our_estimate(kernel_facts.load(), "measured", B, C, D)
    finally:
        del gm.GPUS["measured"]
    rows = {}
    for kernel in KERNELS:
        name = kernel.replace("_kernel", "")
        model = est["kernels_ms"].get(name, {}).get("total")
        got = measured["kernels"].get(kernel, {}).get("ms")
        rows[name] = {"model_ms": model, "measured_ms": got,
                      "ratio": (got / model) if got and model else None}
    fwd = rows["lse_forward"]
    if fwd["measured_ms"]:
        mma = est["kernels_ms"]["lse_forward"]["mma"]
        rows["refit_triton_mma"] = gm.TRITON_MMA * mma / max(fwd["measured_ms"], 1e-9)
    return {"constants": fitted.__dict__, "estimate": est, "per_kernel": rows}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu-probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for 50_probe.json and 51_model_vs_measured.md")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"versions": versions()}
    steps = [("ceilings", lambda: __import__("bench.ceilings", fromlist=["measure"]).measure(
                 torch.device("cuda"), torch.bfloat16, 3)),
             ("step_filter_off", lambda: profile_step(0.0)),
             ("step_filter_on", lambda: profile_step(1e-4)),
             # the last: the CUTLASS path's per-chunk dx GEMM (16 output tiles, K = 32768), which its estimate
             # assumes cuBLAS splits over K (bench/gpu_model.py FITTED["gemm_split_k"])
             ("plain_gemms_ms", lambda: {"forward B x C x d": gemm_ms(B, C, D), "dW C x d x B": gemm_ms(C, D, B),
                                         "dx B x d x C": gemm_ms(B, D, C),
                                         "dx chunk B x d x 32768": gemm_ms(B, D, 32768)}),
             ("peers", peers),
             ("correctness_c_times_d_over_2_31", big_correctness)]
    for name, fn in steps:
        if not torch.cuda.is_available():
            report[name] = "skipped: no CUDA device"
            continue
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
            report[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if isinstance(report.get("ceilings"), dict) and isinstance(report.get("step_filter_off"), dict):
        report["model_vs_measured"] = model_vs_measured(report["ceilings"], report["step_filter_off"])
    else:
        report["model_vs_measured"] = "skipped: needs the ceilings and the profiled step"
    (out / "50_probe.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["| kernel | model ms (re-fitted constants) | measured ms | measured / model |", "|---|---|---|---|"]
    mvm = report["model_vs_measured"]
    if isinstance(mvm, dict):
        for name, r in mvm["per_kernel"].items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['model_ms']} | {r['measured_ms']} | {r['ratio']} |")
        lines.append(f"\nre-fitted triton_mma: {mvm['per_kernel'].get('refit_triton_mma')}")
    else:
        lines.append(f"| {mvm} | | | |")
    (out / "51_model_vs_measured.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / '50_probe.json'} and {out / '51_model_vs_measured.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
