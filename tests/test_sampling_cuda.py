"""sample_tokens on CUDA: bit-identical to the CPU executor for the same seed (skipped without a GPU)."""
import math

import pytest
import torch

from conftest import requires_cuda
from fourm_fast.ops import sample_tokens, select_positions
from fourm_fast.reference.sampling import filtered_probs_reference

pytestmark = [requires_cuda, pytest.mark.cuda]

SETTINGS = [
    dict(),
    dict(temperature=0.0),
    dict(top_k=7),
    dict(top_k=0.01, top_p=0.9),
    dict(top_p=0.5, temperature=0.6),
    dict(min_p=0.05, temperature=1.3),
    dict(top_k=50, top_p=0.95, min_p=0.01, temperature=0.8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1, 2, 97, 1031, 16384, 30000])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_cuda_equals_cpu_bitwise(setting, V, dtype):
    logits = (torch.randn(33, V) * 3).to(dtype)
    logits[5, : V // 2] = -math.inf
    for seed in (0, 1, 2**40 + 3):
        c_tok, c_prob = sample_tokens(logits, seed=seed, offset=7, **setting)
        g_tok, g_prob = sample_tokens(logits.cuda(), seed=seed, offset=7, **setting)
        assert torch.equal(g_tok.cpu(), c_tok), f"tokens differ at rows {(g_tok.cpu() != c_tok).nonzero().flatten().tolist()}"
        assert torch.equal(g_prob.cpu(), c_prob)


def test_cuda_cfg_and_per_row_params_equal_cpu():
    R, V = 64, 4099
    logits = torch.randn(R, V) * 2
    uncond = torch.randn(R, V) * 2
    params = dict(
        temperature=torch.rand(R) * 2,
        top_k=torch.randint(0, 100, (R,)).float(),
        top_p=torch.rand(R) * 0.9 + 0.1,
        min_p=torch.rand(R) * 0.1,
        cfg_scale=torch.rand(R) * 4,
    )
    c = sample_tokens(logits, uncond_logits=uncond, seed=3, **params)
    g = sample_tokens(logits.cuda(), uncond_logits=uncond.cuda(), seed=torch.tensor(3, device="cuda"),
                      **{k: v.cuda() for k, v in params.items()})
    assert torch.equal(g[0].cpu(), c[0]) and torch.equal(g[1].cpu(), c[1])


def test_cuda_distribution_and_noncontiguous():
    row = torch.randn(40) * 1.5
    n = 400_000
    logits = row.expand(n, 40).cuda()  # stride 0 rows
    tokens, _ = sample_tokens(logits, top_p=0.9, seed=5)
    expected = filtered_probs_reference(row[None], top_p=0.9)[0]
    freq = torch.bincount(tokens.cpu(), minlength=40).double() / n
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 5e-3  # ~6 sigma at these counts


def test_cuda_errors_and_graph_capture():
    x = torch.randn(4, 10, device="cuda")
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match="row 1 has a NaN"):
        sample_tokens(x)
    with pytest.raises(ValueError, match="same device|are on"):
        sample_tokens(torch.randn(4, 10, device="cuda"), uncond_logits=torch.randn(4, 10))
    logits = torch.randn(256, 1000, device="cuda")
    seed = torch.tensor(0, device="cuda")
    out = torch.empty(256, dtype=torch.int64, device="cuda")
    sample_tokens(logits, top_p=0.9, seed=seed)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, _ = sample_tokens(logits, top_p=0.9, seed=seed)
        out.copy_(tokens)
    draws = []
    for s in range(3):
        seed.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        draws.append(out.clone())
        assert torch.equal(out.cpu(), sample_tokens(logits.cpu(), top_p=0.9, seed=s)[0])
    assert not torch.equal(draws[0], draws[1])


def test_cuda_select_positions():
    conf = torch.randn(8, 300)
    cand = torch.rand(8, 300) < 0.5
    num = torch.randint(0, 200, (8,))
    assert torch.equal(select_positions(conf.cuda(), cand.cuda(), num.cuda()).cpu(), select_positions(conf, cand, num))


def test_cuda_guidance_scale_one_and_zero_are_the_branches_exactly():
    c, u = torch.randn(32, 3000) * 4, torch.randn(32, 3000) * 4
    for scale, branch in ((1.0, c), (0.0, u)):
        want = sample_tokens(branch.cuda(), seed=5)
        got = sample_tokens(c.cuda(), uncond_logits=u.cuda(), cfg_scale=scale, seed=5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), scale
