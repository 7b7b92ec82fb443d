"""The developer tools of the repository's bench/ folder (not installed; ``python -m bench JOB`` from the
repository root), as CI runs them: the 'chunks' and 'memory-model' jobs, the compiled-kernel report and its
roofline, the ceilings, the throughput table, the GPU session script, the plot redrawn from a run's JSON and
the dispatcher. They import from the top-level ``bench`` package: tests/ is a package, so pytest puts the
repository root on sys.path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.__main__ import JOBS, main as bench_main
from margin_kernels.bench import cli
from tests.tolerances import FP64_SAME_SUMS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_tools_import_from_this_checkout_and_the_dispatcher_lists_them(capsys):
    import bench
    assert os.path.dirname(bench.__file__) == os.path.join(REPO_ROOT, "bench")
    assert bench_main(["-h"]) == 0
    text = capsys.readouterr().out
    assert all(job in text for job in JOBS)
    assert bench_main(["nosuch"]) == 2 and "unknown job 'nosuch'" in capsys.readouterr().err


def test_margin_bench_names_where_a_moved_job_went(capsys):
    """The installed CLI no longer offers the tools: one line saying where they are, exit status 2."""
    for job in ("chunks", "memory-model", "optimizer-step", "kernels", "ceilings", "throughput"):
        assert cli.main([job, "--help"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"python -m bench {job}" in err and "source checkout" in err


def test_bad_arguments_of_the_tools_exit_with_usage(capsys):
    for argv in (["chunks", "--backend", "reference"], ["memory-model", "--optimizer", "nosuch"]):
        with pytest.raises(SystemExit) as exc:
            bench_main(argv)
        assert exc.value.code == 2
    assert "python -m bench" in capsys.readouterr().err


def test_chunks_without_cuda_is_explained(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit) as exc:
        bench_main(["chunks", "--device", "cuda"])
    assert exc.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_plot_is_redrawn_from_a_recorded_json(tmp_path, capsys):
    """The PNG is derived data: the recorded run's JSON gives it back (rows, OOM marks, load in the title)."""
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot'/'test' extra) is not installed")
    from matplotlib import image
    from bench.plot import sweep_from_payload
    from margin_kernels.bench.plot import plot_title
    run = os.path.join(REPO_ROOT, "bench", "results", "cpu_quick_default.json")
    with open(run) as f:
        data = json.load(f)
    sweep = sweep_from_payload(data)
    assert len(sweep.rows) == len(data["rows"]) and sweep.load.samples == data["load_1min"]["samples"]
    assert [(r.method, r.problem.classes, r.total_ms()) for r in sweep.rows] == \
        [(r["method"], r["classes"], r["total"]["median_ms"] if r["status"] == "ok" else None) for r in data["rows"]]
    assert "1-minute load average" in plot_title(sweep)
    out = tmp_path / "quick.png"
    assert bench_main(["plot", run, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    pixels = image.imread(str(out))
    assert pixels.shape[0] > 200 and float(pixels[..., :3].std()) > 0.01  # something was drawn


def test_chunks_job_times_a_backend_against_its_chunk(tmp_path, capsys):
    """``python -m bench chunks`` (it replaced the chunk-size script): one row per chunk, every ratio to the same
    floor, and a pick among the chunks."""
    path = tmp_path / "chunks.json"
    code = bench_main(["chunks", "-B", "16", "-d", "16", "-C", "3000", "--chunks", "256,1024", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--no-progress", "--json", str(path)])
    text = capsys.readouterr().out
    assert code == 0
    for heading in ("chunk", "total ms", "extra mem", "x floor", "pick: chunk"):
        assert heading in text
    payload = json.loads(path.read_text())
    assert payload["command"].startswith("python -m bench chunks ") and payload["backend"] == "torch"
    assert payload["floor"]["method"] == "gemm-floor" and payload["floor"]["status"] == "ok"
    assert [r["chunk_size"] for r in payload["rows"]] == [256, 1024]
    floor = payload["floor"]["total"]["median_ms"]
    for row in payload["rows"]:
        assert row["status"] == "ok" and row["method"] == "torch"
        assert row["floor_ratio"] == pytest.approx(row["total"]["median_ms"] / floor) and row["floor_ratio"] > 0
    assert payload["pick"] in (256, 1024)


def test_memory_model_job_prints_the_per_rank_table(capsys):
    from bench.memory_model import per_rank_bytes
    assert bench_main(["memory-model", "--classes", "1e6", "--worlds", "1", "2", "--detail"]) == 0
    text = capsys.readouterr().out
    assert "| C | dtype | sample_rate | 1 GPU | 2 GPUs |" in text and "| 1e6 | bf16 | 1.0 |" in text
    assert "MiB received per rank per step" in text and "torch_tiles" in text
    row = per_rank_bytes(num_classes=10 ** 6, dim=512, world=2, dtype=torch.bfloat16, sample_rate=1.0,
                         batch_per_rank=128)
    assert row["local_classes"] == 500_000 and row["weight"] == 500_000 * 512 * 2


# ---- python -m bench kernels: the compiled sm_90 facts and the roofline ----------------------------------------
def _variant(**kw):
    from bench.kernels import Variant
    base = dict(kernel="dcos", config="c", dtype="bf16", kind="ARC", dim=512, registers=128, spill_bytes=0,
                shared_bytes=64 * 1024, wgmma=True)
    base.update(kw)
    return Variant(**base)


def test_kernel_report_flags_spills_and_products_off_wgmma_where_ci_requires():
    from bench import kernels
    good = [_variant(kernel=k) for k in ("lse_forward", "dcos", "dweight", "dx")]
    estimate = kernels.roofline(good)
    assert 1.0 < estimate["triton_x_floor"] <= kernels.TRITON_ESTIMATE_LIMIT
    assert 1.0 < estimate["cuda_x_floor"] <= kernels.CUDA_ESTIMATE_LIMIT
    assert kernels.violations(good, estimate) == []
    bad = good + [_variant(spill_bytes=16), _variant(wgmma=False, dtype="fp16"),
                  _variant(spill_bytes=999, dim=1024), _variant(wgmma=False, dtype="fp32")]
    found = kernels.violations(bad, estimate)
    assert len(found) == 2 and "spills 16 bytes" in found[0] and "not on wgmma" in found[1]
    over = dict(estimate, triton_x_floor=kernels.TRITON_ESTIMATE_LIMIT + 0.01)
    assert any("triton estimate" in v for v in kernels.violations(good, over))


# ---- the GPU model, calibrated on the peers' published times (bench/calibration.py) --------------------------
def test_gpu_model_meets_every_published_calibration_point():
    """Every calibration row of bench/data/published_peers.csv within 35 % of its published time, from the
    committed compiled facts (no compiling); the data-dependent row solves for a kept fraction in (0, 1)."""
    from bench import calibration, kernel_facts
    rows = calibration.evaluate(calibration.read_points(), kernel_facts.load())
    points = [r for r in rows if r["role"] == "calibration"]
    assert len(points) >= 8 and {r["gpu"] for r in points} >= {"A100", "H200"}
    for r in points:
        assert abs(r["error"]) <= calibration.TOLERANCE, (r["id"], r["model_ms"], r["published_ms"])
    filtered = [r for r in rows if r["role"] == "consistency"]
    assert filtered and all(0.0 < r["solved_kept_fraction"] < 1.0 for r in filtered)


def test_the_cute_dsl_rows_pin_cutlass_mma(monkeypatch):
    """The CUTLASS path's MMA efficiency is the one the two CuTe-DSL rows fit: at 1.0 both sit within 5 % of
    their published times, at Triton's 0.85 both are 10 % or more too slow; the CUTLASS estimate moves with it."""
    import json
    from bench import calibration, cutlass_check, gpu_model as gm, kernel_facts
    records = kernel_facts.load()
    cute = [r for r in calibration.read_points() if r["program"] == "fused_gemm_peak"]
    assert len(cute) == 2
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    fitted = cutlass_check.estimate(facts)["ratio"]
    assert all(abs(r["error"]) <= 0.05 for r in calibration.evaluate(cute, records))
    monkeypatch.setattr(gm, "CUTLASS_MMA", gm.TRITON_MMA)
    monkeypatch.setitem(gm.LIBRARY_MMA, "cutlass", gm.TRITON_MMA)
    assert all(r["error"] >= 0.10 for r in calibration.evaluate(cute, records))
    assert cutlass_check.estimate(facts)["ratio"] > fitted


def test_gpu_model_terms_move_the_way_the_hardware_does():
    """A kernel's time grows with spills, with an MMA loop that loses its async copies, and with one CTA per SM
    instead of two (the epilogue no longer hides); a vendor GEMM with a grid under the SM count slows down."""
    from bench import gpu_model as gm
    h100 = gm.GPUS["H100"]
    facts = gm.Facts(product="wgmma", registers=100, shared_bytes=64 * 1024, num_warps=8, pipelined=True,
                     epilogue_instructions=2000)
    launch = gm.Launch("k", flop=1e12, hbm_bytes=1e9, l2_bytes=5e9, tiles=60000, facts=facts)
    base = gm.launch_terms(launch, h100)["total"]
    for changed in (dict(spill_bytes=64), dict(pipelined=False), dict(registers=255)):
        slower = gm.Launch("k", flop=1e12, hbm_bytes=1e9, l2_bytes=5e9, tiles=60000,
                           facts=gm.Facts(**{**facts.__dict__, **changed}))
        assert gm.launch_terms(slower, h100)["total"] > base, changed
    assert gm.ctas_per_sm(gm.Facts(registers=255, num_warps=8), h100) == 1
    full = gm.launch_terms(gm.Launch("g", flop=1e12, ctas=1000), h100)["total"]
    assert gm.launch_terms(gm.Launch("g", flop=1e12, ctas=33), h100)["total"] == pytest.approx(full * 4, rel=0.01)
    assert gm.floor_s(512, 512, 10 ** 6) == pytest.approx(8 * 512 * 512 * 1e6 / 790e12)


def test_calibrate_points_option_reads_any_file_of_the_same_columns(tmp_path, capsys):
    from bench import calibration
    with open(calibration.POINTS_PATH) as f:
        header, first = f.readline(), f.readline()
    points = tmp_path / "points.csv"
    points.write_text(header + first.replace("cce_loss,", "cce_again,", 1))
    out = tmp_path / "cal.json"
    assert bench_main(["calibrate", "--points", str(points), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [p["id"] for p in report["points"]] == ["cce_again"]
    assert report["ours"][0]["x_floor"] <= __import__("bench.kernels").kernels.TRITON_ESTIMATE_LIMIT
    points.write_text(header + first.replace(",cce_loss,A100", ",nosuch,A100"))
    with pytest.raises(SystemExit):
        bench_main(["calibrate", "--points", str(points)])
    assert "unknown program 'nosuch'" in capsys.readouterr().err


def _compiler_ready():
    pytest.importorskip("triton", reason="compiles Triton kernels")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" in sys.modules:
        # conftest sets the interpreter before triton is imported: compile in a child process instead
        return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return dict(os.environ)


def test_every_arch_compiles_the_representative_tilings_within_its_limits(tmp_path):
    """python -m bench archs --representative: the fixed forward tiling and the backward's, bf16, for sm_80,
    86, 89, 90 and 100 (no GPU). Shared memory within every arch's limit and the arch's tensor-core instruction
    everywhere; the spills it finds are exactly the known ones (``arch_check.KNOWN``, each with its fix), so a
    new one fails and a fixed one must leave the list."""
    from bench import arch_check
    env = _compiler_ready()
    out = tmp_path / "archs.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "archs", "--representative", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    report = json.loads(out.read_text())
    assert {r["arch"] for r in report["records"]} == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100"}, proc.stderr[-2000:]
    assert all(r["error"] is None for r in report["records"])
    assert sorted(report["violations"]) == sorted(arch_check.KNOWN), proc.stdout[-3000:]
    assert proc.returncode == (1 if arch_check.KNOWN else 0)


@pytest.mark.slow
def test_committed_kernel_facts_match_a_fresh_compile(tmp_path):
    """bench/data/kernel_facts.json is what this toolchain compiles (this project's kernels; the peers' where
    they are importable): registers, shared memory, product and pipelining."""
    from bench import kernel_facts
    env = _compiler_ready()
    out = tmp_path / "facts.json"
    args = [sys.executable, "-m", "bench", "kernel-facts", "--out", str(out)]
    try:
        import cut_cross_entropy  # noqa: F401
        import liger_kernel  # noqa: F401
    except ImportError:
        args.append("--no-peers")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = {(r["kernel"], r["arch"], r["config"], r["filter"]): r for r in json.loads(out.read_text())["records"]}
    for r in kernel_facts.load():
        key = (r["kernel"], r["arch"], r["config"], r["filter"])
        if key not in fresh:
            continue
        f = fresh[key]
        assert (f["registers"], f["shared_bytes"], f["product"], f["sass"]["pipelined"]) == \
            (r["registers"], r["shared_bytes"], r["product"], r["sass"]["pipelined"]), key


@pytest.mark.slow
def test_kernel_report_compiles_every_16_bit_variant_on_wgmma_without_spills(tmp_path):
    """What CI enforces: every Triton kernel x config x bf16/fp16 x negative kind x d compiled for sm_90
    (no GPU needed): no spill and every product on wgmma at d <= 512, and the estimate within the guard."""
    from bench import kernels
    pytest.importorskip("triton", reason="the report compiles Triton kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "kernels", "--dtypes", "bf16,fp16",
                           "--ptx-dir", str(tmp_path / "ptx"), "--json", str(out), "--check"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    kernels_seen = {v["kernel"] for v in report["variants"]}
    assert kernels_seen == {"lse_forward", "dcos", "dweight", "dx"}
    assert all(v["error"] is None and os.path.isfile(v["ptx"]) for v in report["variants"])
    assert report["roofline"]["triton_x_floor"] <= kernels.TRITON_ESTIMATE_LIMIT and report["violations"] == []
    # fp64 compiles too (its dots name an fp64 accumulator); not held to the no-spill rule
    proc = subprocess.run([sys.executable, "-m", "bench", "kernels", "--dtypes", "fp64", "--dims",
                           "512", "--json", str(out)], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fp64 = json.loads(out.read_text())["variants"]
    assert {v["kernel"] for v in fp64} == {"lse_forward", "dcos", "dweight", "dx"}  # the forward's fallback too
    assert all(v["error"] is None for v in fp64)


def test_gpu_session_script_parses_and_writes_at_most_ten_named_files():
    """bench/gpu_session.sh runs only on a lent GPU; here: it is valid bash and names at most 10 outputs (8, and
    the GPU probe's two: 50_probe.json, 51_model_vs_measured.md, which gpu-probe writes itself)."""
    import re
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    names = set(re.findall(r'\$OUT/([0-9]{2}_[a-z_]+\.(?:log|json|txt|md))', text)) | set(
        re.findall(r'#\s+([0-9]{2}_[a-z_]+\.(?:log|json|txt|md))', text))
    assert 1 < len(names) <= 10, names
    assert "python -m bench gpu-probe" in text.replace('"$PY" -m', "python -m")


def test_gpu_probe_dry_run_on_cpu_skips_every_gpu_step(tmp_path):
    """python -m bench gpu-probe without CUDA: exit 0, versions recorded, every measurement skipped with its
    reason, both files written (the plumbing of the session's probe, tried on CPU)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the probe would measure")
    assert bench_main(["gpu-probe", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "50_probe.json").read_text())
    assert report["versions"]["torch"] == torch.__version__
    for step in ("ceilings", "step_filter_off", "step_filter_on", "plain_gemms_ms", "peers",
                 "correctness_c_times_d_over_2_31"):
        assert report[step] == "skipped: no CUDA device", step
    assert "skipped" in (tmp_path / "51_model_vs_measured.md").read_text()


def test_ceilings_job_measures_this_device_and_keeps_the_model_beside_it(tmp_path):
    """python -m bench ceilings on the CPU: every measured figure positive and finite, the model's cuda estimate
    the one the kernel report gives (one function), and no "measured" estimate off a GPU."""
    from bench import ceilings, kernels
    path = tmp_path / "ceilings.json"
    assert bench_main(["ceilings", "--device", "cpu", "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    for key in ("square_gemm_tflops", "chunk_gemm_tflops", "cache_copy_tbps", "large_copy_tbps"):
        assert 0 < report[key] < float("inf"), key
    assert report["model"]["cuda_x_floor"] == pytest.approx(kernels.roofline([])["cuda_x_floor"], rel=FP64_SAME_SUMS)
    assert "measured" not in report
    with pytest.raises(SystemExit):
        ceilings.main(["--repeats", "0", "--device", "cpu"])


def test_cuda_bound_of_the_unfused_design_is_as_written():
    """kernels.py's docstring: at the model's ceilings the cuda estimate is >= 1.77x; 1.6x needs an L2 of
    >= 12 TB/s with the launches hidden, and the launches alone cap it at 1.85x."""
    from bench.kernels import HBM_TBPS, L2_TBPS, PEAK_TFLOPS, cuda_estimate_s, floor_s
    floor = floor_s(512, 512, 10 ** 6)

    def ratio(l2, launch_us):
        return cuda_estimate_s(512, 512, 10 ** 6, 2, PEAK_TFLOPS, l2, HBM_TBPS, launch_us)[0] / floor
    assert ratio(L2_TBPS, 0.0) >= 1.77
    assert ratio(11.5, 0.0) > 1.6 >= ratio(12.0, 0.0)
    assert ratio(1e9, 4.0) == pytest.approx(1.85, abs=0.01)


def test_throughput_table_reports_tflops_beside_the_floor_ratio(tmp_path):
    from bench import throughput
    row = dict(loss="arcface", batch=512, classes=10 ** 6, dim=512, dtype="bfloat16", method="triton",
               status="ok", total={"median_ms": 4.0}, floor_ratio=1.25)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"command": "margin-bench ...", "rows": [row, dict(row, method="reference",
                                                                                   status="oom", total=None)]}))
    table = throughput.markdown([path, tmp_path / "absent.json"])
    assert "| triton | 4 | 1.25 | 524.3 |" in table  # 8 * 512 * 1e6 * 512 FLOP in 4 ms
    assert "| reference | oom |" in table and "(missing" in table
