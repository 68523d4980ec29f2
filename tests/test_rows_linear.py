"""rows_linear on the CPU: fp64 parity within float32's dot-product bound on hostile shapes, one
order of summation for every kernel and thread count, 16-bit inputs summed exactly as their
float32 widening, strided inputs, non-finite values, bad input, opcheck, autograd and
torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from fourm_fast._extension import extension
from fourm_fast.ops import rows_linear

op = torch.ops.fourm_fast.rows_linear.default


def _operands(r: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g), torch.randn(n, k, generator=g)


def _assert_within_dot_bound(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    # A float32 sum of K products, each lane an FMA chain and the 8 lanes added in a tree, is off
    # from the exact value by at most about K * u * sum|x_k w_k| (u = 2^-24); 1.01 covers the
    # rounding of the bound itself.
    exact = x.double() @ w.double().t()
    bound = max(x.shape[1], 1) * 2.0**-24 * 1.01 * (x.double().abs() @ w.double().abs().t())
    err = (y.double() - exact).abs()
    assert bool((err <= bound + 1e-30).all()), f"max error {err.max().item():.3g}, bound {bound.max().item():.3g}"


@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 6, 7, 13])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 17, 384, 1031])
@pytest.mark.parametrize("n", [1, 2, 3, 31, 257])
def test_matches_fp64_within_the_float32_dot_bound(cpu_isa, r, k, n):
    x, w = _operands(r, k, n, seed=r * 1000 + k + n)
    y = rows_linear(x, w)
    assert y.shape == (r, n) and y.dtype == torch.float32 and y.is_contiguous()
    _assert_within_dot_bound(y, x, w)


def _portable_loop(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows_linear with the vector kernels switched off (ISA code 1)."""
    ext = extension()
    ext._set_cpu_isa(1)
    try:
        return rows_linear(x, w)
    finally:
        ext._set_cpu_isa(0)


def _underflowing(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Every product underflows to -0, so a lane that holds any is -0: the tail lanes must keep it.
    return torch.full((5, k), -1e-30), torch.full((70, k), 1e-30)


@pytest.mark.skipif(extension().build_info()["cpu_kernel"] == "generic", reason="this CPU runs the portable loop only")
@pytest.mark.parametrize("k", [5, 8, 9, 23, 384])
@pytest.mark.parametrize("values", ["random", "underflow"])
def test_every_kernel_and_thread_count_gives_the_same_bits(k, values):
    # The lane order is the op's definition: the AVX2 kernel must return the portable loop's bits
    # (signed zeros included), and splitting the weight rows over threads must not change a sum.
    x, w = _operands(11, k, 1500, seed=k) if values == "random" else _underflowing(k)
    generic = _portable_loop(x, w)
    auto = rows_linear(x, w)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = rows_linear(x, w)
    finally:
        torch.set_num_threads(threads)
    if values == "underflow" and k >= 8:  # every lane then holds a product: the sum is -0
        assert bool((generic == 0).all()) and bool(torch.signbit(generic).all())
    assert torch.equal(torch.signbit(auto), torch.signbit(generic))
    assert torch.equal(auto, generic)
    assert torch.equal(one_thread, auto)


HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("r, k, n", [(1, 1, 1), (4, 7, 3), (5, 9, 31), (12, 384, 257), (3, 1031, 40)])
def test_half_inputs_are_the_float32_sum_rounded_once(cpu_isa, dtype, r, k, n):
    # The definition: widen (exact), sum in the float32 order, round once to the dtype.
    x, w = _operands(r, k, n, seed=r + k + n)
    x, w = x.to(dtype), w.to(dtype)
    y = rows_linear(x, w)
    assert y.dtype == dtype and y.shape == (r, n)
    assert torch.equal(y, rows_linear(x.float(), w.float()).to(dtype))
    # and so within float32's dot bound plus the one rounding to the dtype (unit roundoff u16 of
    # the result, and half its smallest subnormal step)
    exact = x.double() @ w.double().t()
    dot = max(k, 1) * 2.0**-24 * 1.01 * (x.double().abs() @ w.double().abs().t())
    u16 = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    tiny = 2.0**-134 if dtype == torch.bfloat16 else 2.0**-25
    assert bool(((y.double() - exact).abs() <= (1 + u16) * dot + u16 * exact.abs() + tiny).all())


@pytest.mark.skipif(extension().build_info()["cpu_kernel"] == "generic", reason="this CPU runs the portable loop only")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("k", [5, 8, 9, 23, 384])
def test_half_weights_give_the_portable_loops_bits(dtype, k):
    # Tails (K % 8) of 16-bit weights go through a zero-padded copy: same lanes as the loop.
    x, w = _operands(7, k, 700, seed=k)
    x, w = x.to(dtype), w.to(dtype)
    generic = _portable_loop(x, w)
    assert torch.equal(rows_linear(x, w), generic)


@pytest.mark.skipif(extension().build_info()["cpu_kernel"] == "generic", reason="this CPU runs the portable loop only")
@pytest.mark.parametrize("k", [5, 9, 16, 23])
def test_bfloat16_underflowing_lanes_keep_their_signed_zeros(k):
    # bf16 has float32's exponent range: products of 1e-30 and -1e-30 underflow to -0, and the
    # 16-bit tail's zero padding must leave such lanes as the portable loop leaves them.
    x, w = (t.to(torch.bfloat16) for t in _underflowing(k))
    generic = _portable_loop(x, w)
    auto = rows_linear(x, w)
    assert torch.equal(auto, generic) and torch.equal(torch.signbit(auto), torch.signbit(generic))
    if k >= 8:
        assert bool((auto == 0).all()) and bool(torch.signbit(auto).all())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_non_finite_values_and_overflow_like_linear(dtype):
    x, w = _operands(5, 33, 9)
    x[1, 4] = float("nan")
    x[3, 0] = float("inf")
    w[2, 7] = float("-inf")
    x, w = x.to(dtype), w.to(dtype)
    got, want = rows_linear(x, w), F.linear(x.float(), w.float()).to(dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)])  # the signs too
    if dtype == torch.float16:  # a finite float32 sum past 65504 rounds to inf, as F.linear's does
        big = rows_linear(torch.full((2, 8), 200.0, dtype=dtype), torch.full((3, 8), 50.0, dtype=dtype))
        assert bool(torch.isposinf(big).all())
        assert torch.equal(big, F.linear(torch.full((2, 8), 200.0, dtype=dtype), torch.full((3, 8), 50.0, dtype=dtype)))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_strided_inputs_and_empty_shapes(dtype):
    x, w = _operands(6, 40, 50)
    x, w = x.to(dtype), w.to(dtype)
    want = rows_linear(x, w)
    xs = torch.zeros(12, 80, dtype=dtype)
    xs[::2, ::2] = x  # strides (160, 2)
    assert torch.equal(rows_linear(xs[::2, ::2], w), want)
    assert torch.equal(rows_linear(x, w.t().contiguous().t()), want)  # K-major weight: copied
    assert rows_linear(x[:0], w).dtype == dtype and rows_linear(x[:0], w).shape == (0, 50)
    assert rows_linear(x, w[:0]).shape == (6, 0)
    zero_k = rows_linear(torch.zeros(3, 0, dtype=dtype), torch.zeros(4, 0, dtype=dtype))
    assert zero_k.dtype == dtype and torch.equal(zero_k, torch.zeros(3, 4, dtype=dtype))


