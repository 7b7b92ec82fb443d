"""Argument checks shared by every entry point: bad input gets a ValueError/TypeError naming the argument,
never a kernel assert, a crash or a silently wrong loss."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import check_backend_name
from .losses.base import MarginLoss
from .memory_budget import check_memory_budget
from .precision import FLOAT_DTYPES

REDUCTIONS = ("mean", "sum", "none")


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch without torch.compiler
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- one check per argument: every entry point (functional call, both heads, the CLI) calls these ---------
def check_positive_int(name: str, value) -> int:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_margin(margin) -> None:
    if not isinstance(margin, MarginLoss):
        raise TypeError(f"margin must be a margin_kernels loss (e.g. ArcFace()), got {type(margin).__name__}")


def check_reduction(reduction, allowed=REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {reduction!r}")


def check_ignore_index(ignore_index, num_classes: Optional[int] = None) -> None:
    """An int; for a head (``num_classes`` known) outside [0, num_classes), or that class could never train."""
    if not _is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index must be an int outside [0, num_classes={num_classes}), got {ignore_index!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_grad_filter(grad_filter) -> None:
    if not _is_number(grad_filter) or not 0.0 <= grad_filter < 1.0:
        raise ValueError(f"grad_filter must be a number in [0, 1), got {grad_filter!r}")


def check_sample_rate(sample_rate) -> float:
    if not _is_number(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def check_dtype(dtype) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES} or None, got {dtype!r}")


def check_seed(seed) -> None:
    if not _is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_head_arguments(num_classes, embedding_dim, margin, *, backend, reduction, reductions, ignore_index,
                         chunk_size, grad_filter, sample_rate, seed, check_values, dtype,
                         memory_budget=None) -> None:
    """Construction-time checks of a head's arguments (``MarginHead`` and ``DistributedMarginHead``)."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("embedding_dim", embedding_dim)
    check_margin(margin)
    check_backend_name(backend)
    check_reduction(reduction, reductions)
    check_ignore_index(ignore_index, num_classes)
    check_chunk_size(chunk_size)
    check_grad_filter(grad_filter)
    check_sample_rate(sample_rate)
    check_seed(seed)
    check_flag("check_values", check_values)
    check_dtype(dtype)
    check_memory_budget(memory_budget)


