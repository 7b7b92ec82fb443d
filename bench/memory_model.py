"""``python -m bench memory-model``: memory per rank and traffic per step of DistributedMarginHead, from the sizes
the code uses (arithmetic, no timing: it runs anywhere, GPU or not).

    python -m bench memory-model  [--detail] [--classes 1e6 1e7 1e8] ...

Every size comes from the package: the shard a rank holds (``sharding.max_shard_size``: rank 0 holds the
largest, which is what every GPU must provision), the classes Partial FC keeps (``sampling.num_sampled``),
the class chunk of the torch backend (``chunk_loop.DEFAULT_CHUNK_SIZE``) and the collectives the head
issues per step (``distributed/head.py``). Assumptions, stated once:

* the global batch is ``batch_per_rank * world`` rows (insightface's default 128 per GPU);
* dW is dense over the shard, in the weight's dtype, with or without sampling (the op's contract: rows
  outside the class index are written as zeros), so sampling saves FLOPs, not W/dW/optimizer memory;
* optimizer state is kept in the weight's dtype, as torch.optim does: SGD momentum (insightface's choice)
  one W-sized buffer, Adam two;
* with a fused optimizer (``margin_kernels.optim``, ``--fused``) dW is never allocated: the gradient term is the
  chunk buffer the sink receives (chunk x d, fp32), and the state has its own dtype (fp32 by default for bf16
  weights, which makes fused SGD-momentum in bf16 as large as unfused: ``state_dtype=torch.bfloat16`` halves it);
* activations are what the head keeps or allocates per step besides W and dW: the gathered features
  (saved for backward), their gradient (accumulated in fp32, then cast), the per-row vectors, the Partial FC
  draw (fp32 scores over the shard + the index). The torch backend's class tiles (B x chunk fp32, a few alive
  at once in backward) are listed apart: fused backends keep tiles on chip instead.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from margin_kernels.backends.chunk_loop import DEFAULT_CHUNK_SIZE
from margin_kernels.sampling import num_sampled
from margin_kernels.distributed.sharding import max_shard_size
from margin_kernels.batch_reduction import accumulation_dtype

INT64, FP64 = 8, 8
# backward of the torch backend keeps about this many (B x chunk) fp32 tiles alive at once: the cosines, the
# logits, the probabilities and the derivative factor (torch_backend.TorchEpilogue.backward_tile)
TORCH_TILES_ALIVE = 4
OPTIMIZER_BUFFERS = {"sgd_momentum": 1, "adam": 2}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GiB = 1024 ** 3


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def per_rank_bytes(*, num_classes: int, dim: int, world: int, dtype: torch.dtype, sample_rate: float,
                   batch_per_rank: int, optimizer: str = "sgd_momentum", chunk_size: int = DEFAULT_CHUNK_SIZE,
                   sub_centers: int = 1, fused: bool = False, state_dtype: Optional[torch.dtype] = None) -> dict:
    """Bytes on the rank with the largest shard, and the classes its kernels visit per step. ``sub_centers``
    K: K weight rows per class (SubCenterArcFace): W, dW, the optimizer state and a chunk's tiles are K x as
    large (the chunk counts classes of K rows; the default chunk is divided by K, see chunk_loop). ``fused``:
    the optimizer update in backward (no dW), its state in ``state_dtype`` (default: the weight's dtype unfused,
    fp32 for 16-bit weights fused, as margin_kernels.optim does)."""
    local = max_shard_size(num_classes, world)
    elem, acc = _size(dtype), _size(accumulation_dtype(dtype))
    batch = batch_per_rank * world
    columns = num_sampled(local, sample_rate)
    sampling = columns < local
    weight = local * sub_centers * dim * elem
    activations = (batch * dim * elem              # gathered features x_eff, saved for backward
                   + batch * dim * (acc + elem)    # their gradient: fp32 accumulator, then cast to storage
                   + batch_per_rank * dim * elem   # the reduce-scatter's output: this rank's rows
                   + batch * (2 * FP64 + 8 * acc))  # B-vectors: labels+norms, target pairs, shift, sums, lse
    if sampling:
        activations += local * 4 + 2 * columns * INT64  # fp32 scores over the shard, top-k and sorted index
    tile_columns = min(max(1, chunk_size // sub_centers), columns) * sub_centers  # weight rows per tile
    tiles = TORCH_TILES_ALIVE * batch * tile_columns * 4 + tile_columns * dim * (2 * acc + elem)
    if state_dtype is None:
        state_dtype = accumulation_dtype(dtype) if fused else dtype
    grad = tile_columns * dim * acc if fused else weight  # fused: the sink's chunk buffer
    state = 0 if state_dtype == "none" else \
        OPTIMIZER_BUFFERS[optimizer] * local * sub_centers * dim * _size(state_dtype)
    return {"local_classes": local, "sampled_classes": columns, "weight": weight, "grad": grad,
            "optimizer": state, "activations": activations, "torch_tiles": tiles}


def per_step_comm_bytes(*, world: int, dim: int, dtype: torch.dtype, batch_per_rank: int) -> int:
    """Bytes each rank receives per training step (ring collectives: an all-gather or reduce-scatter of N
    bytes in total moves (world-1)/world N into each rank, an all-reduce twice that). 0 on one rank."""
    if world == 1:
        return 0
    elem, acc = _size(dtype), _size(accumulation_dtype(dtype))
    batch = batch_per_rank * world
    share = (world - 1) / world
    gathers = (world * 4 * INT64          # sizes and validity flags
               + batch * dim * elem       # features (forward)
               + batch * 2 * FP64)        # labels and feature norms
    all_reduces = (2 * batch * acc        # target (cos, ||w||) before the op
                   + batch * acc          # max of the per-shard lse
                   + 3 * batch * acc)     # target (cos, ||w||) after the op and the shifted sum of exp(lse)
    reduce_scatter = batch * dim * elem   # feature gradient (backward)
    return int(share * (gathers + reduce_scatter) + 2 * share * all_reduces)


def table(*, classes=(10 ** 6, 10 ** 7, 10 ** 8), worlds=(1, 2, 4, 8, 16, 32, 64), dim=512, batch_per_rank=128,
          sample_rates=(1.0, 0.1), dtypes=("bf16", "fp32"), optimizer="sgd_momentum",
          sub_centers: int = 1) -> list[dict]:
    rows = []
    for num_classes in classes:
        for dtype_name in dtypes:
            for rate in sample_rates:
                for world in worlds:
                    sizes = per_rank_bytes(num_classes=num_classes, dim=dim, world=world,
                                           dtype=DTYPES[dtype_name], sample_rate=rate,
                                           batch_per_rank=batch_per_rank, optimizer=optimizer,
                                           sub_centers=sub_centers)
                    comm = per_step_comm_bytes(world=world, dim=dim, dtype=DTYPES[dtype_name],
                                               batch_per_rank=batch_per_rank)
                    rows.append(dict(sizes, classes=num_classes, dtype=dtype_name, sample_rate=rate, world=world,
                                     comm=comm, total=sizes["weight"] + sizes["grad"] + sizes["optimizer"]
                                     + sizes["activations"]))
    return rows


#: the published records beside which the fused table is read: (label, classes, GPUs, GiB per GPU)
RECORDS = (("PaddlePaddle PLSC, fp16, sample rate 0.1, V100 32 GB", 92_000_000, 8, 32),)
#: the fused table's variants: (column label, fused, state dtype)
FUSED_VARIANTS = (("unfused: W + dW + state (bf16)", False, None),
                  ("fused, fp32 state", True, torch.float32),
                  ("fused, bf16 state", True, torch.bfloat16),
                  ("fused, no state (plain SGD)", True, "none"))


def fused_table(*, classes=(92_000_000, 10 ** 8, 10 ** 9), worlds=(8, 64, 512), dim=512, batch_per_rank=128,
                dtype_name="bf16", optimizer="sgd_momentum") -> list[dict]:
    """GiB per rank with and without the fused update (sample rate 1: sampling changes no memory term)."""
    rows = []
    for num_classes in classes:
        for world in worlds:
            row = dict(classes=num_classes, world=world)
            for label, fused, state_dtype in FUSED_VARIANTS:
                sizes = per_rank_bytes(num_classes=num_classes, dim=dim, world=world, dtype=DTYPES[dtype_name],
                                       sample_rate=1.0, batch_per_rank=batch_per_rank, optimizer=optimizer,
                                       fused=fused, state_dtype=state_dtype)
                row[label] = sizes["weight"] + sizes["grad"] + sizes["optimizer"] + sizes["activations"]
            rows.append(row)
    return rows


def render_fused(rows: list[dict]) -> str:
    labels = [label for label, _, _ in FUSED_VARIANTS]
    lines = ["| C | GPUs | " + " | ".join(labels) + " |", "|" + "---|" * (2 + len(labels))]
    for r in rows:
        lines.append(f"| {_classes(r['classes'])} | {r['world']} | " + " | ".join(_gib(r[k]) for k in labels) + " |")
    for label, num_classes, gpus, gib in RECORDS:
        lines.append(f"\n{label}: {_classes(num_classes)} classes on {gpus} GPUs of {gib} GiB.")
    return "\n".join(lines) + "\n"


def _classes(n: int) -> str:
    exponent = len(str(n)) - 1
    return f"1e{exponent}" if n == 10 ** exponent else str(n)


def _gib(n: int) -> str:
    return f"{n / GiB:.3g}" if n >= GiB / 100 else f"{n / GiB:.2g}"


def render_markdown(rows: list[dict]) -> str:
    """Summary: GiB per rank (W + dW + optimizer + activations), one column per world size."""
    worlds = sorted({r["world"] for r in rows})
    header = "| C | dtype | sample_rate | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in worlds) + " |"
    lines = [header, "|" + "---|" * (3 + len(worlds))]
    keys = sorted({(r["classes"], r["dtype"], r["sample_rate"]) for r in rows}, key=lambda k: (k[0], k[1], -k[2]))
    for key in keys:
        cells = {r["world"]: r["total"] for r in rows if (r["classes"], r["dtype"], r["sample_rate"]) == key}
        lines.append(f"| {_classes(key[0])} | {key[1]} | {key[2]} | " + " | ".join(_gib(cells[w]) for w in worlds) + " |")
    return "\n".join(lines) + "\n"


def render_detail(rows: list[dict]) -> str:
    cols = ("classes", "dtype", "sample_rate", "world", "local_classes", "sampled_classes", "weight", "grad",
            "optimizer", "activations", "torch_tiles", "total", "comm")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            value = r[c]
            if c in ("weight", "grad", "optimizer", "activations", "torch_tiles", "total", "comm"):
                value = _gib(value)
            elif c == "classes":
                value = _classes(value)
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_comm(rows: list[dict]) -> str:
    worlds = sorted({r["world"] for r in rows})
    lines = ["| dtype | " + " | ".join(str(w) for w in worlds) + " |", "|" + "---|" * (1 + len(worlds))]
    for dtype_name in sorted({r["dtype"] for r in rows}):
        cells = {r["world"]: r["comm"] for r in rows if r["dtype"] == dtype_name}
        lines.append(f"| {dtype_name} | " + " | ".join(f"{cells[w] / 2 ** 20:.3g}" for w in worlds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench memory-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-per-rank", type=int, default=128)
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_BUFFERS), default="sgd_momentum")
    parser.add_argument("--sub-centers", type=int, default=1,
                        help="weight rows per class (SubCenterArcFace's K; default 1)")
    parser.add_argument("--detail", action="store_true", help="one row per configuration with every term")
    parser.add_argument("--fused", action="store_true",
                        help="the fused-optimizer table instead: 9.2e7, 1e8, 1e9 classes on 8/64/512 GPUs, bf16")
    args = parser.parse_args(argv)
    if args.fused:
        print(f"GiB per rank (largest shard), bf16 W, {args.optimizer}, d = {args.dim}, {args.batch_per_rank} rows "
              "per rank, with and without the optimizer fused into backward\n")
        print(render_fused(fused_table(dim=args.dim, batch_per_rank=args.batch_per_rank, optimizer=args.optimizer)))
        return 0
    rows = table(classes=tuple(int(c) for c in args.classes), worlds=tuple(args.worlds), dim=args.dim,
                 batch_per_rank=args.batch_per_rank, sample_rates=tuple(args.sample_rates),
                 optimizer=args.optimizer, sub_centers=args.sub_centers)
    print(f"GiB per rank (largest shard): W + dW + optimizer ({args.optimizer}) + activations; d = {args.dim}, "
          f"{args.batch_per_rank} rows per rank\n")
    print(render_markdown(rows))
    print(f"MiB received per rank per step (d = {args.dim}, {args.batch_per_rank} rows per rank):\n")
    print(render_comm([r for r in rows if r["classes"] == rows[0]["classes"] and r["sample_rate"] == 1.0]))
    if args.detail:
        print(render_detail(rows))
    return 0
