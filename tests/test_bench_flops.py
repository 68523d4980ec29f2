"""bench/flops.py counts fourm_fast's masked_attention like the eager attention it replaces and
rows_linear like F.linear, so the benchmarks' FLOP ratios compare like with like."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flops import count_flops  # noqa: E402
from fourm_fast.ops.attention import masked_attention  # noqa: E402


def _eager(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def test_masked_attention_counts_as_eager_forward_and_backward():
    B, H, Nq, Nk, d = 2, 3, 5, 7, 16
    q = torch.randn(B, H, Nq, d, requires_grad=True)
    k = torch.randn(B, H, Nk, d, requires_grad=True)
    v = torch.randn(B, H, Nk, d, requires_grad=True)
    valid = torch.ones(B, Nk, dtype=torch.bool)
    with torch.no_grad():
        fwd = count_flops(lambda: masked_attention(q, k, v, valid))
        assert fwd == count_flops(lambda: _eager(q, k, v)) == 4 * B * H * Nq * Nk * d
    both = count_flops(lambda: masked_attention(q, k, v, valid).sum().backward())
    assert both == count_flops(lambda: _eager(q, k, v).sum().backward()) == 3 * fwd


def test_rows_linear_counts_as_the_linear_it_replaces():
    from fourm_fast.ops import rows_linear

    x, w = torch.randn(5, 24), torch.randn(37, 24)
    with torch.no_grad():
        assert count_flops(lambda: rows_linear(x, w)) == count_flops(lambda: torch.nn.functional.linear(x, w)) == 2 * 5 * 37 * 24
