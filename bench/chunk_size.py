"""Pick the torch backend's default chunk size: fwd+bwd time against chunk width, beside the GEMM floor.

    python bench/chunk_size.py --batch 256 --classes 100000 --dim 512

The floor is the time of the four GEMMs of B x C x d (forward, backward recompute, dx, dW) alone.
Memory per chunk is a few B x chunk fp32 tiles, so the smallest chunk within a few % of the best is chosen.
"""
import argparse
import time

import torch

import margin_kernels as mk


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    w = (torch.randn(args.classes, args.dim) * 0.01).requires_grad_(True)
    y = torch.randint(0, args.classes, (args.batch,))
    g = torch.randn(args.batch, args.classes)

    def floor():
        logits = x.detach() @ w.detach().t()
        logits = x.detach() @ w.detach().t()
        g @ w.detach()
        g.t() @ x.detach()

    t_floor = median_time(floor, args.repeats)
    del g
    print(f"B={args.batch} C={args.classes} d={args.dim} fp32, {torch.get_num_threads()} threads; "
          f"GEMM floor {t_floor * 1e3:.0f} ms")
    for chunk in args.chunks:
        def step():
            loss = mk.margin_cross_entropy(x, w, y, mk.ArcFace(), backend="torch", chunk_size=chunk)
            torch.autograd.grad(loss, [x, w])
        t = median_time(step, args.repeats)
        print(f"chunk {chunk:6d}: {t * 1e3:7.0f} ms  ({t / t_floor:.2f}x floor)")


if __name__ == "__main__":
    main()
