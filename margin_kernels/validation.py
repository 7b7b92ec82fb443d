"""Argument checks shared by every entry point: bad input gets a ValueError/TypeError naming the argument,
never a kernel assert, a crash or a silently wrong loss."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import BACKEND_NAMES
from .losses.base import MarginLoss

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        return False


def check_arguments(features, weight, labels, margin, *, backend: str, reduction: str, ignore_index: int,
                    chunk_size: Optional[int], class_index: Optional[torch.Tensor] = None,
                    grad_filter: float = 0.0, check_values: bool = True) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if not isinstance(margin, MarginLoss):
        raise TypeError(f"margin must be a margin_kernels loss (e.g. ArcFace()), got {type(margin).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (batch, embedding_dim), got shape {tuple(features.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_classes, embedding_dim), got shape {tuple(weight.shape)}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be a floating tensor (fp16, bf16, fp32, fp64), got {features.dtype}")
    if weight.dtype != features.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match features dtype {features.dtype}; cast one "
                        "of them (accumulation is fp32 for low-precision storage either way)")
    if weight.device != features.device:
        raise ValueError(f"weight is on {weight.device} but features are on {features.device}")
    if weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight has embedding_dim {weight.shape[1]} but features have {features.shape[1]} "
                         f"(weight is {tuple(weight.shape)}, features {tuple(features.shape)})")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (row)")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match features, "
                         f"got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels are on {labels.device} but features are on {features.device}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(grad_filter, (int, float)) or isinstance(grad_filter, bool) or not 0.0 <= grad_filter < 1.0:
        raise ValueError(f"grad_filter must be a number in [0, 1), got {grad_filter!r}")
    num_columns = weight.shape[0]
    if class_index is not None:
        if not isinstance(class_index, torch.Tensor) or class_index.dim() != 1:
            raise ValueError("class_index must be a 1-D integer tensor of class ids")
        if class_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"class_index must be int32 or int64, got {class_index.dtype}")
        if class_index.device != weight.device:
            raise ValueError(f"class_index is on {class_index.device} but weight is on {weight.device}")
        if class_index.numel() == 0:
            raise ValueError("class_index must not be empty")
        num_columns = class_index.shape[0]
    if not check_values or _is_compiling():
        return
    # value checks need a device sync; they are O(B d) and O(K), never O(C d)
    if features.numel() and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or Inf")
    if class_index is not None:
        if bool(((class_index < 0) | (class_index >= weight.shape[0])).any()):
            raise ValueError(f"class_index values must be in [0, {weight.shape[0]})")
        if torch.unique(class_index).numel() != class_index.numel():
            raise ValueError("class_index must not contain duplicates")
    valid = labels != ignore_index
    if bool(valid.any()):
        bad = valid & ((labels < 0) | (labels >= num_columns))
        if bool(bad.any()):
            first = int(labels[bad][0])
            what = "len(class_index)" if class_index is not None else "num_classes"
            raise ValueError(f"labels must be in [0, {num_columns}) ({what}) or equal ignore_index={ignore_index}; "
                             f"found {first}")
