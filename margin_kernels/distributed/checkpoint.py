"""Shard-wise, crash-safe checkpoints of a DistributedMarginHead that load at any world size.

Layout of a checkpoint directory:

* one file per saving rank, ``classes_<start>_<stop>.g<generation>.pt`` (the class range and the save's
  generation in the name), holding that rank's ``state_dict()``: its weight rows (and the regularisers'
  per-class rows, e.g. Center loss centers: the extra state's ``row_keys``), the loss's buffers and the
  head's extra state (class range, sizes, the Partial FC generator);
* ``manifest.json``, written last: format, generation, world size, num_classes, embedding_dim, and per shard
  the saving rank, file name, class range, size in bytes and sha256.

Crash safety: every file is written under a temporary name, fsynced, renamed into place and its directory
fsynced; the manifest is replaced the same way only after every rank's shard is in place, and only then are
the previous generation's shards deleted. A process killed at any point leaves the previous manifest, which
names the previous, intact shards: the previous checkpoint still loads. ``load_sharded`` trusts nothing but
the manifest: it checks that its shards tile the classes, and every file it reads for its size and sha256
before unpickling it; every error names the file and the rank that saved it (and, raised on every rank, the
rank that found it). Each rank reads only the files whose classes overlap its new range (memory-mapped), so
a run saved on 8 ranks resumes on 4 or 16. The margin buffers are identical on every rank by construction;
loading checks that the files agree and that every rank ends with the same buffers.

A head with a fused optimizer (``head.fuse``) saves that optimizer's state in its shard file (``OPTIMIZER``:
the weight's state rows, resharded like the weight, its step count, param_groups and the state of the
optimizer's other, replicated parameters); loading restores it into the loading head's fused optimizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from .comm import all_gather_objects, all_gather_stacked, group_rank_and_size
from ..head_base import CHECKPOINT_FORMAT
from .head import DistributedMarginHead
from .validation import run_collectively

EXTRA_STATE = "_extra_state"
WEIGHT = "weight"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
_PARTIAL = ".partial"
#: a head's fused optimizer state in its shard file (``fused_optimizer_rows``)
OPTIMIZER = "_fused_optimizer"


def shard_file_name(start: int, stop: int, generation: int = 1) -> str:
    return f"classes_{start:012d}_{stop:012d}.g{generation}.pt"


# ---- durable writes ------------------------------------------------------------------------------------------
def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: str, write) -> None:
    """``write(file)`` into ``path + '.partial'``, fsync, rename over ``path``, fsync the directory: a crash
    at any point leaves either the old ``path`` or the complete new one, never a torn file under its name."""
    partial = path + _PARTIAL
    with open(partial, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_directory(os.path.dirname(path) or ".")


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


# ---- saving ----------------------------------------------------------------------------------------------------
def read_manifest(directory: str) -> dict:
    """The manifest of a checkpoint directory; a ValueError naming the file if it is missing or unreadable."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ValueError(f"{path}: missing: {directory} is not a complete save_sharded checkpoint (the manifest "
                         "is written last, so an interrupted first save leaves none)")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    keys = ("format", "generation", "world_size", "num_classes", "embedding_dim", "shards")
    if not isinstance(manifest, dict) or any(k not in manifest for k in keys) or \
            manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a save_sharded manifest of format {MANIFEST_FORMAT}")
    return manifest


def _check_head(head, what: str) -> None:
    if not (hasattr(head, "shard_range") and hasattr(head, "weight") and hasattr(head, "state_dict")):
        raise TypeError(f"{what}: head must be a MarginHead or DistributedMarginHead, got {type(head).__name__}")


def _single_process(head) -> bool:
    """A ``MarginHead`` (no process group): one shard of every class, saved and loaded by this process alone,
    never a collective (even where torch.distributed is initialised); its state_dict is already the one-shard
    checkpoint of the distributed head."""
    return not hasattr(head, "process_group")


