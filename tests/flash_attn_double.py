"""A stand-in for flash-attn's flash_attn_varlen_func (no flash-attn wheel exists here): it checks
the arguments against the documented varlen contract and computes each sequence's attention in
float32, so the tests exercise fourm_fast's packing, unpacking and gradients through it."""
import types

import torch


def _check_cu(cu: torch.Tensor, total: int, max_len: int, what: str) -> list[int]:
    assert cu.dtype == torch.int32 and cu.dim() == 1, f"cu_seqlens_{what} must be 1-D int32"
    bounds = cu.tolist()
    assert bounds[0] == 0 and bounds[-1] == total, f"cu_seqlens_{what} must run from 0 to {total}: {bounds}"
    lens = [b - a for a, b in zip(bounds, bounds[1:])]
    assert min(lens, default=1) > 0, f"an empty {what} sequence reached the kernel: {lens}"
    assert isinstance(max_len, int) and max_len >= max(lens, default=0), f"max_seqlen_{what} {max_len} < {max(lens)}"
    return bounds


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **kwargs):
    assert not kwargs, f"unexpected arguments {sorted(kwargs)}"
    assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape and q.shape[1:] == k.shape[1:]
    assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    assert all(t.stride(-1) == 1 for t in (q, k, v)), "the last dim must be contiguous"
    assert dropout_p == 0.0 and not causal
    bq = _check_cu(cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
    bk = _check_cu(cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
    assert len(bq) == len(bk)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    outs = []
    for i in range(len(bq) - 1):
        qi, ki, vi = (t.float().transpose(0, 1) for t in (q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]))
        p = torch.softmax(qi @ ki.transpose(1, 2) * scale, -1)
        outs.append((p @ vi).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def module() -> types.ModuleType:
    m = types.ModuleType("flash_attn")
    m.flash_attn_varlen_func = flash_attn_varlen_func
    return m
