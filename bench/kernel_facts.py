"""``python -m bench kernel-facts``: the compiled facts the performance model reads, as data.

Compiles (no GPU: ``triton.compile`` for a GPUTarget, ptxas -v, cuobjdump -sass) this project's Triton kernels
at the tilings the model evaluates (bf16, d = 512, every forward autotune candidate and the backward's tiling,
gradient filtering on and off, for sm_90) and the peers' kernels at the configs their released code launches
at the published shapes: Cut Cross-Entropy's LSE forward and backward (its fixed configs, CCE_AUTOTUNE unset)
and Liger-Kernel's cross-entropy kernel (one program per row, 32 warps), for sm_80 and sm_90. Each record:
registers, spill bytes, shared memory, the product's instruction and the SASS facts (``archs.sass_facts``).

The result is committed as bench/data/kernel_facts.json; the calibration test evaluates the model from it
without compiling (a slow test recompiles and compares). Regenerate (a few minutes on 2 cores):

    PYTHONPATH=/tmp/peers python -m bench kernel-facts --out bench/data/kernel_facts.json

with the peers importable from /tmp/peers (``pip download --no-deps cut-cross-entropy liger-kernel`` then
``pip install --no-deps --target /tmp/peers *.whl``: their Triton source only, never their dependencies).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from . import archs

DATA = Path(__file__).resolve().parent / "data"
FACTS_PATH = DATA / "kernel_facts.json"
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
#: the forward epilogue of the calibration shapes (ArcFace: identity negatives under the log-sum-exp)
OUR_KIND = "IDENTITY"


def ptxas_facts(ptx: str, cc: int) -> tuple[int, int]:
    """(registers, spill bytes per thread: stores + loads) from ``ptxas -v`` for sm_<cc> (``a`` variants for
    sm_90 / sm_100, as Triton compiles them)."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(cc).path
    gpu_name = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, path, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    finally:
        os.unlink(path)
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def compile_record(case: dict) -> dict:
    """Compile one case (a dict: kernel getter, types, constexprs, divisible, cc, warps, stages, labels) and
    return its record; a failure is a record with ``error``."""
    record = {k: v for k, v in case.items() if k not in ("getter", "types", "constexprs", "divisible")}
    try:
        kernel = _resolve(case["getter"])
        compiled = archs.compile_kernel(kernel, case["types"], case["constexprs"], set(case["divisible"]),
                                        case["cc"], case["num_warps"], case["num_stages"])
        record["registers"], record["spill_bytes"] = ptxas_facts(compiled.asm["ptx"], case["cc"])
        record["shared_bytes"] = int(compiled.metadata.shared)
        record["product"] = archs.product_kind(compiled)
        record["sass"] = archs.sass_facts(compiled.asm["cubin"])
        record["error"] = None
    except Exception as exc:  # noqa: BLE001 - a failing case is a record
        record["error"] = f"{type(exc).__name__}: {exc}"[:400]
    return record


def _resolve(getter: str):
    """'module:attr' -> the @triton.jit function under any autotune / heuristics wrappers."""
    module, attr = getter.split(":")
    obj = getattr(__import__(module, fromlist=[attr]), attr)
    while not hasattr(obj, "arg_names") or type(obj).__name__ in ("Autotuner", "Heuristics"):
        obj = obj.fn
    return obj


