"""masked_attention on the CPU: float64 reference parity (outputs and gradients), 4M's decoder rule,
hostile shapes, low precision, dispatcher, opcheck and torch.compile."""

import math
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fourm_fast.ops import masked_attention
from fourm_fast.ops.attention import select_backend, AttentionInputs
from fourm_fast.reference.attention import decoder_metadata_4m, masked_attention_reference, visible_mask
from attention_layouts import decoder_layout_metadata, outputs_at_thread_counts, random_metadata
from parity import load_json, load_safetensors


_metadata = random_metadata


def _check(q, k, v, k_valid, meta, atol, g=None):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, k_valid, **meta)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention_reference(*ref_in, k_valid, **meta)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    g = torch.randn_like(out) if g is None else g
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=atol * 10, rtol=atol * 10, msg=lambda m: f"d{name}: {m}")
    return out


@pytest.mark.parametrize("kind", ["padding", "segments", "ranks", "both"])
@pytest.mark.parametrize("B,H,Nq,Nk,d", [(1, 1, 1, 1, 16), (2, 3, 17, 128, 32), (1, 12, 128, 17, 64),
                                          (2, 1, 257, 257, 16), (1, 3, 128, 128, 128), (3, 3, 1, 257, 64),
                                          (2, 3, 5, 97, 64), (1, 2, 8, 33, 128), (3, 1, 9, 40, 32),
                                          (2, 2, 1, 29, 20), (2, 2, 3, 29, 20)])  # d = 20: vector loops' tails
def test_matches_float64_reference(B, H, Nq, Nk, d, kind, cpu_gemm, cpu_isa):
    gen = torch.Generator().manual_seed(B * 1000 + Nq + Nk + d)
    q, k, v = (torch.randn(B, H, n, d, generator=gen) for n in (Nq, Nk, Nk))
    k_valid, meta = _metadata(B, Nq, Nk, kind, gen)
    _check(q, k, v, k_valid, meta, atol=2e-5)


@pytest.mark.parametrize("layout", ["blocks", "decoder", "long_runs"])
@pytest.mark.parametrize("B,H,N,d", [(2, 2, 17, 16), (2, 3, 130, 64), (1, 2, 300, 32)])
def test_block_sparse_layouts(B, H, N, d, layout, cpu_gemm, cpu_isa):
    """Contiguous segments, as 4M lays out modalities: the CPU executor cuts queries into blocks at
    segment changes (and every 128 rows) and computes only each block's key range."""
    gen = torch.Generator().manual_seed(B * 100 + N + d)
    q, k, v = (torch.randn(B, H, N, d, generator=gen) for _ in range(3))
    if layout == "decoder":  # 4M's decoder rule: images bidirectional, sequences causal, padding
        k_valid, meta = decoder_layout_metadata(B, N, gen)
    else:  # sorted segments (5 short runs, or 2 runs longer than a block), ranks, some padding
        n_seg = 5 if layout == "blocks" else 2
        k_valid = torch.rand(B, N, generator=gen) > 0.1
        seg = torch.randint(0, n_seg, (B, N), generator=gen, dtype=torch.int32).sort(dim=1).values
        rank = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()
        limit = torch.randint(-1, N, (B, N), generator=gen, dtype=torch.int32)
        meta = dict(q_segment=seg, k_segment=seg.clone(), q_limit=limit, k_rank=rank)
    _check(q, k, v, k_valid, meta, atol=2e-5)


@pytest.mark.parametrize("first_sees_nothing", [False, True])
def test_backward_writes_every_gradient_element(first_sees_nothing, cpu_isa):
    """dQ, dK and dV start uninitialised: each pair zero-fills only the keys outside its first
    seeing block's range, which that block writes with beta 0. Same-sized NaN buffers are freed
    just before each call (below glibc's mmap threshold, so the allocator hands their memory back)
    and the gradients must still match the float64 reference: blocks with disjoint and overlapping
    key ranges, keys no block sees, and (parametrised) a first block that sees no key."""
    B, H, N, d = 1, 2, 130, 32  # 33 KiB per tensor
    gen = torch.Generator().manual_seed(17)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen) for _ in range(4))
    k_valid = torch.rand(B, N, generator=gen) > 0.1
    k_valid[:, -5:] = False  # keys no query sees
    seg = torch.randint(0, 5, (B, N), generator=gen, dtype=torch.int32).sort(dim=1).values
    rank = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()
    limit = torch.randint(-1, N, (B, N), generator=gen, dtype=torch.int32)
    if first_sees_nothing:
        limit[seg == seg[:, :1]] = -1
    scale = d**-0.5
    meta = (seg, seg.clone(), limit, rank)
    out, lse = torch.ops.fourm_fast.masked_attention_fwd(q, k, v, k_valid, *meta, scale)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention_reference(*ref_in, k_valid, q_segment=meta[0], k_segment=meta[1], q_limit=meta[2],
                                     k_rank=meta[3], scale=scale)
    want = torch.autograd.grad(ref, ref_in, g.double())
    for _ in range(3):
        junk = [torch.full((B, H, N, d), float("nan")) for _ in range(6)]
        del junk
        got = torch.ops.fourm_fast.masked_attention_bwd(g, q, k, v, out, lse, k_valid, *meta, scale)
        for name, a, b in zip("qkv", got, want):
            assert torch.isfinite(a).all(), f"d{name} holds a value never written"
            torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("B,H,N", [(1, 1, 300), (1, 3, 257), (4, 4, 130)], ids=["1-pair", "3-pairs", "16-pairs"])
