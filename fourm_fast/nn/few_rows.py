"""Linear layers on a handful of rows (one autoregressive decoding step) at the speed of
streaming their weights.

``x @ W.T`` with few rows is weight-bound: the whole weight streams from memory for a few
multiply-adds per element. BLAS handles that shape unevenly across CPUs: on the 2-core AMD EPYC
(AVX2) MKL's ``F.linear`` ran well below memory speed for 2-32 rows of the output heads (and the
swapped order ``(W @ x.T).T`` did not), while on the 2-core Xeon (AVX-512) the swapped order is
the slow one. So FEW_ROWS_MIN-FEW_ROWS_MAX float32 rows times a weight of ROWS_LINEAR_MIN_BYTES or
more go to fourm_fast.ops.rows_linear, which streams the weight with software prefetch and does
not depend on the BLAS; everything else is ``F.linear``. Weights cold in memory, as in a decoding
step, GB/s of weight read on the Xeon (``bench/bench_linear_rows.py``, roofline about 23 GB/s,
rows in bench/results/linear_rows.jsonl; 829bc81 for dim 384, ebe1eb5 for dim 768):

    rows                    1      2      4      8     12     16     32
    30522 x 384 F.linear  24.1   22.7   14.2   13.4   12.3   11.5    9.0
                swapped   24.3   11.6   11.8   11.7   11.9   12.3    9.7
                rows_lin  21.6   20.1   18.3   16.1   14.3   11.3    6.6
    8192 x 384  F.linear  23.2   22.3   12.7    9.3    7.9   10.9    8.9
                rows_lin  22.2   19.3   18.0   15.3   13.9   10.9    6.5
    1024 x 384  F.linear  23.9   23.9   16.9   14.3   12.8   12.1    9.8
                rows_lin  21.9   19.2   16.4   15.4   12.4   11.2    6.8
    3072 x 768  F.linear  24.0   23.6   14.0   10.8    8.7   10.9    8.3
                rows_lin  21.4   20.6   18.3   15.0   12.1   10.1    6.2

The weights of 4 MiB and more are the heads at the tiny preset (dim 384) and also the blocks' qkv
and MLP weights from dim 768 on. In the table rows_linear won by 1.16-1.76x at 4-12 rows on the
heads and on 3072 x 768, a weight size the base preset does not have: its SwiGLU MLP weights are
2048 x 768 and 768 x 2048. Remeasured on those and on qkv 2304 x 768 at 21c501b, on a day the
roofline read 15 GB/s instead of 23, the float32 runs were inconclusive: rows_linear 0.69-1.40x
F.linear at 4-12 rows, varying from cell to cell by more than the two methods differ. The policy
stands until a quieter run (rows in linear_rows.jsonl). On the tiny preset's block weights (1.7 MiB
and less) it ran at 0.76-1.11x F.linear's speed for 4-12 rows
(slowest on the 384 x 1024 projection), so they keep F.linear; so do 1-3 rows, past a dozen rows (where the AVX2
kernel's arithmetic shows against MKL's AVX-512), weights not unit-stride along K (rows_linear
would copy them on every call), float64 and GPUs (16-bit dtypes: below). Not remeasured on the
EPYC: there the
swapped order had beaten F.linear on 2-3 and 13-32 rows, which now take F.linear.
rows_linear's sums agree with F.linear to float32 rounding, not bitwise.

bfloat16 / float16 (x and weight of one dtype, as in a model cast to bf16): rows_linear widens the
weight in registers as it streams. bf16 F.linear read the tiny preset's weights at only 6-13 GB/s
for 1-8 rows (``bench_linear_rows.py --dtype bfloat16``, 2-core Xeon, rows with dtype bfloat16 in
linear_rows.jsonl). rows_linear read them at 10-17 GB/s for 1-4 rows: 1.14-2.11x F.linear's
speed, the heads included. From 8 rows its widening and multiply-adds cost more than the memory
(0.77-1.15x), and the weight with K = 3072 lost at every row count (0.43-0.83x). So
1-FEW_ROWS_MAX_HALF 16-bit rows times a weight of HALF_ROWS_MIN_BYTES or more with K <=
HALF_ROWS_MAX_K take rows_linear; the rest take F.linear. The K limit came from that 3072-wide
weight; the base preset's widest is its MLP's fc2, K = 2048, which the noisy remeasure at 21c501b
(above) put at 1.45x for 2 rows and 0.69x for 4: not yet a reason to move the limit. The swapped order ``(W @ x.T).T`` read
2-4 bf16 rows faster still on the heads and the dim-768 blocks (19-26 GB/s against rows_linear's
13-19). It is not used: rows_linear's speed is its own code's, while which order a BLAS runs fast
depends on the BLAS build and the CPU (in float32 the swapped order was the slow one here and the
fast one on the EPYC). float16 follows the bfloat16 policy, measured after it was set
(``--dtype float16``, the same file): F.linear read 5.6-13.6 GB/s and the swapped order no better,
rows_linear 1.10-2.11x F.linear at 1-4 rows on every weight with K <= 1024, still 1.03-1.46x at
8 rows, and 0.93-1.35x at 1-4 rows with K = 3072.
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
FEW_ROWS_MAX_HALF = 4
HALF_ROWS_MIN_BYTES = 256 << 10
HALF_ROWS_MAX_K = 1024
_HALF = (torch.bfloat16, torch.float16)


def _few_rows_path(rows: int, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if torch.is_autocast_enabled("cpu"):  # F.linear's autocast dtype, whatever the row count
        return False
    if bias is not None and bias.dtype != x.dtype:  # F.linear's error, not a silent promotion
        return False
    if x.dtype in _HALF:
        return (x.device.type == "cpu" and weight.dtype == x.dtype and 1 <= rows <= FEW_ROWS_MAX_HALF
                and weight.numel() * 2 >= HALF_ROWS_MIN_BYTES and weight.shape[-1] <= HALF_ROWS_MAX_K
                and weight.stride(-1) == 1)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and FEW_ROWS_MIN <= rows <= FEW_ROWS_MAX and weight.numel() * 4 >= ROWS_LINEAR_MIN_BYTES
            and weight.stride(-1) == 1)


def few_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _few_rows_path(rows, x, weight, bias):
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
    h = mlp.hidden(few_rows_layer(mlp.fc1, x), few_rows_layer(mlp.fc3, x) if mlp.gated else None)
    return few_rows_layer(mlp.fc2, h)
