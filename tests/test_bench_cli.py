"""margin-bench end to end on CPU at tiny sizes: table and JSON fields, accuracy columns against the float64
reference, the memory columns (reference grows with C, the chunked backend stays flat), out-of-memory under a
forced limit as a result, the PNG plot, ``python -m margin_kernels.bench`` as a command; the recorded CPU
sweep's mode (--interleave, --clock process) and the GEMM floor's two variants. The developer tools that
margin-bench once ran as jobs are tested in test_bench_tools.py; the table in a terminal, bad numbers, output
files and Ctrl-C in test_bench_safety.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from margin_kernels.bench import cli
import margin_kernels as mk
from margin_kernels.bench.config import Problem, Settings, parse_sizes, problem_grid
from margin_kernels.bench.methods import floor_ms
from margin_kernels.bench.runner import Sweep, run_sweep
from margin_kernels.bench.worker import _oom_note
from tests.tolerances import FP32_GRAD, FP32_LOSS, FP32_SMOKE

MIB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small but not trivial: the reference's B x C temporaries are tens of MiB at the larger C (well above the RSS
# resolution of about a MiB), the chunked backend's (B x chunk) workspace is the same at both
TINY = ["-B", "64", "-d", "32", "--chunk-size", "1024", "--repeats", "2", "--warmup", "0", "--threads", "1",
        "--no-progress"]


def _rows(payload, method):
    return sorted((r for r in payload["rows"] if r["method"] == method), key=lambda r: r["classes"])


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """One CLI run shared by the checks below (children are cheap forks, but keep the count small)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--loss", "softmax", "-C", "4096,32768", "--backends", "reference,torch,auto",
            "--peers", "torch-lce,naive-arcface,cce", "--json", str(out / "run.json"), "--plot", str(out / "run.png"),
            "--record", str(out / "rec")] + TINY
    return out, argv


@pytest.fixture(scope="module")
def sweep_output(sweep_run):
    out, argv = sweep_run
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue(), json.loads((out / "run.json").read_text()), out


def test_sweep_exit_code_and_table(sweep_output):
    code, text, _, _ = sweep_output
    assert code == 0
    for heading in ("fwd ms", "bwd ms", "total ms", "extra mem", "loss diff", "grad err", "x floor"):
        assert heading in text
    for method in ("reference", "torch", "auto", "torch-lce", "gemm-floor"):
        assert method in text
    assert "auto -> torch" in text or "auto -> cpu" in text
    # methods that cannot run are listed once, with the reason
    assert "naive-arcface" in text and "--loss arcface" in text
    assert "cce" in text


def test_sweep_json_fields(sweep_output):
    _, _, payload, _ = sweep_output
    assert payload["command"].startswith("margin-bench ")
    assert {"torch", "cpu_count"} <= set(payload["environment"])
    assert payload["settings"]["repeats"] == 2
    assert len(payload["rows"]) == 2 * 5  # 2 C x (reference, torch, auto, torch-lce, gemm-floor)
    for row in payload["rows"]:
        assert row["status"] == "ok", row
        assert row["batch"] == 64 and row["dim"] == 32 and row["classes"] in (4096, 32768)
        for phase in ("forward", "backward", "total"):
            stats = row[phase]
            assert stats["n"] == 2 and len(stats["values_ms"]) == 2
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        totals = [f + b for f, b in zip(row["forward"]["values_ms"], row["backward"]["values_ms"])]
        assert row["total"]["median_ms"] == pytest.approx(sum(totals) / 2)  # the median of two
        # peak includes the gradients dx, dW (C x d fp32 + B x d fp32); extra is the peak without them
        assert row["grad_bytes"] == (row["classes"] + 64) * 32 * 4
        assert row["extra_bytes"] == row["peak_bytes"] - row["grad_bytes"]
        assert row["floor_ratio"] > 0
    assert {r["floor_ratio"] for r in _rows(payload, "gemm-floor")} == {1.0}
    for row in _rows(payload, "gemm-floor"):  # one floor: the faster of its two timings, both kept
        variants = row["floor_variants"]
        assert set(variants) == {"full", "chunked"}
        assert row["total"]["median_ms"] == min(variants.values())
    assert "skipped" in payload and any("naive-arcface" in v for v in payload["skipped"].values())


def test_sweep_accuracy_columns(sweep_output):
    """fp32 methods against the float64 reference: loss and gradients within fp32 accuracy."""
    _, _, payload, _ = sweep_output
    for method in ("reference", "torch", "auto", "torch-lce"):
        for row in _rows(payload, method):
            assert row["loss_diff"] < FP32_LOSS * max(1.0, abs(row["loss_value"])), row
            assert row["dx_err"] < FP32_GRAD and row["dw_err"] < FP32_GRAD, row
            assert row["grad_err"] == max(row["dx_err"], row["dw_err"])
    assert all("loss_diff" not in r for r in _rows(payload, "gemm-floor"))


