"""The GPU architectures users train on, and compiling a Triton kernel for one of them without a GPU.

``ARCHS`` says, per target, the shared memory one block may use and which tensor-core instruction a 16-bit
product must become there (mma.sync on sm_8x, a warpgroup MMA on sm_90, tcgen05 on sm_100). ``compile_kernel``
runs ``triton.compile`` for a ``GPUTarget("cuda", cc, 32)`` with the signature a launch on contiguous tensors
would get; ``sass_facts`` reads the cubin's SASS (``cuobjdump -sass``, Triton's bundled copy) for what the
performance model (bench/gpu_model.py) needs: the MMA loops, whether they copy operands asynchronously
(software pipelining), and the instructions a warp issues per output tile outside them (the epilogue).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    cc: int
    #: bytes of shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    smem_per_block: int
    #: what a 16-bit tl.dot must compile to ("mma": mma.sync, "wgmma", "tcgen05")
    product: str
    gpus: str


KIB = 1024
ARCHS = {
    "sm_80": Arch("sm_80", 80, 163 * KIB, "mma", "A100, A30"),
    "sm_86": Arch("sm_86", 86, 99 * KIB, "mma", "RTX 30xx, A10, A40"),
    "sm_89": Arch("sm_89", 89, 99 * KIB, "mma", "RTX 40xx, L4, L40"),
    "sm_90": Arch("sm_90", 90, 227 * KIB, "wgmma", "H100, H200"),
    "sm_100": Arch("sm_100", 100, 227 * KIB, "tcgen05", "B200, GB200"),
}


def compile_kernel(kernel, types: dict, constexprs: dict, divisible: set, cc: int, num_warps: int,
                   num_stages: int):
    """triton.compile of a @triton.jit function for compute capability ``cc``: ``types`` maps argument names to
    Triton types (missing: i32), ``constexprs`` the compile-time values (None for an absent optional pointer),
    ``divisible`` the integer/pointer arguments known to be multiples of 16 (unit strides go in constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        # "*": the type of pointers not named (this project's kernels: the accumulation dtype)
        signature[name] = types.get(name, types.get("*", "i32") if name.endswith("_ptr") else "i32")
        if name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def product_kind(compiled) -> str:
    """What the kernel's tl.dot became: "wgmma", "tcgen05", "mma" (mma.sync), "fma" (no tensor core) or
    "none" (no product)."""
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    kinds = []
    if "tc_gen5_mma" in ttgir or "tcgen05.mma" in ptx:
        kinds.append("tcgen05")
    if "warp_group_dot" in ttgir or "wgmma.mma_async" in ptx:
        kinds.append("wgmma")
    dots = re.findall(r"\btt\.dot\b[^\n]*", ttgir)
    if dots:
        # a tt.dot left in TTGIR is mma.sync when its result has an nvidia_mma layout, else FMA
        kinds.append("mma" if all("#mma" in d or "nvidia_mma" in d for d in dots) and "mma.sync" in ptx
                     else "fma")
    if not kinds:
        return "none"
    # the weakest product decides (any fma makes the kernel an FMA kernel for the model)
    for kind in ("fma", "mma", "wgmma", "tcgen05"):
        if kind in kinds:
            return kind
    return kinds[0]


def _cuobjdump() -> str:
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
#: SASS opcodes of tensor-core products: mma.sync (HMMA), warpgroup MMA (HGMMA), tcgen05 (UTC*MMA)
_MMA = re.compile(r"^(HMMA|HGMMA|UTC\w*MMA|IMMA|DMMA)")
#: asynchronous operand copies: cp.async (LDGSTS), TMA (UTMALDG / UBLKCP)
_ASYNC = re.compile(r"^(LDGSTS|UTMALDG|UBLKCP)")


def sass_instructions(cubin: bytes) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every SASS instruction of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _LINE.finditer(out) if m.group(3) != "NOP"]


def sass_facts(cubin: bytes) -> dict:
    """The loops of the kernel's SASS (a backward branch closes one) and per MMA loop (a loop holding a
    tensor-core instruction, no inner loop that does): its instructions per iteration, its MMA instructions,
    whether it copies operands asynchronously. ``epilogue_instructions``: what a warp issues per output tile
    outside the MMA loops: the instructions of the smallest loop around an MMA loop less its MMA loops (the
    class-tile loop of a persistent kernel), or, without such a loop, the instructions after the first MMA
    loop (one tile per program). Static counts: inner non-MMA loops count once."""
    code = sass_instructions(cubin)
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    loops = []
    for i, (addr, op, args) in enumerate(code):
        if op.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
                loops.append((index[int(target.group(1), 16)], i))
    loops = sorted(set(loops))

    def has_mma(lo, hi):
        return any(_MMA.match(code[j][1]) for j in range(lo, hi + 1))

    mma_loops = [(lo, hi) for lo, hi in loops if has_mma(lo, hi) and not any(
        (l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi and has_mma(l2, h2) for l2, h2 in loops)]
    facts = {"instructions": len(code), "mma_instructions": sum(bool(_MMA.match(op)) for _, op, _ in code),
             "mma_loops": [], "epilogue_instructions": 0, "tile_loop": False}
    for lo, hi in mma_loops:
        ops = [code[j][1] for j in range(lo, hi + 1)]
        facts["mma_loops"].append({"instructions": len(ops), "mma": sum(bool(_MMA.match(o)) for o in ops),
                                   "async_copies": sum(bool(_ASYNC.match(o)) for o in ops)})
    if mma_loops:
        outer = [(lo, hi) for lo, hi in loops if (lo, hi) not in mma_loops and any(
            lo <= l2 and h2 <= hi for l2, h2 in mma_loops)]
        if outer:
            lo, hi = min(outer, key=lambda lh: lh[1] - lh[0])
            inside = sum(h2 - l2 + 1 for l2, h2 in mma_loops if lo <= l2 and h2 <= hi)
            facts["epilogue_instructions"] = (hi - lo + 1) - inside
            facts["tile_loop"] = True
        else:
            first_end = min(hi for _, hi in mma_loops)
            inside = sum(h2 - l2 + 1 for l2, h2 in mma_loops if l2 > first_end)
            facts["epilogue_instructions"] = len(code) - first_end - 1 - inside
    facts["pipelined"] = bool(mma_loops) and all(loop["async_copies"] > 0 for loop in facts["mma_loops"])
    return facts
