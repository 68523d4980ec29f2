"""4M's generation loop restated in plain eager PyTorch (ml-4m's GenerationSampler.generate and its
*_step_batched methods), on the weights of a fourm_fast FourM: the baseline of
bench/bench_generate.py and a second reading of the semantics for the tests.

As the reference does it: the batch in 4M's format (per modality tensor / input_mask /
target_mask / decoder_attention_mask, True = excluded); per step, every modality re-embedded,
argsort selection of encoder and decoder tokens, dense B x N x N masks and eager attention; the
guided pass on a deep copy of the batch with the guided modalities emptied, run after the
conditional one; sampling by a full sort (top-k / top-p) and torch.multinomial; autoregressive
decoding re-runs the whole decoder over the prefix for every token (no cache); the token count of
a MaskGIT / ROAR step is the batch's (4M assumes every sample has as many tokens left).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor

from .fourm import decoder_4m as decode, encoder_4m
from .sampling import sample_tokens_4m


def empty_image(d: dict) -> None:
    d["input_mask"][:] = True
    d["target_mask"][:] = False


def empty_sequence(d: dict, s1: int, s2: int) -> None:
    """4M's empty sequence: input [S_1]; target [S_1] ... [S_2] (decoded autoregressively)."""
    d["tensor"][:] = 0
    d["tensor"][:, [0, 1]] = s1
    d["tensor"][:, -1] = s2
    d["input_mask"][:] = True
    d["input_mask"][:, 0] = False
    d["target_mask"] = ~d["input_mask"]
    d["decoder_attention_mask"][:] = 1
    d["decoder_attention_mask"][:, 0] = 0


def image_input(tokens: Tensor) -> dict:
    B, N = tokens.shape
    return {"tensor": tokens.clone(), "input_mask": torch.zeros(B, N, dtype=torch.bool),
            "target_mask": torch.ones(B, N, dtype=torch.bool)}


def sequence_input(ids: Tensor) -> dict:
    """A given sequence (B, L) whose every non-padding token is an input (up to its EOS)."""
    return {"tensor": ids.clone(), "input_mask": ids == 0, "target_mask": torch.ones_like(ids, dtype=torch.bool),
            "decoder_attention_mask": torch.zeros_like(ids, dtype=torch.bool)}


def empty_target(model, name: str, B: int, sentinels: dict) -> dict:
    m = model.cfg.modality(name)
    if m.kind == "image":
        d = {"tensor": torch.zeros(B, m.num_tokens, dtype=torch.int64), "input_mask": torch.ones(B, m.num_tokens, dtype=torch.bool),
             "target_mask": torch.zeros(B, m.num_tokens, dtype=torch.bool)}
        empty_image(d)
        return d
    n = max(m.max_length, 2)
    d = {"tensor": torch.zeros(B, n, dtype=torch.int64), "input_mask": torch.ones(B, n, dtype=torch.bool),
         "target_mask": torch.zeros(B, n, dtype=torch.bool), "decoder_attention_mask": torch.zeros(B, n, dtype=torch.bool)}
    empty_sequence(d, sentinels[name][1], sentinels[name][2])
    return d


def _encoder_parts(model, mod_dict: dict):
    """Per modality: token embeddings, position + modality embeddings, input masks, as 4M's
    encoder embeddings compute them."""
    xs, es, ms = [], [], []
    for name, d in mod_dict.items():
        if name not in model.encoder_embeddings:
            continue
        emb = model.encoder_embeddings[name]
        m = model.cfg.modality(name)
        t, im = d["tensor"].long(), d["input_mask"]
        B = t.shape[0]
        x = emb.token_emb(t)
        if m.kind == "image":
            e = (emb.pos_emb + emb.mod_emb).expand(B, -1, -1)
        else:
            pid = ((~im).long().cumsum(1) - 1).clamp(min=0)
            e = emb.pos_emb[0][pid].masked_fill(im[..., None], 0.0) + emb.mod_emb
        xs.append(x), es.append(e), ms.append(im)
    return torch.cat(xs, 1), torch.cat(es, 1), torch.cat(ms, 1)