def test_gradients_do_not_depend_on_the_thread_count(B, H, N, cpu_isa):
    """Under 16 (batch, head) pairs the backward splits each pair's query blocks into chunks summed
    in a fixed order (from 16 pairs, one chunk per pair): the chunking follows the shape, not the
    thread count, so 1 and 2 threads give the same bits on fourm_fast's own GEMM kernels; both
    match the float64 reference. The portable ISA's products run on MKL's sgemm_, whose rounding
    may follow the operands' memory alignment (MKL without its CNR mode), so there the two agree
    to float32 rounding only."""
    gen = torch.Generator().manual_seed(23)
    q, k, v, g = (torch.randn(B, H, N, 32, generator=gen) for _ in range(4))
    k_valid, meta = _metadata(B, N, N, "both", gen)
    meta["q_segment"] = meta["q_segment"].sort(dim=1).values  # runs of one segment: several blocks
    meta["k_segment"] = meta["k_segment"].sort(dim=1).values
    results = outputs_at_thread_counts(q, k, v, k_valid, meta, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        if cpu_isa == "generic":
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    _check(q, k, v, k_valid, meta, atol=2e-5, g=g)


_JUNK_MEMORY_CHECK = r"""
import torch
from fourm_fast.ops import masked_attention
from fourm_fast.reference.attention import masked_attention_reference
torch.set_num_threads(2)
empty = torch.empty(1 << 16)
assert (empty != 0).any(), "MALLOC_PERTURB_ did not reach torch's allocations"
for dtype in (torch.float32, torch.bfloat16):
    for B, H, N, d in ((1, 1, 300, 32), (1, 3, 257, 20), (2, 1, 1100, 16), (4, 4, 130, 32), (1, 2, 40, 16)):
        gen = torch.Generator().manual_seed(B * N + d)
        q, k, v, g = (torch.randn(B, H, N, d, generator=gen).to(dtype) for _ in range(4))
        k_valid = torch.rand(B, N, generator=gen) > 0.1
        k_valid[:, -7:] = False
        seg = torch.randint(0, 5, (B, N), generator=gen, dtype=torch.int32).sort(dim=1).values
        rank = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()
        limit = torch.randint(-1, N, (B, N), generator=gen, dtype=torch.int32)
        limit[seg == seg[:, :1]] = -1
        meta = dict(q_segment=seg, k_segment=seg.clone(), q_limit=limit, k_rank=rank)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = masked_attention(qq, kk, vv, k_valid, **meta)
        got = (out, *torch.autograd.grad(out, (qq, kk, vv), g))
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = masked_attention_reference(*ref_in, k_valid, **meta)
        want = (ref, *torch.autograd.grad(ref, ref_in, g.double()))
        tol = 2e-4 if dtype == torch.float32 else 6e-2
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(a).all(), f"{dtype} {(B, H, N, d)} {name}: an element never written"
            torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{dtype} {(B, H, N, d)} {name}: {m}")
print("ok")
"""


def test_every_output_element_written_in_junk_filled_memory():
    """glibc fills every allocation with junk (MALLOC_PERTURB_), from the heap only
    (MALLOC_MMAP_THRESHOLD_, so large buffers are not fresh zero pages): outputs, gradients and the
    backward's chunk buffers must still be finite and right, on 1 to 16 pairs (split and unsplit
    backward), keys nobody sees, first blocks that see nothing; float32 and bfloat16 (AMX tiles
    where the CPU has them)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_PERTURB_="85", MALLOC_MMAP_THRESHOLD_="1000000000")
    res = subprocess.run([sys.executable, "-c", _JUNK_MEMORY_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_tile_products_use_the_blas_pytorch_links():
    """PyTorch's MKL builds export sgemm_: the CPU tiles must call it, not fall back to ATen."""
    from fourm_fast._extension import extension

    if not torch.backends.mkl.is_available():
        pytest.skip("this PyTorch has no MKL; the ATen path is expected")
    assert extension().build_info()["cpu_gemm"] == "blas"


def test_queries_that_see_nothing_get_zeros_and_zero_grads():
    B, H, N, d = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, N, d, requires_grad=True) for _ in range(3))
    k_valid = torch.ones(B, N, dtype=torch.bool)
    k_valid[1] = False  # the whole second sample is padding
    q_seg = torch.zeros(B, N, dtype=torch.int32)
    q_seg[0, :5] = 9  # segment with no keys
    k_seg = torch.zeros(B, N, dtype=torch.int32)
    out = masked_attention(q, k, v, k_valid, q_seg, k_seg)
    assert (out[1] == 0).all() and (out[0, :, :5] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, :5] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_non_contiguous_views(cpu_gemm, cpu_isa):  # strided leading dims through each GEMM path
    B, N, H, d = 2, 33, 3, 32
    x = torch.randn(B, N, 3, H, d)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d) strided views
    gen = torch.Generator().manual_seed(5)
    k_valid, meta = _metadata(B, N, N, "both", gen)
    g = torch.randn(B, N, H, d, generator=gen).transpose(1, 2)  # grad_out as nn.Attention's reshape sends it
    _check(q, k, v, k_valid, meta, atol=2e-5, g=g)
    # rows that overlap (stride 0 along N) cannot be read in place: copied, same result
    k1 = torch.randn(B, H, 1, d, generator=gen).expand(B, H, N, d)
    _check(q, k1, v, k_valid, meta, atol=2e-5, g=g)
    _check(q[:, :, :1], k, v, k_valid, {n: (t[:, :1] if n[0] == "q" else t) for n, t in meta.items()}, atol=2e-5)


