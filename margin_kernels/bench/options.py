"""Command-line pieces shared by ``margin-bench`` and the developer tools of the repository's ``bench/`` folder
(``python -m bench chunks`` times with the same clock, device check and progress bar): one definition each."""
from __future__ import annotations

import os
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .timing import CLOCKS


def add_clock_argument(group) -> None:
    group.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                       help="wall (default: the figure to record) or process: CPU seconds of all threads, "
                            "steadier on a busy CPU (set OMP_WAIT_POLICY=PASSIVE so idle threads do not spin)")


def check_device(parser, requested: Optional[str], clock: str = "wall") -> str:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device: none is visible to this torch build "
                     "(GPU figures are only ever measured, never estimated)")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: on CUDA the benchmark times compiled Triton kernels")
    if device == "cuda" and clock == "process":
        parser.error("--clock process counts CPU time: on CUDA use the default wall clock")
    return device


def progress_bar(console: Console, disabled: bool) -> Progress:
    return Progress(TextColumn("[bold]margin-bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=console, disable=disabled, transient=True)
