"""The CPU attention row passes' own exponential (csrc/cpu/attention_cpu_rows.h, exp_lanes), measured
against float64 over the float32 range, in both ISA copies; and what non-finite scores do to
masked_attention rows that do or do not see them."""

import numpy as np
import pytest
import torch

from fourm_fast._extension import extension
from fourm_fast.ops import masked_attention


def _exp(x: np.ndarray) -> np.ndarray:
    y = np.ascontiguousarray(x, dtype=np.float32).copy()
    extension()._cpu_exp(y)
    return y


def test_exp_within_two_ulp_over_the_float_range(cpu_isa):
    # Every 997th float32 bit pattern whose e^x is finite and not zero in float32: normal and
    # subnormal results alike, error in units of the float32 spacing at the true value.
    x = np.arange(0, 2**32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (x >= -103.9) & (x <= 88.72)]
    assert x.size > 2_000_000
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
    err = np.abs(_exp(x).astype(np.float64) - ref) / ulp
    worst = int(err.argmax())
    # Degree-7 Taylor truncation is ~0.1 ulp; the rest is rounding of the reduction and Horner
    # steps. Measured: 0.92 ulp with FMA, 1.2 without.
    assert err.max() <= 2.0, f"{err.max():.2f} ulp at x = {x[worst]!r}"


def test_exp_special_values(cpu_isa):
    x = np.array([-np.inf, -1e4, -112.0, -104.0, 0.0, -0.0, 1e-30, 88.73, 89.0, 1e4, np.inf, np.nan],
                 dtype=np.float32)
    y = _exp(x)
    assert (y[:4] == 0.0).all()  # masked scores are -inf: exactly 0, not a subnormal
    assert (y[4:7] == 1.0).all()
    assert np.isposinf(y[7:11]).all()
    assert np.isnan(y[11])


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33])  # 4-, 8- and 16-lane edges
def test_exp_partial_vectors(n, cpu_isa):
    """Lengths that are not whole vectors: the tail is computed, and nothing past n is written."""
    buf = np.full(n + 4, 7.0, dtype=np.float32)
    buf[:n] = -np.arange(n, dtype=np.float32) / 3
    x = buf[:n].astype(np.float64)  # e^x of the float32 inputs (at -10, -k/3's own rounding is 4e-7)
    extension()._cpu_exp(buf[:n])
    np.testing.assert_allclose(buf[:n], np.exp(x), rtol=3e-7)
    assert (buf[n:] == 7.0).all()


def test_exp_rejects_other_buffers():
    with pytest.raises(TypeError, match="float32"):
        extension()._cpu_exp(np.zeros(4, dtype=np.float64))
    with pytest.raises(TypeError, match="float32"):
        extension()._cpu_exp(np.zeros(4, dtype=np.int32))
    with pytest.raises((TypeError, BufferError, ValueError)):
        extension()._cpu_exp(np.zeros((4, 4), dtype=np.float32)[:, 1])  # not contiguous


@pytest.mark.parametrize("Nk", [5, 40])
def test_nan_score_reaches_only_the_rows_that_see_it(Nk, cpu_isa):
    """A NaN in one key makes the output of every query that sees that key NaN (as softmax does),
    and leaves queries it is hidden from exact: hidden scores are replaced, never combined."""
    B, H, Nq, d = 1, 2, 6, 16
    gen = torch.Generator().manual_seed(Nk)
    q, k, v = (torch.randn(B, H, n, d, generator=gen) for n in (Nq, Nk, Nk))
    k_valid = torch.ones(B, Nk, dtype=torch.bool)
    rank = torch.arange(Nk, dtype=torch.int32)[None]
    limit = torch.tensor([[0, 1, 2, Nk - 1, Nk - 1, 2]], dtype=torch.int32)  # causal-style limits
    clean = masked_attention(q, k, v, k_valid, q_limit=limit, k_rank=rank)
    k_bad = k.clone()
    k_bad[..., 3, 0] = float("nan")  # key 3: seen by queries 3 and 4 only
    out = masked_attention(q, k_bad, v, k_valid, q_limit=limit, k_rank=rank)
    sees = (limit[0] >= 3).tolist()
    for i, s in enumerate(sees):
        if s:
            assert out[0, :, i].isnan().all(), f"query {i} sees the NaN key"
        else:
            torch.testing.assert_close(out[0, :, i], clean[0, :, i], atol=0, rtol=0)


@pytest.mark.parametrize("Nk", [5, 40])
def test_huge_hidden_key_changes_nothing(Nk, cpu_isa):
    """A padded key in the middle of the key range with enormous (finite) values: its score would
    overflow exp, so unless the row passes replace hidden scores before exponentiating, forward or
    backward would meet inf * 0. Outputs and all gradients must equal those with a tame key."""
    B, H, Nq, d = 2, 2, 7, 16
    gen = torch.Generator().manual_seed(100 + Nk)
    q, k, v = (torch.randn(B, H, n, d, generator=gen) for n in (Nq, Nk, Nk))
    k_valid = torch.ones(B, Nk, dtype=torch.bool)
    k_valid[:, 2] = False
    k_huge = k.clone()
    k_huge[:, :, 2] = 1e30 * torch.sign(q.mean(dim=2))  # aligned with the queries: scores ~ +1e30
    g = torch.randn(B, H, Nq, d, generator=gen)
    results = []
    for keys in (k, k_huge):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, keys, v))
        out = masked_attention(qq, kk, vv, k_valid)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), g)
        results.append((out, dq, dk, dv))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert b.isfinite().all(), f"{name} is not finite"
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