def test_one_query_whose_scores_are_all_minus_inf_outputs_zeros():
    """A visible key set whose every score is -inf (a -inf in q): the one-query path, like the
    tiled path and the float64 reference, outputs zeros there, not NaN."""
    B, H, N, d = 2, 2, 9, 16
    gen = torch.Generator().manual_seed(3)
    k, v = torch.rand(B, H, N, d, generator=gen) + 0.5, torch.randn(B, H, N, d, generator=gen)
    q = torch.randn(B, H, 3, d, generator=gen)
    q[0, :, :, 0] = -math.inf  # k > 0: every score of sample 0 is -inf
    k_valid = torch.ones(B, N, dtype=torch.bool)
    k_valid[1, 4:] = False
    ref = masked_attention_reference(q.double(), k.double(), v.double(), k_valid)
    for nq in (1, 3):
        out = masked_attention(q[:, :, :nq], k, v, k_valid)
        assert torch.equal(out[0], torch.zeros_like(out[0])), nq
        torch.testing.assert_close(out.double(), ref[:, :, :nq], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_views_of_a_cache(dtype):
    """One or a few queries (autoregressive decoding) against the filled prefix of a larger key /
    value cache: strided views, as the generator passes them."""
    B, H, d, cap = 3, 2, 64, 50
    gen = torch.Generator().manual_seed(9)
    kc, vc = (torch.randn(B, H, cap, d, generator=gen).to(dtype) for _ in range(2))
    for nq, t in ((1, 1), (1, 29), (4, 50)):
        q = torch.randn(B, nq, H, d, generator=gen).to(dtype).transpose(1, 2)
        k, v = kc[:, :, :t], vc[:, :, :t]
        k_valid = torch.rand(B, t, generator=gen) < 0.8
        k_valid[:, 0] = True
        out = masked_attention(q, k, v, k_valid)
        ref = masked_attention_reference(q.double(), k.double(), v.double(), k_valid)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 20, 64])
