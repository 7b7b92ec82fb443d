"""Checks shared by the native backends' tests (test_native_cpu.py runs them on CPU, test_native_cuda.py on a
CUDA device): whole losses against the float64 reference, and the fused epilogues tile by tile against the
pure-torch epilogue, which is the reference implementation of the epilogue contract."""
from __future__ import annotations

import torch

import margin_kernels as mk
from margin_kernels.backends.native_epilogue import NativeEpilogue
from margin_kernels.backends.torch_backend import TorchEpilogue
from margin_kernels.losses.negatives import NegativeKind, NegativeSpec

from .helpers import loss_and_grads, make_loss, random_problem, rel_err, twin

# relative error bounds on (loss, dx, dW) against the reference evaluated on the same inputs
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# bf16/fp16: the math is fp32 in both, but gradients are returned in the storage dtype, where an fp32
# difference of a few ulps can round an element to the neighbouring bf16 value (2^-8 relative)
LOW_PRECISION_GRAD_TOL = 5e-3

# a spec per kind whose constants put the kind's branch points inside the cosine range
SPECS = {
    NegativeKind.IDENTITY: NegativeSpec(NegativeKind.IDENTITY, 30.0),
    NegativeKind.CLAMP: NegativeSpec(NegativeKind.CLAMP, 16.0, -0.3, 0.5),
    NegativeKind.CURRICULAR: NegativeSpec(NegativeKind.CURRICULAR, 64.0),
    NegativeKind.MV: NegativeSpec(NegativeKind.MV, 32.0, 1.12),
    NegativeKind.CIRCLE: NegativeSpec(NegativeKind.CIRCLE, 64.0, 0.25),
    NegativeKind.FILTER: NegativeSpec(NegativeKind.FILTER, 64.0, 0.1),
}


def per_row_losses(backend, name, x, w, labels, *, class_index=None, chunk_size=None, loss=None):
    margin = loss if loss is not None else make_loss(name)

    def fn(a, b):
        return mk.margin_cross_entropy(a, b, labels, margin, backend=backend, reduction="none",
                                       class_index=class_index, chunk_size=chunk_size)

    return loss_and_grads(fn, x, w)


