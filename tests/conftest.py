"""Test-session set-up that must happen before anything imports triton.

Triton reads TRITON_INTERPRET when it is first imported (torch.compile's inductor may import it, too), so the
interpreter is switched on here, at the top of the first file pytest loads, on machines without an NVIDIA GPU:
that is how every Triton kernel is tested on CPU."""
import os

if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
