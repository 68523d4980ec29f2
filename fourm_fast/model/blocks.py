"""Pre-norm encoder and decoder blocks with 4M's structure and parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Attention, CrossAttention, LayerNorm
from .._extension import extension
from ..ops.swiglu import SWIGLU_DTYPES, swiglu


@functools.cache
def _cuda_kernels_built() -> bool:
    return bool(extension().build_info()["cuda_compiled"])  # a build fact: read once, not per MLP call


def _has_swiglu_kernel(a: Tensor, b: Tensor) -> bool:
    if a.dtype not in SWIGLU_DTYPES or b.dtype != a.dtype:
        return False
    return a.device.type == "cpu" or (a.device.type == "cuda" and _cuda_kernels_built())
from .config import FourMConfig


class Mlp(nn.Module):
    """fc2(act(fc1 x)), or SwiGLU fc2(act(fc1 x) * fc3 x) when gated."""

    def __init__(self, cfg: FourMConfig):
        super().__init__()
        h = cfg.mlp_hidden
        self.gated = cfg.gated_mlp
        self.act = F.silu if cfg.act == "silu" else F.gelu
        self.fc1 = nn.Linear(cfg.dim, h, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(h, cfg.dim, bias=cfg.mlp_bias)
        if self.gated:
            self.fc3 = nn.Linear(cfg.dim, h, bias=cfg.mlp_bias)

    def hidden(self, a: Tensor, b: Tensor | None) -> Tensor:
        """The input of fc2 from a = fc1 x and (gated) b = fc3 x. SwiGLU runs as the fused
        swiglu op where it has a kernel (float32/bfloat16/float16 on the CPU, and on CUDA in a
        build with CUDA kernels); a float64 model, other devices, and code under torch.compile
        (whose Inductor fuses silu * mul itself, and with its neighbours) run the two ops. Every
        caller (forward, the KV cache's few-row path) goes through here, so they compute the
        same bits."""
        if not self.gated:
            return self.act(a)
        if not torch.compiler.is_compiling() and self.act is F.silu and _has_swiglu_kernel(a, b):
            return swiglu(a, b)
        return self.act(a) * b

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(self.fc1(x), self.fc3(x) if self.gated else None))


def _norm(cfg: FourMConfig) -> LayerNorm:
    return LayerNorm(cfg.dim, eps=1e-6, bias=cfg.norm_bias)


class Block(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg.dim, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias, qk_norm=cfg.qk_norm)
        self.norm2 = _norm(cfg)
        self.mlp = Mlp(cfg)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), k_valid=valid)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias, qk_norm=cfg.qk_norm)
        self.query_norm = _norm(cfg)
        self.context_norm = _norm(cfg)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias, qk_norm=cfg.qk_norm)
        self.norm2 = _norm(cfg)
        self.mlp = Mlp(cfg)

    def forward(self, y: Tensor, context: Tensor, dec_valid: Tensor, segment: Tensor | None, limit: Tensor | None,
                rank: Tensor | None, context_valid: Tensor) -> Tensor:
        y = y + self.self_attn(self.norm1(y), k_valid=dec_valid, segment=segment, limit=limit, rank=rank)
        y = y + self.cross_attn(self.query_norm(y), self.context_norm(context), context_valid)
        return y + self.mlp(self.norm2(y))
