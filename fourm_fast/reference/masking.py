"""4M's multimodal masking restated per sample in plain PyTorch (ml-4m fourm/data/masking.py,
UnifiedMasking), the semantics fourm_fast.masking implements batched.

One call of ``mask_sample_4m`` is one sample as a 4M dataloader worker produces it: pick the
mixture component, the token totals, the Dirichlet budgets (floor, then the remainder one token
at a time to the argmax of fresh Dirichlet draws, then the caps), then per image modality a random
permutation (first the inputs, then the targets) and per sequence span masking with sentinels.
Random numbers come from Python's ``random`` and torch's global generator, as in 4M; the batched
op uses Philox instead, so the two agree in distribution, not draw by draw.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
from torch.distributions import Dirichlet

_EPS = 1e-9  # 4M clamps alphas to this, so alpha 0 is "almost never"


def _dirichlets(alphas: Sequence[Sequence[float]]) -> list[Dirichlet]:
    """alphas: [M][C] per modality and component -> one Dirichlet per component."""
    table = torch.tensor(alphas, dtype=torch.float32).T
    return [Dirichlet(torch.clamp(row, min=_EPS)) for row in table]


def _apportion(dirichlet: Dirichlet, total: int, cap: torch.Tensor) -> torch.Tensor:
    budget = (dirichlet.sample() * total).floor().int()
    missing = int(total - budget.sum())
    if missing > 0:
        winners = dirichlet.sample((missing,)).argmax(dim=-1)
        budget += torch.bincount(winners, minlength=budget.numel()).int()
    return torch.minimum(budget, cap)


def budgets_4m(sizes: Sequence[int], is_image: Sequence[bool], alphas_in, alphas_tg, input_range, target_range,
               weights=None, _cache={}) -> tuple[int, list[int], list[int]]:
    """One sample's (component, input budgets, target budgets), 4M's way (min_tokens = 0)."""
    key = (tuple(map(tuple, alphas_in)), tuple(map(tuple, alphas_tg)))
    if key not in _cache:
        _cache[key] = (_dirichlets(alphas_in), _dirichlets(alphas_tg))
    d_in, d_tg = _cache[key]
    if weights is not None:
        c = int(torch.multinomial(torch.tensor(weights, dtype=torch.float32), 1))
    else:
        c = random.randint(0, len(d_in) - 1)
    n_in = random.randint(*input_range)
    n_tg = random.randint(*target_range)
    size = torch.tensor(sizes, dtype=torch.int32)
    image = torch.tensor(is_image)
    inp = _apportion(d_in[c], n_in, size)
    tgt = _apportion(d_tg[c], n_tg, torch.where(image, size - inp, size))
    return c, inp.tolist(), tgt.tolist()


def image_mask_4m(num_tokens: int, input_budget: int, target_budget: int) -> dict[str, torch.Tensor]:
    """A random permutation: its first input_budget positions are inputs, the next target_budget targets."""
    order = torch.argsort(torch.rand(num_tokens))
    input_mask = torch.ones(num_tokens, dtype=torch.bool)
    input_mask[order[:input_budget]] = False
    target_mask = torch.ones(num_tokens, dtype=torch.bool)
    target_mask[order[input_budget:input_budget + target_budget]] = False
    dam = torch.zeros(num_tokens, dtype=torch.int32)
    if target_budget > 0:
        dam[int((~target_mask).nonzero()[0])] = target_budget
    return {"input_mask": input_mask, "target_mask": target_mask, "decoder_attention_mask": dam}


def span_masking_4m(sequence: list[int], sentinel_ids: Sequence[int], keep_prob: float) -> tuple[list[int], list[int]]:
    """Masked runs become one sentinel each in the input; the target lists each run after its
    sentinel and ends with one more sentinel."""
    masked = (torch.rand(len(sequence)) > keep_prob).tolist()
    inp, tgt = [], []
    sentinel, in_run = 0, False
    for token, m in zip(sequence, masked):
        if not m:
            inp.append(token)
            in_run = False
            continue
        if not in_run:
            sentinel += 1
            inp.append(sentinel_ids[sentinel])
            tgt.append(sentinel_ids[sentinel])
        tgt.append(token)
        in_run = True
    tgt.append(sentinel_ids[sentinel + 1])
    return inp, tgt


def sequence_mask_4m(ids: list[int], max_tokens: int, input_budget: int, target_budget: int, keep: str,
                     sentinel_ids: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Span-mask a token list (EOS included) into 4M's 2 (max_tokens + 1) buffer."""
    ids = ids[:max_tokens]
    if input_budget == 0:
        inp, tgt = [], span_masking_4m(ids, sentinel_ids, 0.0)[1]
    else:
        keep_prob = {"random": lambda: random.uniform(0, 1), "all": lambda: 1.0,
                     "binary": lambda: random.choice([0.0, 1.0])}[keep]()
        inp, tgt = span_masking_4m(ids, sentinel_ids, keep_prob)
        while len(inp) > input_budget:
            keep_prob *= 0.9
            inp, tgt = span_masking_4m(ids, sentinel_ids, keep_prob)
    if len(tgt) > target_budget:
        sentinel_set = set(sentinel_ids)
        starts = [i for i, t in enumerate(tgt) if t in sentinel_set]
        pick = random.randrange(max(1, len(starts) - 1))
        if len(tgt) - starts[pick] >= target_budget:
            tgt = tgt[starts[pick]:starts[pick] + target_budget]
        else:
            first = next(i for i in starts if len(tgt) - i <= target_budget)
            tgt = tgt[first:]
    n = 2 * (max_tokens + 1)
    tensor = torch.full((n,), pad_id, dtype=torch.int32)
    input_mask = torch.ones(n, dtype=torch.bool)
    target_mask = torch.ones(n, dtype=torch.bool)
    dam = torch.zeros(n, dtype=torch.int32)
    tensor[:len(inp)] = torch.tensor(inp, dtype=torch.int32)
    input_mask[:len(inp)] = False
    span = slice(input_budget, input_budget + len(tgt))
    tensor[span] = torch.tensor(tgt, dtype=torch.int32)
    target_mask[span] = False
    dam[span] = 1
    return {"tensor": tensor, "input_mask": input_mask, "target_mask": target_mask, "decoder_attention_mask": dam}


def mask_sample_4m(specs, alphas_in, alphas_tg, input_range, target_range, tokens: dict, sentinel_ids, pad_id,
                   weights=None) -> dict[str, dict[str, torch.Tensor]]:
    """One sample in ml-4m's format. specs: fourm_fast.masking.ModalitySpec list; alphas: [M][C];
    tokens: name -> 1-D token tensor (image grid) or list of ids (sequence, EOS included)."""
    sizes = [s.num_tokens for s in specs]
    c, inp, tgt = budgets_4m(sizes, [s.kind == "image" for s in specs], alphas_in, alphas_tg, input_range,
                             target_range, weights)
    out = {}
    for spec, b_in, b_tg in zip(specs, inp, tgt):
        if spec.kind == "image":
            out[spec.name] = {"tensor": tokens[spec.name], **image_mask_4m(spec.num_tokens, b_in, b_tg)}
        else:
            keep = spec.keep if isinstance(spec.keep, str) else spec.keep[c]
            out[spec.name] = sequence_mask_4m(list(tokens[spec.name]), spec.num_tokens, b_in, b_tg, keep,
                                              sentinel_ids, pad_id)
    return out
