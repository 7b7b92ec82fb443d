"""ElasticFace (Boutros et al., CVPRW 2022): ArcFace / CosFace with a margin per row drawn from N(m, std) on
every training call; the "+" variants hand the sorted draws out by the rows' target cosines."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .base import MarginLoss, RowInputs, cos_plus_margin, flag, in_range, one_of

#: how ``plus=True`` assigns the sorted margins (docs/losses.md, ElasticFace)
PLUS_ORDERS = ("code", "paper")


class _ElasticMargin(MarginLoss):
    """The per-row margin machinery both ElasticFace losses share; subclasses write the target with it.

    Where a call's margins come from, first match wins:

    * ``margins`` (a (B,) tensor set at construction or assigned to ``loss.margins``): used as given, in every
      mode (entries of ignored rows are unused);
    * training mode: one draw N(m, std) per non-ignored row, in row order, as fp32 ``torch.normal`` (as the
      authors' code): from ``generator`` if given, else from the loss's own CPU generator when ``seed`` is
      given (its state is the buffer ``rng_state``, so it is saved in ``state_dict`` and a deep copy draws
      the same numbers), else from torch's global generator on the features' device;
    * eval mode: every row gets m (no draw: the loss of a fixed model is deterministic).

    ``plus=True`` then sorts the rows' margins ascending and the rows by target cosine descending and pairs
    them: ``plus_order="code"`` exactly as fdbtrs/ElasticFace indexes them (row k takes the margin of rank
    ``order[k]``, ``order`` being the descending-cosine permutation), ``"paper"`` as the paper describes
    (the row with the k-th largest cosine takes the k-th smallest margin).
    """

    params = {"m": in_range(0.0, math.pi), "std": in_range(0.0, 1.0), "plus": flag,
              "plus_order": one_of(*PLUS_ORDERS)}
    fixed_after_init = ("seed", "generator")  # the draws' source (rng_state is made from seed once)

    def __init__(self, s: float, m: float, std: float, plus: bool, plus_order: str, seed: Optional[int],
                 generator: Optional[torch.Generator], margins: Optional[torch.Tensor]):
        super().__init__(s)
        if not isinstance(plus, bool):  # stricter than the flag rule at construction: 0/1 are not accepted
            raise ValueError(f"plus must be a bool, got {plus!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        self.m, self.std, self.plus, self.plus_order = m, std, plus, plus_order
        self.seed, self.generator, self.margins = seed, generator, margins
        if seed is not None:
            self.register_buffer("rng_state", torch.Generator().manual_seed(seed).get_state())
        self._row_margins: Optional[torch.Tensor] = None

    def begin_call(self, rows: RowInputs) -> torch.Tensor:
        with torch.no_grad():
            self._row_margins = self._call_margins(rows.detach())
        return super().begin_call(rows)

    def row_margins(self, rows: RowInputs) -> torch.Tensor:
        """This call's margin per row (what ``target_logit`` uses)."""
        if self._row_margins is None or self._row_margins.shape != rows.cos.shape:
            raise RuntimeError("row_margins is only defined after begin_call of the same batch")
        return self._row_margins

    def _call_margins(self, rows: RowInputs) -> torch.Tensor:
        cos, valid = rows.cos, rows.valid
        if self.margins is not None:
            drawn = self._explicit_margins(cos)
        elif not self.training:
            return torch.full_like(cos, self.m)
        else:
            drawn = torch.full_like(cos, self.m)
            drawn[valid] = self._draw(int(valid.sum()), cos.device).to(cos.dtype)
        if self.plus:
            drawn = drawn.clone()
            drawn[valid] = self._assign_by_rank(drawn[valid], cos[valid])
        return drawn

    def _explicit_margins(self, cos: torch.Tensor) -> torch.Tensor:
        margins = self.margins
        if not isinstance(margins, torch.Tensor) or margins.shape != cos.shape or not margins.is_floating_point():
            got = tuple(margins.shape) if isinstance(margins, torch.Tensor) else type(margins).__name__
            raise ValueError(f"margins must be a floating-point tensor of shape ({cos.shape[0]},), one per row, "
                             f"got {got}")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(margins).all()):  # a sync: eager only
            raise ValueError("margins must be finite")
        return margins.detach().to(device=cos.device, dtype=cos.dtype)

    def _draw(self, count: int, device: torch.device) -> torch.Tensor:
        size = (count, 1)  # the authors' shape: label[index, None].size()
        if self.generator is not None:
            return torch.normal(self.m, self.std, size, generator=self.generator,
                                device=self.generator.device).to(device).squeeze(1)
        if self.seed is None:
            return torch.normal(self.m, self.std, size, device=device).squeeze(1)
        generator = torch.Generator()
        generator.set_state(self.rng_state.cpu())
        drawn = torch.normal(self.m, self.std, size, generator=generator)
        self.rng_state.copy_(generator.get_state())
        return drawn.to(device).squeeze(1)

    def _assign_by_rank(self, margins: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        order = torch.sort(cos, descending=True).indices
        ascending = torch.sort(margins).values
        if self.plus_order == "code":
            return ascending[order]
        assigned = torch.empty_like(ascending)
        assigned[order] = ascending
        return assigned

    def _hparams(self):
        out = {"s": self.s, "m": self.m, "std": self.std, "plus": self.plus}
        if self.plus:
            out["plus_order"] = self.plus_order
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class ElasticArcFace(_ElasticMargin):
    """z_iy = s cos(theta_iy + m_i), m_i this call's margin of row i; z_ij = s c_ij.

    As the authors' code: cos(arccos(c) + m_i) without ArcFace's easy-margin / th-mm rules (theta + m may pass
    pi), and an exact gradient (the margin is a constant of the call)."""

    def __init__(self, s: float = 64.0, m: float = 0.50, std: float = 0.0125, plus: bool = False, *,
                 plus_order: str = "code", seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 margins: Optional[torch.Tensor] = None):
        super().__init__(s, m, std, plus, plus_order, seed, generator, margins)

    def target_logit(self, rows: RowInputs):
        return self.s * cos_plus_margin(rows.cos, self.row_margins(rows))


class ElasticCosFace(_ElasticMargin):
    """z_iy = s (c_iy - m_i), m_i this call's margin of row i; z_ij = s c_ij."""

    def __init__(self, s: float = 64.0, m: float = 0.35, std: float = 0.0125, plus: bool = False, *,
                 plus_order: str = "code", seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 margins: Optional[torch.Tensor] = None):
        super().__init__(s, m, std, plus, plus_order, seed, generator, margins)

    def target_logit(self, rows: RowInputs):
        return self.s * (rows.cos - self.row_margins(rows))
