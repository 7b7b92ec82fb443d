"""The package imports and computes on CPU without triton and without the compiled extension."""
import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["triton"] = None                       # any `import triton` now raises ImportError
sys.modules["margin_kernels._C"] = None            # nor the prebuilt extension...
import os
os.environ["MARGIN_KERNELS_JIT"] = "0"             # ...nor a JIT build of csrc/
import warnings
import torch
import margin_kernels as mk
reasons = mk.available_backends()
assert reasons["triton"] is not None and "triton" in reasons["triton"], reasons
assert reasons["cpu"] is not None, reasons
torch.manual_seed(0)
x, w, y = torch.randn(5, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64), torch.randint(0, 40, (5,))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    a = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="auto")
assert any("falling back" in str(c.message) for c in caught), [str(c.message) for c in caught]
b = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="reference")
assert abs(a.item() - b.item()) < 1e-10, (a, b)
print("ok", sorted(k for k, v in reasons.items() if v is None))
"""


def test_imports_and_runs_without_triton():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok ['reference', 'torch']", out.stdout
