"""vq_lookup / vq_dequantize on the CPU: reference parity, hostile shapes, dtypes, bad input, opcheck."""
import itertools

import pytest
import torch

from fourm_fast.ops import vq_dequantize, vq_lookup
from fourm_fast.reference.vq import vq_lookup_4m, vq_lookup_cdist, vq_lookup_reference
from vq_checks import assert_vq_matches_reference, code_rounding

NS = (1, 19, 1025)
KS = (1, 7, 1031, 8192)
DS = (1, 3, 32, 64, 256)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", list(itertools.product(NS, KS, DS)))
def test_matches_reference_fp32(N, K, D, metric):
    x = torch.randn(N, D)
    cb = torch.randn(K, D)
    idx, dist = vq_lookup(x, cb, metric)
    assert_vq_matches_reference(x, cb, metric, idx, dist)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(19, 1031, 3), (1025, 7, 64), (97, 8192, 32), (123, 257, 256)])
def test_both_cpu_kernels(cpu_isa, N, K, D, metric):
    x = torch.randn(N, D) * 3
    cb = torch.randn(K, D)
    idx, dist = vq_lookup(x, cb, metric)
    assert_vq_matches_reference(x, cb, metric, idx, dist)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (19, 7, 3), (1025, 1031, 32), (97, 8192, 64), (33, 513, 256)])