def _argsort_keep(mask: Tensor, n: int) -> Tensor:
    return torch.argsort(mask.float() + torch.arange(mask.shape[1], device=mask.device) * 1e-6, dim=1)[:, :n]


def encode(model, mod_dict: dict):
    """4M's forward_mask_encoder_generation + forward_encoder: (context, encoder mask (B, 1, N))."""
    x, e, m = _encoder_parts(model, mod_dict)
    n = int((~m).sum(1).max())
    keep = _argsort_keep(m, n)
    x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    e = e.gather(1, keep[..., None].expand(-1, -1, e.shape[-1]))
    m = m.gather(1, keep)
    x, e = x.masked_fill(m[..., None], 0.0), e.masked_fill(m[..., None], 0.0)
    mask = m[:, None, :]
    return encoder_4m(model, x + e, mask) + e, mask


def _decoder_positions(tm: Tensor, roar_select: int | None, generator) -> Tensor:
    """The target positions a MaskGIT (roar_select None: all undecided) or ROAR step decodes; the
    guided pass reuses them, as 4M's re-seeding does."""
    n = int((~tm[0]).sum())
    if roar_select is None:
        return _argsort_keep(tm, n)
    noise = torch.rand(tm.shape[1], generator=generator, device=generator.device)[None] * 1e-6
    return torch.argsort(tm.float() + noise, dim=1)[:, :min(roar_select, n)]


def _image_logits(model, mod_dict: dict, name: str, keep: Tensor) -> Tensor:
    """One decoder pass over the target positions ``keep`` (B, n): logits (B, n, V)."""
    context, enc_mask = encode(model, mod_dict)
    emb = model.decoder_embeddings[name]
    tm = mod_dict[name]["target_mask"]
    B = tm.shape[0]
    e = (emb.pos_emb + emb.mod_emb).expand(B, -1, -1)
    e = e.gather(1, keep[..., None].expand(-1, -1, e.shape[-1]))
    dm = tm.gather(1, keep)
    y = (torch.zeros_like(e) + model.mask_token).masked_fill(dm[..., None], 0.0) + e.masked_fill(dm[..., None], 0.0)
    y = decode(model, y, context, enc_mask, None)
    return emb.to_logits(y)


def _uncond(mod_dict: dict, model, conditioning: list[str], sentinels: dict) -> dict:
    out = copy.deepcopy(mod_dict)
    for c in conditioning:
        if model.cfg.modality(c).kind == "sequence":
            empty_sequence(out[c], sentinels[c][1], sentinels[c][2])
        else:
            empty_image(out[c])
    return out


def _sample(logits: Tensor, temperature: float, top_k, top_p, generator):
    if np.isclose(temperature, 0, atol=1e-10):
        return logits.argmax(-1), torch.ones(logits.shape[0], device=logits.device)
    return sample_tokens_4m(logits.clone(), temperature, top_k, top_p, generator=generator)


def _image_step(model, mod_dict, step, top_k, top_p, sentinels, generator) -> dict:
    name, scheme = step["target_domain"], step["scheme"]
    roar = step["num_tokens"] if scheme == "roar" else None
    pos = _decoder_positions(mod_dict[name]["target_mask"], roar, generator)
    logits = _image_logits(model, mod_dict, name, pos)
    cond = step.get("cfg_cond_domains", [])
    if step.get("cfg_scale", 1.0) != 1.0 and cond:
        u = _image_logits(model, _uncond(mod_dict, model, cond, sentinels), name, pos)
        logits = u + (logits - u) * step["cfg_scale"]
    B, n, V = logits.shape
    samples, probs = _sample(logits.reshape(B * n, V), step["temperature"], top_k, top_p, generator)
    samples, probs = samples.reshape(B, n), probs.reshape(B, n)
    if scheme == "maskgit":
        top = torch.topk(probs, step["num_tokens"], dim=-1).indices
        samples, pos = samples.gather(1, top), pos.gather(1, top)
    d = mod_dict[name]
    d["tensor"] = d["tensor"].scatter(1, pos, samples)
    d["input_mask"] = d["input_mask"].scatter(1, pos, torch.zeros_like(samples, dtype=torch.bool))
    d["target_mask"] = d["target_mask"].scatter(1, pos, torch.ones_like(samples, dtype=torch.bool))
    return mod_dict


