"""The project's developer tools: importable from a source checkout, never installed (pyproject's
``packages.find`` includes ``margin_kernels*`` only). Run from the repository root:

    python -m bench JOB [options]        (python -m bench -h lists the jobs; python -m bench JOB -h each)

What a user runs to compare the backends on their machine is ``margin-bench`` (``margin_kernels.bench``);
these tools may import ``margin_kernels``, never the other way round.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def write_json(payload, dest) -> None:
    """A job's ``--json`` output: "-" is stdout, a path a file, empty/None nothing."""
    if dest == "-":
        json.dump(payload, sys.stdout, indent=1)
    elif dest:
        Path(dest).write_text(json.dumps(payload, indent=1))
