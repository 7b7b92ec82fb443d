"""Tile sizes of the Triton kernels and how they are chosen.

* On a GPU the forward is autotuned over a short config list written for H100 (autotuning times each config
  once per (batch bucket, d, dtypes) and keeps the fastest; C is not in the key); the backward uses one
  tiling per (architecture, element size, and for the heavier epilogues the loss), ``BACKWARD_TILES``.
  ``MARGIN_KERNELS_TRITON_AUTOTUNE=0`` gives the forward one fixed tiling per dtype (``default_forward``)
  instead, so separate processes always run the same tiling (bitwise-reproducible runs; a given config is
  deterministic anyway: fixed merge orders, and the one atomic reduction, the dx partials', has a single
  writer per element and launch).
* Under TRITON_INTERPRET (CPU) there is no autotuning: a small fixed config (tiles of 16, two class
  splits) that still exercises several tiles, masked tails and the split merge on tiny test shapes.
* ``fixed_configs(...)`` overrides the choice (tests use it to force other tilings).

Forward tiles: BLOCK_B rows x BLOCK_C classes with a K loop of BLOCK_K. Backward tiles: one tiling shared
by its three kernels (``triton_backward``): BLOCK_B rows x BLOCK_C classes of dL/dcos, BLOCK_D columns of d
(the dcos kernel's K step and the width of the two gradient GEMMs' output tiles). The backward runs per
class chunk whose dL/dcos buffer stays within BACKWARD_BUFFER_BYTES.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..losses.negatives import NegativeKind
from ..losses.reductions import ReductionKind
from ..precision import PRODUCTS


@dataclass(frozen=True)
class ForwardTiles:
    block_b: int
    block_c: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BackwardTiles:
    """block_b x block_c: the dcos kernel's dL/dcos tile (and the gradient filter's unit), block_d its K step;
    the two gradient GEMMs' output tiles are ``out_d`` columns of d wide (grad_block_d, 0: block_d), the dW
    kernel's ``dw_group`` dcos class tiles tall (a skipped dW K step is one whose group of tiles all were)."""
    block_b: int
    block_c: int
    block_d: int = 16
    num_warps: int = 4
    num_stages: int = 1
    grad_block_d: int = 0
    dw_group: int = 1

    @property
    def out_d(self) -> int:
        return self.grad_block_d or self.block_d


#: tried by the autotuner on CUDA (bf16 GEMM shapes that suit an H100's wgmma and 228 KB of shared memory)
H100_FORWARD = [
    ForwardTiles(128, 128, 64, 8, 3),
    ForwardTiles(128, 256, 64, 8, 3),
    ForwardTiles(64, 128, 64, 4, 4),
    ForwardTiles(128, 64, 64, 4, 4),
    ForwardTiles(64, 64, 64, 4, 4),
    ForwardTiles(128, 128, 32, 8, 4),
]
#: the backward's tiling per storage element size, per architecture (one pick each: the three kernels must
#: agree on BLOCK_B x BLOCK_C for gradient filtering, and none is re-tuned per step). Chosen by the compiled
#: sm_90 code (``python -m bench kernels``, bf16, d = 512) under the GPU model (bench/gpu_model.py), whose
#: largest backward term is the operands' L2 -> shared memory traffic, M N K (1/BM + 1/BN) elements per GEMM:
#: a 128 x 128 dL/dcos tile in the dcos kernel where its epilogue fits the registers (204-254 of them, 0 spills,
#: every LSE kind but the power ones), and 128 x 256 output tiles in the dW and dx kernels (245-255 registers, 0
#: spills, once the dx partial is added by a reduction instead of a load beside the accumulator and the dW
#: epilogue's row factors are formed first; 224-225 KiB of shared memory at 3 stages).
#: ``NARROW_BACKWARD``: the dcos tile at 128 x 64 for the epilogues that spill at 128 x 128 (the power kinds
#: 304-392 bytes, CURRICULAR 24 with filtering, sub-centers 5032, the binary reduction at 255 registers with no
#: room left), the dW kernel still 128 rows tall (two dcos class tiles per K step). fp32/fp64: smaller tiles
#: (2x/4x the bytes). sm_80 (also sm_86/89: 99 KiB of shared memory per block) keeps narrow 32-wide tiles.
BACKWARD_TILES = {
    "sm_90": {2: BackwardTiles(128, 128, 64, 8, 3, grad_block_d=256), 4: BackwardTiles(64, 64, 32, 4, 3),
              8: BackwardTiles(32, 32, 32, 4, 2)},
    "sm_80": {2: BackwardTiles(128, 64, 32, 8, 3), 4: BackwardTiles(64, 64, 32, 4, 2),
              8: BackwardTiles(32, 32, 32, 4, 2)},
    # tcgen05 keeps the accumulator in tensor memory, but the dW epilogue reads it into registers beside the
    # W tile: 128 x 256 spills 104 bytes there (python -m bench archs), 128 x 128 does not
    "sm_100": {2: BackwardTiles(128, 128, 64, 8, 3, grad_block_d=128), 4: BackwardTiles(64, 64, 32, 4, 3),
               8: BackwardTiles(32, 32, 32, 4, 2)},
}
NARROW_BACKWARD = {"sm_90": BackwardTiles(128, 64, 64, 8, 3, grad_block_d=256, dw_group=2),
                   "sm_100": BackwardTiles(128, 64, 64, 8, 3, grad_block_d=128, dw_group=2)}