def test_low_precision_inputs(N, K, D, metric, dtype):
    # Inputs in bf16/fp16 are exact in fp32, and accumulation is fp32: the same bound applies,
    # measured against the float64 reference of the very same (rounded) values, plus the rounding
    # of cosine-normalised codes to the input dtype.
    x = torch.randn(N, D).to(dtype)
    cb = torch.randn(K, D).to(dtype)
    idx, dist = vq_lookup(x, cb, metric)
    assert_vq_matches_reference(x, cb, metric, idx, dist, code_rounding=code_rounding(dtype, metric))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cosine_ranks_codes_rounded_to_input_dtype(dtype):
    # The executors normalise each code in fp32 and round it to the input dtype before the dot
    # product (the CUDA tensor cores take it in that dtype; the CPU matches it). Against those
    # rounded codes in float64 the pick is the best up to fp32 accumulation, a far tighter bound
    # than the rounding itself, so ranking unrounded codes would fail here.
    torch.manual_seed(0)
    x = torch.randn(257, 32).to(dtype)
    cb = torch.randn(4099, 32).to(dtype)
    idx, _ = vq_lookup(x, cb, "cosine")
    c = cb.float()
    rounded = (c * (1.0 / c.pow(2).sum(1).sqrt().clamp_min(1e-12))[:, None]).to(dtype).double()
    scores = x.double() @ rounded.T
    excess = scores.max(1).values - scores.gather(1, idx[:, None])[:, 0]
    tol = 4 * (32 + 4) * 2.0**-24 * x.double().norm(dim=1)
    assert (excess <= tol).all(), f"worst excess {float((excess - tol).max())}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_ties_go_to_smallest_index(cpu_isa, metric, dtype):
    # Integer-valued data keeps every fp32 sum exact, so ties are real ties (bfloat16: the AMX
    # search where the CPU has it, whose lanes each see their codes in increasing order).
    base = torch.randint(-3, 4, (11, 8)).to(dtype)
    cb = torch.cat([base, base, base])  # every code appears three times
    x = torch.randint(-3, 4, (301, 8)).to(dtype)
    idx, _ = vq_lookup(x, cb, metric)
    ref_idx, _ = vq_lookup_reference(x, cb, metric)
    assert (idx < 11).all()
    if metric == "l2":  # cosine normalisation rounds, so only the first-copy rule is exact there
        assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_dim_cosine_ties_go_to_smallest_index(cpu_isa, dtype):
    # With D = 1 every code of a row's sign is at cosine distance exactly 0. Codes normalised as
    # c * (1 / |c|) read 0.99999994 for some values and 1 for others, so the search picked a larger
    # index for 32 of 70 rows; c / |c| is exactly +-1, as F.normalize gives.
    g = torch.Generator().manual_seed(1)
    cb, x = torch.randn(33, 1, generator=g).to(dtype), torch.randn(70, 1, generator=g).to(dtype)
    idx, dist = vq_lookup(x, cb, "cosine")
    first_pos, first_neg = int((cb[:, 0] > 0).nonzero()[0]), int((cb[:, 0] < 0).nonzero()[0])
    assert torch.equal(idx, torch.where(x[:, 0] > 0, first_pos, first_neg))
    assert (dist == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_zero_and_tiny_codes_are_normalised_as_f_normalize(cpu_isa, dtype):
    """F.normalize's c / max(|c|, eps): a zero (dead) code stays zero, at distance 1 from every row,
    so it wins a tie at 1 as the smallest index; a code far below eps stays far from unit length."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]).to(dtype)
    for codes, want in ((((0.0, 0.0), (-1.0, 0.0), (0.0, -1.0)), [0, 0, 1]),
                        (((1e-20, 0.0), (-1.0, 0.0), (0.5, 0.5)), [2, 2, 1])):
        cb = torch.tensor(codes).to(dtype)
        idx, dist = vq_lookup(x, cb, "cosine")
        ref_idx, ref_dist = vq_lookup_reference(x, cb, "cosine")
        assert idx.tolist() == want and torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist, ref_dist.float(), rtol=0, atol=1e-6)


def test_benchmark_baselines_pick_the_nearest_code():
    """bench_vq's baselines (4M's expansion, cdist + argmin) answer the same question: their picks
    equal the float64 reference's where the two nearest codes are not within float32 rounding."""
    g = torch.Generator().manual_seed(12)
    x, cb = torch.randn(500, 24, generator=g), torch.randn(300, 24, generator=g)
    want, _ = vq_lookup_reference(x, cb, "l2")
    d = torch.cdist(x.double(), cb.double()) ** 2
    top2 = d.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-3
    assert clear.float().mean() > 0.95
    for baseline in (vq_lookup_4m, vq_lookup_cdist):
        got = baseline(x, cb)
        assert torch.equal(got[clear], want[clear]), baseline.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_codes_equal_picks_zero(cpu_isa, dtype):
    cb = torch.ones(1031, 5, dtype=dtype)
    idx, dist = vq_lookup(torch.randn(40, 5).to(dtype), cb)
    assert (idx == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_leading_dims_and_strides(metric, dtype):
    big = torch.randn(4, 6, 10, 64).to(dtype)
    x = big[:, ::2, 1:8, :]  # non-contiguous leading dims
    cb = torch.randn(64, 150).to(dtype).T  # (150, 64) column-major codebook
    idx, dist = vq_lookup(x, cb, metric)
    assert idx.shape == (4, 3, 7)
    assert_vq_matches_reference(x, cb, metric, idx, dist, code_rounding=code_rounding(dtype, metric))
    idx2, dist2 = vq_lookup(x.contiguous(), cb.contiguous(), metric)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(dist, dist2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_rows(dtype):
    x = torch.randn(32, 500).to(dtype).T  # (500, 32), row stride 1
    cb = torch.randn(1031, 32).to(dtype)
    idx, dist = vq_lookup(x, cb)
    assert_vq_matches_reference(x, cb, "l2", idx, dist)


def test_empty_rows():
    cb = torch.randn(7, 3)
    for shape in [(0, 3), (2, 0, 3)]:
        idx, dist = vq_lookup(torch.randn(shape), cb)
        assert idx.shape == shape[:-1] and dist.shape == shape[:-1]


def test_one_dim_x_is_a_single_row():
    cb = torch.randn(9, 4)
    idx, dist = vq_lookup(cb[3].clone(), cb)
    assert idx.shape == () and int(idx) == 3 and float(dist) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nonfinite_rows_get_minus_one(cpu_isa, metric, dtype):
    x = torch.randn(50, 16).to(dtype)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[11, 15] = -float("inf")
    cb = torch.randn(100, 16).to(dtype)
    idx, dist = vq_lookup(x, cb, metric)
    bad = torch.zeros(50, dtype=torch.bool)
    bad[[3, 7, 11]] = True
    assert (idx[bad] == -1).all() and torch.isnan(dist[bad]).all()
    assert (idx[~bad] >= 0).all() and torch.isfinite(dist[~bad]).all()
    assert_vq_matches_reference(x, cb, metric, idx, dist, code_rounding=code_rounding(dtype, metric))
    with pytest.raises(IndexError, match="NaN or inf"):
        vq_dequantize(idx, cb)


def test_a_code_whose_float32_norm_overflows_is_never_chosen(cpu_isa):
    """Finite entries, squared norm past float32 (2 x 1e40): the executors cannot score it, so it is
    not eligible, in the op and in the float64 reference alike (which could score it: x equals it)."""
    cb = torch.tensor([[1e20, 1e20], [0.0, 0.0], [1.0, 1.0], [1e15, 1e15]])
    x = torch.tensor([[1e20, 1e20], [0.9, 0.9], [-0.1, 0.0]])
    idx, _ = vq_lookup(x, cb, "l2")
    ref_idx, _ = vq_lookup_reference(x, cb, "l2")
    assert idx.tolist() == ref_idx.tolist() == [3, 2, 1]


@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30])
def test_cosine_distance_of_huge_rows_does_not_overflow(cpu_isa, scale):
    # |x|^2 overflows float32 from entries of about 1.8e19; the cosine distance does not depend on
    # |x|, so it must equal the unit-scale row's (it came out 1.0 or NaN). Picks stay right up to
    # where <x, c> itself overflows (about 1e38 / |c|).
    g = torch.Generator().manual_seed(3)
    x, cb = torch.randn(40, 24, generator=g), torch.randn(50, 24, generator=g)
    idx1, dist1 = vq_lookup(x, cb, "cosine")
    idx, dist = vq_lookup(x * scale, cb, "cosine")
    assert torch.equal(idx, idx1)
    assert torch.isfinite(dist).all()
    torch.testing.assert_close(dist, dist1, rtol=1e-5, atol=1e-5)
    _, dist_c = vq_lookup(x, cb * scale, "cosine")  # codes too large to square: the same check on c
    idx_c = vq_lookup(x, cb * scale, "cosine")[0]
    assert (idx_c == -1).all() or torch.isfinite(dist_c[idx_c >= 0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_codes_are_never_chosen(cpu_isa, dtype):
    cb = torch.randn(40, 8).to(dtype)
    x = cb[[5, 6, 7]].clone()  # exact matches of codes 5, 6, 7
    cb[5, 0] = float("nan")
    cb[6, 3] = float("inf")
    idx, dist = vq_lookup(x, cb)
    assert (idx != 5).all() and (idx != 6).all() and int(idx[2]) == 7
    cb_all_bad = torch.full((4, 8), float("nan"), dtype=dtype)
    idx, dist = vq_lookup(x, cb_all_bad)
    assert (idx == -1).all() and torch.isnan(dist).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(301, 1031, 256), (67, 4099, 32), (33, 100, 20), (257, 31, 40), (256, 17, 50)])
