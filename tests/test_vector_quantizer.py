"""fourm_fast.nn.VectorQuantizer: straight-through estimator, losses, EMA, dead-code restarts."""
import pytest
import torch
import torch.nn.functional as F

from fourm_fast.nn import VectorQuantizer


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_forward_quantizes_to_nearest_code(metric):
    vq = VectorQuantizer(64, 16, metric=metric)
    z = torch.randn(2, 30, 16)
    out = vq(z)
    assert out.indices.shape == (2, 30) and out.quantized.shape == z.shape
    codes = vq.codebook.detach()
    if metric == "cosine":
        codes = F.normalize(codes, dim=-1)
        expect = (F.normalize(z, dim=-1) @ codes.T).argmax(-1)
    else:
        expect = torch.cdist(z.reshape(-1, 16), codes).argmin(-1).reshape(2, 30)
    assert torch.equal(out.indices, expect)
    torch.testing.assert_close(out.quantized, codes[out.indices])


def test_straight_through_and_losses():
    torch.manual_seed(1)
    vq = VectorQuantizer(32, 8, beta=0.25)
    z = torch.randn(100, 8, requires_grad=True)
    out = vq(z)
    codes = vq.codebook[out.indices]
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(z, codes).detach())
    torch.testing.assert_close(out.codebook_loss, F.mse_loss(z, codes).detach())
    torch.testing.assert_close(out.loss, (1.25 * F.mse_loss(z, codes)).detach())
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity gradient through the quantiser
    assert vq.codebook.grad is None  # only losses train the codebook
    out = vq(z.detach())
    out.loss.backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_each_loss_trains_only_its_side():
    """VQ-VAE's split: the commitment loss moves the encoder output only, the codebook loss the
    codebook only (each with the other side detached); their values alone cannot tell."""
    torch.manual_seed(4)
    vq = VectorQuantizer(16, 6)
    z = torch.randn(40, 6, requires_grad=True)
    out = vq(z)
    codes = vq.codebook.detach()[out.indices]
    out.commitment_loss.backward()
    torch.testing.assert_close(z.grad, 2 * (z.detach() - codes) / z.numel())
    assert vq.codebook.grad is None or not vq.codebook.grad.any()
    z.grad = None
    vq.zero_grad()
    out = vq(z)
    out.codebook_loss.backward()
    assert z.grad is None or not z.grad.any()
    want = torch.zeros_like(vq.codebook).index_add_(0, out.indices, 2 * (codes - z.detach()) / z.numel())
    torch.testing.assert_close(vq.codebook.grad, want)


def test_perplexity_counts_the_codes_in_use():
    vq = VectorQuantizer(8, 2)
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(8.0)[:, None].expand(8, 2) * 10)
    z = torch.arange(8.0)[:, None].repeat(3, 2) * 10  # each of the 8 codes picked 3 times
    torch.testing.assert_close(vq(z).perplexity, torch.tensor(8.0))
    torch.testing.assert_close(vq(z[:6]).perplexity, torch.tensor(6.0))  # 6 codes, once each
    torch.testing.assert_close(vq(torch.zeros(5, 2)).perplexity, torch.tensor(1.0))


def test_one_ema_step_in_closed_form():
    """count <- d count + (1 - d) n, sum <- d sum + (1 - d) sum(z), codebook = sum / Laplace-smoothed
    count; decay 0.9, where decay and 1 - decay differ."""
    d, eps = 0.9, 1e-5
    vq = VectorQuantizer(3, 2, ema_decay=d, ema_eps=eps)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
        vq.ema_sum.copy_(vq.codebook)
    z = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [9.0, 1.0]])  # codes 0, 0, 1
    vq(z)
    count = torch.tensor([d + (1 - d) * 2, d + (1 - d) * 1, d])
    total = torch.tensor([[0.0, 0.0], [10.0 * d, 0.0], [0.0, 10.0 * d]]) + (1 - d) * torch.tensor([[0.0, 2.0], [9.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(vq.ema_count, count)
    torch.testing.assert_close(vq.ema_sum, total)
    n = count.sum()
    torch.testing.assert_close(vq.codebook, total / ((count + eps) / (n + 3 * eps) * n)[:, None])


def test_ema_moves_codes_to_cluster_means():
    torch.manual_seed(2)
    vq = VectorQuantizer(4, 2, ema_decay=0.5)
    centers = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    vq.codebook.copy_(centers * 0.8)
    vq.ema_sum.copy_(vq.codebook)
    z = (centers[:, None, :] + 0.01 * torch.randn(4, 50, 2)).reshape(-1, 2)
    for _ in range(30):
        out = vq(z)
    torch.testing.assert_close(vq.codebook, centers, atol=0.05, rtol=0)
    assert out.codebook_loss.item() == 0.0
    assert not isinstance(vq.codebook, torch.nn.Parameter)


def test_dead_codes_are_restarted_from_inputs():
    torch.manual_seed(3)
    vq = VectorQuantizer(8, 3, ema_decay=0.9, dead_code_threshold=0.5)
    vq.codebook[1:] = 1e3  # codes 1..7 far away: never used
    vq.ema_sum.copy_(vq.codebook)
    z = torch.randn(64, 3)
    for step in range(10):  # their counts decay 0.9 a step: below 0.5 at the 7th
        vq(z)
        if bool((vq.codebook[1:].abs() < 100).all()):
            break
    assert step == 6, "unused codes were not restarted near the data when their count fell below 0.5"
    restarted = vq.codebook[1:]
    assert torch.equal(vq.ema_count[1:], torch.ones(7)) and torch.equal(vq.ema_sum[1:], restarted)
    assert bool((restarted[:, None, :] == z[None]).all(-1).any(1).all())  # each one an input row


def test_eval_mode_freezes_ema():
    vq = VectorQuantizer(8, 3, ema_decay=0.9).eval()
    before = vq.codebook.clone()
    vq(torch.randn(20, 3))
    assert torch.equal(before, vq.codebook)


def test_bad_input():
    vq = VectorQuantizer(8, 3)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 3\)"):
        vq(torch.randn(4, 5))
    z = torch.randn(4, 3)
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        vq(z)
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(8, 3, metric="dot")
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 3, ema_decay=1.5)
    with pytest.raises(TypeError, match="codebook must be float32, bfloat16 or float16 .* got codebook torch.float64"):
        VectorQuantizer(8, 3).double()(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="z floating, got codebook torch.float32 and z torch.int64"):
        vq(torch.ones(4, 3, dtype=torch.int64))