# ---- this project's kernels ------------------------------------------------------------------------------
def our_cases(arch: str = "sm_90", dtype: str = "bf16", kind: str = OUR_KIND, representative: bool = False):
    """The model's (and the arch check's) cases of this project's kernels for ``arch``: every forward tiling
    the autotuner may pick there (``representative``: the fixed tiling only) and the arch's backward tiling,
    filtering on and off (``representative``: on only)."""
    from margin_kernels.backends import triton_configs as configs
    from margin_kernels.losses.negatives import NegativeKind
    from margin_kernels.losses.reductions import ReductionKind
    from margin_kernels.precision import PRODUCTS
    cc = archs.ARCHS[arch].cc
    elem = ELEMENT_BYTES[dtype]
    acc = "*fp64" if dtype == "fp64" else "*fp32"
    # the pointers of a launch on 16-bit storage (dL/dcos in the storage dtype) or fp32/fp64 (accumulation
    # dtype, IEEE product); every other pointer is in the accumulation dtype (as bench/kernels.py compiles them)
    types = {"x_ptr": "*" + dtype, "w_ptr": "*" + dtype, "dw_ptr": "*" + dtype, "labels_ptr": "*i64",
             "index_ptr": "*i64", "flags_ptr": "*i8", "tiles_ptr": "*i32", "tiles_count_ptr": "*i32",
             "blocks_ptr": "*i32", "blocks_count_ptr": "*i32", "filter_threshold": "fp32",
             "dc_ptr": "*" + dtype if elem == 2 else acc, "*": acc}
    divisible = {"x_ptr", "w_ptr", "dw_ptr", "labels_ptr", "index_ptr", "flags_ptr", "dc_ptr", "rp_ptr",
                 "consts_ptr", "partial_ptr", "norms_ptr", "keep_ptr", "lse_ptr", "g_lse_ptr", "g_target_ptr",
                 "factor_ptr", "col_dot_ptr", "inv_norm_ptr", "shift_ptr", "shift_partial_ptr", "stride_xb",
                 "stride_wc", "stride_dwc", "CH", "D"}
    base = dict(NORMALIZE=True, HAS_INDEX=False, UPCAST=False, PRODUCT=PRODUCTS.index("storage"), SUB_CENTERS=1,
                stride_xd=1, stride_wd=1, stride_dwd=1)
    epilogue = dict(KIND=int(NegativeKind[kind]), REDUCTION=int(ReductionKind.LSE))
    if representative:
        forward = [configs.default_forward(elem, kind=epilogue["KIND"], arch=configs.config_arch(cc // 10))]
    else:
        forward = [t for t in configs.forward_candidates_for(arch, elem)] if hasattr(
            configs, "forward_candidates_for") else [t for t in configs.H100_FORWARD
                                                     if configs.forward_candidate(t, elem, False)]
    module = "margin_kernels.backends."
    for t in forward:
        yield dict(getter=module + "triton_forward:lse_forward_kernel", kernel="lse_forward", arch=arch, cc=cc,
                   dtype=dtype, kind=kind, config=f"{t.block_b}x{t.block_c}x{t.block_k} w{t.num_warps} s{t.num_stages}",
                   tile=[t.block_b, t.block_c, t.block_k], num_warps=t.num_warps, num_stages=t.num_stages,
                   filter=False, types=types, divisible=sorted(divisible),
                   constexprs=dict(base, **epilogue, BLOCK_B=t.block_b, BLOCK_C=t.block_c, BLOCK_K=t.block_k,
                                   SAVE_NORMS=False, KEEP=False, FAST=True))
    t = configs.default_backward(elem, configs.config_arch(cc // 10), epilogue["KIND"], epilogue["REDUCTION"],
                                 fp16=dtype == "fp16")
    label = f"{t.block_b}x{t.block_c}x{t.block_d} w{t.num_warps} s{t.num_stages}"
    for use_filter in ((True,) if representative else (False, True)):
        common = dict(arch=arch, cc=cc, dtype=dtype, config=label, tile=[t.block_b, t.block_c, t.block_d],
                      out_d=t.out_d, dw_group=t.dw_group, num_warps=t.num_warps, num_stages=t.num_stages,
                      filter=use_filter, types=types, divisible=sorted(divisible))
        yield dict(common, getter=module + "triton_backward:dcos_kernel", kind=kind, kernel="dcos",
                   constexprs=dict(base, **epilogue, FILTER=use_filter, LOADED=False, FAST=True,
                                   **configs.backward_kernel_tiles(t, "dcos")))
        for name in ("dweight", "dx"):
            constexprs = dict(base, FILTER=use_filter, **configs.backward_kernel_tiles(t, name))
            if name == "dweight":
                constexprs["LOCAL_OUT"] = False
            yield dict(common, getter=module + f"triton_backward:{name}_kernel", kernel=name, kind="-",
                       constexprs=constexprs)


# ---- the peers' kernels at the configs their code launches ---------------------------------------------
def peer_cases(ccs=(80, 90)):
    """CCE's LSE forward (BLOCK 256 x 128 x 32, 8 warps, 3 stages) and backward (128 x 128 x 32, 4 warps, 4
    stages; gradient filtering on and off), Liger's cross-entropy kernel (BLOCK_SIZE 32768, 32 warps): bf16,
    D = 2304 / H = 4096 (both multiples of the K step: EVEN_D)."""
    bf16 = "*bf16"
    for cc in ccs:
        arch = f"sm_{cc}"
        yield dict(getter="cut_cross_entropy.cce_lse_forward:_cce_lse_forward_kernel", kernel="cce_lse_forward",
                   arch=arch, cc=cc, dtype="bf16", kind="-", config="256x128x32 w8 s3", tile=[256, 128, 32],
                   num_warps=8, num_stages=3, filter=False,
                   types={"E": bf16, "C": bf16, "LSE": "*fp32", "Locks": "*u32"},
                   divisible=["E", "C", "LSE", "Locks", "B", "V", "D", "stride_eb", "stride_cv"],
                   constexprs=dict(LA=None, Valids=None, softcap=None, stride_ed=1, stride_cd=1, stride_lse_b=1,
                                   stride_vb=1, HAS_VALIDS=False, BLOCK_B=256, BLOCK_V=128, BLOCK_D=32,
                                   GROUP_B=8, EVEN_D=True, HAS_SOFTCAP=False, HAS_LA=False,
                                   DOT_PRECISION="ieee"))
        for use_filter in (False, True):
            yield dict(getter="cut_cross_entropy.cce_backward:_cce_backward_kernel", kernel="cce_backward",
                       arch=arch, cc=cc, dtype="bf16", kind="-", config="128x128x32 w4 s4", tile=[128, 128, 32],
                       num_warps=4, num_stages=4, filter=use_filter,
                       types={"E": bf16, "C": bf16, "LSE": "*fp32", "dOut": "*fp32", "grad_scale": "fp32",
                              "Targets": "*i64", "dE": bf16, "dELocks": "*i32", "dC": bf16, "dCLocks": "*i32",
                              "VocabOrdering": "*i64", "filter_eps": "fp32"},
                       divisible=["E", "C", "LSE", "dOut", "Targets", "dE", "dELocks", "dC", "dCLocks", "B", "D",
                                  "V", "stride_eb", "stride_cv", "VocabOrdering"],
                       constexprs=dict(Valids=None, softcap=None, stride_ed=1, stride_cd=1, stride_vb=1,
                                       **({} if use_filter else {"VocabOrdering": None, "filter_eps": None}),
                                       BLOCK_B=128, BLOCK_V=128, BLOCK_D=32, MM_BACK_BLOCK_D=64, GROUP_B=8,
                                       EVEN_D=True, MM_BACK_EVEN_D=True, ITEM_DO=False, HAS_VALIDS=False,
                                       HAS_VOCAB_ORDERING=use_filter, FILTER_GRAD=use_filter, HAS_TARGETS=True,
                                       HAS_SOFTCAP=False, SHIFT=False, REQUIRES_GRAD=True, B_BIN=1024))
        yield dict(getter="liger_kernel.ops.cross_entropy:liger_cross_entropy_kernel", kernel="liger_ce",
                   arch=arch, cc=cc, dtype="bf16", kind="-", config="row x 32768 w32", tile=[1, 32768, 1],
                   num_warps=32, num_stages=3, filter=False,
                   types={"X_ptr": bf16, "Y_ptr": "*i64", "loss_ptr": "*fp32", "sum_non_ignore_weight": "fp32",
                          "weight_sum": "fp32"},
                   divisible=["X_ptr", "X_stride", "Y_ptr", "loss_ptr", "n_cols"],
                   constexprs=dict(weight_ptr=None, z_loss_ptr=None, token_accuracy_ptr=None,
                                   predicted_tokens_ptr=None, softcap=None, Y_stride=1, loss_stride=1,
                                   token_accuracy_stride=0, predicted_tokens_stride=0, lse_square_scale=0.0,
                                   label_smoothing=0.0, reduction="mean", RETURN_Z_LOSS=False,
                                   RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=32768,
                                   HAS_WEIGHT=False, HAS_SOFTCAPPING=False, HAS_GRADIENTS=True))


def compile_cases(cases, jobs: int = 2) -> list[dict]:
    cases = list(cases)
    if jobs <= 1:
        return [compile_record(c) for c in cases]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_record, cases))


def load(path: Path = FACTS_PATH) -> list[dict]:
    return json.loads(Path(path).read_text())["records"]


def find(records: list[dict], kernel: str, arch: str, **match) -> list[dict]:
    return [r for r in records if r["kernel"] == kernel and r["arch"] == arch and r.get("error") is None
            and all(r.get(k) == v for k, v in match.items())]


def toolchain() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    out = {"triton": triton.__version__}
    for cc in (90, 100):
        try:
            out[f"ptxas_sm{cc}"] = subprocess.run([get_ptxas(cc).path, "--version"], capture_output=True,
                                                  text=True).stdout.strip().splitlines()[-1]
        except Exception as exc:  # noqa: BLE001
            out[f"ptxas_sm{cc}"] = f"unavailable: {exc}"
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kernel-facts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(FACTS_PATH), help="the JSON to write (default bench/data/...)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-peers", action="store_true",
                        help="recompile only this project's kernels; the peers' records of --out are kept")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    cases = list(our_cases("sm_90"))
    if not args.no_peers:
        try:
            import cut_cross_entropy  # noqa: F401
            import liger_kernel.ops.cross_entropy  # noqa: F401
        except ImportError as exc:
            parser.error(f"the peers are not importable ({exc}); see this module's docstring, or --no-peers")
        cases += list(peer_cases())
    records = compile_cases(cases, args.jobs)
    if args.no_peers and Path(args.out).is_file():
        ours = {c["kernel"] for c in cases}
        records += [r for r in load(Path(args.out)) if r["kernel"] not in ours]
    failed = [r for r in records if r["error"]]
    for r in records:
        sass = r.get("sass") or {}
        print(f"{r['kernel']:16} {r['arch']:6} {r['config']:18} filter={int(r['filter'])} "
              + (f"ERROR {r['error'][:100]}" if r["error"] else
                 f"regs {r['registers']:3} spill {r['spill_bytes']:4} smem {r['shared_bytes'] // 1024:3}K "
                 f"{r['product']:7} pipelined={sass.get('pipelined')} epilogue={sass.get('epilogue_instructions')}"),
              file=sys.stderr)
    payload = {"command": "python -m bench kernel-facts " + " ".join(argv or sys.argv[1:]),
               "toolchain": toolchain(), "records": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
