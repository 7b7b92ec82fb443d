"""margin-bench's guard rails, without running a sweep: output paths refused before the run, the warnings on a
loaded machine or unsteady medians, --list's "not installed", the plot's title and min..max bars."""
from __future__ import annotations

import importlib.util
import json

import pytest

from margin_kernels.bench import cli, outputs, peers
from margin_kernels.bench.conditions import SPREAD_BOUND, LoadRecord, warnings_for
from margin_kernels.bench.config import Problem
from margin_kernels.bench.methods import BACKENDS, Method
from margin_kernels.bench.report import payload, summary_lines
from margin_kernels.bench.runner import Row, Sweep
from margin_kernels.bench.config import Settings

PROBLEM = Problem("arcface", 64, 32, 4096, "float32", "cpu")


def _row(method="torch", median=10.0, low=9.0, high=11.0, n=3, classes=4096) -> Row:
    total = {"median_ms": median, "min_ms": low, "max_ms": high, "n": n,
             "spread": (high - low) / 2 / median, "values_ms": [low, median, high][:n]}
    result = {"status": "ok", "forward": total, "backward": total, "total": total, "extra_bytes": 1 << 20,
              "grad_bytes": 1 << 20}
    return Row(Problem("arcface", 64, 32, classes, "float32", "cpu"), method, "backend", result)


@pytest.fixture
def no_sweep(monkeypatch):
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: pytest.fail("the sweep must not start"))


@pytest.mark.parametrize("flag,name", [("--json", "r.json"), ("--plot", "r.png"), ("--record", "rec")])
def test_output_into_a_missing_folder_is_refused_before_the_run(flag, name, tmp_path, no_sweep, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([flag, str(tmp_path / "missing" / name)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write the results" in err and "does not exist" in err and "missing" in err


def test_output_onto_a_folder_is_refused_before_the_run(tmp_path, no_sweep, capsys):
    for argv in (["--json", str(tmp_path)], ["--record", str(tmp_path)], ["--record", str(tmp_path) + "/"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "--record takes a file prefix" in err


def test_writable_output_paths_pass(tmp_path):
    assert outputs.output_path_problem(str(tmp_path / "out.json")) is None
    assert not (tmp_path / "out.json").exists()  # tried by creating it, then removed


def test_a_load_above_the_cores_warns_and_is_recorded():
    busy = LoadRecord(cores=2, samples=[1.5, 3.7])
    (text,) = warnings_for([_row()], busy)
    assert "3.7 on 2 cores" in text
    assert warnings_for([_row()], LoadRecord(cores=2, samples=[1.2, 1.9])) == []
    sweep = Sweep(rows=[_row()], load=busy)
    lines = summary_lines(sweep)
    assert lines[0].startswith("WARNING: the 1-minute load reached 3.7")
    assert any(line.startswith("1-minute load average 1.5-3.7 during the run (2 usable cores") for line in lines)
    out = payload(sweep, "margin-bench", Settings())
    assert out["load_1min"]["max"] == 3.7 and out["warnings"] == [text]
    json.dumps(out)  # the record stays JSON


def test_a_spread_past_the_bound_warns_with_the_worst_case():
    idle = LoadRecord(cores=2, samples=[0.5])
    steady = _row(low=10 * (1 - SPREAD_BOUND / 2), high=10 * (1 + SPREAD_BOUND / 2))
    assert warnings_for([steady], idle) == []
    wide = _row("cpu", low=5.0, high=25.0, classes=32768)  # half-range 10 ms on a 10 ms median: ±100%
    (text,) = warnings_for([steady, wide, _row(n=1, low=1.0, high=30.0)], idle)  # one repeat has no spread
    assert text.startswith("1 of the timed medians") and "±100%: cpu at C = 32,768" in text


def test_missing_peers_are_listed_as_not_installed(capsys):
    assert peers._missing_module("surely_not_a_module_mk", "surely-not") == "not installed (pip install surely-not)"
    fake = Method("x", "peer", "", lambda p: "computes plain Softmax cross-entropy only", None,
                  not_installed=lambda: "not installed (pip install x)")
    assert cli.list_status(fake, PROBLEM) == "not installed (pip install x)"
    present = Method("y", "peer", "", lambda p: "computes plain Softmax cross-entropy only", None)
    assert cli.list_status(present, PROBLEM) == "installed, not here: computes plain Softmax cross-entropy only"
    assert cli.list_status(BACKENDS["torch"], PROBLEM) == "runs"
    assert cli.main(["--list", "--loss", "arcface"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and line[0] != " "}
    for name, module, package in (("cce", "cut_cross_entropy", "cut-cross-entropy"),
                                  ("liger", "liger_kernel", "liger-kernel")):
        if importlib.util.find_spec(module) is None:  # not installed here: say so, not "plain Softmax only"
            assert f"not installed (pip install {package})" in listed[name], listed[name]
            assert "Softmax" not in listed[name]


def test_plot_title_names_the_problem_and_the_bars(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot'/'test' extra) is not installed")
    from margin_kernels.bench.plot import _time_bars, plot_title, write_plot
    rows = [_row("torch", 10, 8, 13), _row("torch", 40, 39, 44, classes=32768)]
    sweep = Sweep(rows=rows, load=LoadRecord(cores=2, samples=[0.7, 1.1]))
    title = plot_title(sweep)
    assert "arcface, B=64, d=32, float32, cpu" in title and "median of 3 timed runs, bars: min to max" in title
    assert "1-minute load average 0.7-1.1" in title and "margin-bench " not in title  # no raw command line
    assert _time_bars(rows) == [[2.0, 1.0], [3.0, 4.0]]
    path = tmp_path / "p.png"
    write_plot(sweep, str(path), command="margin-bench -C 4096,32768")
    assert path.read_bytes()[:4] == b"\x89PNG"
