"""The bfloat16 CPU attention tiles on Intel AMX: the GEMM under them (csrc/cpu/bf16_gemm_amx.cpp)
against float64 on its bfloat16-rounded operands, and masked_attention in bfloat16 (forward and
gradients) against the float64 reference within FlashAttention's low-precision rule. Skipped on a
CPU (or kernel) without AMX-BF16; there the float32-widening tiles, tested in test_attention.py,
run instead."""

import numpy as np
import pytest
import torch

from fourm_fast._extension import extension
from fourm_fast.ops import masked_attention
from fourm_fast.reference.attention import masked_attention_reference
from attention_layouts import outputs_at_thread_counts, random_metadata

pytestmark = pytest.mark.skipif(extension().build_info()["cpu_kernel"] != "avx512+amx",
                                reason="this CPU (or its kernel) offers no AMX-BF16")


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _bf16_values(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


# m, n around the 16-row / 16-column tiles and 32 x 32 blocks, k around the 32-value k steps
GEMM_SHAPES = [(1, 1, 1), (16, 16, 32), (17, 33, 31), (31, 47, 33), (128, 256, 64), (5, 3, 100), (40, 70, 129),
               (128, 64, 200), (33, 1, 64), (1, 40, 7), (64, 130, 16), (48, 48, 96), (50, 96, 64)]


@pytest.mark.parametrize("a_f32,b_f32", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["bf16xbf16", "f32xbf16", "bf16xf32", "f32xf32"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm_matches_float64_on_rounded_operands(trans_a, trans_b, a_f32, b_f32):
    """float32 operands are scaled, then rounded to bfloat16 (nearest even, as torch rounds) when
    packed; the products of the rounded values accumulate in float32: within gamma_(k+2) of the
    float64 product of the rounded operands. alpha 1 with beta 0 or 1 has the tiles store (or
    accumulate) straight into C for blocks inside it; other blocks and factors take the scaled
    pass; a bfloat16 A with k a multiple of 32 is read in place (a last partial row group packed)."""
    rng = np.random.default_rng(11)
    for m, n, k in GEMM_SHAPES:
        a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        for alpha, beta, sa, sb in ((1.0, 0.0, 1.0, 1.0), (1.0, 1.0, 0.125, 3.0), (-0.5, 2.0, 1.0, 0.3)):
            sa, sb = (sa if a_f32 else 1.0), (sb if b_f32 else 1.0)  # bfloat16 operands take no scale
            opa, opb = _bf16_values(a * np.float32(sa)), _bf16_values(b * np.float32(sb))
            opa, opb = (opa.T if trans_a else opa), (opb.T if trans_b else opb)
            c = c0.copy() if beta else np.full((m, n), np.nan, dtype=np.float32)  # beta 0: C never read
            extension()._bf16_gemm(trans_a, trans_b, alpha, a if a_f32 else _bf16_bits(a), b if b_f32 else _bf16_bits(b),
                                   beta, c, sa, sb)
            want = alpha * (opa @ opb) + (beta * c0.astype(np.float64) if beta else 0.0)
            u = 2.0**-24
            bound = (k + 2) * u / (1 - (k + 2) * u) * (abs(alpha) * (np.abs(opa) @ np.abs(opb)) + abs(beta) * np.abs(c0))
            err = np.abs(c.astype(np.float64) - want)
            assert np.isfinite(c).all(), f"{m}x{n}x{k}: non-finite output"
            assert (err <= bound + 1e-30).all(), f"{m}x{n}x{k} alpha {alpha} beta {beta}: error {err.max():.3g}"


def test_output_rounding_is_torchs_bit_for_bit():
    """The tiles write bfloat16 outputs with their own vector rounding: it must give torch's bits
    (nearest even, subnormals kept; NaN as c10::BFloat16's 0x7FC0) on ties, carries into the exponent, infinities,
    NaNs and subnormals, and on random values of every magnitude; lengths off the 16-lane width."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 1.17e-38, 3.4e38, -3.39e38, 1.0, 65504.0],
                       dtype=np.float32)
    ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    carry = (np.arange(1, 2000, dtype=np.uint32) << 16 | 0xFFFF).view(np.float32)  # rounds into the next binade
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 50_003, dtype=np.uint64).astype(np.uint32).view(np.float32)
    for x in (special, ties, carry, bits, bits[:17], bits[:1]):
        got = np.empty(x.shape, dtype=np.uint16)
        extension()._bf16_round(x, got)
        want = _bf16_bits(x)
        nan = np.isnan(x)  # NaN bits differ between torch's scalar (0x7FC0) and vector (0xFFFF) paths
        np.testing.assert_array_equal(got[~nan], want[~nan])
        assert (got[nan] == 0x7FC0).all()


def test_gemm_rejects_bad_operands():
    a = np.zeros((4, 4), dtype=np.float64)
    with pytest.raises(TypeError, match="float32 or uint16"):
        extension()._bf16_gemm(False, False, 1.0, a, a.astype(np.float32), 0.0, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="do not agree"):
        extension()._bf16_gemm(False, False, 1.0, np.zeros((4, 3), np.float32), np.zeros((4, 4), np.float32), 0.0,
                               np.zeros((4, 4), np.float32))


def test_gemm_refused_when_amx_is_switched_off():
    extension()._set_cpu_isa(3)
    try:
        with pytest.raises(RuntimeError, match="AMX kernels are not available"):
            z = np.zeros((2, 2), np.float32)
            extension()._bf16_gemm(False, False, 1.0, z, z, 0.0, z.copy())
    finally:
        extension()._set_cpu_isa(0)


def _inputs(B, H, Nq, Nk, d, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=gen).bfloat16()
    k, v = (torch.randn(B, H, Nk, d, generator=gen).bfloat16() for _ in range(2))
    k_valid, meta = random_metadata(B, Nq, Nk, kind, gen)
    g = torch.randn(B, H, Nq, d, generator=gen).bfloat16()
    return q, k, v, k_valid, meta, g


def _check_flash_rule(q, k, v, k_valid, meta, g):
    """|x - ref| <= 2 max|naive - ref| + eps for the output and each gradient: ref in float64, naive
    the same formula evaluated eagerly in bfloat16 (FlashAttention's test rule)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, k_valid, **meta)
    assert out.dtype == torch.bfloat16
    got = (out, *torch.autograd.grad(out, (q, k, v), g))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention_reference(*ref_in, k_valid, **meta)
    want = (ref, *torch.autograd.grad(ref, ref_in, g.double()))
    naive_in = [t.detach().requires_grad_() for t in (q, k, v)]
    naive = masked_attention_reference(*naive_in, k_valid, **meta, dtype=torch.bfloat16)
    low = (naive, *torch.autograd.grad(naive, naive_in, g))
    for name, x, r, n in zip(("out", "dq", "dk", "dv"), got, want, low):
        assert x.dtype == torch.bfloat16 and torch.isfinite(x).all(), f"{name}: dtype {x.dtype} or non-finite"
        assert x.shape == r.shape, f"{name}: shape {tuple(x.shape)}"
        if x.numel() == 0:  # Nk = 0: empty dK, dV
            continue
        limit = 2 * (n.double() - r).abs().max().item() + 1e-3
        err = (x.double() - r).abs().max().item()
        assert err <= limit, f"{name}: error {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("kind", ["padding", "segments", "ranks", "both"])
@pytest.mark.parametrize("B,H,Nq,Nk,d", [(1, 1, 2, 1, 16), (2, 3, 17, 128, 32), (1, 12, 128, 17, 64),
                                         (2, 1, 257, 130, 128), (1, 3, 130, 257, 64), (2, 2, 33, 33, 80),
                                         (2, 2, 19, 23, 20), (1, 3, 40, 37, 72), (2, 3, 1, 30, 64), (2, 2, 9, 0, 32)])
def test_matches_float64_within_the_flash_rule(B, H, Nq, Nk, d, kind):
    _check_flash_rule(*_inputs(B, H, Nq, Nk, d, kind, seed=B + 7 * Nq + 13 * Nk + d))


def test_non_contiguous_views_and_overlapping_rows():
    B, N, H, d = 2, 33, 3, 32
    x = torch.randn(B, N, 3, H, d).bfloat16()
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d) views into one qkv
    _, _, _, k_valid, meta, _ = _inputs(B, H, N, N, d, "both", seed=5)
    g = torch.randn(B, N, H, d).bfloat16().transpose(1, 2)  # grad_out as nn.Attention's reshape sends it
    _check_flash_rule(q, k, v, k_valid, meta, g)
    k1 = torch.randn(B, H, 1, d).bfloat16().expand(B, H, N, d)  # stride 0 along N: copied first
    _check_flash_rule(q, k1, v, k_valid, meta, g)


def test_queries_that_see_nothing_get_zeros_and_zero_grads():
    B, H, N, d = 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, N, d).bfloat16().requires_grad_() for _ in range(3))
    k_valid = torch.ones(B, N, dtype=torch.bool)
    k_valid[1] = False
    q_seg = torch.zeros(B, N, dtype=torch.int32)
    q_seg[0, :5] = 9  # a segment with no keys
    out = masked_attention(q, k, v, k_valid, q_seg, torch.zeros(B, N, dtype=torch.int32))
    assert (out[1] == 0).all() and (out[0, :, :5] == 0).all()
    out.float().sum().backward()
    assert (q.grad[1] == 0).all() and (q.grad[0, :, :5] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_backward_writes_every_gradient_element():
    """dK / dV accumulate in float32 scratch reused across (batch, head) pairs and dQ is written
    block by block: NaN-filled buffers of the gradients' size are freed before each call, and the
    result must still be finite and within the rule (keys no query sees, blocks with disjoint and
    overlapping key ranges, a first block that sees nothing)."""
    B, H, N, d = 3, 3, 130, 32  # more pairs than threads: each thread's scratch serves several
    gen = torch.Generator().manual_seed(17)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen).bfloat16() for _ in range(4))
    k_valid = torch.rand(B, N, generator=gen) > 0.1
    k_valid[:, -5:] = False
    seg = torch.randint(0, 5, (B, N), generator=gen, dtype=torch.int32).sort(dim=1).values
    rank = torch.arange(N, dtype=torch.int32).expand(B, N).contiguous()
    limit = torch.randint(-1, N, (B, N), generator=gen, dtype=torch.int32)
    limit[:2][seg[:2] == seg[:2, :1]] = -1  # the first block of rows 0 and 1 sees nothing; row 2's does
    meta = dict(q_segment=seg, k_segment=seg.clone(), q_limit=limit, k_rank=rank)
    for _ in range(3):
        junk = [torch.full((B, H, N, d), float("nan"), dtype=torch.bfloat16) for _ in range(6)]
        del junk
        _check_flash_rule(q, k, v, k_valid, meta, g)


