#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200, torch + triton preinstalled, no internet), at most ~8 minutes,
# everything it writes under $OUT (10 files):
#   00_env_build.log   GPU, versions, the no-isolation build (CPU + CUDA extensions), usable backends
#   10_tests.log       first the cuda backend: its GEMM path (variant), its conformance tests against the
#                      reference, the CUTLASS kernels' compile report (its JSON appended); then the Triton and
#                      CUDA tests compiled and run on the GPU (conformance suite included)
#   20_kernels.json    the kernel report: every Triton kernel compiled for sm_90 (python -m bench kernels)
#   21_loaded.txt      the kernel report's table, then the same kernels as the driver loaded them (registers,
#                      spills) after a real step
#   30_arcface.json    margin-bench --device cuda, ArcFace bf16, B=512 d=512 C in {1e5,1e6,4e6}: triton, cuda,
#                      reference, the naive head eager and under torch.compile, the GEMM floor
#   31_softmax.json    the same for plain Softmax with the peers: F.linear_cross_entropy, Cut Cross-Entropy,
#                      Liger-Kernel (each where installed: carry their wheels in .whl/, installed --no-deps)
#   40_tables.md       both tables with achieved TFLOP/s (8 B C d FLOP over the fwd+bwd time) beside x floor
#   50_probe.json      python -m bench gpu-probe: versions, ceilings, each Triton kernel alone (profiler, filter
#                      off and on) beside a cuBLAS GEMM of its shape, host vs device time of the step, the peers,
#                      correctness at C x d > 2^31, the GPU model's constants re-fitted
#   51_model_vs_measured.md  the model per kernel at the re-fitted constants beside the measured time
#   99_summary.txt     each step's exit code and seconds, the roofline's ceilings measured (python -m bench
#                      ceilings: GEMM TFLOP/s, L2 and HBM copy TB/s, the cuda estimate at them), the memory_budget table (ArcFace bf16, B=512,
#                      C=1e6, d=512 and 1024: triton and cuda with and without every tile kept, the prediction
#                      of margin_kernels/memory_budget.py measured)
# Usage (repo root):  OUT=/some/dir bash bench/gpu_session.sh      (OUT defaults to ./gpu_session_out)
# The developer tools run as `python -m bench JOB` from the repository root (bench/ is not installed); the
# comparison is the installed package's `python -m margin_kernels.bench` (margin-bench).
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"; cd "$ROOT"
OUT="${OUT:-$ROOT/gpu_session_out}"; mkdir -p "$OUT"
BUDGET="${GPU_SESSION_BUDGET_S:-470}"; START=$(date +%s); SUMMARY="$OUT/99_summary.txt"; : > "$SUMMARY"
# 9.0a: the arch-specific target the cuda backend's CUTLASS kernels need (its cubin runs on H100 and H200); their
# headers come from the nvidia-cutlass wheel carried in .whl/ (pip download --no-deps nvidia-cutlass==4.2.0.0)
export PYTHONUNBUFFERED=1 MARGIN_KERNELS_JIT=0 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset TRITON_INTERPRET                                    # compiled kernels, never the interpreter
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
PY="${PYTHON:-python}"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME CAP_S LOG CMD...: CMD under timeout min(CAP_S, time left), output appended to LOG
step() {
  local name="$1" cap="$2" log="$3"; shift 3
  local t; t=$(( cap < $(left) ? cap : $(left) ))
  if [ "$t" -lt 10 ]; then
    echo "== $name: SKIPPED (budget spent)" >> "$SUMMARY"; [ "$log" = "$SUMMARY" ] || echo "== $name: SKIPPED" >> "$log"
    return 0
  fi
  echo "== $name (timeout ${t}s)" >> "$log"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$t" "$@" >> "$log" 2>&1; local rc=$?
  local line="== $name: rc=$rc$([ $rc = 124 ] && echo ' (TIMED OUT)') $(( $(date +%s) - t0 ))s"
  echo "$line" >> "$SUMMARY"; [ "$log" = "$SUMMARY" ] || echo "$line" >> "$log"   # once when LOG is the summary
}

