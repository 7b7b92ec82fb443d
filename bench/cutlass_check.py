"""``python -m bench cutlass``: the cuda backend's CUTLASS sm_90a GEMMs (csrc/cutlass/margin_sm90.cu) compiled
without a GPU, one instantiation at a time, and the calibrated model's estimate of the backend's step.

Per instantiation (forward/backward x bf16/fp16, the dW GEMM x bf16/fp16 x 16-bit/fp32 output,
``MK_SM90_KERNELS``): ``nvcc -arch=sm_90a -cubin -DNDEBUG
-Xptxas -v`` (the extension's flags), its wall and CPU time, the GEMM kernel's registers, spill bytes, any
ptxas C7510 or C7515 warning (wgmma serialized), whether its SASS (Triton's cuobjdump) holds HGMMA; the dynamic shared
memory each launch requests comes from one host-only compile that prints ``Kernel::SharedStorageSize`` (the
forward's 4,144 B of static norm slots added). Written
to bench/data/cutlass_facts.json. ``--check`` exits 1 on a spill, a C7510 or C7515, no HGMMA, shared memory above
227 KiB, or an estimate above ``LIMIT`` x the floor; ``--facts-only`` checks the committed file's content
against the same limits without compiling (what the default test run does).

The estimate (B = 512, C = 1e6, d = 512, bf16, H100 of bench/gpu_model.py) follows what the chunk loop's fused
branch issues (margin_kernels/backends/chunk_loop.py; its default chunks come from ``fused_chunk_sizes``, the
function the loop calls), with these assumptions:

* the forward: the call's column-major row_params (one small copy), then the fused forward GEMM over the
  forward chunk (all of C at B = 512: nothing B x C is written; its scratch is one (max, sum) pair per row and
  256 columns) and the fixed-order merge of those pairs, per forward chunk. The GEMM forms the inverse norms
  itself from the W tiles its mainloop holds (each CTA of a 4 x 1 cluster a quarter of the tile's 256 classes,
  exchanged through distributed shared memory; written into the op's saved store, which the backward reads; no
  separate pass over W): its consumer warps issue those instructions beside the epilogue's, counted per tile
  from compiled code (the probes below: one K step of the norm loop, its loads and squares, times the K steps,
  plus the exchange, 1/max(|w|, eps) and the per-subtile loads);
* the backward: a chunk loop of the backward width (the 16-bit dL/dcos chunk sized to L2): the fused
  recompute GEMM (dL/dcos in bf16 into the chunk buffer, per-64-row-tile column partials), the dx GEMM (cuBLAS,
  bf16 operands, fp32 output) into a group buffer summed into dx once per ``DX_GROUP`` chunks, the fused dW
  GEMM (finish_dw's unscale and tangent projection and the column partials' sum in its epilogue, bf16 dW);
  the last chunk is only as wide as the classes left; ``HOST_OPS_PER_CHUNK`` host operations per chunk,
  against the model's ``host_op_us``;
* ping-pong warp specialisation: one consumer warpgroup's epilogue runs under the other's mainloop, so a fused
  GEMM's body is max(mainloop, epilogue) (the model's two-CTAs rule; the kernel is one CTA of two consumer
  warpgroups per SM), and its epilogue issue time counts one warpgroup (4 warps) per tile;
* the epilogue's instructions per element are those of a probe loop compiled here for sm_90a (the per-element
  step of ``margin_math.h`` for ``PROBE_KIND``, ArcFace/CosFace's identity negatives, plus the visitor's load
  and compare), times the tile's elements per thread, plus ``EPILOGUE_FIXED`` per tile for the reduction trees
  and the stores; the run-time kind switch adds ``SWITCH_INSTRUCTIONS`` per element; the forward's norm work
  adds its probes' counts (csrc/cutlass/norm_steps.h, the code the kernel runs: ``norm_step`` per K step of
  64, ``norm_finish`` per tile);
* clusters (``CLUSTERS``): TMA multicast delivers one L2 read of a W tile to the cluster's M CTAs (and of an x
  tile to its N CTAs), so the L2 term is M N K (1 / (BM cm) + 1 / (BN cn)) elements;
* the per-element exp is the SFU's (margin_math.h mk_exp_sfu: ex2.approx, two instructions), as the probe and
  the visitor both call it;
* the MMA loop's efficiency is the model's CUTLASS one (``gpu_model.CUTLASS_MMA``, 1.0), pinned by the two
  CuTe-DSL calibration rows (Liger's and QuACK's epilogue-fused kernels on H200, whose step is their MMA term
  at d = 4096); Triton's 0.85 would put those rows at +14-15 %. Those rows are modelled without compiled facts
  (their DSL kernels are not compiled here), so this is the weakest of the model's constants for this path;
* a fused GEMM reads W from HBM once per launch and writes nothing B x C to HBM (the backward's 32 MiB chunk
  buffer stays in the 50 MB L2 between the GEMM that writes it and the two that read it; the dW GEMM reads W
  again as its C operand: it does not stay in L2 beside that buffer).
No GPU has run these kernels: the estimate is the model's, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import gpu_model
from .archs import _cuobjdump

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCE = CSRC / "cutlass" / "margin_sm90.cu"
FACTS_PATH = ROOT / "bench" / "data" / "cutlass_facts.json"

#: name -> MK_SM90_KERNELS bit
INSTANTIATIONS = {"forward_bf16": 1, "forward_f16": 2, "backward_bf16": 4, "backward_f16": 8, "dw_bf16": 16,
                  "dw_bf16_f32": 32, "dw_f16": 64, "dw_f16_f32": 128}
#: tiles (M, N) of the forward, backward and dW GEMMs (margin_sm90.cu TileShape / BackwardTileShape /
#: DwTileShape; the dW GEMM's M is the chunk's classes, its N is d)
TILES = {"forward": (64, 256), "backward": (64, 128), "dw": (64, 256)}
#: cluster shapes (M, N) (margin_sm90.cu ClusterShape / BackwardClusterShape / DwClusterShape): TMA multicasts
#: each B-operand tile to the cluster's M CTAs and each A-operand tile to its N CTAs, so a panel crosses
#: L2 -> SM once per cluster
CLUSTERS = {"forward": (4, 1), "backward": (4, 2), "dw": (4, 1)}
#: the forward's K step (TileShape's K): the norm loop's probe counts one step
NORM_K_STEP = 64
#: SASS instructions per element of the dW GEMM's epilogue outside the probe (not measured by a probe loop: a
#: load of w, the unscale, dw_normalize's two multiplies and a subtract, the conversion and the shared-memory
#: store, counted generously) and per tile for the column sums (2 rows per thread x up to 8 row-tile partials)
DW_PER_ELEMENT = 12
SMEM_LIMIT = 227 * 1024
LIMIT = 1.3
#: what CI holds the committed estimate to (1.29x at the last change: a regression guard under LIMIT)
GUARD = 1.3
SHAPE = dict(batch=512, classes=1_000_000, dim=512)
#: per backward chunk: the fused recompute GEMM (its binding's checks, the dL/dcos buffer), the dx GEMM, the
#: dx group's bookkeeping, the fused dW GEMM (its sink: the dense dW's rows in place), one for the loop's own
#: Python (the chunk's slices and norms' view)
HOST_OPS_PER_CHUNK = 5
PROBE_KIND = "kIdentity"
SWITCH_INSTRUCTIONS = 4
EPILOGUE_FIXED = 400


def nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    from shutil import which
    return which("nvcc")


def cutlass_flags() -> tuple[Optional[list[str]], str]:
    """The extension's nvcc flags for the CUTLASS translation unit, or (None, why not)."""
    sys.path.insert(0, str(ROOT))
    from margin_kernels import native_build
    dirs, where = native_build.cutlass_include_dirs()
    if dirs is None:
        return None, where
    return native_build.cutlass_nvcc_flags(dirs) + ["-I", str(CSRC)], where


