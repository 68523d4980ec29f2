"""fourm_fast.nn.few_rows: rows_linear for a few rows agrees with F.linear to float32 rounding, is
taken exactly where the docstring says, and the Mlp helper matches Mlp.forward."""
import pytest
import torch
import torch.nn.functional as F

from fourm_fast.model import ModalityConfig, preset
from fourm_fast.model.blocks import Mlp
from fourm_fast.nn.few_rows import (FEW_ROWS_MAX, FEW_ROWS_MAX_HALF, FEW_ROWS_MIN, HALF_ROWS_MAX_K, HALF_ROWS_MIN_BYTES,
                                    ROWS_LINEAR_MIN_BYTES, few_rows_linear, few_rows_mlp)
from fourm_fast.ops import rows_linear


def _operands(rows: int, k: int, n: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("rows", [0, 1, 3, FEW_ROWS_MIN, 7, FEW_ROWS_MAX, FEW_ROWS_MAX + 1, 97])
@pytest.mark.parametrize("n", [1, 7, 384, 17000])  # 17000 x 64 floats: over ROWS_LINEAR_MIN_BYTES
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_to_float32_rounding(rows, n, bias):
    x, w, b = _operands(rows, 64, n, bias)
    got = few_rows_linear(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # K = 64 products of O(1) terms: float32 dot-product error is well under 1e-5 relative
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, FEW_ROWS_MIN - 1, FEW_ROWS_MIN, 7, FEW_ROWS_MAX, FEW_ROWS_MAX + 1])
@pytest.mark.parametrize("n", [ROWS_LINEAR_MIN_BYTES // (4 * 48) - 1, ROWS_LINEAR_MIN_BYTES // (4 * 48) + 1])
def test_rows_linear_is_taken_exactly_for_few_float32_cpu_rows_and_large_weights(rows, n):
    x, w, b = _operands(rows, 48, n, True, seed=rows)
    got = few_rows_linear(x, w, b)
    if FEW_ROWS_MIN <= rows <= FEW_ROWS_MAX and w.numel() * 4 >= ROWS_LINEAR_MIN_BYTES:
        assert torch.equal(got, rows_linear(x, w) + b)
    else:
        assert torch.equal(got, F.linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, FEW_ROWS_MAX_HALF, FEW_ROWS_MAX_HALF + 1])
@pytest.mark.parametrize("n, k", [(HALF_ROWS_MIN_BYTES // (2 * 64) - 1, 64), (HALF_ROWS_MIN_BYTES // (2 * 64) + 1, 64),
                                  (300, HALF_ROWS_MAX_K), (300, HALF_ROWS_MAX_K + 8)])
def test_rows_linear_is_taken_exactly_for_few_half_rows(dtype, rows, n, k):
    x, w, b = _operands(rows, k, n, True, seed=rows)
    x, w, b = x.to(dtype), w.to(dtype), b.to(dtype)
    got = few_rows_linear(x, w, b)
    assert got.dtype == dtype
    if rows <= FEW_ROWS_MAX_HALF and w.numel() * 2 >= HALF_ROWS_MIN_BYTES and k <= HALF_ROWS_MAX_K:
        assert torch.equal(got, rows_linear(x, w) + b)
    else:
        assert torch.equal(got, F.linear(x, w, b))
    # either way: a float32 sum (K u32 sum|x w|) rounded to the dtype, then the bias added and
    # rounded again (at most 2 u16 (|y| + |b|)), plus half the dtype's smallest subnormal step
    ref = F.linear(x.double(), w.double(), b.double())
    u16 = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    tiny = 2.0**-134 if dtype == torch.bfloat16 else 2.0**-25
    bound = k * 2.0**-24 * (x.double().abs() @ w.double().abs().t()) + 2 * u16 * (ref.abs() + b.double().abs()) + tiny
    assert bool(((got.double() - ref).abs() <= bound).all())


def test_other_dtypes_and_leading_dims_and_strided_inputs():
    x, w, b = _operands(12, 32, 40, True)
    # float64 keeps F.linear (the measured gain is float32's)
    assert torch.equal(few_rows_linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    # (B, N, K) input and a non-contiguous view
    x3 = torch.randn(3, 4, 64)[..., ::2]
    torch.testing.assert_close(few_rows_linear(x3, w, b), F.linear(x3, w, b), rtol=1e-5, atol=1e-5)
    assert few_rows_linear(x3, w, b).shape == (3, 4, 40)


def test_gradients_agree_with_linear():
    x, w, b = _operands(6, 16, 21, True)
    for t in (x, w, b):
        t.requires_grad_(True)
    g = torch.randn(6, 21)
    grads = torch.autograd.grad((few_rows_linear(x, w, b) * g).sum(), (x, w, b))
    want = torch.autograd.grad((F.linear(x, w, b) * g).sum(), (x, w, b))
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [True, False])
def test_mlp_helper_matches_mlp_forward(gated):
    cfg = preset("tiny", (ModalityConfig("rgb", "image", 64, grid=4),), dim=96, gated_mlp=gated,
                 act="silu" if gated else "gelu")
    torch.manual_seed(0)
    mlp = Mlp(cfg)
    x = torch.randn(5, 1, 96)
    with torch.no_grad():
        torch.testing.assert_close(few_rows_mlp(mlp, x), mlp(x), rtol=1e-5, atol=1e-5)


def test_weights_strided_along_k_keep_linear():
    # rows_linear would copy a 4+ MiB weight on every call: such weights stay on F.linear.
    x = torch.randn(5, 48)
    w = torch.randn(48, 30000).t()  # (30000, 48), stride 1 along N
    assert torch.equal(few_rows_linear(x, w), F.linear(x, w))


def test_autocast_and_mixed_bias_behave_as_linear():
    # Under CPU autocast F.linear runs in bfloat16; rows_linear's float32 path ran instead for
    # 4-12 rows, so the output dtype depended on the row count
    for rows in (2, FEW_ROWS_MIN, FEW_ROWS_MAX, FEW_ROWS_MAX + 4):
        x, w, b = _operands(rows, 384, 8192, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = few_rows_linear(x, w, b), F.linear(x, w, b)
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), rows
    x, w, b = _operands(2, 384, 8192, True)
    with pytest.raises(RuntimeError):  # F.linear refuses a float32 bias beside bfloat16 x and weight
        F.linear(x.bfloat16(), w.bfloat16(), b)
    with pytest.raises(RuntimeError):
        few_rows_linear(x.bfloat16(), w.bfloat16(), b)
