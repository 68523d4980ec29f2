"""masked_attention in plain PyTorch: the visibility rule as a dense mask (tests, SDPA backend),
the float64 oracle, and 4M's eager attention with a dense mask (benchmark baseline)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def visible_mask(k_valid: Tensor, Nq: int, q_segment: Tensor | None = None, k_segment: Tensor | None = None,
                 q_limit: Tensor | None = None, k_rank: Tensor | None = None) -> Tensor:
    """(B, Nq, Nk) bool: True where query i may attend key j (the op's rule, materialised)."""
    B, Nk = k_valid.shape
    vis = k_valid[:, None, :].expand(B, Nq, Nk)
    if q_segment is not None:
        vis = vis & (q_segment[:, :, None] == k_segment[:, None, :])
    if q_limit is not None:
        vis = vis & (k_rank[:, None, :] <= q_limit[:, :, None])
    return vis


def masked_attention_reference(q, k, v, k_valid, q_segment=None, k_segment=None, q_limit=None, k_rank=None,
                               scale=None, dtype=torch.float64) -> Tensor:
    """Softmax attention over visible keys in `dtype`; a query with no visible key outputs zeros."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    vis = visible_mask(k_valid, q.shape[2], q_segment, k_segment, q_limit, k_rank)[:, None]
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows give NaN -> 0
    return p @ v.to(dtype)


def attention_4m_dense(q, k, v, additive_mask: Tensor, scale: float) -> Tensor:
    """4M's eager attention (scores, softmax, matmul) with the mask as an additive (B, 1, Nq, Nk)
    tensor. 4M itself writes ``masked_fill(mask, -finfo.max)`` on a bool mask (fm_utils.py): the
    same result, and the addition was no slower than that on the 2-core Xeon (per-round medians of
    interleaved runs 0.82-1.00x its time, fp32, B 8, H 12, d 64, N 128/256, fwd and fwd+bwd), so
    ratios against this baseline understate ours a little, if anything."""
    attn = (q @ k.transpose(-2, -1)) * scale + additive_mask
    return attn.softmax(dim=-1) @ v


def decoder_metadata_4m(decoder_attention_mask: Tensor, mod_mask: Tensor, causal: bool = False, sep: bool = True):
    """4M's decoder self-attention rule (FourM.adapt_decoder_attention_mask) as per-token metadata.

    Returns (k_valid, q_segment, k_segment, q_limit, k_rank): non-causal: key j visible to query i
    iff j < cumsum(decoder_attention_mask)[i]; causal: iff j <= i; sep: and same modality.
    """
    B, M = decoder_attention_mask.shape
    pos = torch.arange(M, dtype=torch.int32).expand(B, M).contiguous()
    limit = pos if causal else (torch.cumsum(decoder_attention_mask.to(torch.int64), dim=1) - 1).to(torch.int32)
    seg = mod_mask.to(torch.int32) if sep else None
    k_valid = torch.ones(B, M, dtype=torch.bool)
    return k_valid, seg, seg, limit.contiguous(), pos
