"""Where margin-bench's results go (``--json``, ``--plot``, ``--record``): every file is tried before the sweep
starts, so a run of hours never ends in an error that loses what it measured, then written at the end (also
after Ctrl-C, with the rows measured so far, marked incomplete)."""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Optional

from rich.console import Console

from .plot import write_plot
from .report import markdown, payload


def output_paths(args) -> list[str]:
    """Every file the run will write (--json, --plot, --record's three)."""
    paths = [p for p in (args.json, args.plot) if p and p != "-"]
    if args.record:
        paths += [args.record + suffix for suffix in (".json", ".md", ".png")]
    return paths


def output_path_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be written, None when it can. Found by opening it, as the end of the run will: an
    existing file in append mode (its content kept), a new one created and removed again; permission bits
    alone (``os.access``) miss read-only mounts, full disks' quotas and the like."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a file name"
    if not os.path.isdir(folder):
        return f"the folder {folder!r} of {path!r} does not exist (create it first)"
    existed = os.path.exists(path)
    try:
        with open(path, "a" if existed else "x"):
            pass
    except OSError as exc:
        reason = "is not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "cannot be opened"
        return f"{path!r} {reason} ({exc.strerror or exc})"
    if not existed:
        os.remove(path)
    return None


def write_outputs(args, sweep, settings, command: str, console: Console) -> list[str]:
    """Write every requested file; returns the paths written (stdout counts as '-')."""
    written = []
    json_paths = [p for p in (args.json, args.record and args.record + ".json") if p]
    plot_paths = [p for p in (args.plot, args.record and args.record + ".png") if p]
    if args.record:
        with open(args.record + ".md", "w") as f:
            f.write(markdown(sweep, command))
        written.append(args.record + ".md")
    if json_paths:
        text = json.dumps(payload(sweep, command, settings), indent=1) + "\n"
        for path in json_paths:
            if path == "-":
                sys.stdout.write(text)
            else:
                with open(path, "w") as f:
                    f.write(text)
            written.append(path)
    for path in plot_paths:
        if sweep.rows:  # an interrupted sweep may have none: no empty figure
            write_plot(sweep, path, command=command)
            console.print(f"plot written to {path}", markup=False, highlight=False)
            written.append(path)
    return written