def test_bfloat16_searches_agree(N, K, D, metric):
    """bfloat16 rows and codes: the AMX search (ISA auto) and the float32-widening search (ISA code
    3) each pick a code within the float64 bound; on integer-valued data every l2 sum is exact in
    both, so their l2 picks, ties included, are the same codes (cosine's normalised codes are not
    integers, so only the bound applies there)."""
    from fourm_fast._extension import extension

    if extension().build_info()["cpu_kernel"] != "avx512+amx":
        pytest.skip("no AMX on this CPU: auto runs the widening search too")
    x = torch.randn(N, D).bfloat16()
    cb = torch.randn(K, D).bfloat16()
    xi, cbi = torch.randint(-3, 4, (N, D)).bfloat16(), torch.randint(-3, 4, (K, D)).bfloat16()
    widening = 3
    picks = {}
    for isa in (0, widening):
        extension()._set_cpu_isa(isa)
        try:
            idx, dist = vq_lookup(x, cb, metric)
            assert_vq_matches_reference(x, cb, metric, idx, dist, code_rounding=code_rounding(torch.bfloat16, metric))
            picks[isa] = vq_lookup(xi, cbi, "l2")
        finally:
            extension()._set_cpu_isa(0)
    assert torch.equal(picks[0][0], picks[widening][0])
    assert torch.equal(picks[0][1], picks[widening][1])  # the distance of a code is computed exactly


