"""Attention metadata layouts shared by the CPU and CUDA attention tests."""
import torch

from fourm_fast.reference.attention import decoder_metadata_4m


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
