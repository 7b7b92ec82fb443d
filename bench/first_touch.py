"""Recomputing cpu path: weight.grad None each step (a fresh dW: page faults) vs zero_grad(set_to_none=False)
(the backward adds into the existing gradient in place), beside the chunked 4-GEMM floor; interleaved.

Run: PYTHONPATH=. OMP_NUM_THREADS=1 python bench/first_touch.py   (and again with THP_MEM_ALLOC_ENABLE=1)
Recorded in bench/results/cpu_recompute_first_touch_B256_d512_t1.md."""
import json, os, statistics, sys, time
import torch
torch.set_num_threads(1)
import margin_kernels as mk
B, C, D, CH = 256, 100_000, 512, 2048
g = torch.Generator().manual_seed(0)
x = torch.randn(B, D, generator=g).requires_grad_(True)
w = (torch.randn(C, D, generator=g) * 0.05).requires_grad_(True)
y = torch.randint(0, C, (B,), generator=g)
margin = mk.ArcFace()
xs, ws = x.detach(), w.detach()
t_tile = torch.empty(B, CH); t_dw = torch.empty(CH, D); t_dx = torch.zeros(B, D)
def floor():
    for c0 in range(0, C, CH):
        wc = ws[c0:c0 + CH]
        n = wc.shape[0]
        torch.mm(xs, wc.t(), out=t_tile[:, :n])
    for c0 in range(0, C, CH):
        wc = ws[c0:c0 + CH]
        n = wc.shape[0]
        tile = torch.mm(xs, wc.t(), out=t_tile[:, :n])
        t_dx.addmm_(tile, wc)
        torch.mm(tile.t(), xs, out=t_dw[:n])
def fresh():
    w.grad = None; x.grad = None
    mk.margin_cross_entropy(x, w, y, margin, backend="cpu").backward()
def in_place():
    if w.grad is not None:
        w.grad.zero_()
    x.grad = None
    mk.margin_cross_entropy(x, w, y, margin, backend="cpu").backward()
methods = {"gemm-floor (chunked, buffers reused)": floor, "cpu, weight.grad None (fresh dW)": fresh,
           "cpu, zero_grad(set_to_none=False) (in-place)": in_place}
for f in methods.values():
    f()
times = {k: [] for k in methods}
load = [os.getloadavg()[0]]
for _ in range(5):
    for k, f in methods.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
load.append(os.getloadavg()[0])
floor_ms = statistics.median(times[next(iter(methods))]) * 1e3
rows = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(json.dumps({"shape": dict(B=B, C=C, d=D, dtype="fp32", threads=1, chunk=CH), "median_ms": rows,
                  "x_floor": {k: v / floor_ms for k, v in rows.items()}, "load_1min": load,
                  "torch": torch.__version__}, indent=1))