ENV_LOG="$OUT/00_env_build.log"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
} > "$ENV_LOG" 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then step "peer wheels" 60 "$ENV_LOG" "$PY" -m pip install --no-deps --no-index .whl/*.whl; fi
step "build" 200 "$ENV_LOG" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
step "backends" 30 "$ENV_LOG" "$PY" -c "import margin_kernels as mk; print(mk.available_backends())"

# the cuda backend first: its conformance against the float64 reference on this GPU, which GEMM path it runs
# (cuda_backend.variant: "cutlass-sm90" once the bindings call the fused kernels, else "cublas"), and the CUTLASS
# kernels' compile report (compile-checked only until this step passes)
CUDA_LOG="$OUT/10_tests.log"
step "cuda variant" 20 "$CUDA_LOG" "$PY" -c "import torch; from margin_kernels.backends import cuda_backend as c
from margin_kernels.backends.contract import OpConfig
x = torch.zeros(8, 512, device='cuda', dtype=torch.bfloat16); print('variant:', c.variant(x, x, OpConfig()))"
step "cuda conformance" 120 "$CUDA_LOG" "$PY" -m pytest -p no:cacheprovider -q -rs -x tests/test_conformance.py \
  tests/test_native_epilogues.py -k cuda
step "cutlass report" 120 "$CUDA_LOG" sh -c "\"$PY\" -m bench cutlass --out build/cutlass_facts.json; \
  cat build/cutlass_facts.json"

# Order: the measurements first (the GEMM floor's ceilings, the two sweeps, whose --check-up-to compares each
# method with the reference at the smallest C, and their tables), then the test suite, the compiled-kernel
# facts and the budget sweep: the steps' caps add up to more than the budget, and what is skipped when it runs
# out should be what a later session can best afford to miss.
# the roofline's ceilings (GEMM rate, L2 and HBM copy bandwidth) measured, and the cuda estimate at them
step "ceilings" 40 "$OUT/99_summary.txt" "$PY" -m bench ceilings --device cuda
# what falsifies the GPU model first (bench/gpu_probe.py): per-kernel times, host vs device, peers, C x d > 2^31
step "gpu probe" 150 "$OUT/99_summary.txt" "$PY" -m bench gpu-probe --out "$OUT"

BENCH=("$PY" -m margin_kernels.bench --device cuda --dtype bfloat16 -B 512 -d 512 -C 1e5,1e6,4e6 --repeats 5
       --warmup 2 --no-progress --check-up-to 1e5)
step "bench arcface" 120 "$OUT/99_summary.txt" "${BENCH[@]}" --loss arcface --backends triton,cuda,reference \
  --peers naive-arcface,naive-arcface-compiled --json "$OUT/30_arcface.json"
step "bench softmax" 100 "$OUT/99_summary.txt" "${BENCH[@]}" --loss softmax --backends triton,cuda \
  --peers torch-lce,cce,liger --json "$OUT/31_softmax.json"
step "tables" 20 "$OUT/99_summary.txt" sh -c "\"$PY\" -m bench throughput \
  \"$OUT/30_arcface.json\" \"$OUT/31_softmax.json\" > \"$OUT/40_tables.md\""

TEST_LOG="$OUT/10_tests.log"
step "tests on the GPU" 150 "$TEST_LOG" "$PY" -m pytest -p no:cacheprovider -q -rs -x \
  tests/test_triton_backend.py tests/test_native_epilogues.py tests/test_precision.py \
  tests/test_conformance.py tests/test_memory_budget.py -k "triton or cuda"

step "kernel report" 90 "$OUT/21_loaded.txt" "$PY" -m bench kernels --dtypes bf16,fp16 --dims 512 --jobs 8 \
  --json "$OUT/20_kernels.json"
step "loaded kernels" 60 "$OUT/21_loaded.txt" "$PY" - <<'PYEOF'
import torch, margin_kernels as mk
from margin_kernels.backends import triton_backend
B, C, d = 512, 1_000_000, 512
x = torch.randn(B, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (0.01 * torch.randn(C, d, device="cuda")).to(torch.bfloat16).requires_grad_(True)
y = torch.randint(0, C, (B,), device="cuda")
mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="triton").backward(); torch.cuda.synchronize()
fwd, bwd = triton_backend._kernels()
tuned = triton_backend._autotuned.get(fwd.lse_forward_kernel)
print("forward autotune pick:", None if tuned is None else tuned.cache)
for kernel in (fwd.lse_forward_kernel, bwd.dcos_kernel, bwd.dweight_kernel, bwd.dx_kernel):
    try:  # JITFunction.device_caches: {device: (compiled kernels by specialisation, ...)} in triton 3.x
        for device_cache in kernel.device_caches.values():
            for compiled in device_cache[0].values():
                print(kernel.fn.__name__, "regs", compiled.n_regs, "spills", compiled.n_spills,
                      "smem", compiled.metadata.shared)
    except Exception as exc:
        print(kernel.fn.__name__, "cache not readable in this triton:", type(exc).__name__, exc)
PYEOF

# memory_budget= (margin_kernels/memory_budget.py predicts: keeping loses at d = 512, wins at d >= 1024)
step "bench budget" 60 "$OUT/99_summary.txt" "$PY" -m margin_kernels.bench --device cuda --dtype bfloat16 -B 512 \
  -d 512,1024 -C 1e6 --repeats 3 --warmup 1 --no-progress --no-check --loss arcface --backends triton,cuda \
  --memory-budgets all
echo "== total $(( $(date +%s) - START ))s of ${BUDGET}s" >> "$SUMMARY"
