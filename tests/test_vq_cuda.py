"""vq_lookup on CUDA: GPU vs its CPU twin vs the float64 reference (skipped without a GPU)."""
import pytest
import torch

from conftest import requires_cuda
from fourm_fast.ops import vq_dequantize, vq_lookup
from vq_checks import assert_vq_matches_reference, code_rounding

pytestmark = [requires_cuda, pytest.mark.cuda]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "N,K,D",
    [(1, 1, 1), (19, 7, 3), (1025, 1031, 32), (1025, 8192, 64), (19, 8192, 256), (4099, 1024, 32), (97, 16384, 32)],
)
def test_cuda_matches_reference_and_cpu(N, K, D, metric, dtype):
    x = torch.randn(N, D).to(dtype)
    cb = torch.randn(K, D).to(dtype)
    idx, dist = vq_lookup(x.cuda(), cb.cuda(), metric)
    assert idx.device.type == "cuda"
    assert_vq_matches_reference(x, cb, metric, idx.cpu(), dist.cpu(), code_rounding=code_rounding(dtype, metric))
    cpu_idx, cpu_dist = vq_lookup(x, cb, metric)
    agree = (idx.cpu() == cpu_idx).float().mean().item()
    assert agree >= 0.99, f"GPU and CPU agree on only {agree:.3%} of rows"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_equals_cpu_on_exact_data(dtype):
    # Small integers: every product and sum is exact in fp32, so both executors must agree bit
    # for bit, ties included (smallest index).
    base = torch.randint(-4, 5, (300, 48)).to(dtype)
    cb = torch.cat([base, base])
    x = torch.randint(-4, 5, (2049, 48)).to(dtype)
    g_idx, g_dist = vq_lookup(x.cuda(), cb.cuda(), "l2")
    c_idx, c_dist = vq_lookup(x, cb, "l2")
    assert torch.equal(g_idx.cpu(), c_idx)
    assert torch.equal(g_dist.cpu(), c_dist)
    assert (c_idx < 300).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_one_dim_cosine_ties_go_to_smallest_index(dtype):
    # With D = 1 every code of a row's sign is at cosine distance 0: the GPU's prepared codes must
    # be exactly +-1 (c / |c|), as the CPU's are, or ties go to a larger index.
    g = torch.Generator().manual_seed(1)
    cb, x = torch.randn(33, 1, generator=g).to(dtype), torch.randn(70, 1, generator=g).to(dtype)
    idx, dist = vq_lookup(x.cuda(), cb.cuda(), "cosine")
    first_pos, first_neg = int((cb[:, 0] > 0).nonzero()[0]), int((cb[:, 0] < 0).nonzero()[0])
    assert torch.equal(idx.cpu(), torch.where(x[:, 0] > 0, first_pos, first_neg))
    assert (dist == 0).all()


def test_cuda_strided_and_batched():
    x = torch.randn(3, 40, 64, device="cuda")[:, ::3, :]
    cb = torch.randn(64, 500, device="cuda").T
    idx, dist = vq_lookup(x, cb)
    assert idx.shape == (3, 14)
    assert_vq_matches_reference(x.cpu(), cb.cpu(), "l2", idx.cpu(), dist.cpu())


def test_cuda_nonfinite_and_empty():
    x = torch.randn(33, 16, device="cuda")
    x[5, 3] = float("nan")
    x[6, 0] = float("inf")
    cb = torch.randn(70, 16, device="cuda")
    cb[2, 2] = float("nan")
    idx, dist = vq_lookup(x, cb)
    c_idx, _ = vq_lookup(x.cpu(), cb.cpu())
    assert torch.equal(idx.cpu(), c_idx)
    assert int(idx[5]) == -1 and int(idx[6]) == -1 and torch.isnan(dist[5])
    assert (idx != 2).all()
    e_idx, e_dist = vq_lookup(torch.randn(0, 16, device="cuda"), cb)
    assert e_idx.shape == (0,) and e_dist.shape == (0,)
    with pytest.raises(IndexError, match="NaN or inf"):
        vq_dequantize(idx, cb)


def test_cuda_device_mismatch_raises():
    with pytest.raises(ValueError, match="same device"):
        vq_lookup(torch.randn(4, 8, device="cuda"), torch.randn(5, 8))


def test_cuda_large_rows():
    x = torch.randn(65536, 32, device="cuda")
    cb = torch.randn(8192, 32, device="cuda")
    idx, dist = vq_lookup(x, cb)
    sample = torch.randint(0, 65536, (512,), device="cuda")
    assert_vq_matches_reference(x[sample].cpu(), cb.cpu(), "l2", idx[sample].cpu(), dist[sample].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_opcheck_and_compile(dtype):
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(2, 19, 32, device="cuda", dtype=dtype, requires_grad=True)
    cb = torch.randn(100, 32, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fourm_fast.vq_lookup.default, (x, cb, "l2"), test_utils=utils)
    torch._dynamo.reset()
    compiled = torch.compile(lambda z, c: vq_lookup(z, c)[1].sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x, cb), vq_lookup(x, cb)[1].sum())