@pytest.mark.parametrize("scale", [1e-17, 1e-20], ids=["1e-17", "1e-20"])
def test_bfloat16_tiny_magnitudes(scale):
    """AMX tiles flush products below 2^-126: rows and codes this small go to the float32 search
    (vq_amx.h). An l2 pick does not change when rows and codes are scaled by one power of two
    (exact in bfloat16), so the picks on tiny data must meet the float64 bound of the same data
    scaled up to unit size (assert_vq_matches_reference's absolute floor of 1e-30 would pass any
    pick at this size). Cases: tiny rows and codes; normal rows, tiny codes; tiny and normal rows,
    tiny codes. (Near 1e-23 and below, products underflow float32 itself, in either search.)"""
    import math

    from vq_checks import score_tolerance
    from fourm_fast.reference.vq import pairwise_distance_f64

    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(200, 16, generator=gen) * scale).bfloat16()
    cb = (torch.randn(300, 16, generator=gen) * scale).bfloat16()
    normal = torch.randn(50, 16, generator=gen).bfloat16()
    for xs, cs in ((x, cb), (normal, cb), (torch.cat([x[:50], normal]), cb)):
        idx, _ = vq_lookup(xs, cs, "l2")
        up = 2.0 ** -math.floor(math.log2(float(cs.float().abs().max())))
        xu, cu = (xs.double() * up), (cs.double() * up)
        full = pairwise_distance_f64(xu, cu, "l2")
        excess = full.gather(1, idx[:, None])[:, 0] - full.min(1).values
        tol = score_tolerance(xu, cu, "l2")
        assert (excess <= tol).all(), f"{int((excess > tol).sum())} of {len(idx)} rows picked a farther code"


def test_bad_inputs_raise_clear_errors():
    x, cb = torch.randn(5, 8), torch.randn(7, 8)
    with pytest.raises(ValueError, match="D = 8 but the codebook has D = 9"):
        vq_lookup(x, torch.randn(7, 9))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        vq_lookup(x.long(), cb.long())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        vq_lookup(x.double(), cb.double())
    with pytest.raises(TypeError, match="share a dtype"):
        vq_lookup(x, cb.half())
    with pytest.raises(ValueError, match="empty"):
        vq_lookup(x, torch.randn(0, 8))
    with pytest.raises(ValueError, match="2-D"):
        vq_lookup(x, torch.randn(7, 8, 1))
    with pytest.raises(ValueError, match="metric"):
        vq_lookup(x, cb, "dot")
    with pytest.raises(ValueError, match="at least one dimension"):
        vq_lookup(torch.tensor(1.0), cb)


