#!/usr/bin/env python
"""Small launches of every CUDA kernel, for compute-sanitizer (bench/device_check.sh).

Odd sizes exercise the partial-tile edges; each case is compared with the CPU executor so a
kernel that reads out of bounds but happens not to crash still fails here.
"""
import sys

import torch

from fourm_fast.ops import vq_lookup


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for metric in ("l2", "cosine"):
            for N, K, D in ((1, 1, 1), (19, 7, 3), (130, 1031, 33), (67, 70, 256)):
                x = torch.randn(N, D).to(dtype)
                cb = torch.randn(K, D).to(dtype)
                g_idx, _ = vq_lookup(x.cuda(), cb.cuda(), metric)
                torch.cuda.synchronize()
                c_idx, _ = vq_lookup(x, cb, metric)
                agree = (g_idx.cpu() == c_idx).float().mean().item()
                status = "ok" if agree >= 0.95 else "MISMATCH"
                failures += status != "ok"
                print(f"vq_lookup {str(dtype):15} {metric:6} N={N:4} K={K:5} D={D:4}: agree {agree:.3f} {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