def check_tensors(features, weight, labels) -> None:
    """Types, shapes, dtypes and devices of the three input tensors (no device sync)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
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


def check_sub_centers(weight, margin) -> int:
    """The classes of ``weight``: its rows, or its rows / K for a loss with K sub-centers per class."""
    k = margin.sub_centers
    if weight.shape[0] % k:
        raise ValueError(f"weight must have num_classes * sub_centers rows (sub_centers={k}, each class's rows "
                         f"adjacent), got {weight.shape[0]} rows")
    return weight.shape[0] // k


def check_class_index(class_index, weight, num_classes: Optional[int] = None) -> int:
    """Structure of a Partial FC class index; returns the number of columns of the problem (``num_classes``:
    the classes of ``weight``, default its rows)."""
    if class_index is None:
        return weight.shape[0] if num_classes is None else num_classes
    if not isinstance(class_index, torch.Tensor) or class_index.dim() != 1:
        raise ValueError("class_index must be a 1-D integer tensor of class ids")
    if class_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"class_index must be int32 or int64, got {class_index.dtype}")
    if class_index.device != weight.device:
        raise ValueError(f"class_index is on {class_index.device} but weight is on {weight.device}")
    if class_index.numel() == 0:
        raise ValueError("class_index must not be empty")
    return class_index.shape[0]


def value_checks_apply(check_values: bool) -> bool:
    """Whether the host-side value checks run (they read values on the host: the distributed head's input
    exchange, which syncs anyway); off with check_values=False and under torch.compile."""
    return check_values and not _is_compiling()


#: how the value checks run (``value_check_mode``): on the host with a ValueError, or on the device
SYNC, DEVICE = "sync", "device"


def value_check_mode(check_values: bool, device: torch.device) -> Optional[str]:
    """None with check_values=False; SYNC (host checks, ValueError naming the argument) in eager mode on CPU,
    where reading a value costs nothing; DEVICE otherwise (a GPU, or any device under torch.compile): the same
    conditions as ``torch._assert_async``, so no host sync and nothing for dynamo to break on. A failed device
    check raises a RuntimeError with the same message: at once on CPU, at the next synchronisation on CUDA
    (a device-side assert, after which the CUDA context is unusable: the process must restart)."""
    if not check_values:
        return None
    return SYNC if device.type == "cpu" and not _is_compiling() else DEVICE


def bad_labels(labels: torch.Tensor, num_columns: int, ignore_index: int) -> torch.Tensor:
    """Labels that are neither ``ignore_index`` nor a column id, compared as int64 (in their own dtype a uint8
    255 would equal ignore_index -1 and an int8 label could not reach a class count above 127)."""
    labels = labels.long()
    return (labels != ignore_index) & ((labels < 0) | (labels >= num_columns))


def label_range_message(labels: torch.Tensor, bad: torch.Tensor, num_columns: int, ignore_index: int,
                        what: str = "num_classes") -> str:
    return (f"labels must be in [0, {num_columns}) ({what}) or equal ignore_index={ignore_index}; "
            f"found {int(labels[bad][0])}")


NON_FINITE_FEATURES = "features contain NaN or Inf"
#: found in the forward pass, which reads every weight row of the call anyway (no extra pass over W)
NON_FINITE_WEIGHT = "weight contains NaN or Inf in a class this call reads"


def check_values_of(features, weight, labels, ignore_index: int, class_index, num_columns: int,
                    num_classes: Optional[int] = None) -> None:
    """The checks that read values (a device sync): O(B d) and O(K), never O(C d)."""
    if features.numel() and not bool(torch.isfinite(features).all()):
        raise ValueError(NON_FINITE_FEATURES)
    if class_index is not None:
        num_classes = weight.shape[0] if num_classes is None else num_classes
        if bool(((class_index < 0) | (class_index >= num_classes)).any()):
            raise ValueError(f"class_index values must be in [0, {num_classes})")
        if torch.unique(class_index).numel() != class_index.numel():
            raise ValueError("class_index must not contain duplicates")
    bad = bad_labels(labels, num_columns, ignore_index)
    if bool(bad.any()):
        what = "len(class_index)" if class_index is not None else "num_classes"
        raise ValueError(label_range_message(labels, bad, num_columns, ignore_index, what))


def assert_values_on_device(features, weight, labels, ignore_index: int, class_index, num_columns: int,
                            num_classes: Optional[int] = None) -> None:
    """``check_values_of`` without a host sync (``torch._assert_async``): same conditions, messages without
    the offending value (reading it would sync)."""
    if features.numel():
        torch._assert_async(torch.isfinite(features).all(), NON_FINITE_FEATURES)
    if class_index is not None:
        num_classes = weight.shape[0] if num_classes is None else num_classes
        torch._assert_async(((class_index >= 0) & (class_index < num_classes)).all(),
                            f"class_index values must be in [0, {num_classes})")
        ordered = torch.sort(class_index).values
        torch._assert_async((ordered[1:] != ordered[:-1]).all(), "class_index must not contain duplicates")
    what = "len(class_index)" if class_index is not None else "num_classes"
    if labels.numel():
        torch._assert_async((~bad_labels(labels, num_columns, ignore_index)).all(),
                            f"labels must be in [0, {num_columns}) ({what}) or equal ignore_index={ignore_index}")


def check_no_bad_rows(bad: torch.Tensor, message: str, mode: Optional[str]) -> None:
    """Raise ``message`` if any entry of the B-vector ``bad`` is set: a ValueError (SYNC), a device assert
    (DEVICE), nothing (None: the rows' documented NaN stands)."""
    if mode == SYNC:
        if bool(bad.any()):
            raise ValueError(message)
    elif mode == DEVICE and bad.numel():
        torch._assert_async((~bad).all(), message)


def check_arguments(features, weight, labels, margin, *, backend: str, reduction: str, ignore_index: int,
                    chunk_size: Optional[int], class_index: Optional[torch.Tensor] = None,
                    grad_filter: float = 0.0, check_values: bool = True, memory_budget=None) -> None:
    """Every check of the functional call, in the order a user would want to hear about them."""
    check_tensors(features, weight, labels)
    check_margin(margin)
    check_backend_name(backend)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    check_chunk_size(chunk_size)
    check_grad_filter(grad_filter)
    check_flag("check_values", check_values)
    check_memory_budget(memory_budget)
    num_classes = check_sub_centers(weight, margin)
    num_columns = check_class_index(class_index, weight, num_classes)
    mode = value_check_mode(check_values, features.device)
    if mode == SYNC:
        check_values_of(features, weight, labels, ignore_index, class_index, num_columns, num_classes)
    elif mode == DEVICE:
        assert_values_on_device(features, weight, labels, ignore_index, class_index, num_columns, num_classes)