def test_decode_step_reads_a_half_cache_as_its_float32_widening(dtype, d):
    """One query reads a 16-bit cache in place, widening each element (exact): the result must be
    the float32 computation on the widened tensors, rounded once. Covers D not a multiple of 8 and
    a cache whose rows are not unit-stride along D (copied first)."""
    B, H, cap, t = 2, 3, 40, 31
    gen = torch.Generator().manual_seed(5)
    kc, vc = (torch.randn(B, H, cap, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(B, H, 1, d, generator=gen).to(dtype)
    k_valid = torch.rand(B, t, generator=gen) < 0.7
    k_valid[0] = False  # a sample that sees nothing: zeros
    strided_k = kc.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :t]  # stride 1 along the keys
    for k, v in ((kc[:, :, :t], vc[:, :, :t]), (strided_k, vc[:, :, :t])):
        out = masked_attention(q, k, v, k_valid)
        want = masked_attention(q.float(), k.float(), v.float(), k_valid).to(dtype)
        assert out.dtype == dtype
        assert torch.equal(out, want)
    assert bool((out[0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bound(dtype):
    # FlashAttention's rule: |out - ref| <= 2 |naive_lowprec - ref| + eps, naive_lowprec being the
    # reference computed eagerly in the low-precision dtype.
    gen = torch.Generator().manual_seed(3)
    B, H, N, d = 2, 3, 130, 64
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(dtype) for _ in range(3))
    k_valid, meta = _metadata(B, N, N, "both", gen)
    out = masked_attention(q, k, v, k_valid, **meta)
    assert out.dtype == dtype
    ref = masked_attention_reference(q, k, v, k_valid, **meta)
    naive = masked_attention_reference(q, k, v, k_valid, **meta, dtype=dtype)
    eps = 1e-3
    assert ((out.double() - ref).abs() <= 2 * (naive.double() - ref).abs().max() + eps).all()


PARITY = load_safetensors("decoder_mask.safetensors")
CASES = load_json("decoder_mask.json")["cases"]


@pytest.mark.parametrize("case,flags", [(c, f) for c in CASES for f in ("causal0_sep1", "causal0_sep0", "causal1_sep1", "causal1_sep0")])
def test_4m_decoder_rule_from_metadata(case, flags):
    dam = PARITY[f"{case}.decoder_attention_mask"]
    mod = PARITY[f"{case}.mod_mask"]
    expected_blocked = PARITY[f"{case}.out.{flags}"]
    causal, sep = flags == "causal1_sep1" or flags == "causal1_sep0", flags.endswith("sep1")
    k_valid, q_seg, k_seg, q_lim, k_rank = decoder_metadata_4m(dam, mod, causal=causal, sep=sep)
    vis = visible_mask(k_valid, dam.shape[1], q_seg, k_seg, q_lim, k_rank)
    assert torch.equal(vis, ~expected_blocked)
    # The op sees the same sets: with q = k = 0 and v = identity, out[i, j] = 1/|visible(i)| or 0.
    B, M = dam.shape
    q = torch.zeros(B, 1, M, M)
    v = torch.eye(M).expand(B, 1, M, M).contiguous()
    out = masked_attention(q, q.clone(), v, k_valid, q_seg, k_seg, q_lim, k_rank)
    assert torch.equal(out[:, 0] > 0, ~expected_blocked)


def test_flush_denormal_applies_on_every_thread():
    # torch.set_flush_denormal sets the calling thread's FTZ/DAZ only. Units of work are handed to
    # whichever thread is free, so the same call flushed a different set of heads each time.
    # Here key 1's weight is exp(-90), a subnormal: 8.2e-10 in the output unflushed, 0 flushed.
    B, H, Nq, Nk, d = 1, 64, 4, 2, 8
    q = torch.zeros(B, H, Nq, d)
    q[..., 0] = 1.0
    k, v = torch.zeros(B, H, Nk, d), torch.zeros(B, H, Nk, d)
    k[:, :, 1, 0], v[:, :, 1, :] = -90.0, 1e30
    kv = torch.ones(B, Nk, dtype=torch.bool)
    assert (masked_attention(q, k, v, kv, scale=1.0)[..., 0] > 0).all()
    threads = torch.get_num_threads()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the caller's mode is carried to the workers on x86-64 only (csrc/cpu/parallel.h)")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        torch.set_num_threads(max(threads, 2))
        for _ in range(20):
            assert (masked_attention(q, k, v, kv, scale=1.0)[..., 0] == 0).all()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert (masked_attention(q, k, v, kv, scale=1.0)[..., 0] > 0).all()  # the workers got their own mode back


def test_every_cpu_op_runs_its_workers_in_the_callers_float_mode():
    # the test above exercises attention alone: the other CPU ops must go through the same wrapper
    root = Path(__file__).resolve().parents[1] / "csrc" / "cpu"
    stray = [f"{p.name}:{i}" for p in sorted(root.iterdir()) if p.suffix in (".h", ".cpp") and p.name != "parallel.h"
             for i, line in enumerate(p.read_text().splitlines(), 1) if "at::parallel_for(" in line]
    assert not stray, f"at::parallel_for called directly (use fourm_fast::parallel_for): {stray}"


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 3, 5, 8)
    kv = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="k_valid is on meta but q is on cpu"):  # was: uninitialised output
        masked_attention(q, q, q, kv.to("meta"))
    with pytest.raises(ValueError, match="q_segment is on meta"):
        seg = torch.zeros(2, 5, dtype=torch.int32)
        masked_attention(q, q, q, kv, q_segment=seg.to("meta"), k_segment=seg)
    with pytest.raises(ValueError, match="head dim must be positive"):
        masked_attention(q[..., :0], q[..., :0], q[..., :0], kv)
    for bad_scale in (math.nan, math.inf, 1e39, -3.5e38, 10**400):  # finite doubles past float32 gave all-NaN outputs
        with pytest.raises(ValueError, match="scale must be finite in float32"):
            masked_attention(q, q, q, kv, scale=bad_scale)
    for bad_scale in ("0.3", True, torch.ones(2), torch.tensor(1 + 1j)):  # a string and a bool were taken as numbers
        with pytest.raises(TypeError, match="scale must be a real number"):
            masked_attention(q, q, q, kv, scale=bad_scale)
    torch.testing.assert_close(masked_attention(q, q, q, kv, scale=np.float32(0.5)),
                               masked_attention(q, q, q, kv, scale=0.5))
    # a scale made of a symbolic shape while tracing (the type check refused SymFloat)
    from torch.fx.experimental.proxy_tensor import make_fx
    traced = make_fx(lambda q, kv: masked_attention(q, q, q, kv, scale=q.shape[-1] ** -0.5), tracing_mode="symbolic")(q, kv)
    torch.testing.assert_close(traced(q, kv), masked_attention(q, q, q, kv))
    with pytest.raises(ValueError, match="head counts differ"):
        masked_attention(q, torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), kv)
    with pytest.raises(ValueError, match="batch sizes differ"):
        masked_attention(q, torch.randn(3, 3, 5, 8), torch.randn(3, 3, 5, 8), kv)
    with pytest.raises(ValueError, match="head dims differ"):
        masked_attention(q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), kv)
    with pytest.raises(ValueError, match="k_valid must have shape"):
        masked_attention(q, q, q, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="k_valid must be bool"):
        masked_attention(q, q, q, torch.ones(2, 5))
    seg = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="both q_segment and k_segment"):
        masked_attention(q, q, q, kv, q_segment=seg)
    with pytest.raises(TypeError, match="q_segment must be int32"):
        masked_attention(q, q, q, kv, q_segment=seg.long(), k_segment=seg)
    with pytest.raises(ValueError, match="k_rank must have shape"):
        masked_attention(q, q, q, kv, q_limit=seg, k_rank=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="share a dtype"):
        masked_attention(q, q.half(), q, kv)
    with pytest.raises(RuntimeError, match="fourm_fast: q is torch.float64; the kernels take float32"):
        masked_attention(q.double(), q.double(), q.double(), kv, backend="fourm_fast")
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        masked_attention(q.int(), q.int(), q.int(), kv, backend="sdpa_dense")
    with pytest.raises(ValueError, match="4-D"):
        masked_attention(q[0], q[0], q[0], kv)
    # malformed q before any other check: these read q's last dim for the default scale and
    # failed with IndexError / ZeroDivisionError, and k_valid=None with "does not have a device"
    for bad in (torch.randn(()), torch.randn(1, 3, 0), torch.randn(0)):
        with pytest.raises(ValueError, match="must be 4-D"):
            masked_attention(bad, bad, bad, kv)
    with pytest.raises(TypeError, match="k_valid must be a bool .* tensor, got NoneType"):
        masked_attention(q, q, q, None)
    s = torch.tensor(0.5, requires_grad=True)  # a learnable scale would get no gradient
    with pytest.raises(TypeError, match="scale is a number"):
        masked_attention(q, q, q, kv, scale=s)
    torch.testing.assert_close(masked_attention(q, q, q, kv, scale=s.detach()), masked_attention(q, q, q, kv, scale=0.5))


