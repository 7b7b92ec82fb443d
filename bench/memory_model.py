"""Kept only for ``tests/test_distributed.py``, which loads this path; the model is ``margin-bench memory-model``
(``margin_kernels/bench/memory_model.py``). Delete this file once that test imports the package module."""
from margin_kernels.bench.memory_model import *  # noqa: F401,F403
from margin_kernels.bench.memory_model import main

if __name__ == "__main__":
    raise SystemExit(main())