def compare_with_reference(backend, name, dtype, *, device="cpu", batch=13, classes=301, dim=17, chunk_size=64,
                           ignore_rows=(3,), class_index=False, seed=0, reference_dtype=None):
    """(errors of loss, dx, dW, max-abs loss error) of ``backend`` against backend="reference" on the same
    inputs, or on the inputs cast to ``reference_dtype``; the reference runs on CPU."""
    x, w, labels = random_problem(batch, classes, dim, dtype=dtype, seed=seed, ignore_rows=ignore_rows)
    index = None
    if class_index:
        gen = torch.Generator().manual_seed(seed + 1)
        index = torch.randperm(classes, generator=gen)[: classes // 2]
        labels = torch.where(labels >= 0, labels % index.numel(), labels)
    margin = make_loss(name)
    ref_margin = twin(margin)
    ref_dtype = reference_dtype or dtype
    ref = per_row_losses("reference", name, x.to(ref_dtype), w.to(ref_dtype), labels, class_index=index,
                         loss=ref_margin)
    to_dev = (lambda t: t if t is None else t.to(device))
    out = per_row_losses(backend, name, x.to(device), w.to(device), labels.to(device), class_index=to_dev(index),
                         chunk_size=chunk_size, loss=margin.to(device))
    out = [t.cpu() for t in out]
    errors = [rel_err(o, r) for o, r in zip(out, ref)]
    scale = max(1.0, ref[0].double().abs().max().item())
    errors.append((out[0].double() - ref[0].double()).abs().max().item() / scale)
    return errors


# shapes and label patterns every backend must handle (keyword arguments of compare_with_reference)
VARIANTS = {
    "class_index_and_ignored_rows": dict(class_index=True, ignore_rows=(0, 5, 6)),
    "odd_dim_one_chunk": dict(dim=33, classes=97, chunk_size=None),
    "chunk_of_one_class": dict(classes=23, chunk_size=1),
    "classes_not_multiple_of_chunk": dict(classes=257, chunk_size=50),
    "single_row": dict(batch=1, ignore_rows=()),
    "only_the_target_class": dict(classes=1, ignore_rows=(), chunk_size=None),  # no negatives: lse = -inf
    "all_rows_ignored": dict(batch=4, ignore_rows=(0, 1, 2, 3)),
    "wide_tile_many_strips": dict(batch=5, classes=1500, dim=8, chunk_size=700),
}


def assert_matches_reference(backend, name, dtype, **kwargs):
    errors = compare_with_reference(backend, name, dtype, **kwargs)
    tol = TOL.get(dtype)
    if tol is None:  # bf16 / fp16 storage: fp32 losses, storage-dtype gradients
        bounds = (TOL[torch.float32], LOW_PRECISION_GRAD_TOL, LOW_PRECISION_GRAD_TOL, TOL[torch.float32])
    else:
        bounds = (tol, tol, tol, tol)
    labels = ("loss", "dx", "dW", "max-abs loss")
    bad = [f"{label} {err:.2e} > {bound:.0e}" for label, err, bound in zip(labels, errors, bounds) if not err <= bound]
    assert not bad, f"{backend} {name} {dtype} {kwargs}: " + ", ".join(bad)


# ---- the epilogue contract, tile by tile ---------------------------------------------------------------------
def random_tile_inputs(kind, dtype, device, *, rows=37, cols=301, ld_pad=5, normalized=True, seed=0):
    """A tile of raw dot products (cos * |w|, cos in [-1.1, 1.1]) stored with row stride cols + ld_pad, labels
    with some targets inside and outside the tile and one ignored row, and per-row inputs."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2.2 - 1.1
    norms = torch.rand(cols, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    raw = cos * norms if normalized else cos * 3.0
    storage = torch.zeros(rows, cols + ld_pad, dtype=dtype)
    storage[:, :cols] = raw.to(dtype)
    labels = torch.randint(-cols // 2, cols + cols // 2, (rows,), generator=gen)  # col0 = 0: some outside
    labels[0] = -1
    labels[1] = cols - 1  # last column (tails of vector loops)
    thr = torch.rand(rows, generator=gen, dtype=torch.float64) * 1.6 - 0.8
    aux = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.5
    row_params = torch.stack([thr, aux], dim=1).to(dtype)
    inv_norm = (1.0 / norms).to(dtype) if normalized else None
    g_lse = torch.rand(rows, generator=gen, dtype=torch.float64).to(dtype)
    g_cos_target = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype)
    to = (lambda t: None if t is None else t.to(device))
    return dict(tile=to(storage)[:, :cols], inv_norm=to(inv_norm), labels=to(labels), row_params=to(row_params),
                g_lse=to(g_lse), g_cos_target=to(g_cos_target), spec=SPECS[kind])


def compare_epilogues(ext, kind, dtype, device, *, normalized=True, col0=0, seed=0):
    """Errors of the native epilogue against TorchEpilogue for one tile: forward (lse), backward (gradient
    tile, col_dot, max_abs), finish_dw; both epilogues start from identical copies."""
    inputs = random_tile_inputs(kind, dtype, device, normalized=normalized, seed=seed)
    spec, rows = inputs["spec"], inputs["tile"].shape[0]
    labels = inputs["labels"] + col0
    native, torch_epi = NativeEpilogue(ext), TorchEpilogue()
    lses = []
    for epi in (native, torch_epi):
        run_max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        run_sum = torch.zeros(rows, dtype=dtype, device=device)
        # two tiles merged into the same running pair: the second one shifted by col0 + a tile's width
        for offset in (0, inputs["tile"].shape[1]):
            epi.forward_tile(inputs["tile"].clone(), inputs["inv_norm"], labels, col0 + offset, inputs["row_params"],
                             spec, run_max, run_sum)
        lses.append(run_max + torch.log(run_sum))
    errors = {"lse": rel_err(lses[0], lses[1])}
    lse = lses[1]
    grads = []
    for epi in (native, torch_epi):
        tile = inputs["tile"].clone()
        grads.append(epi.backward_tile(tile, inputs["inv_norm"], labels, col0, inputs["row_params"], spec, lse,
                                       inputs["g_lse"], inputs["g_cos_target"], True))
    errors["grad"] = rel_err(grads[0].grad, grads[1].grad)
    errors["max_abs"] = rel_err(grads[0].max_abs.reshape(()), grads[1].max_abs.reshape(()))
    if normalized:
        errors["col_dot"] = rel_err(grads[0].col_dot, grads[1].col_dot)
        w = torch.randn(inputs["tile"].shape[1], 9, dtype=dtype, device=device)
        dw = torch.randn_like(w)
        outs = []
        for epi in (native, torch_epi):
            out = dw.clone()
            epi.finish_dw(out, w, grads[1].col_dot, inputs["inv_norm"])
            outs.append(out)
        errors["finish_dw"] = rel_err(outs[0], outs[1])
        errors["inv_norms"] = rel_err(native.inv_norms(w, dtype), torch_epi.inv_norms(w, dtype))
    return errors
