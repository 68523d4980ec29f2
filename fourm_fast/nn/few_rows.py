"""Linear layers on a handful of rows (one autoregressive decoding step), in the operand order the
CPU's BLAS runs fastest.

``x @ W.T`` with few rows is weight-bound: the whole weight streams from memory for a few dot
products per element. PyTorch's CPU build hands ``F.linear`` to MKL as an (M x K) by (K x N)^T
product, and for 2-32 rows MKL runs that order well below memory speed on the 2-core AMD EPYC
(AVX2) we measure on; the same product as ``(W @ x.T).T`` (N x K by K x M) streams W at memory
speed. Measured there by ``bench/bench_linear_rows.py`` (``F.linear`` time / ``(W @ x.T).T`` time,
best of 7 alternating, float32, K = 384; rows in bench/results/linear_rows.jsonl):

    rows              4      8     32          rows              4      8     32
    N 30522, 2 thr   3.4x   2.6x   1.6x        N 30522, 1 thr   2.2x   1.4x   1.3x
    N 8192,  2 thr   3.1x   2.1x   1.7x        N 8192,  1 thr   2.2x   1.8x   1.3x
    N 1024,  2 thr   1.3x   0.9x   1.2x        N 1024,  1 thr   0.9x   0.6x   1.1x

The wide products (the output heads) win on either thread count. The narrow ones (the blocks'
projections) win at 4 and 32 rows on 2 threads, break even at 8, and lose at 4-8 rows on 1
thread. End to end the heads dominate: one cached
caption decoding (bench_generate's "rgb->caption ar32", batch 4) went from 1.29 s to 0.85 s on 2
threads and 1.41 s to 1.12 s on 1 thread with every layer swapped, against 1.00 s and 1.17 s with
the heads alone, so every layer takes the swap. One row is a matrix-vector product either
way, and from a few dozen rows on the order stops mattering or goes the other way (the transposed
result then also costs a copy downstream), so only 2-32 float32 rows on the CPU take the swapped
order; everything else is ``F.linear``. The two orders sum each dot product differently, so results
agree to float32 rounding, not bitwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEW_ROWS_MAX = 32


def _swapped(rows: int, x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and 2 <= rows <= FEW_ROWS_MAX


def few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _swapped(rows, x) or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def few_rows_layer(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` for an ``nn.Linear``, through few_rows_linear."""
    return few_rows_linear(x, layer.weight, layer.bias)


def few_rows_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """A fourm_fast.model.blocks.Mlp applied with few_rows_linear (same algebra as Mlp.forward)."""
    h = mlp.act(few_rows_layer(mlp.fc1, x))
    if mlp.gated:
        h = h * few_rows_layer(mlp.fc3, x)
    return few_rows_layer(mlp.fc2, h)