def save_sharded(head: DistributedMarginHead, directory: str) -> str:
    """Collective: each rank writes its shard file into ``directory`` (created if needed), then rank 0 the
    manifest; returns this rank's shard path once the manifest names every rank's file. A ``MarginHead``
    writes a one-shard checkpoint (world size 1) that any ``DistributedMarginHead`` can load."""
    _check_head(head, "save_sharded")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"save_sharded: directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if _single_process(head):
        os.makedirs(directory, exist_ok=True)
        try:
            generation = read_manifest(directory)["generation"] + 1
        except ValueError:
            generation = 1
        entry = _save_shard(head, directory, generation, 0)
        _write_manifest(head, directory, generation, 1, [entry])
        return os.path.join(directory, entry["file"])
    group = head.process_group
    what = f"save_sharded({directory!r})"
    rank, world = group_rank_and_size(group)

    def next_generation():
        os.makedirs(directory, exist_ok=True)
        try:
            return read_manifest(directory)["generation"] + 1 if rank == 0 else None
        except ValueError:
            return 1  # no (readable) previous checkpoint: start over
    generation = all_gather_objects(run_collectively(next_generation, group, what), group)[0]
    entry = run_collectively(lambda: _save_shard(head, directory, generation, rank), group, what)
    entries = all_gather_objects(entry, group)
    if rank == 0:
        run_collectively(lambda: _write_manifest(head, directory, generation, world, entries), group, what)
    else:
        run_collectively(lambda: None, group, what)
    return os.path.join(directory, entry["file"])


def _save_shard(head: DistributedMarginHead, directory: str, generation: int, rank: int) -> dict:
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()}
    optimizer = getattr(head, "fused_optimizer", None)
    if optimizer is not None:
        state[OPTIMIZER] = fused_optimizer_rows(optimizer, head.weight)
    name = shard_file_name(*head.shard_range, generation)
    path = os.path.join(directory, name)
    write_durably(path, lambda handle: torch.save(state, handle))
    size, sha256 = file_digest(path)
    return {"rank": rank, "file": name, "range": list(head.shard_range), "size": size, "sha256": sha256}


def fused_optimizer_rows(optimizer, weight: torch.Tensor) -> dict:
    """A fused optimizer's state for ``weight``: its per-row tensors (on the CPU), the rest, its param_groups,
    and the state of its other (replicated) parameters by their position in the param_groups."""
    state = optimizer.state.get(weight, {})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    others = {str(i): {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                       for k, v in optimizer.state[p].items()}
              for i, p in enumerate(params) if p is not weight and p in optimizer.state}
    return {"rows": {k: v.detach().cpu() for k, v in state.items() if isinstance(v, torch.Tensor)},
            "scalars": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)},
            "param_groups": groups, "others": others}


