"""Autoregressive decoding of one sequence modality with a key/value cache.

4M's loop re-runs the whole decoder over the prefix for every new token (quadratic in the length)
and computes logits at every position. Here each step runs the decoder on the newest token only:
its self-attention keys and values are appended to a per-layer cache, and the cross-attention
keys and values of the encoder output are projected once per encoder pass. The arithmetic per
token is the decoder's own (same modules, same masked_attention op), so with the cache off
(``use_cache=False``, the 4M way) the tokens are the same. A step has only R rows, so its linear
layers go through fourm_fast.nn.few_rows (rows_linear for the heads on the CPU).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..nn.few_rows import few_rows_layer, few_rows_mlp
from ..ops.attention import masked_attention
from .state import Slots


def _heads(x: Tensor, h: int) -> Tensor:
    B, N, C = x.shape
    return x.reshape(B, N, h, C // h).transpose(1, 2)


class CachedDecoder:
    """Decoder state for one autoregressive target: ``step(ids)`` feeds the next input token of
    every row and returns the decoder output there (after decoder_norm), from which the target
    head gives the logits of the token after it."""

    def __init__(self, model, name: str, context: Tensor, context_valid: Tensor, max_len: int):
        self.model = model
        self.name = name
        self.mod_id = model.modalities.index(name)
        self.context_valid = context_valid
        R = context.shape[0]
        self.R, self.max_len, self.t = R, max_len, 0
        self.cross, self.cache = [], []
        for blk in model.decoder:
            ca = blk.cross_attn
            h = ca.num_heads
            kv = ca.kv(blk.context_norm(context))
            k, v = (_heads(x, h) for x in kv.chunk(2, dim=-1))
            if ca.k_norm is not None:
                k = ca.k_norm(k)
            # Head-major copies, once per encoder pass: each step's (batch, head) task then reads
            # one contiguous block instead of every H-th 256-byte row (ar32: 114 -> 54 ms of attention).
            self.cross.append((k.contiguous(), v.contiguous()))
            sa = blk.self_attn
            d = context.shape[-1] // sa.num_heads
            shape = (R, sa.num_heads, max_len, d)
            self.cache.append((context.new_empty(shape), context.new_empty(shape)))

    def step(self, ids: Tensor) -> Tensor:
        """ids: (R,) the input token at position t; returns its (R, dim) decoder output."""
        t = self.t
        if t >= self.max_len:
            raise RuntimeError(f"{self.name}: the cache holds {self.max_len} positions")
        R, dev = self.R, ids.device
        slots = Slots(dec_ids=ids[:, None], dec_modality=torch.full((R, 1), self.mod_id, device=dev),
                      dec_position=torch.full((R, 1), t, device=dev), dec_valid=torch.ones(R, 1, dtype=torch.bool, device=dev))
        y, emb = self.model.embed_decoder(slots, check=False)  # a few small ops a token; it cannot fail here
        y = y + emb
        self_valid = torch.ones(R, t + 1, dtype=torch.bool, device=dev)
        for blk, (kc, vc), (kx, vx) in zip(self.model.decoder, self.cache, self.cross):
            sa, ca = blk.self_attn, blk.cross_attn
            h = sa.num_heads
            q, k, v = (_heads(x, h) for x in few_rows_layer(sa.qkv, blk.norm1(y)).chunk(3, dim=-1))
            if sa.q_norm is not None:
                q, k = sa.q_norm(q), sa.k_norm(k)
            kc[:, :, t: t + 1] = k
            vc[:, :, t: t + 1] = v
            out = masked_attention(q, kc[:, :, : t + 1], vc[:, :, : t + 1], self_valid, backend=sa.backend)
            y = y + few_rows_layer(sa.proj, out.transpose(1, 2).reshape(R, 1, -1))
            q = _heads(few_rows_layer(ca.q, blk.query_norm(y)), h)
            if ca.q_norm is not None:
                q = ca.q_norm(q)
            out = masked_attention(q, kx, vx, self.context_valid, backend=ca.backend)
            y = y + few_rows_layer(ca.proj, out.transpose(1, 2).reshape(R, 1, -1))
            y = y + few_rows_mlp(blk.mlp, blk.norm2(y))
        self.t += 1
        return self.model.decoder_norm(y)[:, 0]


class UncachedDecoder:
    """4M's way, for comparison and tests: the whole prefix through the decoder at every step."""

    def __init__(self, model, name: str, context: Tensor, context_valid: Tensor, max_len: int):
        self.model, self.name = model, name
        self.mod_id = model.modalities.index(name)
        self.context, self.context_valid, self.max_len = context, context_valid, max_len
        self.ids: list[Tensor] = []

    def step(self, ids: Tensor) -> Tensor:
        if len(self.ids) >= self.max_len:
            raise RuntimeError(f"{self.name}: at most {self.max_len} positions")
        self.ids.append(ids)
        R, n, dev = ids.shape[0], len(self.ids), ids.device
        pos = torch.arange(n, device=dev, dtype=torch.int32).expand(R, n).contiguous()
        slots = Slots(dec_ids=torch.stack(self.ids, 1), dec_modality=torch.full((R, n), self.mod_id, device=dev),
                      dec_position=pos, dec_valid=torch.ones(R, n, dtype=torch.bool, device=dev),
                      dec_segment=None, dec_rank=pos, dec_limit=pos)
        return self.model.decode(slots, self.context, self.context_valid)[:, -1]
