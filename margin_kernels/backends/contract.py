"""What every backend receives: the call's tensors, its options as one frozen value, and its per-call state.

    lse_forward(inputs: OpInputs, config: OpConfig, state: CallState) -> lse (B,)
    lse_backward(inputs: OpInputs, config: OpConfig, grads: RowGrads, state: CallState) -> (dx, dW, d shift)

``OpConfig`` is the one description of a call's options (Apple's Cut Cross-Entropy passes one ``CCEParams``
the same way): the custom op (``ops.py``) flattens it into its schema and rebuilds it on the other side, so a
new option is one field here and its use in the backends; no signature restates it. Its fields are
scalars because a registered op's arguments must be (``torch.compile`` treats them as constants of the trace);
the schema's argument types are read off each field's default.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Optional

import torch

from ..losses.negatives import NegativeSpec
from .kept_tiles import KeptTiles


class OpInputs(NamedTuple):
    """The tensors of a call, in the order the op's schema lists them."""

    x: torch.Tensor             # (B, d) features as multiplied (normalised or raw), storage dtype
    weight: torch.Tensor        # (C K, d) class weights, the same dtype
    labels: torch.Tensor        # (B,) int64 column ids, -1 for rows without a target column
    row_params: torch.Tensor    # (B, 2) per-row parameters of the negatives, accumulation dtype (fp32/fp64)
    class_index: Optional[torch.Tensor]  # (n,) int64 class ids in [0, C) (Partial FC), or None: every class


class RowGrads(NamedTuple):
    """What the backward needs per row besides the inputs: the forward's result and the incoming gradients."""

    lse: torch.Tensor           # the forward's reduced negatives
    g_lse: torch.Tensor         # dL/d lse
    g_cos: torch.Tensor         # dL/d(target cosine), written at each row's target column (0: no target)


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """The options of one call of the op (every field a scalar; defaults are a plain normalised call)."""

    spec: NegativeSpec = NegativeSpec()   # the negatives' function, scale, constants and reduction
    normalize_weight: bool = True         # divide each cosine by ||w_j|| (False: raw weights, SphereFace-style)
    backend: str = "torch"                # a resolved backend name (never "auto")
    chunk_size: int = 0                   # classes per chunk of the chunk loop; 0: the backend's default
    grad_filter: float = 0.0              # skip gradient tiles whose every |dL/dcos| is below it (0: off)
    product: str = "storage"              # how fp32 operands are multiplied (margin_kernels.precision)
    sub_centers: int = 1                  # K weight rows per class
    keep_cols: int = 0                    # weight rows whose forward tiles the op keeps (memory_budget)

    # ---- the op's flat form, written once ----------------------------------------------------------------
    def pack(self) -> tuple:
        """The scalars in schema order: the spec's fields, then the others."""
        # field names precomputed at import: dynamo traces getattr, not dataclasses.fields
        return (tuple(_scalar(getattr(self.spec, name)) for name in _SPEC_NAMES)
                + tuple(_scalar(getattr(self, name)) for name in _OWN_NAMES))

    @classmethod
    def unpack(cls, values) -> "OpConfig":
        values = tuple(values)
        n = len(_SPEC_FIELDS)
        spec = NegativeSpec(*(_restore(f, v) for f, v in zip(_SPEC_FIELDS, values[:n])))
        return cls(spec, *values[n:])

    @staticmethod
    def schema() -> str:
        """The op schema's argument list for the packed scalars."""
        return ", ".join(f"{_SCHEMA_TYPES[type(_scalar(f.default))]} {prefix}{f.name}"
                         for prefix, fields in (("spec_", _SPEC_FIELDS), ("", _OWN_FIELDS)) for f in fields)

    def replace(self, **changes) -> "OpConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class CallState:
    """What one call hands its backend besides inputs and options: objects, not options."""

    shift: Optional[torch.Tensor] = None  # (1,) logit shift of the binary family (None: 0), differentiable
    store: Optional[KeptTiles] = None     # the kept-tile store of a memory budget (kept_tiles), None: none
    sink: object = None                   # a ``sinks.ChunkSink`` receiving dW chunk by chunk (backward only)


_SPEC_FIELDS = dataclasses.fields(NegativeSpec)
_OWN_FIELDS = tuple(f for f in dataclasses.fields(OpConfig) if f.name != "spec")
_SPEC_NAMES = tuple(f.name for f in _SPEC_FIELDS)
_OWN_NAMES = tuple(f.name for f in _OWN_FIELDS)
_SCHEMA_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}


def _scalar(value):
    """An enum as its int (the op schema has no enums)."""
    return int(value) if isinstance(value, enum.Enum) else value


def _restore(field, value):
    """The spec's enums back from their ints."""
    default = field.default
    return type(default)(value) if isinstance(default, enum.Enum) else value