def _functions(sass: str) -> dict:
    """SASS text per function (cuobjdump -sass prints a 'Function : name' header before each)."""
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _opcodes(text: str) -> list:
    return [m.group(3) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);",
                                            text) if m.group(3) != "NOP"]


def compile_instantiation(name: str, flags: list[str], compiler: str, workdir: Path) -> dict:
    cubin = workdir / f"{name}.cubin"
    cmd = [compiler, "-arch=sm_90a", "-cubin", "-Xptxas", "-v", *flags, f"-DMK_SM90_KERNELS={INSTANTIATIONS[name]}",
           str(SOURCE), "-o", str(cubin)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed for {name}:\n{log[-4000:]}")
    record = {"compile_wall_s": round(wall, 1),
              "compile_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
              "c7510": "C7510" in log, "c7515": "C7515" in log}
    for block in re.split(r"ptxas info\s+: Compiling entry function '", log)[1:]:
        fname = block.split("'")[0]
        if "GemmUniversal" not in fname:
            continue
        record["kernel"] = fname
        record["registers"] = int(re.search(r"Used (\d+) registers", block).group(1))
        record["spill_bytes"] = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", block))
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = _opcodes(_functions(sass).get(record.get("kernel", ""), ""))
    record["hgmma"] = sum(op.startswith("HGMMA") for op in ops)
    record["hgmma_shapes"] = sorted({op for op in ops if op.startswith("HGMMA")})
    record["sass_instructions"] = len(ops)
    return record


def shared_bytes(flags: list[str], compiler: str, workdir: Path) -> dict:
    exe = workdir / "report"
    subprocess.run([compiler, "-arch=sm_90a", *flags, "-DMK_SM90_KERNELS=0", "-DMK_SM90_REPORT_MAIN", str(SOURCE),
                    "-o", str(exe)], capture_output=True, text=True, check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


PROBE = r"""
#include "margin_math.h"
__global__ void probe_forward(const float* acc, const float* inv, const long long* label, int n, float scale,
                              float thr, float aux, float* out) {
  float m = -INFINITY, s = 0.0f;
  const mk::NegativeConsts<float> k{scale, 0.0f, 0.0f};
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 32) {
    const float c = acc[i] * inv[i];
    if (i == label[0]) continue;
    mk::lse_push<float, true>(m, s, mk::negative_logit<mk::KIND>(c, thr, aux, k));
  }
  out[threadIdx.x] = m + s;
}
__global__ void probe_backward(const float* acc, const float* inv, const long long* label, int n, float scale,
                               float thr, float aux, float lse, float g, float gt, float factor, float* d,
                               float* dot) {
  float sum = 0.0f;
  const mk::NegativeConsts<float> k{scale, 0.0f, 0.0f};
#pragma unroll 1
  for (int i = threadIdx.x; i < n; i += 32) {
    const float c = acc[i] * inv[i];
    const float dc = i == label[0] ? gt : mk::negative_grad<mk::KIND, float, true>(c, thr, aux, k, lse, g);
    d[i] = dc * (inv[i] * factor);
    sum += dc * c;
  }
  dot[threadIdx.x] = sum;
}
// the forward's norm loop (NormMainloop): per K step of 64, four 16-byte loads and 32 squares per thread
__global__ void probe_norm_step(const unsigned* group, int steps, float* out) {
  float s = 0.0f;
  const unsigned g0 = group[0], g1 = group[1], g2 = group[2], g3 = group[3];
#pragma unroll 1
  for (int t = 0; t < steps; ++t) {
    const unsigned stage = t * 8192u;
    s = mk_sm90::square_sum8<true>(mk_sm90::load_shared16(g0 + stage), s);
    s = mk_sm90::square_sum8<true>(mk_sm90::load_shared16(g1 + stage), s);
    s = mk_sm90::square_sum8<true>(mk_sm90::load_shared16(g2 + stage), s);
    s = mk_sm90::square_sum8<true>(mk_sm90::load_shared16(g3 + stage), s);
  }
  out[threadIdx.x] = s;
}
// its per-tile rest (NormMainloop's tail, Sm90NormNode::begin and begin_loop): the halves' shuffle, the
// quarter's 4 st.async, the slot barrier's waits, the warpgroup's two barriers, 2 of the tile's 256
// 1/max(sqrt(s), eps) per thread with their slot and global stores, 4 arrivals per warp, and the thread's 64
// columns of the tile read back from the slot (one per subtile column)
__global__ void probe_norm_finish(float s, float* out, unsigned parity) {
  __shared__ float sums[256], inv[256];
  __shared__ uint64_t full, empty;
  const int t = threadIdx.x;
  const float other = __shfl_xor_sync(0xffffffffu, s, 1);
  mk_sm90::wait_parity(&empty, parity ^ 1);
  if (t % 2 == 0)
    for (unsigned cta = 0; cta < 4; ++cta) mk_sm90::store_async_cluster(&sums[t / 2], &full, cta, s + other);
  __syncthreads();
  if (t == 0) mk_sm90::arrive_expect_tx(&full, 1024);
  mk_sm90::wait_parity(&full, parity);
#pragma unroll
  for (int c = t; c < 256; c += 128) {
    const float v = mk::inv_norm_from_sumsq(sums[c]);
    inv[c] = v;
    out[c] = v;
  }
  __syncthreads();
  if (t % 32 == 0)
    for (unsigned cta = 0; cta < 4; ++cta) mk_sm90::arrive_cluster(&empty, cta);
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc += inv[(t % 4) * 2 + (i % 2) + 8 * (i / 2)];
  out[256 + t] = acc;
}
"""


def per_element_instructions(compiler: str, workdir: Path) -> dict:
    """SASS instructions of one iteration of the probe loops (the per-element step, forward and backward; the
    norm loop's K step), and of the norm tail (``norm_finish``: the whole function, its barrier-wait spin loops
    counted once)."""
    probe = workdir / "probe.cu"
    probe.write_text('#include "cutlass/norm_steps.h"\n' + PROBE.replace("mk::KIND", f"mk::{PROBE_KIND}"))
    cubin = workdir / "probe.cubin"
    subprocess.run([compiler, "-arch=sm_90a", "-cubin", "-DNDEBUG", "-I", str(CSRC), str(probe), "-o", str(cubin)],
                   capture_output=True, text=True, check=True)
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    counts = {}
    for fname, text in _functions(sass).items():
        lines = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in re.finditer(
            r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", text) if m.group(3) != "NOP"]
        index = {addr: i for i, (addr, _, _) in enumerate(lines)}
        loops = []
        for i, (addr, op, args) in enumerate(lines):
            target = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
            if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
                loops.append(i - index[int(target.group(1), 16)] + 1)
        name = next(n for n in ("norm_step", "norm_finish", "forward", "backward") if n in fname)
        counts[name] = len(lines) if name == "norm_finish" else max(loops)
    return counts


def norm_instructions(per_element: dict, dim: int) -> int:
    """Instructions a consumer thread issues per forward tile to form its 64 rows' inverse norms: the norm
    loop's K steps and the tail (the probes of csrc/cutlass/norm_steps.h)."""
    return per_element["norm_step"] * -(-dim // NORM_K_STEP) + per_element["norm_finish"]


def epilogue_instructions(kind: str, per_element: dict, dim: int = 0) -> int:
    """Instructions one consumer warp issues per output tile besides the MMA (the forward's norm work at d =
    ``dim`` included: it competes with the other warpgroup's epilogue for the same issue slots)."""
    tm, tn = TILES[kind]
    elements_per_thread = tm * tn // 128  # one warpgroup of 128 threads per tile (ping-pong)
    if kind == "dw":  # no negative function, no kind switch
        return elements_per_thread * DW_PER_ELEMENT + EPILOGUE_FIXED
    norms = norm_instructions(per_element, dim) if kind == "forward" else 0
    return elements_per_thread * (per_element[kind] + SWITCH_INSTRUCTIONS) + EPILOGUE_FIXED + norms


def _widths(total: int, chunk: int) -> list[int]:
    """The chunk loop's chunk widths over ``total`` classes (chunk_loop's kept_tiles.chunks: the last is short)."""
    return [min(chunk, total - c0) for c0 in range(0, total, chunk)]


def estimate(facts: dict, gpu_name: str = "H100", shape: Optional[dict] = None, partial_fc: bool = False) -> dict:
    """The model's step (seconds) and its launches' terms; see the module docstring for the assumptions.
    ``partial_fc``: the same step over ``classes`` sampled columns (a class index): per chunk, forward and
    backward, the loop gathers the sampled rows into a copy (index_select: W's read moves from the GEMMs, where
    it hid under the MMAs, to the gather, where it does not; the copy is counted as written back), the GEMMs
    read the copy from L2, and the sink scatters the chunk's dW rows back (index_copy_)."""
    from margin_kernels.backends.chunk_loop import DX_GROUP, fused_chunk_sizes  # the loop's own rules

    gpu = gpu_model.GPUS[gpu_name]
    shape = SHAPE if shape is None else shape
    b, c, d = shape["batch"], shape["classes"], shape["dim"]
    two = 2  # bytes of a bf16 element
    forward_chunk, backward_chunk = fused_chunk_sizes(b, partial_fc)
    forward_widths, backward_widths = _widths(c, forward_chunk), _widths(c, backward_chunk)
    chunks = len(backward_widths)
    per_element = facts["per_element_instructions"]

    w_read = 0 if partial_fc else two  # bytes per W element a GEMM reads from HBM (Partial FC: the L2 copy)

    def fused(kind: str, name: str, widths: list[int], extra_hbm: float = 0.0):
        tm, tn = TILES[kind]
        cm, cn = CLUSTERS[kind]
        rec = facts["instantiations"][f"{kind}_bf16"]
        f = gpu_model.Facts(product="wgmma" if rec["hgmma"] else "mma", registers=128, spill_bytes=rec["spill_bytes"],
                            shared_bytes=facts["shared_bytes"][f"{kind}_bf16"], num_warps=4, pipelined=True,
                            epilogue_instructions=epilogue_instructions(kind, per_element, d), library="cutlass")
        cols = sum(widths)
        # output tiles per launch: (B x width) for the forward/recompute GEMMs, (width x d) for the dW GEMM
        tiles = sum(-(-w // tm) * -(-d // tn) if kind == "dw" else -(-b // tm) * -(-w // tn) for w in widths)
        return gpu_model.Launch(name, flop=2.0 * b * cols * d, hbm_bytes=cols * d * w_read + extra_hbm,
                                l2_bytes=b * cols * d * (1 / (tm * cm) + 1 / (tn * cn)) * two, tiles=tiles,
                                ctas=gpu.sms, count=len(widths), facts=f)

    pairs = sum(-(-w // TILES["forward"][1]) for w in forward_widths)
    groups = -(-chunks // DX_GROUP)
    launches = [
        gpu_model.Launch("row_params column-major copy", hbm_bytes=b * 8 * 2),
        # the GEMM also writes the C inverse norms into the op's store
        fused("forward", "fused forward GEMM (EVT log-sum-exp partials, inverse norms formed)", forward_widths,
              extra_hbm=c * 4),
        gpu_model.Launch("merge of the row partials", hbm_bytes=b * pairs * 8 * 2, count=len(forward_widths)),
        fused("backward", "fused recompute GEMM (EVT dL/dcos, bf16 chunk)", backward_widths),
        # its B x d output is 16 tiles at B = d = 512: cuBLAS is assumed to split K (FITTED["gemm_split_k"])
        gpu_model.Launch("dx GEMM (cuBLAS)", flop=2.0 * b * c * d, hbm_bytes=c * d * w_read, count=chunks),
        # reads W again as its C operand (the dx GEMM's read of the 32 MiB chunk does not stay in L2 beside the
        # 32 MiB dL/dcos chunk) and writes bf16 dW; the column partials (8 B per row tile and class) too
        fused("dw", "fused dW GEMM (EVT finish_dw + column sums, bf16 dW)", backward_widths,
              extra_hbm=c * d * two + -(-b // 64) * c * 8),
        # the chunks' fp32 dx products DX_GROUP at a time in a buffer, summed into dx once per group
        gpu_model.Launch("dx accumulate", hbm_bytes=b * d * 4 * (chunks + 2 * groups), count=2 * groups),
    ]
    if partial_fc:
        launches += [
            gpu_model.Launch("gather of the sampled rows (forward)", hbm_bytes=2 * c * d * two,
                             count=len(forward_widths)),
            gpu_model.Launch("gather of the sampled rows (backward)", hbm_bytes=2 * c * d * two, count=chunks),
            gpu_model.Launch("dW rows scattered into the dense dW", hbm_bytes=2 * c * d * two, count=chunks),
        ]
    step = gpu_model.Step(launches=launches, chunks=chunks, host_ops=HOST_OPS_PER_CHUNK)
    result = gpu_model.step_time(step, gpu)
    # ping-pong: the fused GEMMs' epilogue overlaps the other warpgroup's mainloop (module docstring)
    gpu_s = 0.0
    for launch in launches:
        terms = result["launches"][launch.name]
        if launch.facts is not None:
            mainloop = max(terms["mma"], terms["l2"])
            terms["total"] = terms["launch"] + terms["serial"] + max(terms["hbm"], max(mainloop, terms["epilogue"]))
        gpu_s += terms["total"]
    host_chunk = step.host_ops * gpu.host_op_us * 1e-6
    total = chunks * max(gpu_s / chunks, host_chunk)
    floor = gpu_model.floor_s(b, d, c, gpu.peak_tflops)
    return {"gpu": gpu_name, "shape": dict(shape), "forward_chunk": forward_chunk, "backward_chunk": backward_chunk,
            "total_s": total, "floor_s": floor, "ratio": total / floor, "host_s": chunks * host_chunk,
            "gpu_s": gpu_s, "launches": {name: {k: v for k, v in t.items()} for name, t in result["launches"].items()}}


def problems(facts: dict) -> list[str]:
    found = []
    for name, rec in facts["instantiations"].items():
        if rec["spill_bytes"]:
            found.append(f"{name}: {rec['spill_bytes']} spill bytes")
        if rec["c7510"]:
            found.append(f"{name}: ptxas C7510 (wgmma serialized)")
        if rec.get("c7515"):
            found.append(f"{name}: ptxas C7515 (wgmma serialized)")
        if not rec["hgmma"]:
            found.append(f"{name}: no HGMMA in its SASS")
    for name, value in facts["shared_bytes"].items():
        if value > SMEM_LIMIT:
            found.append(f"{name}: {value} B of shared memory > {SMEM_LIMIT}")
    ratio = facts["estimate"]["ratio"]
    if ratio > LIMIT:
        found.append(f"estimate {ratio:.2f}x the floor > {LIMIT}x")
    return found


def report(facts: dict) -> str:
    lines = ["instantiation    regs  spill  smem(B)   HGMMA  C7510  compile wall/CPU (s)"]
    for name, rec in facts["instantiations"].items():
        lines.append(f"{name:15s} {rec['registers']:5d} {rec['spill_bytes']:6d} {facts['shared_bytes'][name]:9d} "
                     f"{rec['hgmma']:6d}  {str(rec['c7510']):5s}  {rec['compile_wall_s']:.0f} / "
                     f"{rec['compile_cpu_s']:.0f}")
    e = facts["estimate"]
    lines.append(f"per-element SASS instructions ({PROBE_KIND}): {facts['per_element_instructions']}")
    lines.append(f"estimate ({e['gpu']}, B={e['shape']['batch']} C={e['shape']['classes']} d={e['shape']['dim']} "
                 f"bf16, chunks {e['forward_chunk']} / {e['backward_chunk']}): {e['total_s'] * 1e3:.2f} ms = {e['ratio']:.2f}x "
                 f"the floor {e['floor_s'] * 1e3:.2f} ms (GPU {e['gpu_s'] * 1e3:.2f} ms, host {e['host_s'] * 1e3:.2f} "
                 "ms; model only, no GPU measured it)")
    if "partial_fc" in facts:
        p = facts["partial_fc"]
        lines.append(f"Partial FC (the same C sampled, rows gathered per chunk): {p['total_s'] * 1e3:.2f} ms = "
                     f"{p['ratio']:.2f}x the floor (the kernels do not read the class index)")
    for name, t in e["launches"].items():
        top = {k: round(v * 1e3, 3) for k, v in t.items() if k in ("mma", "l2", "hbm", "epilogue", "launch", "total")}
        lines.append(f"  {name}: {top} ms")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cutlass", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill, C7510, no HGMMA, smem or estimate")
    parser.add_argument("--facts-only", action="store_true",
                        help="no compile: re-estimate and check the committed bench/data/cutlass_facts.json")
    parser.add_argument("--out", default=str(FACTS_PATH))
    args = parser.parse_args(argv)
    if args.facts_only:
        facts = json.loads(Path(args.out).read_text())
        facts["estimate"], facts["partial_fc"] = estimate(facts), estimate(facts, partial_fc=True)
    else:
        compiler = nvcc()
        if compiler is None:
            print("python -m bench cutlass: nvcc not found", file=sys.stderr)
            return 2
        flags, where = cutlass_flags()
        if flags is None:
            print(f"python -m bench cutlass: {where}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            # the package and version only: the install path is this machine's
            facts = {"cutlass": where.split(" (")[0], "nvcc": subprocess.run([compiler, "--version"], capture_output=True,
                                                              text=True).stdout.strip().splitlines()[-1],
                     "flags": "-arch=sm_90a -cubin -Xptxas -v " + " ".join(
                         f for f in flags if not f.startswith("/")),
                     "instantiations": {name: compile_instantiation(name, flags, compiler, work)
                                        for name in INSTANTIATIONS},
                     "shared_bytes": shared_bytes(flags, compiler, work),
                     "per_element_instructions": per_element_instructions(compiler, work)}
        facts["estimate"], facts["partial_fc"] = estimate(facts), estimate(facts, partial_fc=True)
        Path(args.out).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(report(facts))
    found = problems(facts)
    for problem in found:
        print(f"FAIL: {problem}")
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    raise SystemExit(main())
