#!/usr/bin/env python
"""Small launches of every CUDA kernel, for compute-sanitizer (bench/device_check.sh).

Odd sizes exercise the partial-tile edges; each case is compared with the CPU executor so a
kernel that reads out of bounds but happens not to crash still fails here.

  python bench/sanitize_cases.py                      # every op
  python bench/sanitize_cases.py --only attention     # one op (racecheck is slow: device_check.sh
                                                      # runs it on the attention kernels alone)
"""
import argparse
import sys

import torch

from fourm_fast.masking import ModalitySpec, TokenBudgetSampler
from fourm_fast.ops import sample_tokens, swiglu, vq_lookup


OPS = ("vq", "sampling", "sampler", "attention", "swiglu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=OPS, default=list(OPS))
    only = set(ap.parse_args(argv).only)
    torch.manual_seed(0)
    failures = 0
    if "vq" in only:
        failures += vq_cases()
    if "sampling" in only:
        failures += sampling_cases()
    if "sampler" in only:
        failures += sampler_cases()
    if "attention" in only:
        failures += attention_cases()
    if "swiglu" in only:
        failures += swiglu_cases()
    return 1 if failures else 0


def vq_cases() -> int:
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
    return failures


def sampling_cases() -> int:
    failures = 0
    for dtype in (torch.float32, torch.bfloat16):
        for V in (1, 97, 1031, 30000):
            logits = (torch.randn(37, V) * 2).to(dtype)
            uncond = (torch.randn(37, V) * 2).to(dtype)
            for kw in (dict(), dict(top_k=5, top_p=0.9, min_p=0.01, temperature=0.7), dict(uncond_logits=uncond, cfg_scale=2.0, top_p=0.5)):
                g = sample_tokens(logits.cuda(), **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}, seed=1)
                torch.cuda.synchronize()
                c = sample_tokens(logits, **kw, seed=1)
                same = torch.equal(g[0].cpu(), c[0]) and torch.equal(g[1].cpu(), c[1])
                failures += not same
                print(f"sample_tokens {str(dtype):15} V={V:6} {sorted(kw)}: {'ok' if same else 'MISMATCH'}")
    return failures


def swiglu_cases() -> int:
    """Forward and backward at sizes below, at and past one block, bit for bit (NaN aside) with the CPU."""
    failures = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n in (1, 255, 257, 100003, 3_000_001):  # the last is past one pass of the grid (sms * 32 blocks)
            a, b, g = (torch.randn(n) * 4).to(dtype), torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            gpu = (swiglu(a.cuda(), b.cuda()), *torch.ops.fourm_fast.swiglu_backward(g.cuda(), a.cuda(), b.cuda()))
            torch.cuda.synchronize()
            cpu = (swiglu(a, b), *torch.ops.fourm_fast.swiglu_backward(g, a, b))
            same = all(torch.equal(torch.isnan(x.cpu()), torch.isnan(y)) and torch.equal(x.cpu()[~torch.isnan(y)], y[~torch.isnan(y)])
                       for x, y in zip(gpu, cpu))
            failures += not same
            print(f"swiglu {str(dtype):15} n={n:6}: {'ok' if same else 'MISMATCH'}")
    return failures


def sampler_cases() -> int:
    failures = 0
    specs = [ModalitySpec("a", "image", 7), ModalitySpec("b", "sequence", 5), ModalitySpec("c", "image", 196)]
    alphas = {"a": [0.5, 0.01], "b": [1.0, 0.0], "c": [0.3, 2.0]}
    for B in (1, 33, 1000):
        cpu = TokenBudgetSampler(specs, (3, 40), (1, 30), alphas, alphas).sample(B, seed=5)
        gpu = TokenBudgetSampler(specs, (3, 40), (1, 30), alphas, alphas, device="cuda").sample(B, seed=5)
        torch.cuda.synchronize()
        same = all(torch.equal(x, y.cpu()) for x, y in zip(cpu.slots, gpu.slots))
        same = same and torch.equal(cpu.budgets.input, gpu.budgets.input.cpu())
        failures += not same
        print(f"token sampler B={B:5}: {'ok' if same else 'MISMATCH'}")
    return failures


def attention_cases() -> int:
    """masked_attention forward + backward on small odd shapes: every kernel (bounds, delta, the
    tensor-core fwd / dq / dkdv tiers 32, 64, 128, the SIMT fwd / dq / dkdv incl. d > 128), with
    partial tiles, skipped tiles and rows that see nothing, compared with the CPU executor."""
    failures = 0
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}  # catches garbage, not ulps
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, H, Nq, Nk, d in ((1, 1, 1, 1, 16), (2, 3, 67, 33, 64), (1, 2, 70, 130, 20), (2, 1, 33, 65, 128),
                                (1, 1, 17, 19, 160)):
            q, k, v, g = (torch.randn(B, H, n, d, generator=gen).to(dtype) for n in (Nq, Nk, Nk, Nq))
            k_valid = torch.rand(B, Nk, generator=gen) > 0.2
            q_seg = torch.randint(0, 3, (B, Nq), generator=gen, dtype=torch.int32).sort(dim=1).values
            k_seg = torch.randint(0, 2, (B, Nk), generator=gen, dtype=torch.int32).sort(dim=1).values
            q_lim = torch.randint(-1, Nk, (B, Nq), generator=gen, dtype=torch.int32)
            k_rank = torch.arange(Nk, dtype=torch.int32).expand(B, Nk).contiguous()
            meta = [q_seg, k_seg, q_lim, k_rank]
            scale = d**-0.5

            def run(device):
                x = [t.to(device) for t in (q, k, v, g, k_valid, *meta)]
                out, lse = torch.ops.fourm_fast.masked_attention_fwd(*x[:3], *x[4:], scale)
                grads = torch.ops.fourm_fast.masked_attention_bwd(x[3], *x[:3], out, lse, *x[4:], scale)
                return [t.cpu().float() for t in (out, lse, *grads)]

            gpu = run("cuda")
            torch.cuda.synchronize()
            cpu = run("cpu")
            same_empty = torch.equal(torch.isneginf(gpu[1]), torch.isneginf(cpu[1]))
            rel = [((a - c).abs() / (1 + c.abs())).nan_to_num(0.0, posinf=0.0) for a, c in zip(gpu, cpu)]
            worst = max(r.max().item() for r in rel)
            finite = all(torch.isfinite(t).all() for i, t in enumerate(gpu) if i != 1)
            ok = same_empty and finite and worst <= tol[dtype]
            failures += not ok
            print(f"masked_attention {str(dtype):15} B={B} H={H} Nq={Nq:4} Nk={Nk:4} d={d:4}: "
                  f"worst rel err {worst:.2e} {'ok' if ok else 'MISMATCH'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
