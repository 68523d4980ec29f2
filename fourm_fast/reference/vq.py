"""vq_lookup in plain PyTorch.

``vq_lookup_reference`` states the op's semantics in float64 (the test oracle). The other two are
the baselines a user would otherwise run: ``torch.cdist`` + argmin, and the expansion
``-(|x|^2 - 2 x c^T + |c|^2)`` + argmax that 4M's VQ quantizers use (ml-4m's
fourm/vq/quantizers, the Lucid-style quantizer), both materialising the N x K distance matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 1e-12


def pairwise_distance_f64(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """(N, K) float64 distances for rows x (N, D): squared L2 or cosine distance 1 - cos."""
    xd, cd = x.double(), codebook.double()
    if metric == "l2":
        # Expansion in float64: its rounding (~1e-16 relative) is far below any fp32 effect.
        return (xd * xd).sum(1, keepdim=True) - 2.0 * xd @ cd.T + (cd * cd).sum(1)
    if metric == "cosine":
        return 1.0 - F.normalize(xd, dim=1, eps=NORM_EPS) @ F.normalize(cd, dim=1, eps=NORM_EPS).T
    raise ValueError(f'metric must be "l2" or "cosine", got "{metric}"')


def vq_lookup_reference(x: Tensor, codebook: Tensor, metric: str = "l2", chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The semantics of fourm_fast.ops.vq_lookup, in float64, chunked over rows.

    Nearest code by the metric, ties to the smallest index; codes with a non-finite entry are
    never chosen; a row with a non-finite entry (or with no eligible code) gets (-1, NaN).
    """
    D = codebook.shape[1]
    rows = x.reshape(-1, D)
    # A code is eligible when its entries and its fp32 squared norm are finite (vq_prepare_code).
    code_ok = torch.isfinite(codebook).all(1) & torch.isfinite((codebook.float() ** 2).sum(1))
    indices = torch.empty(rows.shape[0], dtype=torch.int64, device=x.device)
    distance = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    cb = torch.where(code_ok[:, None], codebook, torch.zeros((), dtype=codebook.dtype, device=codebook.device))
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        row_ok = torch.isfinite(part).all(1)
        d = pairwise_distance_f64(torch.nan_to_num(part), cb, metric)
        d = d.masked_fill(~code_ok, float("inf"))
        best = d.argmin(1)  # first minimum = smallest index among ties
        ok = row_ok & code_ok.any()
        indices[start : start + chunk] = torch.where(ok, best, -1)
        dist = d.gather(1, best[:, None])[:, 0].float()
        distance[start : start + chunk] = torch.where(ok, dist, float("nan"))
    shape = x.shape[:-1]
    return indices.reshape(shape), distance.reshape(shape)


def vq_lookup_cdist(x: Tensor, codebook: Tensor) -> Tensor:
    """Baseline: torch.cdist + argmin (materialises N x K)."""
    return torch.cdist(x, codebook).argmin(-1)


def vq_lookup_4m(x: Tensor, codebook: Tensor) -> Tensor:
    """Baseline: 4M's quantizer expansion, negative squared distance then argmax (N x K in memory)."""
    neg_dist = -((x * x).sum(-1, keepdim=True) - 2.0 * x @ codebook.T + (codebook * codebook).sum(-1))
    return neg_dist.argmax(-1)
