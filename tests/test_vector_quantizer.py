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
    for _ in range(10):
        vq(z)
    assert (vq.codebook.abs() < 100).all(), "unused codes were not restarted near the data"


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
