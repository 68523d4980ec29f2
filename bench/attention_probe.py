#!/usr/bin/env python
"""A few forward + backward calls of masked_attention on CUDA at one 4M shape, for profilers:
bench/device_check.sh runs it under Nsight Compute (ncu) to read the attention kernels' tensor-pipe
use, occupancy and memory throughput, which timings alone cannot separate.

  ncu --clock-control none --kernel-name regex:attn_ python bench/attention_probe.py --pattern encoder
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.bench_attention import decoder_layout  # noqa: E402
from bench.utils import positive_int  # noqa: E402
from fourm_fast.ops import masked_attention  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="encoder", choices=["unmasked", "encoder", "decoder"])
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=256)
    ap.add_argument("--calls", type=positive_int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU")
    B, H, N, d = args.batch, 12, args.tokens, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(4))
    k_valid = torch.ones(B, N, dtype=torch.bool, device="cuda")
    if args.pattern != "unmasked":
        k_valid[:, N - N // 8:] = False  # the padding bench_attention uses
    meta = decoder_layout(B, N, "cuda")[0] if args.pattern == "decoder" else {}
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for _ in range(args.calls):
        out = masked_attention(q, k, v, k_valid, **meta, backend="fourm_fast")
        torch.autograd.grad(out, (q, k, v), g)
    torch.cuda.synchronize()
    print(f"masked_attention {args.pattern} B={B} H={H} N={N} d={d} bf16: {args.calls} forward + backward calls done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