def test_amx_and_widening_tiles_agree():
    """The AMX tiles (ISA auto) and the float32-widening tiles (ISA code 3, AVX-512 without AMX)
    compute the same attention; they differ only by P and dS being rounded to bfloat16."""
    q, k, v, k_valid, meta, g = _inputs(2, 3, 130, 130, 64, "both", seed=3)
    results = {}
    for isa in (0, 3):
        extension()._set_cpu_isa(isa)
        try:
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = masked_attention(qq, kk, vv, k_valid, **meta)
            results[isa] = (out, *torch.autograd.grad(out, (qq, kk, vv), g))
        finally:
            extension()._set_cpu_isa(0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], results[3]):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2, msg=lambda m: f"{name}: {m}")


def test_backward_with_float32_grad_or_out_takes_the_widening_tiles():
    """A direct call of the backward op with float32 grad_out (or out) beside bfloat16 q, k, v is
    valid (the float32 tiles widen whatever they get); it must not reach the bfloat16-only AMX
    tiles."""
    q, k, v, k_valid, meta, g = _inputs(2, 2, 40, 40, 32, "padding", seed=8)
    out, lse = torch.ops.fourm_fast.masked_attention_fwd(q, k, v, k_valid, None, None, None, None, 0.2)
    want = torch.ops.fourm_fast.masked_attention_bwd(g, q, k, v, out, lse, k_valid, None, None, None, None, 0.2)
    for g_, o_ in ((g.float(), out), (g, out.float())):
        got = torch.ops.fourm_fast.masked_attention_bwd(g_, q, k, v, o_, lse, k_valid, None, None, None, None, 0.2)
        for a, b in zip(got, want):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("B,H,N", [(1, 1, 300), (1, 3, 257), (4, 4, 130)], ids=["1-pair", "3-pairs", "16-pairs"])
