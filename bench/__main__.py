"""``python -m bench JOB ...``: the dispatcher of the developer tools (run from the repository root)."""
from __future__ import annotations

import importlib
import sys
from typing import Optional

#: job -> (module of this folder with a ``main(argv)``, what it does)
JOBS = {
    "chunks": ("chunks", "one backend's time against its class chunk, beside the GEMM floor (picks the default)"),
    "memory-model": ("memory_model", "memory per rank and traffic per step of DistributedMarginHead (no timing)"),
    "optimizer-step": ("optimizer_step", "forward + backward + optimizer step, fused against torch.optim"),
    "kernels": ("kernels", "the Triton kernels compiled for sm_90 without a GPU (registers, spills, wgmma) and "
                           "the roofline estimate"),
    "kernel-facts": ("kernel_facts", "compile this project's and the peers' kernels: the facts the GPU model reads "
                                     "(bench/data/kernel_facts.json)"),
    "calibrate": ("calibration", "the GPU model against the peers' published times, and its estimate of ours"),
    "archs": ("arch_check", "every Triton config compiled for sm_80/86/89/90/100: shared memory, spills, "
                            "tensor-core instruction"),
    "cutlass": ("cutlass_check", "the cuda backend's CUTLASS sm_90a GEMMs compiled without a GPU (registers, spills, "
                                 "HGMMA, C7510, shared memory) and the model's estimate (bench/data/cutlass_facts.json)"),
    "gpu-probe": ("gpu_probe", "what a first GPU session measures to falsify the GPU model (skips without CUDA)"),
    "ceilings": ("ceilings", "the roofline's GEMM rate and copy bandwidths measured on this device"),
    "throughput": ("throughput", "achieved TFLOP/s beside x floor, from margin-bench JSON files (markdown)"),
    "plot": ("plot", "redraw a recorded run's plot from its JSON (bench/results/NAME.json -> NAME.png)"),
}


def usage() -> str:
    lines = ["usage: python -m bench JOB [options]   (from the repository root; python -m bench JOB -h)", "",
             "jobs:"]
    lines += [f"  {name:15s} {what}" for name, (_, what) in JOBS.items()]
    lines += ["", "The backend comparison itself is margin-bench (installed with the package)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in JOBS:
        print(f"python -m bench: unknown job {argv[0]!r}; choose from {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__package__ or 'bench'}.{JOBS[argv[0]][0]}")
    return module.main(argv[1:])


# guarded: the measuring children (multiprocessing) re-import the main module under another name
if __name__ == "__main__":
    raise SystemExit(main())
