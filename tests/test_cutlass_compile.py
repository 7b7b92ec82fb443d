"""The cuda backend's CUTLASS sm_90a GEMMs (csrc/cutlass/margin_sm90.cu) against the limits of issue 24: no
spill, no ptxas C7510 or C7515 (wgmma serialized), HGMMA in the SASS, shared memory within 227 KiB, and the
model's estimate of the step within 1.3x the floor (bench/cutlass_check.py; 1.29x since the fused forward forms
the weight norms itself, ``GUARD`` below that limit against regressions). The default run checks the committed
report (bench/data/cutlass_facts.json, re-estimated from its facts); the slow case recompiles every
instantiation (four nvcc runs of ~1-2 min each on 2 cores) when nvcc and CUTLASS's headers are present."""
import json

import pytest

from bench import cutlass_check
from margin_kernels import native_build


def _compile_problems(facts):
    return [p for p in cutlass_check.problems(facts) if not p.startswith("estimate")]


def test_committed_report_is_within_the_compile_limits():
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    assert set(facts["instantiations"]) == set(cutlass_check.INSTANTIATIONS)
    facts["estimate"] = cutlass_check.estimate(facts)
    assert _compile_problems(facts) == []


def test_committed_report_estimate_is_within_the_limit():
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    assert cutlass_check.estimate(facts)["ratio"] <= cutlass_check.LIMIT


def test_committed_report_estimate_does_not_regress():
    """CI keeps the step where it is, below the issue's limit: ``GUARD`` x the floor."""
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    assert cutlass_check.estimate(facts)["ratio"] <= cutlass_check.GUARD


def test_the_estimate_follows_the_chunk_loop():
    """The estimate's chunks are the loop's own (chunk_loop.fused_chunk_sizes): one forward launch and 31
    backward chunks at B = 512, C = 1e6, the last one short; a change of the loop's widths moves it."""
    from margin_kernels.backends.chunk_loop import fused_chunk_sizes
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    e = cutlass_check.estimate(facts)
    assert (e["forward_chunk"], e["backward_chunk"]) == fused_chunk_sizes(cutlass_check.SHAPE["batch"])
    forward = "fused forward GEMM (EVT log-sum-exp partials, inverse norms formed)"
    assert e["launches"][forward]["launch"] == pytest.approx(4e-6)
    assert e["launches"]["fused recompute GEMM (EVT dL/dcos, bf16 chunk)"]["launch"] == pytest.approx(31 * 4e-6)
    narrow = cutlass_check.estimate(facts, shape=dict(cutlass_check.SHAPE, batch=2048))  # 8192-class chunks
    assert narrow["backward_chunk"] == 8192 and narrow["host_s"] > 3 * e["host_s"]


def test_the_limits_catch_each_failure():
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    facts["estimate"] = cutlass_check.estimate(facts)
    name = next(iter(facts["instantiations"]))
    for field, bad in (("spill_bytes", 8), ("c7510", True), ("c7515", True), ("hgmma", 0)):
        broken = json.loads(json.dumps(facts))
        broken["instantiations"][name][field] = bad
        assert len(_compile_problems(broken)) == 1
    broken = json.loads(json.dumps(facts))
    broken["shared_bytes"][name] = cutlass_check.SMEM_LIMIT + 1
    assert len(_compile_problems(broken)) == 1
    broken["estimate"]["ratio"] = cutlass_check.LIMIT + 0.01
    assert any(p.startswith("estimate") for p in cutlass_check.problems(broken))


@pytest.mark.slow
def test_every_instantiation_compiles_within_the_limits(tmp_path):
    if cutlass_check.nvcc() is None:
        pytest.skip("nvcc not found: the CUTLASS kernels cannot be compiled here")
    dirs, why = native_build.cutlass_include_dirs()
    if dirs is None:
        pytest.skip(f"CUTLASS's headers not found: {why}")
    out = tmp_path / "facts.json"
    cutlass_check.main(["--out", str(out)])
    facts = json.loads(out.read_text())
    assert set(facts["instantiations"]) == set(cutlass_check.INSTANTIATIONS)
    assert _compile_problems(facts) == []  # the estimate: the committed report's tests above


def test_partial_fc_estimate_counts_the_gathers():
    """Partial FC on the fused path gathers each chunk's sampled rows (forward and backward) and scatters the dW
    rows back: three passes the dense step does not make, so its estimate is the dense one plus at least the
    bytes of those passes at HBM speed (the kernels do not read the class index: README)."""
    from bench import gpu_model
    facts = json.loads(cutlass_check.FACTS_PATH.read_text())
    dense, sampled = cutlass_check.estimate(facts), cutlass_check.estimate(facts, partial_fc=True)
    b, c, d = (cutlass_check.SHAPE[k] for k in ("batch", "classes", "dim"))
    passes = 3 * 2 * c * d * 2 / (gpu_model.GPUS["H100"].hbm_tbps * 1e12)
    assert sampled["total_s"] > dense["total_s"] + 0.5 * passes
    gathers = [n for n in sampled["launches"] if n.startswith("gather")]
    assert len(gathers) == 2 and sampled["backward_chunk"] == sampled["forward_chunk"] == dense["backward_chunk"]