def load_fused_optimizer_rows(optimizer, weight: torch.Tensor, saved: dict) -> None:
    """The inverse of ``fused_optimizer_rows`` (rows already cut to this shard)."""
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(saved_group)
    dtype = optimizer.state_dtype_for(weight)
    optimizer.state[weight] = dict(saved["scalars"], **{
        k: v.to(device=weight.device, dtype=dtype, copy=True) for k, v in saved["rows"].items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in saved.get("others", {}).items():
        param = params[int(index)]
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                # a class-sharded parameter other than the weight (Center loss centers trained by gradient):
                # its optimizer state is saved per rank, not resharded
                raise ValueError(f"fused optimizer state {key!r} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}: the optimizer state of "
                                 "class-sharded parameters other than the weight does not reshard; load on the "
                                 "saving world size, or keep those parameters in an unfused optimizer")
        optimizer.state[param] = {k: (v.to(device=param.device, copy=True) if isinstance(v, torch.Tensor) else v)
                                  for k, v in values.items()}


def _write_manifest(head: DistributedMarginHead, directory: str, generation: int, world: int,
                    entries: list) -> None:
    manifest = {"format": MANIFEST_FORMAT, "generation": generation, "world_size": world,
                "num_classes": head.num_classes, "embedding_dim": head.embedding_dim, "shards": entries}
    text = json.dumps(manifest, indent=1).encode("utf-8")
    write_durably(os.path.join(directory, MANIFEST), lambda handle: handle.write(text))
    # only now is the previous generation unreferenced; leftovers of killed saves go too
    keep = {entry["file"] for entry in entries} | {MANIFEST}
    for name in os.listdir(directory):
        if name.startswith("classes_") and name not in keep:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass


def check_tiling(ranges: list[tuple[int, int]], num_classes: int) -> Optional[str]:
    """None if the sorted ranges cover [0, num_classes) exactly once, else what is wrong."""
    if not ranges:
        return "no shards listed"
    position = 0
    for start, stop in ranges:
        if start != position:
            kind = "overlap (files from two different saves?)" if start < position else "gap"
            return f"shard files {kind} at class {min(start, position)}: ranges {ranges}"
        position = stop
    if position != num_classes:
        return f"shard files cover classes [0, {position}) but the head has {num_classes} classes"
    return None


def reshard_state_dicts(pieces: list[dict], shard_range: tuple[int, int]) -> dict:
    """Assemble the state dict of the shard ``[start, stop)`` from shard state dicts (any order) whose ranges
    cover it. Buffers must agree across pieces. Pure function: no I/O, no communication. A ``MarginHead``'s
    state_dict is the one shard [0, C): cut it for a rank of a ``DistributedMarginHead``, or rejoin every
    rank's shard into (0, C) for a ``MarginHead``. The Partial FC generator's state is kept only when the
    range is the one piece's own."""
    start, stop = shard_range
    pieces = sorted(pieces, key=lambda p: p[EXTRA_STATE]["shard_range"][0])
    first = pieces[0][EXTRA_STATE] if pieces else None
    if first is None or any(p[EXTRA_STATE].get("format") != CHECKPOINT_FORMAT for p in pieces):
        raise ValueError("reshard_state_dicts needs at least one head state dict (a DistributedMarginHead shard's "
                         "or a MarginHead's)")
    k = first.get("sub_centers", 1)  # weight rows per class: shards are cut, and rejoined, in whole classes
    for piece in pieces:
        if (piece[EXTRA_STATE]["num_classes"], piece[EXTRA_STATE]["embedding_dim"],
                piece[EXTRA_STATE].get("sub_centers", 1)) != (first["num_classes"], first["embedding_dim"], k):
            raise ValueError("shard state dicts come from heads of different sizes")
    row_keys = first.get("row_keys", [WEIGHT])  # checkpoints written before regularisers hold only the weight
    # the weight has K rows per class, the regularisers' per-class state (centers) one
    out = {key: _class_rows(pieces, key, start, stop, k if key == WEIGHT else 1) for key in row_keys}
    if OPTIMIZER in pieces[0]:  # a fused optimizer's state rows: K per class, like the weight
        out[OPTIMIZER] = _reshard_optimizer(pieces, start, stop, k)
    for key, value in pieces[0].items():
        if key in row_keys or key in (EXTRA_STATE, OPTIMIZER):
            continue
        for other in pieces[1:]:
            if not torch.equal(other[key], value):
                raise ValueError(f"buffer {key!r} differs between shards: the saved ranks were out of step")
        out[key] = value
    same_shard = len(pieces) == 1 and tuple(first["shard_range"]) == (start, stop)
    out[EXTRA_STATE] = dict(first, shard_range=[start, stop],
                            sampler_state=first.get("sampler_state") if same_shard else None)
    return out


def _class_rows(pieces: list[dict], key: str, start: int, stop: int, rows_per_class: int = 1,
                get=None) -> torch.Tensor:
    """Classes [start, stop) of the class-sharded tensor ``key`` (``rows_per_class`` adjacent rows each), cut
    from the sorted pieces that hold them (``get(piece)``: where the tensor is, by default ``piece[key]``)."""
    rows, position = [], start
    for piece in pieces:
        lo, hi = piece[EXTRA_STATE]["shard_range"]
        if hi <= position or lo >= stop:
            continue
        if lo > position:
            raise ValueError(f"no shard holds classes [{position}, {lo})")
        tensor = piece[key] if get is None else get(piece)
        rows.append(tensor[(position - lo) * rows_per_class:(min(hi, stop) - lo) * rows_per_class])
        position = min(hi, stop)
    if position != stop:
        raise ValueError(f"no shard holds classes [{position}, {stop})")
    return torch.cat(rows) if len(rows) > 1 else rows[0].clone()


def _reshard_optimizer(pieces: list[dict], start: int, stop: int, rows_per_class: int) -> dict:
    """The fused optimizer's state of the new shard: its per-row tensors cut like the weight, its step count,
    param_groups and the other parameters' state, which must agree between the pieces."""
    first = pieces[0][OPTIMIZER]
    for piece in pieces:
        saved = piece.get(OPTIMIZER)
        if saved is None or saved["scalars"] != first["scalars"]:
            raise ValueError("fused optimizer state missing or at different steps between shards")
    rows = {key: _class_rows(pieces, key, start, stop, rows_per_class,
                             get=lambda piece, key=key: piece[OPTIMIZER]["rows"][key])
            for key in first["rows"]}
    return dict(first, rows=rows)


def load_sharded(head: DistributedMarginHead, directory: str) -> None:
    """Collective: load a ``save_sharded`` checkpoint saved at any world size into ``head`` (a ``MarginHead``:
    by this process alone)."""
    _check_head(head, "load_sharded")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"load_sharded: directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if _single_process(head):
        _load(head, directory)
        return
    run_collectively(lambda: _load(head, directory), head.process_group, f"load_sharded({directory!r})")
    check_buffers_consistent(head)


def _shard_label(path: str, entry: dict, saved_world: int) -> str:
    lo, hi = entry["range"]
    return f"{path} (saved by rank {entry['rank']} of {saved_world}, classes [{lo}, {hi}))"


def verified_shard(directory: str, entry: dict, saved_world: int) -> dict:
    """One shard's state dict, after checking the file against its manifest entry (size, sha256)."""
    path = os.path.join(directory, entry["file"])
    label = _shard_label(path, entry, saved_world)
    if os.path.basename(entry["file"]) != entry["file"]:
        raise ValueError(f"{label}: the manifest names a file outside the checkpoint directory")
    if not os.path.exists(path):
        raise ValueError(f"{label}: missing")
    size, sha256 = file_digest(path)
    if size != entry["size"]:
        raise ValueError(f"{label}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
    if sha256 != entry["sha256"]:
        raise ValueError(f"{label}: sha256 {sha256[:16]}... differs from the manifest's {entry['sha256'][:16]}... "
                         "(corrupted)")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure, reported with the file's name
        raise ValueError(f"{label}: cannot be read ({type(exc).__name__}: {exc})") from None
    extra = state.get(EXTRA_STATE) if isinstance(state, dict) else None
    if not isinstance(extra, dict) or list(extra.get("shard_range", ())) != list(entry["range"]):
        raise ValueError(f"{label}: its content does not match the manifest (not this save's shard)")
    return state


def _load(head: DistributedMarginHead, directory: str) -> None:
    manifest = read_manifest(directory)
    where = os.path.join(directory, MANIFEST)
    if (manifest["num_classes"], manifest["embedding_dim"]) != (head.num_classes, head.embedding_dim):
        raise ValueError(f"{where}: checkpoint is for {manifest['num_classes']} classes x "
                         f"{manifest['embedding_dim']}, this head has {head.num_classes} x {head.embedding_dim}")
    entries = sorted(manifest["shards"], key=lambda e: tuple(e["range"]))
    if len(entries) != manifest["world_size"]:
        raise ValueError(f"{where}: {len(entries)} shards listed for world size {manifest['world_size']}")
    problem = check_tiling([tuple(e["range"]) for e in entries], head.num_classes)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    start, stop = head.shard_range
    pieces = [verified_shard(directory, e, manifest["world_size"]) for e in entries
              if e["range"][0] < stop and e["range"][1] > start]
    state = reshard_state_dicts(pieces, head.shard_range)
    saved_optimizer = state.pop(OPTIMIZER, None)
    head.load_state_dict(state)
    optimizer = getattr(head, "fused_optimizer", None)
    if saved_optimizer is not None and optimizer is not None:
        load_fused_optimizer_rows(optimizer, head.weight, saved_optimizer)


def check_buffers_consistent(module: torch.nn.Module, group=None) -> None:
    """Collective: raise on every rank unless every rank holds bit-identical buffers (the margin's state)."""
    group = getattr(module, "process_group", group)
    if group_rank_and_size(group)[1] == 1 or not dist.is_initialized():
        return
    buffers = [b.detach().reshape(-1).to(torch.float64) for _, b in sorted(module.named_buffers())]
    if not buffers:
        return
    mine = torch.cat(buffers).to(next(module.parameters()).device)
    everyone = all_gather_stacked(mine, group, sum_grads=False)
    differing = [r for r in range(everyone.shape[0]) if not torch.equal(everyone[r], everyone[0])]
    if differing:
        raise ValueError(f"margin buffers differ between ranks {differing} and rank 0")