def _autoregressive_step(model, mod_dict, step, top_k, top_p, sentinels, generator) -> dict:
    name = step["target_domain"]
    emb = model.decoder_embeddings[name]
    m = model.cfg.modality(name)
    passes = [mod_dict]
    cond = step.get("cfg_cond_domains", [])
    guided = step.get("cfg_scale", 1.0) != 1.0 and len(cond) > 0
    if guided:
        passes.append(_uncond(mod_dict, model, cond, sentinels))
    encoded = [encode(model, d) for d in passes]
    d = mod_dict[name]
    tm = d["target_mask"]
    B = tm.shape[0]
    n = int((~tm[0]).sum())
    keep = _argsort_keep(tm, n)
    ids = d["tensor"].long().gather(1, keep)
    pid = ((~tm).long().cumsum(1) - 1).clamp(min=0).gather(1, keep)
    y_emb = emb.pos_emb[0][pid.clamp(max=m.max_length - 1)] + emb.mod_emb
    eos = ids[0, -1]
    out = ids[:, :1]
    for _ in range(min(m.max_length, y_emb.shape[1])):
        L = out.shape[1]
        y = emb.token_emb(out) + y_emb[:, :L]
        causal = torch.ones(L, L, dtype=torch.bool, device=y.device).triu(1).expand(B, L, L)
        last = [emb.to_logits(decode(model, y, c, em, causal))[:, -1] for c, em in encoded]
        logits = last[1] + (last[0] - last[1]) * step["cfg_scale"] if guided else last[0]
        sample, _ = _sample(logits, step["temperature"], top_k, top_p, generator)
        out = torch.cat([out, sample[:, None]], 1)
        if bool((out == eos).any(-1).all()):
            break
    # merge: the generated span (between [S_1] and the end sentinel) becomes the whole sequence
    seqs = []
    for b in range(B):
        row = out[b, 1:].tolist()
        seqs.append(row[: row.index(int(eos))] if int(eos) in row else row)
    width = max(m.max_length, 1)
    t = torch.zeros(B, width, dtype=torch.int64)
    for b, r in enumerate(seqs):
        t[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    merged = {"tensor": t, "input_mask": torch.arange(width)[None] >= torch.tensor([len(r) for r in seqs])[:, None],
              "target_mask": torch.ones(B, width, dtype=torch.bool),
              "decoder_attention_mask": torch.zeros(B, width, dtype=torch.bool)}
    mod_dict[name] = {k: v.to(out.device) for k, v in merged.items()}
    return mod_dict


@torch.no_grad()
def generate_4m(model, mod_dict: dict, schedule: list[dict], sentinels: dict, top_k=0.0, top_p=0.0,
                seed: int = 0) -> dict:
    """4M's GenerationSampler.generate: one schedule step after another (see
    fourm_fast.generate.build_chained_schedule for the schedule's format). Targets must already be
    in mod_dict as empty_target made them. Runs on the model's device, as 4M does: the inputs are
    moved there and the random draws come from a generator on that device."""
    device = next(model.parameters()).device
    mod_dict = {name: {k: v.to(device, copy=True) for k, v in d.items()} for name, d in mod_dict.items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    for step in schedule:
        if step["scheme"] == "autoregressive":
            mod_dict = _autoregressive_step(model, mod_dict, step, top_k, top_p, sentinels, generator)
        else:
            mod_dict = _image_step(model, mod_dict, step, top_k, top_p, sentinels, generator)
    return mod_dict
