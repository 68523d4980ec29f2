"""4M's forward pass restated in plain eager PyTorch, as ml-4m's FourM.forward computes it, on the
weights of a fourm_fast FourM (same parameter names): per-modality embeddings, argsort token
selection, dense B x N x N masks built from the compressed decoder_attention_mask, eager
attention with masked_fill(-finfo.max), boolean indexing for the per-modality losses.

It is the baseline of bench/bench_train.py and a second, independent reading of 4M's semantics
(tests check it against the reference vectors too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _layer_norm(norm, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q, k, v (B, H, N, d); mask (B, 1 or N, Nk) True = may not attend, broadcast over heads."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        attn = attn.masked_fill(mask[:, None], -torch.finfo(attn.dtype).max)
    return attn.softmax(dim=-1) @ v


def _self_attn(mod, x: Tensor, mask: Tensor | None) -> Tensor:
    B, N, C = x.shape
    h = mod.num_heads
    q, k, v = mod.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
    if mod.q_norm is not None:
        q, k = mod.q_norm(q), mod.k_norm(k)
    return mod.proj(_attention(q, k, v, mask).transpose(1, 2).reshape(B, N, C))


def _cross_attn(mod, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
    B, N, C = x.shape
    h = mod.num_heads
    q = mod.q(x).reshape(B, N, h, C // h).transpose(1, 2)
    k, v = mod.kv(context).reshape(B, context.shape[1], 2, h, C // h).permute(2, 0, 3, 1, 4)
    if mod.q_norm is not None:
        q, k = mod.q_norm(q), mod.k_norm(k)
    return mod.proj(_attention(q, k, v, mask).transpose(1, 2).reshape(B, N, C))


def _mlp(mod, x: Tensor) -> Tensor:
    """ml-4m's Mlp / gated Mlp (SwiGLU with SiLU): fc2(act(fc1 x) [* fc3 x]), elementwise ops eager."""
    h = mod.act(mod.fc1(x))
    return mod.fc2(h * mod.fc3(x) if mod.gated else h)


def _select(tensors: list[Tensor], mask: Tensor, n: int) -> list[Tensor]:
    """4M's selection: argsort(mask + arange * 1e-6), keep the first n."""
    order = torch.argsort(mask.float() + torch.arange(mask.shape[1], device=mask.device) * 1e-6, dim=1)[:, :n]
    return [t.gather(1, order[..., None].expand(-1, -1, t.shape[-1]) if t.dim() == 3 else order) for t in tensors]


def encoder_4m(model, x: Tensor, enc_mask: Tensor) -> Tensor:
    """Encoder blocks, encoder_norm and decoder_proj_context (the caller adds the embeddings)."""
    for blk in model.encoder:
        x = x + _self_attn(blk.attn, _layer_norm(blk.norm1, x), enc_mask)
        x = x + _mlp(blk.mlp, _layer_norm(blk.norm2, x))
    return model.decoder_proj_context(_layer_norm(model.encoder_norm, x))


def decoder_4m(model, y: Tensor, context: Tensor, enc_mask: Tensor, self_mask: Tensor | None) -> Tensor:
    """Decoder blocks and decoder_norm; masks True = may not attend."""
    for blk in model.decoder:
        y = y + _self_attn(blk.self_attn, _layer_norm(blk.norm1, y), self_mask)
        y = y + _cross_attn(blk.cross_attn, _layer_norm(blk.query_norm, y), _layer_norm(blk.context_norm, context), enc_mask)
        y = y + _mlp(blk.mlp, _layer_norm(blk.norm2, y))
    return _layer_norm(model.decoder_norm, y)


