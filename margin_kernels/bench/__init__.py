"""``margin-bench``: time and memory of every backend and installed peer, side by side, over sweeps.

Layout (one job per file):

* ``config``   - what to run: the grid of problems (loss, B, d, C, dtype) and sweep syntax;
* ``problem``  - the seeded inputs every process rebuilds identically;
* ``methods``  - the things being measured: our backends and the GEMM floor, defined once in ``floor_ms``;
  ``peers`` adds other libraries, ``catalog`` names them all;
* ``timing`` / ``memory`` - how one fwd+bwd is timed and how its peak extra memory is measured;
* ``worker``   - the child process that measures one (problem, method), or all methods of a problem
  round-robin (``--interleave``), or checks accuracy at one problem;
* ``runner``   - the parent: runs the children over the sweep, OOM -> result, Ctrl-C -> the rows so far;
* ``report`` / ``screen`` / ``plot`` - the full table, JSON and markdown; the table fitted to a terminal; PNG;
* ``outputs``  - the files of ``--json``/``--plot``/``--record``: tried before the sweep, written after it;
* ``options``  - the clock option, device check and progress bar (shared with the tools in ``bench/``);
* ``cli``      - argument parsing and ``main``.

The project's developer tools (chunk sizes, the compiled-kernel report and roofline, the memory model, the
optimizer step, ...) live in the repository's ``bench/`` folder, not installed: ``python -m bench -h``.
Nothing here imports them.
"""