def test_strided_inputs_and_empty_shapes():
    x, w = _operands(6, 40, 50)
    want = rows_linear(x, w)
    big_x = torch.zeros(12, 90)
    big_x[::2, 3:43] = x  # row stride 180, unit stride along K
    wt = w.t().contiguous().t()  # K-major weight: stride (1, N), copied by the op
    assert torch.equal(rows_linear(big_x[::2, 3:43], w), want)
    assert torch.equal(rows_linear(x, wt), want)
    xs = torch.zeros(6, 80)
    xs[:, ::2] = x  # stride 2 along K: copied
    assert torch.equal(rows_linear(xs[:, ::2], w), want)
    assert rows_linear(torch.zeros(0, 40), w).shape == (0, 50)
    assert rows_linear(x, torch.zeros(0, 40)).shape == (6, 0)
    zero_k = rows_linear(torch.zeros(3, 0), torch.zeros(4, 0))
    assert zero_k.shape == (3, 4) and torch.equal(zero_k, torch.zeros(3, 4))


def test_non_finite_values_propagate_like_linear():
    x, w = _operands(5, 33, 9)
    x[1, 4] = float("nan")
    x[3, 0] = float("inf")
    w[2, 7] = float("-inf")
    got, want = rows_linear(x, w), F.linear(x, w)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x, w, exc, message", [
    (torch.zeros(3), torch.zeros(4, 3), ValueError, "x must be 2-D"),
    (torch.zeros(2, 3, 4), torch.zeros(4, 4), ValueError, "x must be 2-D"),
    (torch.zeros(2, 3), torch.zeros(3), ValueError, "weight must be 2-D"),
    (torch.zeros(2, 3), torch.zeros(4, 5), ValueError, "x has K = 3 but weight has K = 5"),
    (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64), TypeError,
     "must both be float32, bfloat16 or float16, got x Double and weight Double"),
    (torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4, 3), TypeError, "got x BFloat16 and weight Float"),
    (torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float16), TypeError, "got x Float and weight Half"),
    (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(4, 3, dtype=torch.int32), TypeError, "got x Int"),
])
def test_bad_input_raises_clear_errors(x, w, exc, message):
    with pytest.raises(exc, match=message):
        rows_linear(x, w)
    with pytest.raises(exc, match=message):  # the fake impl agrees with the kernel's checks
        rows_linear(x.to("meta"), w.to("meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_raise_and_point_to_linear():
    x, w = _operands(4, 16, 8)
    with pytest.raises(RuntimeError, match="rows_linear: CPU only"):
        rows_linear(x.cuda(), w.cuda())


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_opcheck(dtype):
    x, w = _operands(5, 24, 37)
    x, w = x.to(dtype), w.to(dtype)
    torch.library.opcheck(op, (x.requires_grad_(), w.requires_grad_()))
    torch.library.opcheck(op, (x.detach(), w.detach()))


def test_gradients_agree_with_linear():
    x, w = _operands(6, 19, 23, seed=3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(6, 23)
    got = torch.autograd.grad((rows_linear(x, w) * g).sum(), (x, w))
    want = torch.autograd.grad((F.linear(x, w) * g).sum(), (x, w))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def head(x, w, b):
        return rows_linear(x, w) + b

    x, w = _operands(4, 32, 45)
    b = torch.randn(45)
    torch.testing.assert_close(head(x, w, b), rows_linear(x, w) + b)


def test_sparse_input_raises_instead_of_crashing():
    with pytest.raises(NotImplementedError, match="rows_linear"):
        rows_linear(torch.zeros(2, 3).to_sparse(), torch.zeros(4, 3))
