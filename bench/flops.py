"""Executed FLOPs of a callable, counted by torch.utils.flop_counter (matrix products, SDPA) plus
fourm_fast's masked_attention, counted as the dense product it replaces (4 B H Nq Nk d forward,
whatever tiles the metadata let it skip), and rows_linear as the product it is (2 R N K), so a
fused op and an eager baseline count alike.

Equal FLOP counts mean a speedup can only come from running them faster; the ratio of counts
bounds what skipping work has bought."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from fourm_fast.ops.attention import masked_attention as _registers_fourm_fast_ops

del _registers_fourm_fast_ops  # imported for its side effect: torch.ops.fourm_fast exists now
_ops = torch.ops.fourm_fast


@register_flop_formula(_ops.masked_attention_fwd)
def _masked_attention_fwd_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, Nq, d = q_shape
    return 4 * B * H * Nq * k_shape[2] * d


@register_flop_formula(_ops.masked_attention_bwd)
def _masked_attention_bwd_flops(g_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, Nq, d = q_shape
    return 8 * B * H * Nq * k_shape[2] * d  # dV, dP, dQ, dK: the eager backward's four products


@register_flop_formula(_ops.rows_linear)
def _rows_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * w_shape[0] * x_shape[1]


def count_flops(fn) -> int:
    """Run fn() once and return the FLOPs it executed."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
