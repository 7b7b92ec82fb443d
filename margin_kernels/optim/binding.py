"""Which fused optimizer updates which head weight, as a small integer the custom op can carry.

``margin_lse`` is a registered custom op: its arguments are tensors and scalars, so a head passes its
binding's slot (``-1``: not fused) and the op's backward looks the optimizer up here. Entries hold the
optimizer weakly: a dropped head or optimizer frees its slot's target.
"""
from __future__ import annotations

import itertools
import weakref

_slots: dict = {}
_next = itertools.count()


def bind(optimizer, param) -> int:
    """A new slot for (optimizer, param); the caller keeps both alive."""
    slot = next(_next)
    _slots[slot] = (weakref.ref(optimizer), weakref.ref(param))
    return slot


def unbind(slot: int) -> None:
    _slots.pop(slot, None)


def lookup(slot: int):
    """(optimizer, param) of a live slot."""
    entry = _slots.get(slot)
    optimizer, param = (entry[0](), entry[1]()) if entry else (None, None)
    if optimizer is None or param is None:
        raise RuntimeError(f"fused optimizer slot {slot} is no longer bound (its head or optimizer was freed)")
    return optimizer, param
