"""``margin-bench``: time and memory of every backend and installed peer, side by side, over sweeps.

Layout (one job per file):

* ``config``   - what to run: the grid of problems (loss, B, d, C, dtype) and sweep syntax;
* ``problem``  - the seeded inputs every process rebuilds identically;
* ``methods``  - the things being measured: our backends and the GEMM floor, defined once in ``floor_ms``
  (``peers`` adds other libraries);
* ``timing`` / ``memory`` - how one fwd+bwd is timed and how its peak extra memory is measured;
* ``worker``   - the child process that measures one (problem, method), or all methods of a problem
  round-robin (``--interleave``), or checks accuracy at one problem;
* ``runner``   - the parent: runs the children over the sweep with a progress bar, OOM -> result;
* ``report`` / ``plot`` - table, JSON, markdown, PNG;
* ``cli``      - argument parsing and ``main``: the comparison, and the dispatch to the other jobs:
* ``chunks``   - ``margin-bench chunks``: a backend's time against its class chunk (picks the default);
* ``memory_model`` - ``margin-bench memory-model``: memory per rank of the distributed head (no timing).
"""