#: LSE kinds whose dcos epilogue spills at 128 x 128 with gradient filtering (CURRICULAR: 24 bytes on sm_90)
NARROW_BACKWARD_KINDS = (int(NegativeKind.POWER), int(NegativeKind.POWER_ST), int(NegativeKind.CURRICULAR))


def narrow_backward(kind: int = 0, reduction: int = 0, sub_centers: int = 1, fp16: bool = False) -> bool:
    """Whether this loss needs ``NARROW_BACKWARD``: its dcos epilogue spills at 128 x 128, or the storage is fp16
    (whose dx kernel, W normalised in registers, spills 12 bytes per thread over 128-class K steps into 128 x 256
    tiles: ``python -m bench kernels``; bf16 does not)."""
    return (kind in NARROW_BACKWARD_KINDS or sub_centers > 1 or reduction == int(ReductionKind.SOFTPLUS_SUM)
            or fp16)


#: bytes of the backward's B x chunk dL/dcos buffer: large enough that a chunk's three launches cost far
#: more than their launch overhead (at B = 512 in bf16: 65,536 classes, ~35 GFLOP per kernel), small enough to
#: stay near the L2 cache (50 MB on H100) between the kernel that writes it and the two that read it
BACKWARD_BUFFER_BYTES = 64 * 2 ** 20
#: the interpreter's fixed tiling (dot needs >= 16 on GPUs; the same config must stay valid there)
INTERPRETER_FORWARD = ForwardTiles(16, 16, 16)
INTERPRETER_BACKWARD = BackwardTiles(16, 16)
#: the interpreter's chunk: two class tiles, so tests cross chunk boundaries
INTERPRETER_CHUNK_TILES = 2
INTERPRETER_SPLITS = 2

_SHARED_MEMORY_BUDGET = 200 * 1024   # bytes of the 228 KB an H100 SM has, leaving room for the compiler
_ACCUMULATOR_REGISTERS = 128         # fp32 accumulator registers per thread we allow before spilling
_PARTIAL_BUDGET = 64 * 2 ** 20       # bytes for the dx split partials


def config_arch(major: int) -> str:
    """The config list of a compute capability's major version: "sm_100" (Blackwell and newer), "sm_90"
    (Hopper) or "sm_80" (Ampere / Ada)."""
    return "sm_100" if major >= 10 else "sm_90" if major >= 9 else "sm_80"


def architecture(device=None) -> str:
    """The config list of the device's GPU (``config_arch``; CPU/interpreter: "sm_90")."""
    if device is None or getattr(device, "type", "cuda") != "cuda" or not torch.cuda.is_available():
        return "sm_90"
    return config_arch(torch.cuda.get_device_capability(device)[0])