def test_dispatcher_backends_agree_and_explain():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 20, 16, generator=gen) for _ in range(3))
    k_valid, meta = _metadata(2, 20, 20, "both", gen)
    own = masked_attention(q, k, v, k_valid, **meta, backend="fourm_fast")
    sdpa = masked_attention(q, k, v, k_valid, **meta, backend="sdpa_dense")
    torch.testing.assert_close(own, sdpa, atol=1e-5, rtol=1e-5)
    a = AttentionInputs(q, k, v, k_valid, *meta.values(), 0.25)
    assert select_backend(a).name == "fourm_fast"
    with pytest.raises(RuntimeError, match="flash_attn: .*not installed|flash_attn: .*CUDA only"):
        masked_attention(q, k, v, k_valid, backend="flash_attn")
    with pytest.raises(ValueError, match="unknown backend"):
        masked_attention(q, k, v, k_valid, backend="nope")


@pytest.mark.parametrize("backend", ["fourm_fast", "sdpa_dense"])
def test_every_backend_checks_its_inputs_the_same(backend):
    # sdpa_dense ran a lone k_segment (ignoring it) and failed on a lone q_segment with a NoneType error
    q = torch.randn(2, 3, 5, 8)
    kv = torch.ones(2, 5, dtype=torch.bool)
    seg = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="give both q_segment and k_segment"):
        masked_attention(q, q, q, kv, k_segment=seg, backend=backend)
    with pytest.raises(ValueError, match="give both q_segment and k_segment"):
        masked_attention(q, q, q, kv, q_segment=seg, backend=backend)
    with pytest.raises(TypeError, match="k_valid must be bool"):
        masked_attention(q, q, q, kv.int(), backend=backend)
    with pytest.raises(TypeError, match="q_limit must be int32"):
        masked_attention(q, q, q, kv, q_limit=seg.long(), k_rank=seg, backend=backend)
    with pytest.raises(ValueError, match="k_valid must have shape"):
        masked_attention(q, q, q, kv[:, :4], backend=backend)