def test_dequantize():
    cb = torch.randn(10, 4, requires_grad=True)
    ids = torch.tensor([[0, 9], [3, 3]])
    out = vq_dequantize(ids, cb)
    assert out.shape == (2, 2, 4)
    assert torch.equal(out.detach(), cb.detach()[ids])
    out.sum().backward()
    assert cb.grad[3].eq(2).all() and cb.grad[1].eq(0).all()
    assert torch.equal(vq_dequantize(ids.int(), cb).detach(), out.detach())
    with pytest.raises(IndexError, match="10 is outside"):
        vq_dequantize(torch.tensor([10]), cb)
    with pytest.raises(TypeError, match="int64 or int32"):
        vq_dequantize(torch.tensor([1.0]), cb)
    with pytest.raises(ValueError, match="2-D"):
        vq_dequantize(ids, cb.detach()[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_distance_gradient(metric):
    x = torch.randn(37, 12, requires_grad=True)
    cb = torch.randn(29, 12, requires_grad=True)
    idx, dist = vq_lookup(x, cb, metric)
    w = torch.randn(37)
    (dist * w).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    cb2 = cb.detach().clone().requires_grad_()
    code = cb2[idx]
    if metric == "l2":
        d = ((x2 - code) ** 2).sum(-1)
    else:
        d = 1 - torch.nn.functional.cosine_similarity(x2, code, dim=-1, eps=1e-12)
    (d * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cb.grad, cb2.grad, rtol=1e-4, atol=1e-5)


def test_gradient_of_nonfinite_row_is_zero():
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x.requires_grad_()
    cb = torch.randn(5, 6, requires_grad=True)
    _, dist = vq_lookup(x, cb)
    torch.nan_to_num(dist, nan=0.0).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    assert torch.isfinite(cb.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck(metric, dtype):
    # opcheck's test_aot_dispatch_dynamic sums all outputs into one accumulator starting with the
    # int64 indices, which cannot take the float distance in place; that path is covered by
    # test_aot_autograd_matches_eager below instead.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(3, 19, 16, dtype=dtype, requires_grad=True)
    cb = torch.randn(33, 16, dtype=dtype, requires_grad=True)
    op = torch.ops.fourm_fast.vq_lookup.default
    torch.library.opcheck(op, (x, cb, metric), test_utils=utils)
    torch.library.opcheck(op, (x.detach(), cb.detach(), metric), test_utils=utils)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_aot_autograd_matches_eager(metric):
    torch._dynamo.reset()

    def loss_fn(z, codebook):
        idx, dist = vq_lookup(z, codebook, metric)
        return (dist * torch.arange(dist.numel()).reshape(dist.shape)).sum(), idx

    z = torch.randn(4, 25, 16, requires_grad=True)
    cb = torch.randn(40, 16, requires_grad=True)
    eager_loss, eager_idx = loss_fn(z, cb)
    eager_grads = torch.autograd.grad(eager_loss, (z, cb))
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True, dynamic=True)
    loss, idx = compiled(z, cb)
    grads = torch.autograd.grad(loss, (z, cb))
    assert torch.equal(idx, eager_idx)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def quantize(z, codebook):
        idx, dist = vq_lookup(z, codebook, "l2")
        return vq_dequantize(idx, codebook), dist.mean()

    z = torch.randn(2, 50, 8)
    cb = torch.randn(64, 8)
    q, loss = quantize(z, cb)
    idx, dist = vq_lookup(z, cb)
    torch.testing.assert_close(q, cb[idx])
    torch.testing.assert_close(loss, dist.mean())


def test_dequantize_and_select_positions_infer_shapes_on_meta_tensors():
    # their eager value checks called .item() on meta tensors ("cannot be called on meta tensors")
    from fourm_fast.ops import select_positions

    codes = vq_dequantize(torch.zeros(3, 4, dtype=torch.long, device="meta"), torch.randn(7, 5, device="meta"))
    assert codes.shape == (3, 4, 5) and codes.is_meta
    chosen = select_positions(torch.randn(3, 10, device="meta"), torch.ones(3, 10, dtype=torch.bool, device="meta"),
                              torch.tensor([1, 2, 3], device="meta"))
    assert chosen.shape == (3, 10) and chosen.dtype == torch.bool and chosen.is_meta
