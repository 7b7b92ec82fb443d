"""The GPU performance model of the developer tools: one definition of the floor, one kernel-time formula, one
table of per-GPU constants. Used by the kernel report (bench/kernels.py), the calibration against the peers'
published times (bench/calibration.py), the ceilings job and the GPU session's model-vs-measured table.

The floor: the four B x C x d GEMMs of a step (forward, recompute, dx, dW), 8 B C d FLOP at the GPU's
``peak_tflops`` (dense 16-bit, what cuBLAS sustains on a large square product).

A launch of a kernel (``Launch``) takes

    t = launches x launch_us + serial + max(hbm, body)
    body = mainloop + epilogue           (one CTA per SM and no warp specialisation: they take turns)
         = max(mainloop, epilogue)       (two or more CTAs per SM: one's epilogue hides under another's MMA)
    mainloop = max(mma, l2)              (operands copied asynchronously: cp.async / TMA in the MMA loop)
             = mma + l2                  (no async copy: every K step waits for its loads)

* mma = FLOP / (peak x product efficiency x grid fill), the product efficiency by instruction
  (``PRODUCT_EFFICIENCY``: the arch's own tensor-core instruction 1, Triton's kernels ``triton_mma``
  x that, CUTLASS's ``cutlass_mma`` x that; mma.sync on Hopper about half; FMA the arch's FP32 rate), x (1 + spill bytes / 256);
  grid fill = min(1, CTAs / SMs) (a grid smaller than the GPU leaves SMs idle);
* l2 = the operand bytes every CTA copies from L2 into shared memory (each output tile reads its A and B
  panels: M N K (1/BM + 1/BN) elements for a BM x BN tiling) / ``l2_tbps``;
* hbm = the bytes that must cross HBM (W once, dW once, buffers larger than L2) / ``hbm_tbps``;
* epilogue = output tiles / SMs x (the instructions a warp issues per tile outside the MMA loops, read from
  the compiled SASS) x warps / 4 schedulers / clock;
* serial = bytes read-modified-written under a spin lock (Cut Cross-Entropy's dE/dC) / (``l2_tbps`` x
  ``lock_efficiency``): the lock keeps them from overlapping anything;
* a vendor kernel (cuBLAS GEMM, a torch elementwise pass) has no SASS facts: max(FLOP / peak / fill, bytes /
  (hbm x its efficiency)).

A step is a list of launches plus its host time: ``host_ops`` x ``host_op_us`` per chunk, which the GPU waits
for only where the host is slower than the GPU's work (or after a device-to-host sync).

Constants: ``GPUS`` (vendor figures, and the few that are fitted: see ``FITTED``, each with the published
rows that pin it; bench/data/published_peers.csv holds the rows, ``python -m bench calibrate`` the errors).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class GPU:
    name: str
    arch: str
    sms: int
    clock_ghz: float
    #: dense 16-bit tensor-core TFLOP/s cuBLAS sustains on a large square GEMM (the floor's rate)
    peak_tflops: float
    #: HBM bandwidth a large copy reaches (TB/s)
    hbm_tbps: float
    #: L2 -> SM bandwidth under load (TB/s; fitted on H100/A100 from the peers, see FITTED)
    l2_tbps: float
    smem_per_block_kib: int
    #: FP32 FMA TFLOP/s (products off the tensor cores)
    fma_tflops: float
    launch_us: float = 4.0
    #: host time per eager torch op / Triton launch in a chunk loop (Python dispatch)
    host_op_us: float = 10.0


#: one table: vendor figures (A100 SXM 312 TFLOP/s dense bf16 2.04 TB/s 108 SMs; H100 SXM 989, 3.35 TB/s, 132
#: SMs; H200 the same SMs with 4.8 TB/s; B200 ~2250, 8 TB/s, 148 SMs), at what cuBLAS and a copy sustain
#: (about 0.8-0.9 of the datasheet; the H100 figure is the one the report always used)
GPUS = {
    "A100": GPU("A100-SXM4-80GB", "sm_80", 108, 1.41, 280.0, 1.85, 4.0, 163, 19.5),
    "H100": GPU("H100-SXM", "sm_90", 132, 1.83, 790.0, 3.0, 7.0, 227, 67.0),
    "H200": GPU("H200", "sm_90", 132, 1.83, 790.0, 4.3, 7.0, 227, 67.0),
    "B200": GPU("B200", "sm_100", 148, 1.9, 1800.0, 7.2, 10.0, 227, 80.0),
}

#: the constants that are not vendor figures, what pins each, and how sure it is
FITTED = {
    "cutlass_mma": "a CUTLASS/CuTe warp-specialised TMA mainloop against cuBLAS: 1.0, from the two CuTe-DSL rows "
                   "on H200 (Liger's and QuACK's epilogue-fused linear cross-entropy at d = 4096, where the MMA "
                   "term is the step: -2 % and -3 % at 1.0, +15 % and +14 % at Triton's 0.85)",
    "triton_mma": "Triton's MMA loop against cuBLAS on the same instruction: 0.85, from CCE's LSE forward on "
                  "A100 (the one deep-K row where MMA is the only large term)",
    "l2_tbps": "L2 -> SM operand bandwidth: A100 4.0, H100/H200 7.0 TB/s (microbenchmarks publish 4-5.5 and "
               "7-10; the CCE backward rows pin A100's together with lock_efficiency)",
    "lock_efficiency": "fraction of L2 bandwidth a spin-locked read-modify-write reaches: 0.5 (CCE backward)",
    "elementwise_cast": "HBM efficiency of torch's mixed-dtype elementwise passes (bf16 += fp32, .float()): "
                        "0.6 (Liger's H200 row; the GPU session measures it)",
    "gemm_split_k": "cuBLAS GEMMs whose output has fewer 128 x 128 tiles than SMs: Liger's grad_input GEMM (64 "
                    "tiles on 108 SMs, 0.6 of a wave) is assumed not split over K (grid fill < 1: its row fits "
                    "that way); the CUTLASS path's per-chunk dx GEMM (16 tiles on 132 SMs, 0.12 of a wave, K = "
                    "32768) is assumed split (fill 1: unsplit it would take 8x the MMA time); both unverified, "
                    "the GPU session times both shapes (bench/gpu_probe.py plain_gemms_ms)",
}
TRITON_MMA = 0.85
CUTLASS_MMA = 1.0
#: the MMA-loop efficiency of a kernel by the library that generated it (Facts.library)
LIBRARY_MMA = {"triton": TRITON_MMA, "cutlass": CUTLASS_MMA}
LOCK_EFFICIENCY = 0.5
ELEMENTWISE_EFFICIENCY = 0.9
ELEMENTWISE_CAST_EFFICIENCY = 0.6
#: product efficiency by (arch, instruction) relative to the arch's own tensor-core peak
PRODUCT_EFFICIENCY = {"tcgen05": 1.0, "wgmma": 1.0, "mma": 1.0, "mma_on_hopper": 0.5}
SPILL_BYTES_PER_HALVING = 256.0
SCHEDULERS_PER_SM = 4


def floor_s(batch: int, dim: int, rows: int, peak_tflops: float = GPUS["H100"].peak_tflops) -> float:
    """The floor: the four B x rows x d GEMMs (8 B rows d FLOP) at ``peak_tflops``."""
    return 4 * 2.0 * batch * rows * dim / (peak_tflops * 1e12)


@dataclass
class Facts:
    """What the model reads from a compiled kernel (bench/data/kernel_facts.json)."""
    product: str = "wgmma"
    registers: int = 128
    spill_bytes: int = 0
    shared_bytes: int = 0
    num_warps: int = 4
    pipelined: bool = True
    epilogue_instructions: int = 0
    #: what generated the MMA loop: "triton" or "cutlass" (``LIBRARY_MMA``)
    library: str = "triton"

    @classmethod
    def from_record(cls, record: dict) -> "Facts":
        sass = record.get("sass") or {}
        return cls(product=record["product"], registers=record["registers"], spill_bytes=record["spill_bytes"],
                   shared_bytes=record["shared_bytes"], num_warps=record["num_warps"],
                   pipelined=sass.get("pipelined", True), epilogue_instructions=sass.get("epilogue_instructions", 0))


def ctas_per_sm(facts: Facts, gpu: GPU) -> int:
    """Resident CTAs per SM from registers (64 K per SM, allocated per warp in 256s) and shared memory."""
    regs = -(-max(facts.registers, 1) * 32 // 256) * 256 * facts.num_warps
    by_regs = 65536 // max(regs, 1)
    smem_sm = (gpu.smem_per_block_kib + 1) * 1024
    by_smem = smem_sm // max(facts.shared_bytes + 1024, 1) if facts.shared_bytes else 32
    return max(0, min(by_regs, by_smem, 2048 // (32 * facts.num_warps)))


@dataclass
class Launch:
    """One kernel of a step (``count`` launches of it in all): its work, and the compiled facts (None: a vendor
    kernel, cuBLAS or a torch elementwise pass)."""
    name: str
    flop: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    #: output tiles (the epilogue runs once per tile) and CTAs in flight at once (grid fill)
    tiles: float = 0.0
    ctas: Optional[float] = None
    serial_bytes: float = 0.0
    count: int = 1
    facts: Optional[Facts] = None
    #: vendor elementwise pass that converts dtypes (slower, see FITTED["elementwise_cast"])
    cast: bool = False


def product_efficiency(facts: Facts, gpu: GPU) -> float:
    if facts.product == "fma":
        return gpu.fma_tflops / gpu.peak_tflops
    if facts.product == "none":
        return 1.0
    if facts.product == "mma" and gpu.arch in ("sm_90", "sm_100"):
        return PRODUCT_EFFICIENCY["mma_on_hopper"]
    return PRODUCT_EFFICIENCY.get(facts.product, 1.0)


def launch_terms(launch: Launch, gpu: GPU) -> dict:
    """The terms of the module docstring for one kernel (seconds), and its time ``total``."""
    peak = gpu.peak_tflops * 1e12
    hbm_bw = gpu.hbm_tbps * 1e12
    l2_bw = gpu.l2_tbps * 1e12
    fill = 1.0 if launch.ctas is None else min(1.0, launch.ctas / gpu.sms)
    terms = {"launch": launch.count * gpu.launch_us * 1e-6}
    if launch.facts is None:  # vendor kernel
        eff = ELEMENTWISE_CAST_EFFICIENCY if launch.cast else ELEMENTWISE_EFFICIENCY
        terms["mma"] = launch.flop / (peak * max(fill, 1e-9))
        terms["hbm"] = launch.hbm_bytes / (hbm_bw * (eff if launch.flop == 0 or launch.cast else 1.0))
        terms["total"] = terms["launch"] + max(terms["mma"], terms["hbm"])
        return terms
    f = launch.facts
    resident = ctas_per_sm(f, gpu)
    eff = product_efficiency(f, gpu) * (LIBRARY_MMA[f.library] if f.product != "fma" else 1.0)
    spill = 1.0 + f.spill_bytes / SPILL_BYTES_PER_HALVING
    terms["mma"] = launch.flop / (peak * eff * max(fill, 1e-9)) * spill
    terms["l2"] = launch.l2_bytes / l2_bw
    terms["hbm"] = launch.hbm_bytes / hbm_bw
    clock = gpu.clock_ghz * 1e9
    per_sm_tiles = launch.tiles / (gpu.sms * max(fill, 1e-9))
    terms["epilogue"] = per_sm_tiles * f.epilogue_instructions * f.num_warps / SCHEDULERS_PER_SM / clock
    terms["serial"] = launch.serial_bytes / (l2_bw * LOCK_EFFICIENCY)
    terms["ctas_per_sm"] = resident
    mainloop = max(terms["mma"], terms["l2"]) if f.pipelined else terms["mma"] + terms["l2"]
    body = max(mainloop, terms["epilogue"]) if resident >= 2 else mainloop + terms["epilogue"]
    terms["total"] = terms["launch"] + terms["serial"] + max(terms["hbm"], body)
    return terms


@dataclass
class Step:
    """A step: its launches, and the host's part (``host_ops`` eager ops or launches per chunk over ``chunks``
    chunks; ``syncs`` device-to-host syncs, after each of which the GPU waits for the host)."""
    launches: list = field(default_factory=list)
    chunks: int = 1
    host_ops: float = 0.0
    syncs: int = 0


def step_time(step: Step, gpu: GPU) -> dict:
    """Seconds of the step and of each launch; the host hides under the GPU chunk by chunk except after a
    sync."""
    per = {}
    for launch in step.launches:
        terms = launch_terms(launch, gpu)
        per[launch.name] = terms
    gpu_s = sum(t["total"] for t in per.values())
    host_chunk = step.host_ops * gpu.host_op_us * 1e-6
    gpu_chunk = gpu_s / max(step.chunks, 1)
    total = step.chunks * max(gpu_chunk, host_chunk) + step.syncs * gpu.host_op_us * 1e-6 * 2
    return {"total": total, "gpu": gpu_s, "host": step.chunks * host_chunk, "launches": per}


def with_constants(gpu: GPU, **overrides) -> GPU:
    """A GPU entry with some constants replaced (the GPU session's re-fit from what it measured)."""
    return replace(gpu, **overrides)
