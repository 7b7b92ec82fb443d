"""Compile the Triton backend's kernels for an H100 (sm_90) without a GPU, and report their resources.

Catches what the interpreter cannot: GPU-only compile errors, shared memory beyond an H100's 227 KB per block,
a forward K loop that is not pipelined (no async copies; expected only when d is a multiple of 16, so that
the masked K tail keeps loads vectorised) or not on wgmma. Kernels are specialised as a launch
on contiguous tensors would be (unit inner strides, 16-byte aligned pointers). Compiling needs only the ptxas
bundled with triton. TRITON_INTERPRET must be unset (interpreted kernels cannot be compiled).

    python bench/triton_compile_check.py --dtypes bf16 fp16 --dims 512 1024 [--all-configs]

Prints one line per kernel and tiling; exits 1 if any compile fails or exceeds shared memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_SHARED_MEMORY = 227 * 1024
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def compile_for_sm90(kernel, dtype: str, dim: int, constexprs: dict, num_warps: int, num_stages: int):
    """triton.compile of one kernel for sm_90 with the signature a contiguous-tensor launch would get (Triton
    marks integer arguments divisible by 16, such as d = 512 but not d = 200, and specialises unit strides)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    acc = "fp64" if dtype == "fp64" else "fp32"
    constexprs = dict(constexprs, stride_xd=1, stride_wd=1)
    if "stride_dwd" in kernel.arg_names:
        constexprs["stride_dwd"] = 1
    types = {"x_ptr": "*" + dtype, "w_ptr": "*" + dtype, "dw_ptr": "*" + dtype, "labels_ptr": "*i64",
             "index_ptr": "*i64", "stats_ptr": "*i32", "filter_threshold": "fp32"}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "*" + acc if name.endswith("_ptr") else "i32")
        aligned = name.endswith("_ptr") or name in ("stride_xb", "stride_wc", "stride_dwc")
        if aligned or (name == "D" and dim % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _cases(dtype: str, dim: int, all_configs: bool):
    """(kernel name, constexprs, num_warps, num_stages) for the fixed tilings, or every fitting candidate."""
    from margin_kernels.backends import triton_configs as configs
    from margin_kernels.losses.negatives import NegativeKind

    elem = ELEM_BYTES[dtype]
    base = dict(KIND=int(NegativeKind.CURRICULAR), NORMALIZE=True, HAS_INDEX=True, UPCAST=False)
    forward = configs.H100_FORWARD if all_configs else [configs.default_forward(elem)]
    for t in forward:
        if configs.forward_fits(t, elem):
            yield "lse_forward_kernel", dict(base, BLOCK_B=t.block_b, BLOCK_C=t.block_c, BLOCK_K=t.block_k), \
                t.num_warps, t.num_stages
    grad = dict(base, RESCALE=dtype == "fp16", FILTER=True, BLOCK_D=configs.block_d(dim))
    backward = configs.H100_BACKWARD if all_configs else [configs.default_backward(dim, elem)]
    for t in backward:
        if configs.backward_fits(t, dim, elem):
            yield "dweight_kernel", dict(grad, BLOCK_C=t.acc_rows, BLOCK_B=t.loop_rows), t.num_warps, t.num_stages
            yield "dx_kernel", dict(grad, BLOCK_B=t.acc_rows, BLOCK_C=t.loop_rows), t.num_warps, t.num_stages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(ELEM_BYTES))
    parser.add_argument("--dims", nargs="+", type=int, default=[512])
    parser.add_argument("--all-configs", action="store_true", help="every autotune candidate that fits, not "
                                                                    "only the fixed tilings")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    from margin_kernels.backends import triton_backward, triton_forward
    kernels = {"lse_forward_kernel": triton_forward.lse_forward_kernel,
               "dweight_kernel": triton_backward.dweight_kernel, "dx_kernel": triton_backward.dx_kernel}
    failed = False
    for dtype in args.dtypes:
        for dim in args.dims:
            for name, constexprs, warps, stages in _cases(dtype, dim, args.all_configs):
                tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
                start = time.perf_counter()
                try:
                    compiled = compile_for_sm90(kernels[name], dtype, dim, constexprs, warps, stages)
                except Exception as exc:  # report every failing tiling, then fail
                    print(f"FAIL {name} {dtype} d={dim} {tiles} warps={warps} stages={stages}: {exc!r}"[:400])
                    failed = True
                    continue
                shared = compiled.metadata.shared
                ok = shared <= H100_SHARED_MEMORY
                failed |= not ok
                print(f"{'ok  ' if ok else 'SMEM'} {name} {dtype} d={dim} {tiles} warps={warps} stages={stages} "
                      f"shared={shared // 1024}KB wgmma={'wgmma.mma_async' in compiled.asm['ptx']} "
                      f"async_copy={'async_copy' in compiled.asm['ttgir']} "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
