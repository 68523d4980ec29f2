"""Token sampling in plain PyTorch: the semantics of fourm_fast.ops.sample_tokens, and 4M's path.

``filter_mask_reference`` / ``filtered_probs_reference`` state the op's semantics in float64 (the
test oracle). ``sample_tokens_4m`` restates how 4M samples (ml-4m's GenerationSampler: guided
logits, top-k then top-p filtering over a full sort, softmax(logits / T), torch.multinomial):
the baseline of bench/bench_sampling.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _as_rows(value, R: int, dtype=torch.float64) -> Tensor:
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(R) if t.dim() == 0 else t


def guided_logits_reference(logits: Tensor, uncond_logits: Tensor | None, cfg_scale) -> Tensor:
    """u + s (c - u) in float64; a token at -inf in either branch stays at -inf."""
    c = logits.double()
    if uncond_logits is None:
        return c
    u = uncond_logits.double()
    s = _as_rows(cfg_scale, c.shape[0]).to(c.device)[:, None]
    g = u + s * (c - u)
    return g.masked_fill(torch.isneginf(c) | torch.isneginf(u), -math.inf)


def effective_top_k(top_k: float, V: int) -> int:
    """4M's rule: an integer k is min(k, V); a fraction in (0, 1) is min(int(k * V), V), at least 1
    (4M's topk(logits, 0) fails there); 0 disables."""
    if top_k <= 0:
        return 0
    k = max(int(top_k * V), 1) if top_k < 1 else int(top_k)
    return min(k, V)


def filter_mask_reference(g: Tensor, top_k=0, top_p=1.0, min_p=0.0) -> Tensor:
    """(R, V) bool, True where a token survives top-k, then top-p, then min-p (float64 maths).

    top-k keeps values >= the k-th largest (ties kept). top-p keeps a value when the softmax mass
    (over the top-k survivors) of strictly larger values is <= p, which is 4M's shifted-cumsum rule
    with tied values kept together. min-p keeps g - max >= log(min_p).
    """
    R, V = g.shape
    g = g.double()
    ks, ps, mps = (_as_rows(v, R).tolist() for v in (top_k, top_p, min_p))
    mask = torch.zeros(R, V, dtype=torch.bool, device=g.device)
    for r in range(R):
        row = g[r]
        keep = torch.isfinite(row)
        k = effective_top_k(ks[r], V)
        if 0 < k < int(keep.sum()):
            kth = torch.topk(row, k).values[-1]
            keep &= row >= kth
        m = row.max()
        if ps[r] < 1.0:
            w = torch.where(keep, torch.exp(row - m), torch.zeros((), dtype=row.dtype, device=row.device))
            total = w.sum()
            vals, order = torch.sort(row[keep], descending=True)
            wv = w[keep][order]
            before = torch.cumsum(wv, 0) - wv  # mass ahead of each position
            # Tied values share the mass strictly above the first of them.
            first = torch.ones_like(vals, dtype=torch.bool)
            first[1:] = vals[1:] != vals[:-1]
            pos = torch.arange(vals.numel(), device=vals.device)
            group_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(0).values
            above = before[group_start]
            cut = vals[above <= ps[r] * total].min()
            keep &= row >= cut
        if mps[r] > 0:
            keep &= (row - m) >= math.log(mps[r])
        mask[r] = keep
    return mask


def filtered_probs_reference(logits: Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                             uncond_logits: Tensor | None = None, cfg_scale=1.0) -> Tensor:
    """(R, V) float64: the distribution one sample_tokens draw follows (T == 0: one-hot argmax)."""
    g = guided_logits_reference(logits, uncond_logits, cfg_scale)
    R, V = g.shape
    mask = filter_mask_reference(g, top_k, top_p, min_p)
    T = _as_rows(temperature, R).to(g.device)[:, None]
    m = g.max(dim=1, keepdim=True).values
    z = torch.where(mask, (g - m) / T.clamp_min(1e-300), torch.full((), -math.inf, dtype=g.dtype, device=g.device))
    probs = torch.softmax(z, dim=1)
    greedy = T[:, 0] == 0
    if greedy.any():
        onehot = torch.zeros_like(probs)
        onehot.scatter_(1, g.argmax(1, keepdim=True), 1.0)  # argmax: first maximum
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def top_k_top_p_filtering_4m(logits: Tensor, top_k: float = 0.0, top_p: float = 0.0) -> Tensor:
    """4M's filter (GenerationSampler.top_k_top_p_filtering): removed logits set to -inf.
    top_p == 0 disables top-p there (fourm_fast uses 1.0 for that)."""
    logits = logits.clone()
    V = logits.shape[-1]
    if isinstance(top_k, float):
        top_k = min(int(top_k * V), V)
    else:
        top_k = min(top_k, V)
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits[logits < kth] = -math.inf
    if top_p > 0.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, sorted_idx, remove)] = -math.inf
    return logits


def sample_tokens_4m(logits: Tensor, temperature: float = 1.0, top_k: float = 0.0, top_p: float = 0.0,
                     uncond_logits: Tensor | None = None, cfg_scale: float = 1.0,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """4M's sampling step: guidance, sort-based filtering, softmax(/T), multinomial."""
    if uncond_logits is not None:
        logits = uncond_logits + cfg_scale * (logits - uncond_logits)
    filtered = top_k_top_p_filtering_4m(logits.float(), top_k, top_p)
    probs = torch.softmax(filtered / temperature, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tokens, probs.gather(1, tokens[:, None])[:, 0]
