"""The package imports and computes on CPU without triton and without the compiled extension."""
import subprocess
import sys

from tests.tolerances import FP64_END_TO_END

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
assert abs(a.item() - b.item()) < FP64_END_TO_END, (a, b)
print("ok", sorted(k for k, v in reasons.items() if v is None))
""".replace("FP64_END_TO_END", repr(FP64_END_TO_END))  # the bound, from tests/tolerances.py


def test_imports_and_runs_without_triton():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok ['reference', 'torch']", out.stdout


INTEGRATIONS_SCRIPT = r"""
import sys
for name in ("triton", "pytorch_metric_learning", "insightface", "margin_kernels._C"):
    sys.modules[name] = None                       # none of them importable
import torch
from margin_kernels.integrations import insightface, pml
torch.manual_seed(0)
x, y = torch.randn(6, 8, requires_grad=True), torch.randint(0, 20, (6,))
head = insightface.PartialFC_V2(insightface.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 20, 0.5)
loss = head(x, y) + pml.ArcFaceLoss(20, 8)(x, y)
loss.backward()
assert torch.isfinite(x.grad).all()
print("ok")
"""


def test_integrations_import_and_run_without_triton_or_the_packages_they_imitate():
    out = subprocess.run([sys.executable, "-c", INTEGRATIONS_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout
