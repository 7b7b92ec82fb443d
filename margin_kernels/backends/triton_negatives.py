"""The negative functions of ``losses/negatives.py`` as Triton device functions.

Same table, same parameters: ``KIND`` is the ``NegativeKind`` value (a constexpr, so each kernel is compiled
for one kind and the switch costs nothing), ``T`` and ``U`` are the per-row threshold and auxiliary value
broadcast as (BLOCK_B, 1) columns, ``a`` and ``b`` the spec's constants (scalars in the accumulation dtype).
``c`` is a (BLOCK_B, BLOCK_C) tile of cosines in the accumulation dtype.
"""
import triton
import triton.language as tl

from ..losses.negatives import NegativeKind

# the NegativeKind values as module-level constexprs (what a @triton.jit function can compare a KIND with)
IDENTITY = tl.constexpr(int(NegativeKind.IDENTITY))
CLAMP = tl.constexpr(int(NegativeKind.CLAMP))
CURRICULAR = tl.constexpr(int(NegativeKind.CURRICULAR))
MV = tl.constexpr(int(NegativeKind.MV))
CIRCLE = tl.constexpr(int(NegativeKind.CIRCLE))
FILTER = tl.constexpr(int(NegativeKind.FILTER))
ROW_SCALE = tl.constexpr(int(NegativeKind.ROW_SCALE))
AFFINE = tl.constexpr(int(NegativeKind.AFFINE))

POWER = tl.constexpr(int(NegativeKind.POWER))
POWER_ST = tl.constexpr(int(NegativeKind.POWER_ST))


@triton.jit
def power_of_base(c, e):
    """((c + 1) / 2)^e with the base floored at 0 (negatives.power_base): exp2(e log2 base), and 0^e = 0 for
    e > 0, 1 for e = 0 (where log2(0) = -inf would give NaN)."""
    base = tl.maximum((c + 1.0) * 0.5, 0.0)
    safe = tl.where(base > 0.0, base, 1.0)
    return tl.where(base > 0.0, tl.exp2(e * tl.log2(safe)), tl.where(e == 0.0, 1.0, 0.0).to(c.dtype))


@triton.jit
def negative_value(c, T, U, a, b, KIND: tl.constexpr):
    """g(c)."""
    if KIND == CLAMP:
        return tl.minimum(tl.maximum(c, a), b)
    elif KIND == CURRICULAR:
        return tl.where(c > T, c * (U + c), c)
    elif KIND == MV:
        return tl.where(c > T, a * c + (a - 1.0), c)
    elif KIND == CIRCLE:
        return tl.maximum(c + a, 0.0) * (c - a)
    elif KIND == FILTER:
        return tl.where(c > a, 0.0, c)
    elif KIND == ROW_SCALE:
        return U * c
    elif KIND == AFFINE:
        return tl.where(c > T, a * c + b, c)
    elif KIND == POWER:  # two comparisons, not `or`: each stays a compile-time branch
        return 2.0 * power_of_base(c, a) - 1.0 + b
    elif KIND == POWER_ST:
        return 2.0 * power_of_base(c, a) - 1.0 + b
    else:
        return c


@triton.jit
def negative_derivative(c, T, U, a, b, KIND: tl.constexpr):
    """dg/dc (CIRCLE's alpha is detached, as in the PyTorch table)."""
    if KIND == CLAMP:
        return tl.where((c >= a) & (c <= b), 1.0, 0.0).to(c.dtype)
    elif KIND == CURRICULAR:
        return tl.where(c > T, U + 2.0 * c, 1.0).to(c.dtype)
    elif KIND == MV:
        return tl.where(c > T, a, 1.0).to(c.dtype)
    elif KIND == CIRCLE:
        return tl.maximum(c + a, 0.0)
    elif KIND == FILTER:
        return tl.where(c > a, 0.0, 1.0).to(c.dtype)
    elif KIND == ROW_SCALE:
        return tl.zeros(c.shape, c.dtype) + U
    elif KIND == AFFINE:
        return tl.where(c > T, a, 1.0).to(c.dtype)
    elif KIND == POWER:
        return a * power_of_base(c, a - 1.0)
    else:  # IDENTITY, and POWER_ST (opensphere's no_grad adjustment: the gradient of c)
        return tl.full(c.shape, 1.0, c.dtype)
