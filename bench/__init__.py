"""The project's developer tools: importable from a source checkout, never installed (pyproject's
``packages.find`` includes ``margin_kernels*`` only). Run from the repository root:

    python -m bench JOB [options]        (python -m bench -h lists the jobs; python -m bench JOB -h each)

What a user runs to compare the backends on their machine is ``margin-bench`` (``margin_kernels.bench``);
these tools may import ``margin_kernels``, never the other way round.
"""
