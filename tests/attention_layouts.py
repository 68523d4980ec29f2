"""Attention metadata layouts and helpers shared by the CPU and CUDA attention tests."""
import torch

from fourm_fast.ops import masked_attention
from fourm_fast.reference.attention import decoder_metadata_4m


def random_metadata(B, Nq, Nk, kind, gen):
    """Random k_valid (about 20% padding) and, by kind ("padding", "segments", "ranks", "both"),
    segments (query segment 3 has no keys) and rank limits from -1 (sees nothing) up."""
    k_valid = torch.rand(B, Nk, generator=gen) > 0.2
    meta = dict(q_segment=None, k_segment=None, q_limit=None, k_rank=None)
    if kind in ("segments", "both"):
        meta["q_segment"] = torch.randint(0, 4, (B, Nq), generator=gen, dtype=torch.int32)
        meta["k_segment"] = torch.randint(0, 3, (B, Nk), generator=gen, dtype=torch.int32)  # segment 3: empty
    if kind in ("ranks", "both"):
        meta["k_rank"] = torch.arange(Nk, dtype=torch.int32).expand(B, Nk).contiguous()
        meta["q_limit"] = torch.randint(-1, Nk, (B, Nq), generator=gen, dtype=torch.int32)
    return k_valid, meta


def outputs_at_thread_counts(q, k, v, k_valid, meta, g, counts=(1, 2)):
    """(out, dq, dk, dv) of masked_attention run with each of torch's thread counts in counts."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = masked_attention(qq, kk, vv, k_valid, **meta)
            results.append((out, *torch.autograd.grad(out, (qq, kk, vv), g)))
    finally:
        torch.set_num_threads(threads)
    return results


def decoder_layout_metadata(B, M, gen):
    """4M's decoder self-attention rule on a random layout of contiguous modalities: images
    (bidirectional over their targets) and sequences (causal), each followed by padding."""
    dam = torch.zeros(B, M, dtype=torch.int32)
    mod = torch.zeros(B, M, dtype=torch.int32)
    for b in range(B):
        start, mod_id = 0, 0
        while start < M:
            n = min(int(torch.randint(1, max(2, M // 3) + 1, (1,), generator=gen)), M - start)
            targets = int(torch.randint(0, n + 1, (1,), generator=gen))
            if torch.rand(1, generator=gen).item() < 0.5:
                dam[b, start] = targets
            else:
                dam[b, start:start + targets] = 1
            mod[b, start:start + n] = 100 + mod_id
            start, mod_id = start + n, mod_id + 1
    k_valid, seg, _, limit, rank = decoder_metadata_4m(dam, mod, causal=False, sep=True)
    return k_valid, dict(q_segment=seg, k_segment=seg.clone(), q_limit=limit, k_rank=rank)
