"""``python -m margin_kernels.bench`` is the same as ``margin-bench``."""
from .cli import main

# guarded: the measuring children re-import the main module under another name and must not run the CLI
if __name__ == "__main__":
    raise SystemExit(main())