def test_float64_runs_on_sdpa_dense_and_says_so():
    from fourm_fast.ops import attention as attn

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    k_valid, meta = _metadata(2, 9, 9, "both", gen)
    attn._warned.clear()
    with pytest.warns(UserWarning, match="(?s)running the sdpa_dense backend.*fourm_fast: q is torch.float64"):
        out = masked_attention(q, k, v, k_valid, **meta)
    torch.testing.assert_close(out, masked_attention_reference(q, k, v, k_valid, **meta), atol=1e-10, rtol=1e-10)


def test_autocast_runs_q_k_v_in_its_dtype():
    # CUDA autocast computes LayerNorm (QK-norm) in float32 next to a bfloat16 v; as SDPA, the op
    # takes all three in the autocast dtype. Without autocast, mixed dtypes stay an error.
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=gen) for _ in range(3))
    kv = torch.ones(1, 7, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = masked_attention(q, k.bfloat16(), v.bfloat16(), kv)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kv), atol=0, rtol=0)
    with pytest.raises(TypeError, match="share a dtype"):
        masked_attention(q, k.bfloat16(), v.bfloat16(), kv)
    # float64 stays float64 under autocast, as with SDPA (a float64 check ran in bfloat16 before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wide = masked_attention(q.double(), k.double(), v.double(), kv, backend="sdpa_dense")
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, masked_attention(q.double(), k.double(), v.double(), kv, backend="sdpa_dense"))


def test_compiles_with_dynamic_shapes():
    # sizes symbolic (the default scale was a symbolic float that math.isfinite could not take)
    def f(q, k, v, k_valid, seg):
        return masked_attention(q, k, v, k_valid, q_segment=seg, k_segment=seg).square().sum()

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(6)
    for B, N in ((2, 7), (3, 11), (1, 13)):
        q, k, v = (torch.randn(B, 2, N, 16, generator=gen, requires_grad=True) for _ in range(3))
        k_valid = torch.rand(B, N, generator=gen) < 0.8
        seg = torch.randint(0, 2, (B, N), generator=gen, dtype=torch.int32)
        got, want = g(q, k, v, k_valid, seg), f(q, k, v, k_valid, seg)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
            torch.testing.assert_close(a, b)


def test_backend_choice_traces_without_a_graph_break():
    # the CUDA path asks the extension whether it has kernels: a constant to torch.compile (calling
    # it while tracing broke every compiled model's graph at each attention layer on the GPU)
    from fourm_fast.ops.attention import _cuda_build_problem

    torch._dynamo.reset()
    f = torch.compile(lambda x: x + len(_cuda_build_problem()), fullgraph=True)
    assert torch.equal(f(torch.zeros(3)), torch.full((3,), float(len(_cuda_build_problem()))))