def forward_4m_eager(model, mod_dict: dict, num_encoder_tokens: int, num_decoder_tokens: int, loss_type: str = "mod"):
    """(loss, per-modality losses) of ml-4m's FourM.forward on ``model``'s weights."""
    cfg = model.cfg
    ids = {n: i for i, n in enumerate(model.modalities)}
    enc_x, enc_e, enc_m, enc_mod = [], [], [], []
    dec_x, dec_e, dec_m, dec_t, dec_a, dec_mod = [], [], [], [], [], []
    for name, d in mod_dict.items():
        m = cfg.modality(name)
        B = d["tensor"].shape[0]
        t = d["tensor"].reshape(B, -1).long()
        if name in model.encoder_embeddings:
            emb = model.encoder_embeddings[name]
            im = d["input_mask"].reshape(B, -1).bool()
            x = emb.token_emb(t)
            if m.kind == "image":
                e = (emb.pos_emb + emb.mod_emb).expand(B, -1, -1)
            else:
                pid = (~im).int().cumsum(1) - 1
                pid[im] = 0
                pe = emb.pos_emb.expand(B, -1, -1).gather(1, pid.long()[..., None].expand(-1, -1, x.shape[-1]))
                pe = pe.masked_fill(im[..., None], 0.0)
                e = pe + emb.mod_emb
            enc_x.append(x), enc_e.append(e), enc_m.append(im), enc_mod.append(torch.full_like(t, ids[name]))
        if name in model.decoder_embeddings:
            emb = model.decoder_embeddings[name]
            tm = d["target_mask"].reshape(B, -1).bool()
            dam = d["decoder_attention_mask"].reshape(B, -1).long()
            x = emb.token_emb(t)
            if m.kind == "image":
                e = (emb.pos_emb + emb.mod_emb).expand(B, -1, -1)
                dec_x.append(torch.zeros_like(x) + model.mask_token), dec_e.append(e), dec_m.append(tm)
                dec_t.append(t), dec_a.append(dam), dec_mod.append(torch.full_like(t, ids[name]))
            else:
                pid = (~tm).int().cumsum(1) - 1
                pid[tm] = 0
                pid[pid >= m.max_length] = 0
                pe = emb.pos_emb.expand(B, -1, -1).gather(1, pid.long()[..., None].expand(-1, -1, x.shape[-1]))
                e = pe.masked_fill(tm[..., None], 0.0) + emb.mod_emb
                dec_x.append(x[:, :-1]), dec_e.append(e[:, :-1]), dec_m.append(tm[:, 1:] | tm[:, :-1])
                dec_t.append(t[:, 1:]), dec_a.append(dam[:, :-1]), dec_mod.append(torch.full_like(t[:, :-1], ids[name]))
    ex, ee, em, emod = _select([torch.cat(enc_x, 1), torch.cat(enc_e, 1), torch.cat(enc_m, 1), torch.cat(enc_mod, 1)],
                               torch.cat(enc_m, 1), num_encoder_tokens)
    ex, ee = ex.masked_fill(em[..., None], 0.0), ee.masked_fill(em[..., None], 0.0)
    dx, de, dm, dt, da, dmod = _select([torch.cat(v, 1) for v in (dec_x, dec_e, dec_m, dec_t, dec_a, dec_mod)],
                                       torch.cat(dec_m, 1), num_decoder_tokens)
    dx, de = dx.masked_fill(dm[..., None], 0.0), de.masked_fill(dm[..., None], 0.0)
    N = dx.shape[1]
    if cfg.decoder_causal_mask:
        sa = torch.ones(N, N, dtype=torch.bool, device=dx.device).triu(1).expand(dx.shape[0], N, N)
    else:
        sa = torch.arange(N, device=dx.device)[None, None, :] >= da.cumsum(-1)[..., None]
    if cfg.decoder_sep_mask:
        sa = sa | (dmod[:, None, :] != dmod[:, :, None])
    dmod = dmod.masked_fill(dm, -1)
    enc_mask = em[:, None, :]
    context = encoder_4m(model, ex + ee, enc_mask) + ee
    y = decoder_4m(model, dx + de, context, enc_mask, sa)
    losses, counts = {}, {}
    for name in mod_dict:
        if name not in model.decoder_embeddings:
            continue
        sel = dmod == ids[name]
        logits = model.decoder_embeddings[name].to_logits(y[sel])
        if logits.numel() == 0:
            losses[name], counts[name] = y.new_zeros(()), 0
        else:
            losses[name], counts[name] = F.cross_entropy(logits, dt[sel]), logits.numel()
    if loss_type == "token":
        loss = sum(losses[n] * counts[n] for n in losses) / sum(counts.values())
    else:
        loss = sum(losses.values()) / len(losses)
    return loss, losses
