"""Crash-safe shard checkpoints: a save killed at any point (SIGKILL) leaves the previous checkpoint loadable
and equal to what was saved; a truncated, corrupted or missing file is refused with its name and the rank
that saved it (single process here; tests/test_distributed_failures.py loads a bad checkpoint on 2 ranks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import margin_kernels as mk
from margin_kernels.distributed import DistributedMarginHead, load_sharded, save_sharded
from margin_kernels.distributed.checkpoint import MANIFEST, read_manifest

CLASSES, DIM = 300, 16


def _head(seed=0):
    return DistributedMarginHead(CLASSES, DIM, mk.CurricularFace(), seed=seed, backend="torch")


def _trained_head(seed=0):
    head = _head(seed)
    x, y = torch.randn(8, DIM), torch.randint(0, CLASSES, (8,))
    head(x, y).backward()  # advances CurricularFace's t
    with torch.no_grad():
        head.weight.sub_(0.1 * head.weight.grad)
    return head


def _assert_same_state(head, expected: dict):
    got = head.state_dict()
    assert torch.equal(got["weight"], expected["weight"])
    assert torch.equal(got["margin.t"], expected["margin.t"])


def test_manifest_lists_every_shard_with_size_and_sha256(tmp_path):
    head = _trained_head()
    path = save_sharded(head, str(tmp_path))
    manifest = read_manifest(str(tmp_path))
    assert manifest["world_size"] == 1 and manifest["num_classes"] == CLASSES and manifest["generation"] == 1
    (entry,) = manifest["shards"]
    assert entry["rank"] == 0 and entry["range"] == [0, CLASSES]
    assert os.path.join(str(tmp_path), entry["file"]) == path and entry["size"] == os.path.getsize(path)
    fresh = _head(seed=5)
    load_sharded(fresh, str(tmp_path))
    _assert_same_state(fresh, head.state_dict())
    # a second save replaces the first generation's file only after its manifest is written
    save_sharded(head, str(tmp_path))
    assert read_manifest(str(tmp_path))["generation"] == 2
    assert sorted(os.listdir(tmp_path)) == sorted([MANIFEST, read_manifest(str(tmp_path))["shards"][0]["file"]])


def _saved(tmp_path):
    head = _trained_head()
    path = save_sharded(head, str(tmp_path))
    return head, path


def _refused(tmp_path, match):
    with pytest.raises(ValueError, match=match):
        load_sharded(_head(seed=5), str(tmp_path))


def test_truncated_shard_is_named(tmp_path):
    _, path = _saved(tmp_path)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    _refused(tmp_path, rf"{os.path.basename(path)} \(saved by rank 0 of 1, classes \[0, {CLASSES}\)\): .*truncated")


def test_corrupted_shard_is_named(tmp_path):
    _, path = _saved(tmp_path)
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    _refused(tmp_path, rf"{os.path.basename(path)} \(saved by rank 0 .*corrupted")


def test_missing_shard_and_missing_or_bad_manifest_are_named(tmp_path):
    _, path = _saved(tmp_path)
    os.remove(path)
    _refused(tmp_path, rf"{os.path.basename(path)} \(saved by rank 0 .*missing")
    manifest = os.path.join(str(tmp_path), MANIFEST)
    with open(manifest, "w") as handle:
        handle.write("{not json")
    _refused(tmp_path, "manifest.json: unreadable manifest")
    os.remove(manifest)
    _refused(tmp_path, "manifest.json: missing")


def test_manifest_that_does_not_tile_the_classes_is_refused(tmp_path):
    _saved(tmp_path)
    manifest_path = os.path.join(str(tmp_path), MANIFEST)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["shards"][0]["range"] = [0, CLASSES - 1]
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    _refused(tmp_path, "manifest.json: shard files cover classes")


# ---- SIGKILL during a save -------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    import margin_kernels as mk
    from margin_kernels.distributed import DistributedMarginHead, save_sharded
    from margin_kernels.distributed import checkpoint

    phase, directory, expected = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    head = DistributedMarginHead({classes}, {dim}, mk.CurricularFace(), seed=0, backend="torch")
    x, y = torch.randn(8, {dim}), torch.randint(0, {classes}, (8,))
    head(x, y).backward()
    save_sharded(head, directory)                      # the checkpoint that must survive
    torch.save(head.state_dict(), expected)
    with torch.no_grad():
        head.weight.mul_(-3.0)
    head(x, y)                                         # the buffers move on too

    real = checkpoint.write_durably

    def dying(path, write):
        is_manifest = path.endswith(checkpoint.MANIFEST)
        if phase == "before-manifest" and is_manifest:
            os.kill(os.getpid(), signal.SIGKILL)
        if (phase == "mid-shard" and not is_manifest) or (phase == "mid-manifest" and is_manifest):
            class Half:                                # writes half of what it is given, then dies
                def __init__(self, handle): self.handle = handle
                def write(self, data):
                    data = bytes(data)
                    self.handle.write(data[: len(data) // 2]); self.handle.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                def __getattr__(self, name): return getattr(self.handle, name)
            return real(path, lambda handle: write(Half(handle)))
        return real(path, write)

    checkpoint.write_durably = dying
    save_sharded(head, directory)
    print("the save was not killed")
""").format(classes=CLASSES, dim=DIM)


@pytest.mark.parametrize("phase", ["mid-shard", "before-manifest", "mid-manifest"])
def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path, phase):
    directory, expected = str(tmp_path / "ckpt"), str(tmp_path / "expected.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    proc = subprocess.run([sys.executable, "-c", _CHILD, phase, directory, expected], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = [n for n in os.listdir(directory) if n.endswith(".partial") or ".g2." in n]
    assert leftovers, "the killed save left nothing behind: it was not killed mid-write"
    head = _head(seed=5)
    load_sharded(head, directory)
    _assert_same_state(head, torch.load(expected, weights_only=True))
    # and the next save after the crash cleans up and loads
    save_sharded(head, directory)
    assert not [n for n in os.listdir(directory) if n.endswith(".partial")]
    again = _head(seed=9)
    load_sharded(again, directory)
    _assert_same_state(again, head.state_dict())