def test_dispatcher_never_falls_back_silently(monkeypatch):
    # Stand-ins for inputs on devices this machine lacks: the dispatcher reads device, dtype and
    # shape only.
    import types
    import warnings

    from fourm_fast.ops import attention as attn

    def inputs(device):
        q = types.SimpleNamespace(device=torch.device(device), dtype=torch.bfloat16, shape=(1, 1, 4, 16))
        return AttentionInputs(q, q, q, None, None, None, None, None, 0.25)

    from fourm_fast._extension import extension

    ext = extension()
    cpu_only = {**ext.build_info(), "cuda_compiled": False}
    with monkeypatch.context() as m:  # as a CPU-only build: CUDA tensors raise, naming the fix
        m.setattr(ext, "build_info", lambda: cpu_only)
        m.setattr(attn, "_cuda_build_problem_cached", None)  # asked again, then restored on exit
        with pytest.raises(RuntimeError, match="no CUDA kernels .*backend='sdpa_dense'"):
            select_backend(inputs("cuda"))
        assert select_backend(inputs("cuda"), "sdpa_dense").name == "sdpa_dense"  # chosen: no error
    attn._warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert select_backend(inputs("meta")).name == "sdpa_dense"
        assert select_backend(inputs("meta")).name == "sdpa_dense"  # once per reason
    notes = [str(w.message) for w in seen]
    assert len(notes) == 1 and "passed over" in notes[0] and "fourm_fast: device meta is not supported" in notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_backend(inputs("meta"), "sdpa_dense")  # a chosen backend runs without a note
        monkeypatch.setenv("FOURM_FAST_ATTENTION_BACKEND", "sdpa_dense")
        select_backend(inputs("meta"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_backend_packs_rows_as_varlen_sequences(monkeypatch, dtype):
    # flash-attn is not installable here: a stand-in checks the varlen contract (int32 cu_seqlens,
    # host max lengths, no empty sequence) and computes each sequence, so this tests the packing,
    # the zeros of rows without keys, strided inputs and gradients through index_select/index_copy.
    import sys

    import flash_attn_double
    from fourm_fast.ops.attention import FlashAttnBackend

    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_double.module())
    gen = torch.Generator().manual_seed(5)
    B, H, Nq, Nk, d = 4, 3, 7, 11, 16
    q = torch.randn(B, Nq, H, d, generator=gen).to(dtype).transpose(1, 2)  # a strided view, as nn.Attention passes
    k, v = (torch.randn(B, H, Nk, d, generator=gen).to(dtype) for _ in range(2))
    k_valid = torch.rand(B, Nk, generator=gen) > 0.4
    k_valid[1] = False  # a row with no key: zeros, and it never reaches the kernel
    k_valid[2] = True
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = FlashAttnBackend()(AttentionInputs(q, k, v, k_valid, None, None, None, None, 0.3))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention_reference(*ref_in, k_valid, scale=0.3)
    assert out.shape == (B, H, Nq, d) and out.dtype == dtype
    assert bool((out[1] == 0).all())
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # inputs rounded to the dtype; float32 inside
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, ref_in, g.double())):
        torch.testing.assert_close(a.double(), b, atol=2 * tol, rtol=2 * tol, msg=lambda m: f"d{name}: {m}")
    assert bool((grads[0][1] == 0).all())
    # with flash-attn importable, the reasons left are the ones that apply
    a = AttentionInputs(q, k, v, k_valid, None, None, None, None, 0.3)
    assert FlashAttnBackend().not_supported_reasons(a) == ["flash-attn runs on CUDA only"]
    seg = torch.zeros(B, Nq, dtype=torch.int32)
    odd = AttentionInputs(q[..., :12], k[..., :12], v[..., :12], k_valid, seg, seg[:, :1].expand(B, Nk), None, None, 0.3)
    reasons = "; ".join(FlashAttnBackend().not_supported_reasons(odd))
    assert "multiple of 8" in reasons and "not expressible" in reasons


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=gen, requires_grad=True) for _ in range(3))
    k_valid, meta = _metadata(2, 19, 19, "both", gen)
    args = (q, k, v, k_valid, meta["q_segment"], meta["k_segment"], meta["q_limit"], meta["k_rank"], 0.25)
    torch.library.opcheck(torch.ops.fourm_fast.masked_attention_fwd.default, args)
    torch.library.opcheck(torch.ops.fourm_fast.masked_attention_fwd.default, (q, k, v, k_valid, None, None, None, None, 0.5))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return masked_attention(q, k, v, k_valid, **meta).square().sum()

    loss = f(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = masked_attention(q, k, v, k_valid, **meta).square().sum()
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["auto", "generic", "avx2", "avx512"])
def test_huge_finite_values_in_masked_keys_do_not_reach_gradients(dtype, isa):
    # dO V^T overflows for a masked key whose V row is near FLT_MAX; its weight is 0, so its score
    # gradient must be 0 (0 * inf made every dq NaN)
    from fourm_fast._extension import extension

    codes = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 2, 6, 32, generator=g) for _ in range(4))
    k_valid = torch.tensor([[True, False, True, True, True, True], [True, True, True, True, False, True]])
    huge = v.clone()
    huge[0, :, 1] = 1e38
    huge[1, :, 4] = -3e38
    extension()._set_cpu_isa(codes[isa])
    try:
        grads = []
        for vv in (v, huge):
            ins = [t.to(dtype).requires_grad_() for t in (q, k, vv)]
            out = masked_attention(*ins, k_valid)
            grads.append(torch.autograd.grad(out, ins, do.to(dtype)))
    finally:
        extension()._set_cpu_isa(0)
    for name, a, b in zip("qk", grads[0][:2], grads[1][:2]):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # the masked rows' values do not matter


def test_direct_backward_call_rejects_other_dtypes():
    q = torch.randn(1, 2, 4, 8)
    kv = torch.ones(1, 4, dtype=torch.bool)
    out, lse = torch.ops.fourm_fast.masked_attention_fwd(q, q, q, kv, None, None, None, None, 0.3)
    for bad in (out.int(), out.double()):
        with pytest.raises(TypeError, match="grad_out and out must be float32, bfloat16 or float16"):
            torch.ops.fourm_fast.masked_attention_bwd(bad, q, q, q, out, lse, kv, None, None, None, None, 0.3)
        with pytest.raises(TypeError, match="grad_out and out must be float32, bfloat16 or float16"):
            torch.ops.fourm_fast.masked_attention_bwd(out, q, q, q, bad, lse, kv, None, None, None, None, 0.3)


