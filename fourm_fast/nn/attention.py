"""Attention modules on masked_attention, with 4M's parameter names (qkv/proj; q/kv/proj) and no
biases by default, as 4M's released models."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.attention import masked_attention


class LayerNorm(nn.Module):
    """LayerNorm whose bias can be a fixed zero buffer, as 4M's (the state dicts keep the key)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        if bias:
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _check_heads(name: str, dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim < 1 or dim % num_heads != 0:
        raise ValueError(f"{name}: num_heads must be >= 1 and divide dim >= 1; got dim {dim}, num_heads {num_heads}")


def _check_input(name: str, x: Tensor, dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name}: expected a (B, N, {dim}) tensor, got shape {tuple(x.shape)}")


def _head_norm(head_dim: int) -> LayerNorm:
    return LayerNorm(head_dim, eps=1e-6, bias=False)


class Attention(nn.Module):
    """Multi-head self-attention of ``x (B, N, dim)``; the mask comes from per-token metadata.

    ``forward(x, k_valid=None, segment=None, limit=None, rank=None)``: k_valid ``(B, N)`` bool
    (default: all valid); segment ``(B, N)`` int32 restricts attention to equal segments; limit
    and rank ``(B, N)`` int32 make key j visible to query i iff rank[j] <= limit[i].

    qkv_bias, proj_bias: biases of the projections (4M's released models have none). backend:
    masked_attention's backend (None: its dispatcher's choice). qk_norm: 4M's QK-norm, a
    LayerNorm (eps 1e-6, no bias) of each head's queries and keys.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = False,
                 backend: str | None = None, qk_norm: bool = False):
        super().__init__()
        _check_heads("Attention", dim, num_heads)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        # 4M's QKNorm variants: LayerNorm (eps 1e-6, no bias) of each head's queries and keys
        self.q_norm = _head_norm(dim // num_heads) if qk_norm else None
        self.k_norm = _head_norm(dim // num_heads) if qk_norm else None

    def forward(self, x: Tensor, k_valid: Tensor | None = None, segment: Tensor | None = None,
                limit: Tensor | None = None, rank: Tensor | None = None) -> Tensor:
        _check_input("Attention", x, self.qkv.in_features)
        B, N, C = x.shape
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients in one op, where
        # three selects each zero-fill a full-size gradient and autograd then adds them
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if k_valid is None:
            k_valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        out = masked_attention(q, k, v, k_valid, segment, segment, limit, rank, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head attention of ``x (B, Nq, dim)`` over ``context (B, Nk, dim)``.

    ``forward(x, context, context_valid=None)``: context_valid ``(B, Nk)`` bool masks padding of
    the encoder output (4M's decoder cross-attention). qkv_bias (of q and kv), proj_bias, backend
    and qk_norm as in Attention.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = False,
                 backend: str | None = None, qk_norm: bool = False):
        super().__init__()
        _check_heads("CrossAttention", dim, num_heads)
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.q_norm = _head_norm(dim // num_heads) if qk_norm else None
        self.k_norm = _head_norm(dim // num_heads) if qk_norm else None

    def forward(self, x: Tensor, context: Tensor, context_valid: Tensor | None = None) -> Tensor:
        _check_input("CrossAttention x", x, self.q.in_features)
        _check_input("CrossAttention context", context, self.kv.in_features)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"CrossAttention: x has batch {x.shape[0]} but context has batch {context.shape[0]}")
        B, Nq, C = x.shape
        Nk = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, Nq, h, C // h).transpose(1, 2)
        k, v = self.kv(context).reshape(B, Nk, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # see Attention
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if context_valid is None:
            context_valid = torch.ones(B, Nk, dtype=torch.bool, device=x.device)
        out = masked_attention(q, k, v, context_valid, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))
