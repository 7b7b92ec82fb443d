"""``python -m bench archs``: every tiling the Triton backend can launch, compiled for each GPU architecture users
train on (``archs.ARCHS``: sm_80 A100, sm_86 / sm_89 RTX 30/40 L4 L40, sm_90 H100/H200, sm_100 B200), no GPU.

Per arch: the forward tilings the autotuner may pick there (``triton_configs.forward_candidate`` with the arch's
shared memory) and the fixed forward tiling (autotuning off), the backward's tiling for that arch, in bf16
(``--dtypes`` adds fp16 / fp32), identity negatives (``--kinds`` adds others). Fails (exit 1) on

* shared memory above the arch's per-block limit (the launch would fail there: ``OutOfResources``);
* a spill in a 16-bit variant;
* a 16-bit product off the arch's tensor-core instruction (mma.sync on sm_8x, wgmma on sm_90, tcgen05 on
  sm_100: what Triton emits for it);
* an arch left with no valid forward candidate.

``--representative`` (what the default test runs: a few minutes on 2 cores) compiles the fixed forward
tiling and the backward's tiling with filtering, bf16 only; the full matrix is
``python -m bench archs --dtypes bf16,fp16,fp32 --kinds all`` (about an hour on 2 cores: a manual command).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import write_json
from . import archs
from . import kernel_facts as kf


#: what ``--representative`` finds today, each with its fix (tests/test_bench_tools.py holds the list to it).
#: Empty since the fixed forward tiling became arch-aware (``triton_configs.PREFERRED_FORWARD``): sm_90's
#: 64 x 128 x 64 with 4 warps kept its fp32 accumulator in registers on mma.sync and spilled 48-140 bytes per
#: thread on sm_8x; 128 x 128 x 32 with 8 warps there spills on none.
KNOWN: list = []


def cases(arch_names, dtypes=("bf16",), kinds=(kf.OUR_KIND,), representative: bool = False):
    for arch in arch_names:
        for dtype in dtypes:
            seen = set()
            for kind in kinds:
                for case in kf.our_cases(arch, dtype, kind, representative):
                    key = (case["kernel"], case["config"], case.get("out_d"), case.get("dw_group"), case["filter"])
                    if case["kernel"] in ("dweight", "dx") and key in seen:
                        continue  # no negative epilogue: once per dtype and tiling (kinds may differ in tiling)
                    seen.add(key)
                    yield case


def violations(records: list[dict]) -> list[str]:
    out = []
    seen_forward = {}
    for r in records:
        where = f"{r['arch']} {r['kernel']} {r['dtype']} {r['kind']} [{r['config']}]" + (
            " filter" if r.get("filter") else "")
        arch = archs.ARCHS[r["arch"]]
        if r["kernel"] == "lse_forward":
            seen_forward.setdefault((r["arch"], r["dtype"]), 0)
        if r.get("error"):
            out.append(f"{where}: does not compile: {r['error'][:200]}")
            continue
        if r["kernel"] == "lse_forward":
            seen_forward[(r["arch"], r["dtype"])] += 1
        if r["shared_bytes"] > arch.smem_per_block:
            out.append(f"{where}: {r['shared_bytes'] // 1024} KiB of shared memory > {arch.smem_per_block // 1024} "
                       f"KiB per block on {arch.name} ({arch.gpus})")
        if kf_elem(r["dtype"]) == 2:
            if r["spill_bytes"]:
                out.append(f"{where}: spills {r['spill_bytes']} bytes per thread")
            if r["product"] != arch.product:
                out.append(f"{where}: product on {r['product']}, not {arch.product}")
    for (arch, dtype), n in seen_forward.items():
        if n == 0:
            out.append(f"{arch} {dtype}: no forward tiling compiles there")
    return out


def kf_elem(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench archs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(archs.ARCHS), help="targets (default: all)")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--kinds", default=kf.OUR_KIND, help="NegativeKind names, or 'all'")
    parser.add_argument("--representative", action="store_true",
                        help="the fixed forward tiling and the backward only (CI's default test)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    names = [a.strip() for a in args.archs.split(",")]
    unknown = [a for a in names if a not in archs.ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {', '.join(unknown)}; choose from {', '.join(archs.ARCHS)}")
    from margin_kernels.losses.negatives import NegativeKind
    kinds = list(NegativeKind.__members__) if args.kinds == "all" else [k.strip().upper() for k in args.kinds.split(",")]
    records = kf.compile_cases(cases(names, [d.strip() for d in args.dtypes.split(",")], kinds,
                                     args.representative), args.jobs)
    problems = violations(records)
    stream = sys.stderr if args.json == "-" else sys.stdout
    for r in records:
        print(f"{r['arch']:6} {r['kernel']:11} {r['dtype']:4} {r['kind']:10} {r['config']:18} "
              + (f"ERROR {r['error'][:90]}" if r.get("error") else
                 f"regs {r['registers']:3} spill {r['spill_bytes']:4} smem {r['shared_bytes'] // 1024:3}K "
                 f"{r['product']}"), file=stream)
    for p in problems:
        print("VIOLATION " + p, file=stream)
    write_json({"records": records, "violations": problems}, args.json)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