def backward_smem_bytes(tiles: BackwardTiles, elem_bytes: int) -> int:
    """Pipelined operand tiles of the largest of the backward kernels' K steps: the dcos kernel's cosine GEMM
    ((BLOCK_B + BLOCK_C) x BLOCK_D), the dW GEMM (a BLOCK_B x BLOCK_C GROUP dC tile and a BLOCK_B x out_d x
    tile) or the dx GEMM (a BLOCK_B x BLOCK_C dC tile and a BLOCK_C x out_d W tile), per stage."""
    cosine = (tiles.block_b + tiles.block_c) * tiles.block_d
    dweight = tiles.block_b * (tiles.block_c * tiles.dw_group + tiles.out_d)
    dx = tiles.block_c * (tiles.block_b + tiles.out_d)
    # Triton's pipeliner keeps num_stages - 1 K steps in shared memory (the compiled sm_90 kernels: 2 x 96 KiB
    # of operands + 32 KiB of epilogue scratch = 224 KiB for the 128 x 256 dW tiles at 3 stages)
    return max(cosine, dweight, dx) * elem_bytes * max(tiles.num_stages - 1, 1)


def backward_fits(tiles: BackwardTiles, elem_bytes: int) -> bool:
    """Operand tiles in shared memory; the largest accumulator (the dcos kernel's BLOCK_B x BLOCK_C tile, the
    dW kernel's BLOCK_C GROUP x out_d, the dx kernel's BLOCK_B x out_d, in the accumulation dtype) within the
    register budget."""
    acc_bytes = max(elem_bytes, 4)
    elements = max(tiles.block_b * tiles.block_c, tiles.block_c * tiles.dw_group * tiles.out_d,
                   tiles.block_b * tiles.out_d)
    registers = elements * acc_bytes // 4 // (32 * tiles.num_warps)
    return registers <= _ACCUMULATOR_REGISTERS and backward_smem_bytes(tiles, elem_bytes) <= _SHARED_MEMORY_BUDGET


def backward_kernel_tiles(tiles: BackwardTiles, kernel: str) -> dict:
    """The tile constexprs of one backward kernel ("dcos", "dweight" or "dx") under ``tiles``: what the host
    launches and what the kernel report compiles."""
    common = dict(BLOCK_B=tiles.block_b, BLOCK_C=tiles.block_c)
    if kernel == "dcos":
        return dict(common, BLOCK_K=tiles.block_d)
    if kernel == "dweight":
        return dict(common, BLOCK_D=tiles.out_d, GROUP=tiles.dw_group)
    return dict(common, BLOCK_D=tiles.out_d)


def default_backward(elem_bytes: int, arch: str = "sm_90", kind: int = 0, reduction: int = 0,
                     sub_centers: int = 1, fp16: bool = False) -> BackwardTiles:
    """The backward's tiling on a GPU of ``arch`` for storage elements of ``elem_bytes`` (``fp16``: fp16, not
    bf16) and this loss's negative kind, reduction and sub-centers (``narrow_backward``)."""
    if arch in NARROW_BACKWARD and elem_bytes == 2 and narrow_backward(kind, reduction, sub_centers, fp16):
        return NARROW_BACKWARD[arch]
    return BACKWARD_TILES[arch][elem_bytes]


def backward_chunk(tiles: BackwardTiles, batch: int, num_cols: int, buffer_elem_bytes: int, interpret: bool) -> int:
    """Classes per backward chunk: a multiple of BLOCK_C whose B x chunk buffer fits BACKWARD_BUFFER_BYTES
    (the interpreter: INTERPRETER_CHUNK_TILES tiles), never more than the problem needs."""
    needed = triton.cdiv(num_cols, tiles.block_c) * tiles.block_c
    if interpret:
        return min(needed, INTERPRETER_CHUNK_TILES * tiles.block_c)
    fit = BACKWARD_BUFFER_BYTES // max(1, batch * buffer_elem_bytes) // tiles.block_c * tiles.block_c
    return min(needed, max(tiles.block_c, fit))