def test_sweep_memory_columns(sweep_output):
    """The measured memory shows the claim: the reference's workspace grows with C (B x C temporaries),
    the chunked backend's does not (B x chunk)."""
    _, _, payload, _ = sweep_output
    ref_small, ref_big = _rows(payload, "reference")
    torch_small, torch_big = _rows(payload, "torch")
    # B x C fp32 at C = 32768 is 8 MiB; the reference keeps several such tensors
    assert ref_big["extra_bytes"] > 16 * MIB
    assert ref_big["extra_bytes"] > 4 * ref_small["extra_bytes"]
    assert torch_big["extra_bytes"] < 1.5 * torch_small["extra_bytes"] + 2 * MIB
    assert torch_big["extra_bytes"] < ref_big["extra_bytes"] / 4


def test_plot_is_a_png_matplotlib_reads(sweep_output):
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (the 'plot'/'test' extra) is not installed")
    from matplotlib import image
    _, _, _, out = sweep_output
    data = (out / "run.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(str(out / "run.png"))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert matplotlib.get_backend().lower() == "agg"
    assert float(pixels[..., :3].std()) > 0.01  # something was drawn


def test_record_writes_json_markdown_and_png(sweep_output):
    _, _, _, out = sweep_output
    md = (out / "rec.md").read_text()
    assert md.startswith("`margin-bench ") and "| C | method |" in md and "| 32,768 | reference |" in md
    assert json.loads((out / "rec.json").read_text())["rows"]
    assert (out / "rec.png").read_bytes()[:4] == b"\x89PNG"


def test_forced_memory_limit_gives_oom_rows_not_a_crash(tmp_path, capsys):
    """Under --mem-limit-gb the reference (B x C temporaries) runs out at the first C and is not run again at
    the larger one; the chunked backend fits at both and is still checked against the float64 reference."""
    path = tmp_path / "oom.json"
    code = cli.main(["--loss", "arcface", "-C", "32768,65536", "--backends", "reference,torch", "--no-floor",
                     "--mem-limit-gb", "0.04", "--json", str(path)] + TINY)
    text = capsys.readouterr().out
    assert code == 0
    payload = json.loads(path.read_text())
    ref = _rows(payload, "reference")
    assert ref[0]["status"] == "oom" and "OOM" in ref[0]["notes"][-1]
    assert ref[1]["status"] == "skipped" and "OOM at C = 32,768" in ref[1]["notes"][0]
    for row in _rows(payload, "torch"):
        assert row["status"] == "ok" and row["peak_bytes"] < 0.04 * (1 << 30)
        assert row["loss_diff"] < FP32_SMOKE and row["grad_err"] < FP32_GRAD
    assert row["limit_source"] == "--mem-limit-gb"
    assert "OOM" in text and "reference: OOM at C = 32,768" in text


def test_python_dash_m_prints_json_to_stdout():
    """The module entry point as a user runs it; with --json - stdout is pure JSON (table on stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "margin_kernels.bench", "-C", "500", "--backends", "torch",
                           "--no-floor", "--no-check", "--json", "-"] + TINY,
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert [r["method"] for r in payload["rows"]] == ["torch"] and payload["rows"][0]["status"] == "ok"
    assert "total ms" in proc.stderr


# ---- pieces that need no child process -----------------------------------------------------------------------

def test_plot_without_matplotlib_is_refused_before_the_sweep(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "matplotlib_missing", lambda: True)
    monkeypatch.setattr(cli, "run_sweep", lambda *a, **k: pytest.fail("the sweep must not start"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "matplotlib" in capsys.readouterr().err


def test_size_lists_and_ranges():
    assert parse_sizes("1e3..1e4", "C") == [1000, 2000, 5000, 10000]
    assert parse_sizes("1e3..4e6:7", "C") == [1000, 4000, 16000, 63000, 250000, 1000000, 4000000]
    assert parse_sizes("5e4,2e4,2e4", "C") == [20000, 50000]
    for bad in ("0", "1.5", "abc", "1e4..1e3", "1e3..1e4:1", ""):
        with pytest.raises(ValueError, match="C"):
            parse_sizes(bad, "C")


def test_bad_arguments_exit_with_usage(capsys):
    for argv in (["--loss", "nosuchloss"], ["--backends", "torch,nosuch"], ["--repeats", "0"],
                 ["-C", "1e3..10"], ["--dtype", "int8"], ["--peers", "nosuch"], ["--clock", "nosuch"],
                 ["--interleave", "--mem-limit-gb", "1"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    assert "margin-bench" in capsys.readouterr().err


def test_a_method_stops_after_oom_and_the_check_after_the_reference_stops():
    """The sweep logic with a stand-in for the child processes: OOM and timeout end a method's curve."""
    def fake_child(job, timeout_s):
        c = job["problem"]["classes"]
        if job["mode"] == "check":
            return ({"status": "oom", "notes": ["float64 reference OOM"]} if c >= 200 else
                    {"status": "ok", "methods": {m: {"loss_diff": 0.0, "grad_err": 0.0} for m in job["methods"]}})
        if job["method"] == "reference" and c >= 200:
            return {"status": "oom", "notes": ["OOM: allocating 1.0 MiB failed"]}
        if job["method"] == "torch" and c >= 300:
            return {"status": "timeout", "notes": ["stopped"]}
        ms = {"median_ms": float(c), "min_ms": float(c), "max_ms": float(c), "n": 1, "spread": 0.0}
        return {"status": "ok", "total": ms, "forward": ms, "backward": ms, "extra_bytes": 0}
    problems = problem_grid(["arcface"], [8], [16], [100, 200, 300, 400], ["float32"], "cpu", 0, None)
    sweep = run_sweep(problems, ["reference", "torch", "gemm-floor"], Settings(), child=fake_child)
    status = {(r.method, r.problem.classes): r.status for r in sweep.rows}
    assert [status["reference", c] for c in (100, 200, 300, 400)] == ["ok", "oom", "skipped", "skipped"]
    assert [status["torch", c] for c in (100, 200, 300, 400)] == ["ok", "ok", "timeout", "skipped"]
    label = problems[0].family_label()
    assert sweep.stopped[label] == {"reference": "OOM at C = 200", "torch": "timed out at C = 300",
                                    "check": "float64 reference OOM at C = 200"}
    rows = {(r.method, r.problem.classes): r for r in sweep.rows}
    assert rows["torch", 100].check == {"loss_diff": 0.0, "grad_err": 0.0}
    assert rows["torch", 200].check == {"check_note": "no check: float64 reference OOM"}
    assert "not run" in rows["torch", 200 + 200].result["notes"][0]
    assert rows["torch", 100].floor_ratio == 1.0  # fake floor time equals the method's


def test_oom_messages_of_both_allocators_are_summarised():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 2097152 bytes. Error code 12 (Cannot allocate memory)")
    assert _oom_note(cpu) == "OOM: allocating 2.0 MiB failed"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
    assert _oom_note(cuda) == "OOM: allocating 2.00 GiB failed"


def test_gpu_rows_need_a_cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (allocator-stat memory and the OOM fraction are GPU-only; the shared "
                    "measuring flow is exercised on CPU above)")
    code = cli.main(["--device", "cuda", "-C", "4096", "--backends", "reference,torch", "--no-check"] + TINY)
    assert code == 0


def test_problem_labels_group_a_curve():
    a = Problem("arcface", 8, 16, 100, "float32", "cpu")
    b = Problem("arcface", 8, 16, 200, "float32", "cpu")
    assert a.family() == b.family() and a.family_label() == "arcface, B=8, d=16, float32, cpu"


# ---- the recorded CPU sweep's mode, the GEMM floor -------------------------------------------------------------

def test_interleaved_process_clock_sweep_of_the_fused_cpu_path(tmp_path, capsys):
    """What the recorded CPU sweep runs (it replaced the fused-CPU benchmark script): every method of a problem in
    one process, round-robin, on the process clock, the fused cpu path at a chunk of its own; each row a time,
    a finite positive ratio to the one floor, and per-method memory."""
    backends = "reference,torch" + (",cpu" if mk.available_backends().get("cpu") is None else "")
    path = tmp_path / "cpu.json"
    code = cli.main(["--loss", "arcface", "-B", "8", "-d", "16", "-C", "300,1000", "--chunk-size", "64",
                     "--backends", backends, "--interleave", "--clock", "process", "--repeats", "2",
                     "--warmup", "0", "--threads", "1", "--no-progress", "--json", str(path)])
    text = capsys.readouterr().out
    assert code == 0
    payload = json.loads(path.read_text())
    assert payload["settings"]["interleave"] is True and payload["settings"]["clock"] == "process"
    methods = backends.split(",") + ["gemm-floor"]
    assert [r["method"] for r in payload["rows"]] == methods * 2
    for row in payload["rows"]:
        assert row["status"] == "ok", row
        assert 0 < row["floor_ratio"] < float("inf") and row["total"]["n"] == 2
        assert row["extra_bytes"] is not None and row["grad_bytes"] == (row["classes"] + 8) * 16 * 4
    for row in _rows(payload, "gemm-floor"):
        assert row["floor_ratio"] == 1.0 and set(row["floor_variants"]) == {"full", "chunked"}
        assert "64 weight rows" in row["notes"][-1]  # the chunked floor runs at the backends' chunk
    for row in payload["rows"]:
        if row["method"] != "gemm-floor":
            assert row["grad_err"] < FP32_GRAD
    assert "x floor" in text and "floor = " in text


def test_interleave_runs_one_child_per_problem_and_stops_methods_after_oom():
    jobs = []

    def fake_child(job, timeout_s):
        jobs.append(job)
        c = job["problem"]["classes"]
        if job["mode"] == "check":
            return {"status": "ok", "methods": {}}
        ms = {"median_ms": float(c), "min_ms": float(c), "max_ms": float(c), "n": 1, "spread": 0.0}
        ok = {"status": "ok", "total": ms, "forward": ms, "backward": ms, "extra_bytes": 0}
        return {"status": "ok", "methods": {m: {"status": "oom", "notes": ["OOM"]} if m == "reference" and c >= 200
                                            else dict(ok) for m in job["methods"]}}
    problems = problem_grid(["arcface"], [8], [16], [100, 200, 300], ["float32"], "cpu", 0, None)
    sweep = run_sweep(problems, ["reference", "torch", "gemm-floor"], Settings(interleave=True, check=False),
                      child=fake_child)
    assert [j["mode"] for j in jobs] == ["interleave"] * 3
    assert jobs[-1]["methods"] == ["torch", "gemm-floor"]  # the reference stopped after its OOM at C = 200
    status = {(r.method, r.problem.classes): r.status for r in sweep.rows}
    assert [status["reference", c] for c in (100, 200, 300)] == ["ok", "oom", "skipped"]
    assert all(r.floor_ratio == 1.0 for r in sweep.rows if r.status == "ok")


def test_the_floor_is_the_minimum_of_its_timings():
    assert floor_ms({"full": 2.0, "chunked": 1.5}) == ("chunked", 1.5)
    assert floor_ms({"full": None, "chunked": 3.0}) == ("chunked", 3.0)  # full size out of memory
    with pytest.raises(ValueError):
        floor_ms({"full": None, "chunked": None})


def test_plain_margin_bench_is_the_quick_comparison(monkeypatch):
    """No arguments: the README's main job, the quick default (C = 2e4 and 5e4) with the floor; on a CPU timed
    round-robin with one thread (cli.QUICK_CPU), the steady mode; any option of what or how turns that off."""
    seen = {}

    def fake_sweep(problems, names, settings, advance=None):
        seen.update(problems=problems, names=names, settings=settings)
        return Sweep()
    monkeypatch.setattr(cli, "run_sweep", fake_sweep)
    monkeypatch.setattr(sys, "argv", ["margin-bench"])
    assert cli.main() == 0
    assert [p.classes for p in seen["problems"]] == [20000, 50000]
    assert {p.batch for p in seen["problems"]} == {256} and "gemm-floor" in seen["names"]
    on_cpu = not torch.cuda.is_available()
    assert seen["settings"].interleave is on_cpu and seen["settings"].clock == "wall"
    assert seen["settings"].threads == (1 if on_cpu else None)
    assert cli.main(["--repeats", "4", "--no-progress"]) == 0
    assert seen["settings"].interleave is False and seen["settings"].threads is None


def test_cuda_device_without_cuda_is_explained(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_bad_backend_and_chunk_size_are_worded_as_the_package_words_them(capsys):
    """One validation layer: the CLI reports the same condition with the functional call's message, after the
    option's name (``--backends cpuu`` says --backends, as every other option's error names its option)."""
    import margin_kernels as mk
    from tests.helpers import random_problem
    x, w, labels = random_problem(2, 5, 4, dtype=torch.float32)
    for argv, kwargs in ((["--backends", "torch,nosuch"], dict(backend="nosuch")),
                         (["--backends", "cpuu"], dict(backend="cpuu")),
                         (["--chunk-size", "0"], dict(chunk_size=0))):
        with pytest.raises(ValueError) as functional:
            mk.margin_cross_entropy(x, w, labels, mk.ArcFace(), **kwargs)
        with pytest.raises(SystemExit):
            cli.main(argv + ["-C", "100"])
        err = capsys.readouterr().err
        assert f"error: {argv[0]}: {functional.value}" in err, err