def test_double_backward_raises_instead_of_dropping_terms():
    q, k, v = (torch.randn(1, 2, 4, 8, requires_grad=True) for _ in range(3))
    out = masked_attention(q, k, v, torch.ones(1, 4, dtype=torch.bool))
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # first order: fine
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        torch.autograd.grad(gq.sum(), (q, k, v), allow_unused=True)


@pytest.mark.parametrize("bad", ["k_valid_shape", "segment_dtype", "segment_shape", "one_segment", "rank_shape"])
def test_fake_impl_raises_what_the_kernel_raises(bad):
    # under torch.compile the fake impl meets bad metadata first: same exception type and message
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, H, N, d = 2, 3, 9, 16
    seg = torch.zeros(B, N, dtype=torch.int32)
    args = dict(k_valid=torch.ones(B, N, dtype=torch.bool), q_segment=None, k_segment=None, q_limit=None, k_rank=None)
    args.update({"k_valid_shape": dict(k_valid=torch.ones(B, N + 1, dtype=torch.bool)),
                 "segment_dtype": dict(q_segment=seg.long(), k_segment=seg),
                 "segment_shape": dict(q_segment=seg, k_segment=seg[:, :-1]),
                 "one_segment": dict(q_segment=seg),
                 "rank_shape": dict(q_limit=seg, k_rank=seg[:1])}[bad])

    def call(mode):
        with mode:
            q = torch.randn(B, H, N, d)
            meta = {k: (None if v is None else (mode.from_tensor(v) if isinstance(mode, FakeTensorMode) else v))
                    for k, v in args.items()}
            torch.ops.fourm_fast.masked_attention_fwd.default(q, q, q, meta["k_valid"], meta["q_segment"],
                                                              meta["k_segment"], meta["q_limit"], meta["k_rank"], 0.25)

    import contextlib

    with pytest.raises((TypeError, ValueError)) as real:
        call(contextlib.nullcontext())
    with pytest.raises(real.type, match=re.escape(str(real.value).split(",")[0].split(" got")[0])):
        call(FakeTensorMode())


# nn modules -------------------------------------------------------------------------------------

def test_attention_modules_match_4m_style_eager():
    from fourm_fast.nn import Attention, CrossAttention
    from fourm_fast.reference.attention import attention_4m_dense

    torch.manual_seed(0)
    B, N, M, C, H = 2, 13, 7, 48, 4
    x, ctx = torch.randn(B, N, C), torch.randn(B, M, C)
    attn = Attention(C, H)
    assert attn.qkv.bias is None and attn.proj.bias is None
    seg = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], dtype=torch.int32)
    rank = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()
    out = attn(x, segment=seg, limit=rank, rank=rank)  # causal within segments
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (rank[:, None, :] <= rank[:, :, None])
    additive = torch.zeros(B, 1, N, N).masked_fill(~allowed[:, None], float("-inf"))
    ref = attn.proj(attention_4m_dense(*qkv, additive, (C // H) ** -0.5).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    cross = CrossAttention(C, H)
    valid = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = cross(x, ctx, valid)
    q = cross.q(x).reshape(B, N, H, C // H).transpose(1, 2)
    kv = cross.kv(ctx).reshape(B, M, 2, H, C // H).permute(2, 0, 3, 1, 4)
    additive = torch.zeros(B, 1, 1, M).masked_fill(~valid[:, None, None], float("-inf"))
    ref = cross.proj(attention_4m_dense(q, kv[0], kv[1], additive, (C // H) ** -0.5).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert cross.q.weight.grad is not None and torch.isfinite(cross.kv.weight.grad).all()


def test_attention_modules_refuse_bad_shapes_with_clear_errors():
    # these raised ZeroDivisionError, "not enough values to unpack" and a reshape error
    from fourm_fast.nn import Attention, CrossAttention

    for cls in (Attention, CrossAttention):
        for dim, heads in ((24, 0), (24, 5), (0, 1)):
            with pytest.raises(ValueError, match=f"{cls.__name__}: num_heads must be >= 1 and divide dim >= 1; got dim {dim}, num_heads {heads}"):
                cls(dim, heads)
    attn, cross = Attention(24, 3), CrossAttention(24, 3)
    with pytest.raises(ValueError, match=r"Attention: expected a \(B, N, 24\) tensor, got shape \(7, 24\)"):
        attn(torch.randn(7, 24))
    with pytest.raises(ValueError, match=r"Attention: expected a \(B, N, 24\) tensor, got shape \(2, 7, 25\)"):
        attn(torch.randn(2, 7, 25))
    with pytest.raises(ValueError, match="CrossAttention: x has batch 2 but context has batch 3"):
        cross(torch.randn(2, 7, 24), torch.randn(3, 5, 24))
    with pytest.raises(ValueError, match=r"CrossAttention context: expected a \(B, N, 24\) tensor, got shape \(3, 5, 8\)"):
        cross(torch.randn(3, 7, 24), torch.randn(3, 5, 8))