def forward_fits(tiles: ForwardTiles, elem_bytes: int) -> bool:
    """Both operand tiles of the K loop, pipelined over num_stages, in shared memory."""
    return (tiles.block_b + tiles.block_c) * tiles.block_k * elem_bytes * tiles.num_stages <= _SHARED_MEMORY_BUDGET


#: the fixed forward tiling per architecture (as many stages as fit are taken): on sm_90 64 x 128 x 64 with 4
#: warps (the accumulator lives in wgmma's registers); on sm_8x the same tile on mma.sync spills 48 (sm_80) to
#: 140 (sm_86/89) bytes per thread (``python -m bench archs``), 128 x 128 x 32 with 8 warps spills on none
PREFERRED_FORWARD = {"sm_90": ForwardTiles(64, 128, 64, 4, 4), "sm_100": ForwardTiles(64, 128, 64, 4, 4),
                     "sm_80": ForwardTiles(128, 128, 32, 8, 4)}


def default_forward(elem_bytes: int, casts_operands: bool = False, sub_centers: int = 1, kind: int = 0,
                    reduction: int = 0, keeps: bool = False, arch: str = "sm_90") -> ForwardTiles:
    """The GPU's fixed forward tiling when autotuning is off: the arch's ``PREFERRED_FORWARD`` with as many
    stages as fit (fp32/fp64 tiles need fewer), else the first autotune candidate ``forward_candidate`` allows
    (fp32 weights cast to 16 bits spill in the 4-warp tiling)."""
    preferred = PREFERRED_FORWARD[arch]
    for stages in (4, 3, 2, 1):
        tiles = ForwardTiles(preferred.block_b, preferred.block_c, preferred.block_k, preferred.num_warps, stages)
        if forward_candidate(tiles, elem_bytes, casts_operands, sub_centers, kind, reduction, keeps):
            return tiles
    for tiles in H100_FORWARD:
        if forward_candidate(tiles, elem_bytes, casts_operands, sub_centers, kind, reduction, keeps):
            return tiles
    return ForwardTiles(32, 32, 32, 4, 1)


@dataclass
class _Override:
    forward: Optional[ForwardTiles] = None
    backward: Optional[BackwardTiles] = None
    splits: Optional[int] = None


_override = _Override()


@contextlib.contextmanager
def fixed_configs(forward: Optional[ForwardTiles] = None, backward: Optional[BackwardTiles] = None,
                  splits: Optional[int] = None):
    """Force tile sizes (and the class split count of the forward and dx kernels) inside the block."""
    global _override
    saved = _override
    _override = _Override(forward, backward, splits)
    try:
        yield
    finally:
        _override = saved


def autotune_enabled(interpret: bool) -> bool:
    return not interpret and os.environ.get("MARGIN_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def forward_tiles(interpret: bool, elem_bytes: int, casts_operands: bool = False,
                  sub_centers: int = 1, kind: int = 0, reduction: int = 0,
                  keeps: bool = False, device=None) -> Optional[ForwardTiles]:
    """The fixed forward tiling, or None to autotune."""
    if _override.forward is not None:
        return _override.forward
    if interpret:
        return INTERPRETER_FORWARD
    return None if autotune_enabled(interpret) else default_forward(elem_bytes, casts_operands, sub_centers, kind,
                                                                    reduction, keeps, architecture(device))


def backward_tiles(interpret: bool, elem_bytes: int, device=None, kind: int = 0, reduction: int = 0,
                   sub_centers: int = 1, fp16: bool = False) -> BackwardTiles:
    if _override.backward is not None:
        return _override.backward
    if interpret:
        return INTERPRETER_BACKWARD
    return default_backward(elem_bytes, architecture(device), kind, reduction, sub_centers, fp16)


