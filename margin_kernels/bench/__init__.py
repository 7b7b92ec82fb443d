"""``margin-bench``: time and memory of every backend and installed peer, side by side, over sweeps.

Layout (one job per file):

* ``config``   - what to run: the grid of problems (loss, B, d, C, dtype) and sweep syntax;
* ``problem``  - the seeded inputs every process rebuilds identically;
* ``methods``  - the things being measured: our backends and the GEMM floor (``peers`` adds other libraries);
* ``timing`` / ``memory`` - how one fwd+bwd is timed and how its peak extra memory is measured;
* ``worker``   - the child process that measures one (problem, method) or checks accuracy at one problem;
* ``runner``   - the parent: runs the children over the sweep with a progress bar, OOM -> result;
* ``report`` / ``plot`` - table, JSON, markdown, PNG;
* ``cli``      - argument parsing and ``main``.
"""
