"""Linear layers on a handful of rows (one autoregressive decoding step) at the speed of
streaming their weights.

``x @ W.T`` with few rows is weight-bound: the whole weight streams from memory for a few
multiply-adds per element. BLAS handles that shape unevenly across CPUs: on the 2-core AMD EPYC
(AVX2) MKL's ``F.linear`` ran well below memory speed for 2-32 rows and the swapped order
``(W @ x.T).T`` did not, while on the 2-core Xeon (AVX-512) the swapped order is the slow one
(11.8 GB/s against F.linear's 15.0 for 4 rows of the 30522 x 384 head). So 2 to FEW_ROWS_MAX
float32 rows on the CPU go to fourm_fast.ops.rows_linear, which reads each weight row from memory
once per thread block with software prefetch and does not depend on the BLAS. Weights cold in
memory, as in a decoding step, on the Xeon (``bench/bench_linear_rows.py``; GB/s of weight read):

    rows                   2      4      8     12     16     24
    30522 x 384 F.linear  21.8   15.0   13.6   12.3   11.7   10.6
                rows_lin  19.7   17.9   15.8   13.3   11.2    8.6
    1024 x 384  F.linear  21.4   17.0   14.6   12.9   11.7   10.4
                rows_lin  20.0   18.2   15.9   14.3   11.1    8.8

Past a dozen rows the AVX2 kernel's arithmetic starts to show against MKL's AVX-512, so more rows
(and one row, a matrix-vector product either way) keep ``F.linear``, as do other dtypes and GPUs.
rows_linear's sums agree with F.linear to float32 rounding, not bitwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.rows_linear import rows_linear

FEW_ROWS_MIN, FEW_ROWS_MAX = 4, 12
# Weights from this size on stream long enough for rows_linear's prefetching to pay; smaller ones
# are dominated by per-call costs, where F.linear is cheaper.
ROWS_LINEAR_MIN_BYTES = 4 << 20


def _few_rows_path(rows: int, x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and FEW_ROWS_MIN <= rows <= FEW_ROWS_MAX and weight.numel() * 4 >= ROWS_LINEAR_MIN_BYTES)


def few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _few_rows_path(rows, x, weight):
        return F.linear(x, weight, bias)
    y = rows_linear(x.reshape(rows, x.shape[-1]), weight)
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