def class_splits(device: torch.device, interpret: bool, batch: int, num_cols: int, partial_row_bytes: int) -> int:
    """How many class ranges the forward grid splits into, so that small batches still fill the GPU.

    Aims at two programs per SM with row blocks of 64; never more splits than class tiles of 64, and the
    partials (``partial_row_bytes`` per batch row and split) stay within a fixed memory budget."""
    if _override.splits is not None:
        return _override.splits
    if interpret or device.type != "cuda":
        return INTERPRETER_SPLITS
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = math.ceil(batch / 64)
    splits = min(math.ceil(programs / row_blocks), math.ceil(num_cols / 64),
                 max(1, _PARTIAL_BUDGET // max(1, batch * partial_row_bytes)))
    return max(1, splits)


def dx_split_count(sms: int, programs_without_split: int, col_tiles: int, batch: int, dim: int) -> int:
    """Class splits of the backward's dx GEMM (its K dimension) on a GPU of ``sms`` SMs: (row blocks x d tiles x
    splits) reaches one program per SM (the 128 x 256 dx tiles hold one CTA per SM at 251 registers; a second
    wave would only double the fp32 partials' read-modify-write per chunk); never more splits than class tiles
    per chunk, and the partials (splits x B x d fp32) within a fixed memory budget. The GPU model
    (bench/calibration.py) counts the same splits."""
    splits = min(math.ceil(sms / max(1, programs_without_split)), col_tiles,
                 max(1, _PARTIAL_BUDGET // max(1, batch * dim * 4)))
    return max(1, splits)


def dx_splits(device: torch.device, interpret: bool, programs_without_split: int, col_tiles: int, batch: int,
              dim: int) -> int:
    """``dx_split_count`` for the device (the interpreter and a forced ``fixed_configs``: theirs)."""
    if _override.splits is not None:
        return _override.splits
    if interpret or device.type != "cuda":
        return INTERPRETER_SPLITS
    return dx_split_count(torch.cuda.get_device_properties(device).multi_processor_count, programs_without_split,
                          col_tiles, batch, dim)


def batch_bucket(batch: int) -> int:
    """The autotuner's view of B: the next power of two (so a new batch size re-tunes at most once per
    octave, and never per step)."""
    return triton.next_power_of_2(max(1, batch))


def forward_autotune_configs():
    return [triton.Config({"BLOCK_B": t.block_b, "BLOCK_C": t.block_c, "BLOCK_K": t.block_k},
                          num_warps=t.num_warps, num_stages=t.num_stages) for t in H100_FORWARD]


#: the forward tiling when no autotune candidate fits (fp64: 8-byte operand tiles exceed shared memory)
FORWARD_FALLBACK = ForwardTiles(32, 32, 32, num_warps=4, num_stages=1)
#: the largest forward tile (BLOCK_B x BLOCK_C elements) whose epilogue still fits the registers, for the heavier
#: epilogues (``python -m bench kernels``, sm_90, bf16, d = 512): SphereFace2's power (exp2/log2 per element)
#: spills above 64 x 64 under the binary reduction (52-2848 bytes per thread) and at 128 x 64 w4 (8 bytes) and
#: 128 x 256 under the log-sum-exp; the binary reduction with IDENTITY spills at 128 x 256 (1680 bytes)
POWER_KINDS_MAX_TILE, BINARY_MAX_TILE = 64 * 64, 128 * 128
#: the largest forward tile that keeps its cosines (KEEP) without spilling in every case (``forward_candidate``)
KEEP_MAX_TILE = 64 * 64
#: kinds whose epilogue keeps one more value per element (CURRICULAR's and CIRCLE's branch terms): with KEEP
#: they spill 64 bytes per thread in the 8-warp 128 x 128 tiling too (fp16, d = 128 and 512, since the
#: forward's norm also sums the overflow-safe (2^-64 w)^2, ``triton_tiles.cosine_tile``), so they keep 64 x 64
KEEP_NARROW_KINDS = (int(NegativeKind.CURRICULAR), int(NegativeKind.CIRCLE), int(NegativeKind.MV),
                     int(NegativeKind.AFFINE))
#: CURRICULAR's log-sum-exp epilogue spills at 128 x 256 (16 bytes per thread, bf16/fp16, d = 128 and 512, once
#: the forward subtracts its shift before the log2(e) multiply; MV and AFFINE spill 64 bytes with KEEP at
#: 128 x 128, hence KEEP_NARROW_KINDS above): the fresh-clone CI run's ``python -m bench kernels --check``
CURRICULAR_MAX_TILE = 128 * 128


def max_forward_tile(kind: int, reduction: int) -> Optional[int]:
    """The tile-size limit of ``forward_candidate`` for a negative kind and reduction (None: no limit)."""
    if kind in (int(NegativeKind.POWER), int(NegativeKind.POWER_ST)):
        return POWER_KINDS_MAX_TILE
    if reduction == int(ReductionKind.SOFTPLUS_SUM):
        return BINARY_MAX_TILE
    if kind == int(NegativeKind.CURRICULAR):
        return CURRICULAR_MAX_TILE
    return None


def forward_candidate(tiles: ForwardTiles, elem_bytes: int, casts_operands: bool, sub_centers: int = 1,
                      kind: int = 0, reduction: int = 0, keeps: bool = False) -> bool:
    """Whether the autotuner may pick ``tiles``: its operand tiles fit shared memory, and, for 4-byte storage
    whose operands are cast to 16 bits in registers (bf16/fp16 products of fp32 weights), it is not one of the
    4-warp tilings of >= 8192 elements that spill there (72 and 536 bytes per thread for 64x128 and 128x64 in
    ``python -m bench kernels``; the 8-warp tilings of the same size do not).

    Sub-centers (K > 1) keep a running max tile beside the cosine accumulator: in ``python -m bench kernels``
    (bf16, d = 512, K = 3) the 4-warp tilings of >= 8192 elements spill 32 bytes and 128 x 256 2408 bytes,
    so those are ruled out too (128 x 128 with 8 warps: 254 registers, no spill).

    ``keeps`` (the kernel also stores its cosine tiles for a memory budget, KEEP): the store's int64 offsets
    sit beside the accumulator. In ``python -m bench kernels`` (bf16/fp16, d = 512) 128 x 256 spills 188-1904
    bytes, the 4-warp 64 x 128 / 128 x 64 tilings 64-464, and every tiling above 64 x 64 under the binary
    reduction 376-1176; 64 x 64 and the 8-warp 128 x 128 tilings under the log-sum-exp stay at 0, but for
    ``KEEP_NARROW_KINDS``."""
    if not forward_fits(tiles, elem_bytes):
        return False
    if keeps and tiles.block_b * tiles.block_c > KEEP_MAX_TILE and not (
            reduction == 0 and tiles.num_warps == 8 and tiles.block_b * tiles.block_c <= 128 * 128
            and kind not in KEEP_NARROW_KINDS):
        return False
    limit = max_forward_tile(kind, reduction)
    if limit is not None and tiles.block_b * tiles.block_c > limit:
        return False
    big_for_four_warps = tiles.num_warps == 4 and tiles.block_b * tiles.block_c >= 8192
    # sub-centers keep a running max and argmax tile beside the accumulator: 128 x 128 spills there (276-344
    # bytes per thread in ``python -m bench kernels`` once the max propagates NaN), as do the 4-warp >= 8192 tilings
    if sub_centers > 1 and (big_for_four_warps or tiles.block_b * tiles.block_c >= 128 * 128):
        return False
    return not (casts_operands and elem_bytes == 4 and big_for_four_warps)


def prune_forward(configs, named_args, **kwargs):
    """The autotune list less the tilings ``forward_candidate`` rules out for this call (keeps at least one)."""
    elem_bytes = named_args["x_ptr"].element_size()
    casts = PRODUCTS[kwargs.get("PRODUCT", 0)] in ("bf16", "fp16")
    sub_centers = kwargs.get("SUB_CENTERS", 1)
    kept = [c for c in configs if forward_candidate(ForwardTiles(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_C"],
                                                                 c.kwargs["BLOCK_K"], c.num_warps, c.num_stages),
                                                    elem_bytes, casts, sub_centers, kwargs.get("KIND", 0),
                                                    kwargs.get("REDUCTION", 0), kwargs.get("KEEP", False))]
    if kept:
        return kept
    t = FORWARD_FALLBACK
    return [triton.Config({"BLOCK_B": t.block_b, "BLOCK_C": t.block_c, "BLOCK_K": t.block_k},
                          num_warps=t.num_warps, num_stages=t.num_stages)]
