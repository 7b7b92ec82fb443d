"""Every method by name: our backends and the GEMM floor (``methods``), other libraries (``peers``), and the
"<backend>@<budget>" rows built on demand. Its own module so that ``peers`` (which builds on ``methods``) and
``methods`` never import each other."""
from __future__ import annotations

from .methods import BACKENDS, GEMM_FLOOR, budgeted_method
from .peers import PEERS


class _Methods(dict):
    """The method table; "<backend>@<budget>" names are built on first lookup (worker processes look them up
    by name too)."""

    def __missing__(self, name):
        method = budgeted_method(name)
        if method is None:
            raise KeyError(name)
        self[name] = method
        return method

    def __contains__(self, name):
        return dict.__contains__(self, name) or budgeted_method(name) is not None


def all_methods() -> dict:
    return _Methods({**BACKENDS, **PEERS, GEMM_FLOOR.name: GEMM_FLOOR})
