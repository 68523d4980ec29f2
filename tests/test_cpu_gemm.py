"""sgemm_rows, the GEMM under the CPU attention tiles (csrc/cpu/cpu_gemm.h): fourm_fast's own AVX2 and
AVX-512 kernels for small k (csrc/cpu/small_gemm_avx2.cpp, small_gemm_avx512.cpp), MKL's sgemm_ and
ATen (the fallback), against float64 with the standard error bound of a float32 dot product."""

import numpy as np
import pytest

from fourm_fast._extension import extension


def _gemm(trans_a, trans_b, alpha, a, b, beta, c):
    extension()._sgemm_rows(trans_a, trans_b, alpha, a, b, beta, c)
    return c


def _check(trans_a, trans_b, m, n, k, alpha=1.0, beta=0.0, seed=0):
    rng = np.random.default_rng(seed + 7919 * m + 104729 * n + k)
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    c0 = rng.standard_normal((m, n), dtype=np.float32)
    c = c0.copy() if beta != 0.0 else np.full((m, n), np.nan, dtype=np.float32)  # beta 0: C never read
    opa = (a.T if trans_a else a).astype(np.float64)
    opb = (b.T if trans_b else b).astype(np.float64)
    want = alpha * (opa @ opb) + (beta * c0.astype(np.float64) if beta != 0.0 else 0.0)
    got = _gemm(trans_a, trans_b, alpha, a, b, beta, c).astype(np.float64)
    # |fl(sum) - sum| <= gamma_(k+2) (|alpha| |A| |B| + |beta| |C|), gamma_j = j u / (1 - j u)
    u = 2.0**-24
    gamma = (k + 2) * u / (1 - (k + 2) * u)
    bound = gamma * (abs(alpha) * (np.abs(opa) @ np.abs(opb)) + abs(beta) * np.abs(c0)) + 1e-30
    err = np.abs(got - want)
    worst = np.unravel_index(int(np.argmax(err / bound)), err.shape) if err.size else None
    assert np.isfinite(got).all(), "non-finite output (was C read with beta = 0?)"
    assert (err <= bound).all(), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


# m around the register tiles' rows (6 for AVX2, 12 for AVX-512), n around their strips (16 and 32
# columns, and a one-vector AVX-512 strip of 16 or fewer), k up to past the small kernels' limit
# (512), where MKL takes over
SHAPES = [(1, 1, 1), (1, 17, 3), (5, 1, 64), (6, 16, 64), (7, 17, 64), (13, 33, 7), (12, 32, 128),
          (97, 31, 20), (128, 128, 64), (128, 64, 128), (21, 21, 64), (3, 200, 257), (130, 5, 512),
          (17, 19, 513), (2, 40, 1000)]


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_float64_within_the_error_bound(m, n, k, trans_a, trans_b, cpu_isa, cpu_gemm):
    _check(trans_a, trans_b, m, n, k)


def _isa_available(code):
    try:
        extension()._set_cpu_isa(code)
    except ValueError:
        return False
    finally:
        extension()._set_cpu_isa(0)
    return True


@pytest.mark.parametrize("isa", [2, 3], ids=["avx2", "avx512"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
def test_each_kernel_on_every_shape(isa, trans_a, trans_b):
    # Each of fourm_fast's own kernels the CPU can run, forced by its ISA code, on every shape with
    # and without alpha and beta (the cpu_isa fixture covers the default and the portable path).
    if not _isa_available(isa):
        pytest.skip(f"this CPU cannot run ISA code {isa}")
    extension()._set_cpu_isa(isa)
    try:
        for m, n, k in SHAPES:
            _check(trans_a, trans_b, m, n, k)
            _check(trans_a, trans_b, m, n, k, alpha=-2.0, beta=0.5)
    finally:
        extension()._set_cpu_isa(0)


def test_unknown_or_unsupported_isa_is_refused():
    with pytest.raises(ValueError, match="unknown CPU ISA code 5"):
        extension()._set_cpu_isa(5)
    kernel = extension().build_info()["cpu_kernel"]
    if not kernel.startswith("avx512"):  # auto picks the widest kernels, so a CPU without them refuses code 3
        with pytest.raises(ValueError, match="lacks AVX-512F"):
            extension()._set_cpu_isa(3)
    if kernel != "avx512+amx":
        with pytest.raises(ValueError, match="no AMX-BF16"):
            extension()._set_cpu_isa(4)
    assert extension().build_info()["cpu_kernel"] == kernel  # a refused code leaves the choice alone
    if kernel.startswith("avx512"):  # code 2 keeps every kernel on AVX2, even on an AVX-512 CPU
        extension()._set_cpu_isa(2)
        try:
            assert extension().build_info()["cpu_kernel"] == "avx2+fma"
        finally:
            extension()._set_cpu_isa(0)
    if kernel == "avx512+amx":  # code 3 keeps AVX-512 and leaves AMX out
        extension()._set_cpu_isa(3)
        try:
            assert extension().build_info()["cpu_kernel"] == "avx512"
        finally:
            extension()._set_cpu_isa(0)


@pytest.mark.parametrize("alpha,beta", [(0.125, 0.0), (1.0, 1.0), (-2.0, 0.5)])
@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])
def test_alpha_and_beta(alpha, beta, trans_a, trans_b, cpu_isa):
    for m, n, k in [(7, 17, 64), (128, 64, 128), (1, 3, 2)]:
        _check(trans_a, trans_b, m, n, k, alpha=alpha, beta=beta)


def test_only_c_is_written():
    """Masked column tails: nothing right of C's last column (here the next row's head) or past its
    end may change."""
    rng = np.random.default_rng(3)
    for trans_b in (False, True):
        for n in (1, 9, 17, 30):
            m, k = 7, 33
            a = rng.standard_normal((m, k), dtype=np.float32)
            b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
            buf = np.full(m * n + 64, 5.0, dtype=np.float32)
            c = buf[: m * n].reshape(m, n)
            _gemm(False, trans_b, 1.0, a, b, 0.0, c)
            assert (buf[m * n :] == 5.0).all(), f"n = {n}: wrote past C"
            np.testing.assert_allclose(c, a @ (b.T if trans_b else b), rtol=1e-4, atol=1e-4)


def test_empty_sum_scales_c():
    c = np.ones((3, 4), dtype=np.float32)
    _gemm(False, False, 1.0, np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), 0.5, c)
    assert (c == 0.5).all()


def test_rejects_bad_arguments():
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="do not agree"):
        _gemm(False, False, 1.0, a, np.zeros((4, 2), np.float32), 0.0, np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="float32"):
        _gemm(False, False, 1.0, a.astype(np.float64), np.zeros((3, 2), np.float32), 0.0, np.zeros((2, 2), np.float32))
