"""What ``MarginHead`` and ``DistributedMarginHead`` share: one constructor surface, one weight initialisation,
one Partial FC sampler, one time at which the backend is resolved.

A single-process head is the world-size-1 case of the model-parallel one: the shard is every class, and the
same ``seed`` gives the same initial weight (drawn in seeded blocks of classes, so the full weight does not
depend on how it is sharded) and the same Partial FC draws.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .backends import resolve_backend
from .losses.base import MarginLoss
from .optim import fused_weight
from .optim.fused import FusedOptimizer
from .optim.fused_weight import COMPILE_REFUSAL
from .optim.sink import FusedUpdate
from .regularizers import check_regularizers
from .initialization import INIT_BLOCK_ROWS, fill_rows_normal  # noqa: F401 (INIT_BLOCK_ROWS: part of the head's API)
from .sampling import PartialFCSampler
from .validation import REDUCTIONS, check_head_arguments

#: insightface's PartialFC initialisation of the class weight: N(0, 0.01^2)
INIT_STD = 0.01
#: the format of a head's extra state (``_extra_state`` in its state_dict), the same for both heads: a
#: ``MarginHead``'s state_dict is a one-shard checkpoint, which ``distributed.reshard_state_dicts`` cuts for any
#: world size, and the shards of a ``DistributedMarginHead`` rejoin into a ``MarginHead``'s
CHECKPOINT_FORMAT = 1


class HeadBase(nn.Module):
    """The class-weight shard ``weight`` (rows = classes ``shard_range``, K rows per class for a loss with
    ``sub_centers`` = K), the loss description ``margin`` and the options both heads take. Subclasses implement ``forward``.

    The backend is resolved at construction for the weight's device (a backend that cannot run in this
    process raises there, not at the first step) and again, once, for each other device type the head is
    moved to ("auto" picks per device type).
    """

    #: reductions a subclass supports
    reductions = REDUCTIONS

    def __init__(self, num_classes: int, embedding_dim: int, margin: MarginLoss, *, shard_range: tuple,
                 sample_rate: float, seed: int, backend: str, reduction: str, ignore_index: int,
                 chunk_size: Optional[int], grad_filter: float, check_values: bool, dtype, device,
                 regularizers=None, memory_budget=None, optimizer=None):
        super().__init__()
        regularizers = check_regularizers(regularizers)
        check_head_arguments(num_classes, embedding_dim, margin, backend=backend, reduction=reduction,
                             reductions=self.reductions, ignore_index=ignore_index, chunk_size=chunk_size,
                             grad_filter=grad_filter, sample_rate=sample_rate, seed=seed,
                             check_values=check_values, dtype=dtype, memory_budget=memory_budget)
        if sample_rate < 1.0 and margin.no_partial_fc_reason is not None:
            raise ValueError(f"sample_rate={sample_rate} (Partial FC) is not supported by {type(margin).__name__}: "
                             f"{margin.no_partial_fc_reason}")
        self.num_classes, self.embedding_dim, self.margin = num_classes, embedding_dim, margin
        self.shard_range = tuple(shard_range)
        self.backend, self.reduction, self.ignore_index = backend, reduction, ignore_index
        self.chunk_size, self.grad_filter, self.seed = chunk_size, float(grad_filter), seed
        #: bytes (or "auto") the op may spend keeping forward tiles for backward (margin_kernels.memory_budget)
        self.memory_budget = memory_budget
        # the value checks (finite features and weights, labels in range): host-side on CPU, device-side
        # (torch._assert_async, no sync) on a GPU; the distributed head's input exchange syncs anyway
        self.check_values = check_values
        # K adjacent rows per class for a loss with sub-centers (margin.sub_centers)
        self.weight = nn.Parameter(torch.empty(self.num_local * margin.sub_centers, embedding_dim, dtype=dtype,
                                               device=device))
        self.sampler = PartialFCSampler(self.num_local, sample_rate, seed=seed, shard_start=self.shard_range[0],
                                        device=self.weight.device)
        #: the last training step's sampled classes (global ids on this shard); None without sampling
        self.sampled_classes: Optional[torch.Tensor] = None
        self._resolved: dict = {}
        self.resolved_backend  # noqa: B018 - resolve now: an unusable backend fails at construction
        self.reset_parameters()
        #: Center / Ring loss terms added to every row's loss (margin_kernels.regularizers), state sized for the shard
        self.regularizers = nn.ModuleList(regularizers)
        for regularizer in regularizers:
            regularizer.bind(num_classes=num_classes, embedding_dim=embedding_dim, shard_range=self.shard_range,
                             seed=seed, dtype=self.weight.dtype, device=self.weight.device)
        self.fused_optimizer = None
        self._pending_update = None  # a weak reference to the last call's FusedUpdate (gradient_sink)
        if optimizer is not None:
            self.fuse(optimizer(self.parameters()) if callable(optimizer) else optimizer)

    def fuse(self, optimizer) -> None:
        """Apply ``optimizer`` (a ``margin_kernels.optim`` FusedSGD / FusedAdamW over this head's weight) inside
        the backward pass: dW is never allocated and ``weight.grad`` stays None (see optim.fused). The
        constructor's ``optimizer=`` does this with an optimizer or a factory ``params -> optimizer``. The
        weight becomes an ``optim.fused_weight.FusedWeight`` (still an nn.Parameter, the same object):
        ``clip_grad_norm_``/``clip_grad_value_`` or a ``GradScaler`` over it raise with the reason."""
        if self.backend == "reference":
            raise ValueError("backend='reference' builds the full logits and has no fused update: pick a chunked "
                             "backend for a head with a fused optimizer")
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"optimizer must be a margin_kernels.optim FusedSGD or FusedAdamW, got "
                            f"{type(optimizer).__name__}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not any(p is self.weight for p in params):
            raise ValueError("optimizer must hold this head's weight (e.g. FusedSGD(head.parameters(), ...))")
        fused_weight.mark_fused(self.weight)  # clipping it or GradScaler on it raises (optim.fused_weight)
        self.fused_optimizer = optimizer

    def gradient_sink(self):
        """The op's ``sink_factory`` for this call: the fused optimizer's update of the weight's rows
        (``optim.sink.UpdateSink``), or None without a fused optimizer. Refuses torch.compile in fused mode."""
        if self.fused_optimizer is None:
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(COMPILE_REFUSAL)
        if self.weight.grad is not None:
            raise RuntimeError("the head's weight has a .grad although its optimizer is fused: mixing a fused "
                               "update with an accumulated gradient is not supported")
        pending = None if self._pending_update is None else self._pending_update()
        if pending is not None and not pending.applied:
            # refused before anything is written: the earlier call's update has not run, and in one backward
            # the first update would change the weight the second call's gradient was taken at
            raise RuntimeError("this head's previous call has not been backpropagated yet: with a fused optimizer "
                               "each call's backward applies its own update, so two calls cannot share one "
                               "backward. Concatenate the batches into one call, or call backward() (and "
                               "optimizer.step()) after each call")
        update = FusedUpdate(self.fused_optimizer, self.weight)
        # alive as long as the call's autograd graph holds it (ops._SinkOp's context): a dropped loss frees it
        self._pending_update = weakref.ref(update)
        return update

    @property
    def num_local(self) -> int:
        return self.shard_range[1] - self.shard_range[0]

    @property
    def resolved_backend(self) -> str:
        """The concrete backend for the weight's current device type."""
        device_type = self.weight.device.type
        if device_type not in self._resolved:
            self._resolved[device_type] = resolve_backend(self.backend, device_type)
        return self._resolved[device_type]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            fill_rows_normal(self.weight, self.shard_range[0] * self.margin.sub_centers, self.seed, INIT_STD)

    def sample_columns(self, columns: torch.Tensor):
        """Partial FC in training mode: (labels as positions in the sampled index, the index), or
        (columns, None) when every class is used. ``columns`` are local class ids, -1 for no local target."""
        if not (self.training and self.sampler.active):
            self.sampled_classes = None
            return columns, None
        # the sampler draws on its generator's device (insightface's on the CPU): the index joins the columns
        index = self.sampler.sample(columns).to(columns.device)
        self.sampled_classes = index + self.shard_range[0]
        return self.sampler.remap(index, columns), index

    # ---- checkpoints (distributed/checkpoint.py saves and reshards them) -------------------------------------
    def get_extra_state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "num_classes": self.num_classes, "embedding_dim": self.embedding_dim,
                "shard_range": list(self.shard_range), "sampler_state": self.sampler.get_state(),
                "row_keys": self.class_row_keys(), "sub_centers": self.margin.sub_centers}

    def class_row_keys(self) -> list:
        """state_dict keys whose rows are this shard's classes (resharded by the checkpoint functions): the
        weight and the regularisers' per-class state (the centers)."""
        return ["weight"] + [f"regularizers.{i}.{name}" for i, regularizer in enumerate(self.regularizers)
                             for name in regularizer.class_rows]

    def set_extra_state(self, state: dict) -> None:
        """Checks that the checkpoint is this head's (sizes, sub-centers, class range) and restores the Partial
        FC generator when the checkpoint has its state (a resharded one has none: the sampler goes on from its
        own, seeded for the new range)."""
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a margin_kernels head checkpoint (its _extra_state has a missing or unknown "
                             "format)")
        if (state["num_classes"], state["embedding_dim"]) != (self.num_classes, self.embedding_dim):
            raise ValueError(f"checkpoint is for {state['num_classes']} classes x {state['embedding_dim']}, "
                             f"this head has {self.num_classes} x {self.embedding_dim}")
        if state.get("sub_centers", 1) != self.margin.sub_centers:
            raise ValueError(f"checkpoint has {state.get('sub_centers', 1)} weight rows per class, this head's loss "
                             f"has sub_centers={self.margin.sub_centers}")
        if tuple(state["shard_range"]) != tuple(self.shard_range):
            raise ValueError(f"checkpoint shard holds classes {tuple(state['shard_range'])}, this head holds "
                             f"{self.shard_range}: reshard it with margin_kernels.distributed.load_sharded (a "
                             f"save_sharded directory) or reshard_state_dicts (state dicts)")
        if state.get("sampler_state") is not None:
            self.sampler.set_state(state["sampler_state"])

    def extra_repr(self) -> str:
        shard = "" if self.shard_range == (0, self.num_classes) else f", shard_range={self.shard_range}"
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}{shard}, "
                f"sample_rate={self.sampler.sample_rate}, backend={self.backend!r}, dtype={self.weight.dtype}")