def test_gradients_do_not_depend_on_the_thread_count(B, H, N):
    """As for the float32 tiles (test_attention.py): under 16 pairs the backward's chunks are summed
    in a fixed order, so 1 and 2 threads give the same bits; both within the flash rule."""
    q, k, v, k_valid, meta, g = _inputs(B, H, N, N, 32, "both", seed=29)
    meta["q_segment"] = meta["q_segment"].sort(dim=1).values
    meta["k_segment"] = meta["k_segment"].sort(dim=1).values
    results = outputs_at_thread_counts(q, k, v, k_valid, meta, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    _check_flash_rule(q, k, v, k_valid, meta, g)


def test_opcheck_and_compile_in_bfloat16():
    """The registered op in bfloat16 (AMX tiles forward and backward): schema, fake tensors and
    autograd registration (opcheck), and torch.compile(fullgraph) against eager."""
    q, k, v, k_valid, meta, _ = _inputs(2, 3, 40, 40, 32, "both", seed=31)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, k_valid, meta["q_segment"], meta["k_segment"], meta["q_limit"], meta["k_rank"], 0.25)
    torch.library.opcheck(torch.ops.fourm_fast.masked_attention_fwd.default, args)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return masked_attention(q, k, v, k_valid, **meta).float().square().sum()

    loss = f(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = masked_attention(q, k, v, k_valid, **meta).float().square().sum()
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, e)
