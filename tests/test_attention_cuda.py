"""masked_attention on CUDA: the GPU executor vs its CPU twin vs the float64 reference, forward and
backward, on hostile shapes, every metadata pattern and 4M's decoder masks (skipped without a GPU).

fp32 is held to a tight tolerance. For bf16 / fp16 the rule is FlashAttention's: the error against
the float64 reference may be at most twice the error of the same attention computed naively in the
low-precision dtype, plus a small eps."""
import pytest
import torch

from attention_layouts import decoder_layout_metadata
from conftest import requires_cuda
from fourm_fast.ops import masked_attention
from fourm_fast.reference.attention import decoder_metadata_4m, masked_attention_reference, visible_mask
from parity import load_json, load_safetensors

pytestmark = [requires_cuda, pytest.mark.cuda]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
META_KEYS = ("q_segment", "k_segment", "q_limit", "k_rank")
EPS = 1e-3


def _fwd_bwd(q, k, v, k_valid, meta, g, scale):
    """The op pair as autograd would call it: (out, lse, dq, dk, dv)."""
    m = [meta[key] for key in META_KEYS]
    out, lse = torch.ops.fourm_fast.masked_attention_fwd.default(q, k, v, k_valid, *m, scale)
    dq, dk, dv = torch.ops.fourm_fast.masked_attention_bwd.default(g, q, k, v, out, lse, k_valid, *m, scale)
    return out, lse, dq, dk, dv


def _reference(q, k, v, k_valid, meta, g, scale, dtype):
    """(out, dq, dk, dv) of the plain-PyTorch attention computed in `dtype`."""
    ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = masked_attention_reference(*ins, k_valid, **meta, scale=scale, dtype=dtype)
    return (out, *torch.autograd.grad(out, ins, g.to(dtype)))


def _reference_lse(q, k, k_valid, meta, scale):
    vis = visible_mask(k_valid, q.shape[2], **meta)[:, None]
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return s.masked_fill(~vis, float("-inf")).logsumexp(-1)


def _to(t, device):
    return None if t is None else t.to(device)


def _check(q, k, v, k_valid, meta, g, scale=None):
    """q, k, v, g, k_valid and meta live on the GPU (any strides); the CPU twin gets copies."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gpu = [t.cpu() for t in _fwd_bwd(q, k, v, k_valid, meta, g, scale)]
    meta_cpu = {key: _to(t, "cpu") for key, t in meta.items()}
    cpu = _fwd_bwd(q.cpu(), k.cpu(), v.cpu(), k_valid.cpu(), meta_cpu, g.cpu(), scale)
    ref = [t.cpu() for t in _reference(q, k, v, k_valid, meta, g, scale, torch.float64)]
    names = ("out", "dq", "dk", "dv")
    gpu_main, cpu_main = [gpu[0], *gpu[2:]], [cpu[0], *cpu[2:]]
    for name, a in zip(names, gpu_main):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: dtype {a.dtype} or non-finite values"
    if dtype == torch.float32:
        for i, name in enumerate(names):
            tol = 2e-5 if name == "out" else 2e-4
            torch.testing.assert_close(gpu_main[i].double(), ref[i], atol=tol, rtol=tol,
                                       msg=lambda m: f"{name} vs float64: {m}")
            torch.testing.assert_close(gpu_main[i], cpu_main[i], atol=tol, rtol=tol,
                                       msg=lambda m: f"{name} vs CPU: {m}")
    else:
        naive = [t.cpu() for t in _reference(q, k, v, k_valid, meta, g, scale, dtype)]
        for i, name in enumerate(names):
            eps = EPS * max(1.0, ref[i].abs().max().item())
            bound = 2 * (naive[i].double() - ref[i]).abs().max().item() + eps
            err = (gpu_main[i].double() - ref[i]).abs().max().item()
            assert err <= bound, f"{name}: error {err:.3g} vs float64 > 2 x naive {dtype} error + eps = {bound:.3g}"
            diff = (gpu_main[i].double() - cpu_main[i].double()).abs().max().item()
            assert diff <= bound, f"{name}: GPU and CPU differ by {diff:.3g} > {bound:.3g}"
    # lse: the same empty rows (-inf) as the CPU executor, the same values elsewhere.
    g_lse, c_lse = gpu[1], cpu[1]
    assert g_lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(g_lse), torch.isneginf(c_lse)), "rows without visible keys differ"
    assert torch.equal(torch.isneginf(c_lse), torch.isneginf(_reference_lse(q, k, k_valid, meta, scale).cpu()))
    finite = torch.isfinite(c_lse)
    torch.testing.assert_close(g_lse[finite], c_lse[finite], atol=1e-4, rtol=1e-4)
    return gpu


def _metadata(B, Nq, Nk, kind, gen):
    """(k_valid, meta) on the CPU. Every kind but "tail" leaves some queries without a visible key
    ("halves" only where Nq != Nk). "tail" and "halves" make whole tiles fully visible (the
    kernels' path without the per-element rule, from Nk = 64 up) next to partial and skipped ones."""
    if kind == "decoder":
        assert Nq == Nk
        return decoder_layout_metadata(B, Nk, gen)
    if kind in ("tail", "halves"):
        k_valid = torch.ones(B, Nk, dtype=torch.bool)
        k_valid[0, Nk - Nk // 5:] = False  # sample 0 padded at the end, the others full
        meta = dict(q_segment=None, k_segment=None, q_limit=None, k_rank=None)
        if kind == "halves":  # two contiguous segments: the first bidirectional, the second causal
            qi, kj = torch.arange(Nq, dtype=torch.int32), torch.arange(Nk, dtype=torch.int32)
            meta["q_segment"] = (qi * 2 // Nq).expand(B, Nq).contiguous()
            meta["k_segment"] = (kj * 2 // Nk).expand(B, Nk).contiguous()
            meta["k_rank"] = kj.expand(B, Nk).contiguous()
            meta["q_limit"] = torch.where(qi * 2 // Nq == 0, Nk, qi * Nk // Nq).to(torch.int32).expand(B, Nq).contiguous()
        return k_valid, meta
    k_valid = torch.rand(B, Nk, generator=gen) > 0.2
    meta = dict(q_segment=None, k_segment=None, q_limit=None, k_rank=None)
    if kind in ("segments", "both"):
        meta["q_segment"] = torch.randint(0, 4, (B, Nq), generator=gen, dtype=torch.int32)
        meta["k_segment"] = torch.randint(0, 3, (B, Nk), generator=gen, dtype=torch.int32)  # segment 3: no keys
    if kind == "blocks":  # contiguous segments of different lengths on both sides: block-sparse tiles
        meta["q_segment"] = torch.randint(0, 6, (B, Nq), generator=gen, dtype=torch.int32).sort(dim=1).values
        meta["k_segment"] = torch.randint(0, 5, (B, Nk), generator=gen, dtype=torch.int32).sort(dim=1).values
    if kind in ("ranks", "both", "blocks"):
        meta["k_rank"] = torch.arange(Nk, dtype=torch.int32).expand(B, Nk).contiguous()
        meta["q_limit"] = torch.randint(-1, Nk, (B, Nq), generator=gen, dtype=torch.int32)
    if kind == "padding" and B > 1:
        k_valid[-1] = False  # a whole sample of padding
    return k_valid, meta


def _inputs(B, H, Nq, Nk, d, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, n, d, generator=gen).to(dtype).to(DEVICE) for n in (Nq, Nk, Nk, Nq))
    k_valid, meta = _metadata(B, Nq, Nk, kind, gen)
    return q, k, v, k_valid.to(DEVICE), {key: _to(t, DEVICE) for key, t in meta.items()}, g


SHAPES = [(1, 1, 1, 1, 16), (2, 3, 17, 17, 32), (1, 3, 128, 128, 64), (2, 1, 257, 257, 128), (2, 3, 17, 128, 64),
          (1, 3, 257, 17, 16), (3, 1, 1, 257, 128), (2, 3, 128, 257, 32)]
KINDS = ["padding", "segments", "ranks", "both", "blocks", "decoder", "tail", "halves"]
CASES = [(s, kind) for s in SHAPES for kind in KINDS if kind != "decoder" or s[2] == s[3]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kind", CASES, ids=[f"{'x'.join(map(str, s))}-{k}" for s, k in CASES])
def test_cuda_matches_cpu_and_reference(shape, kind, dtype):
    B, H, Nq, Nk, d = shape
    _check(*_inputs(B, H, Nq, Nk, d, kind, dtype, seed=B * 7919 + Nq * 31 + Nk + d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 8, 20, 40, 72, 100, 160, 256])
def test_cuda_head_dims_off_the_common_tiers(d, dtype):
    # d % 8 != 0 takes padded copies, 72 / 100 the kD = 128 tier with zero columns, > 128 the
    # generic (SIMT, column-sliced) path for every dtype.
    _check(*_inputs(2, 2, 70, 45, d, "both", dtype, seed=d))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 64])
def test_cuda_non_contiguous_views(d, dtype):
    B, N, H = 2, 97, 3
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(B, N, 3, H, d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, d) strided views
    k_valid, meta = _metadata(B, N, N, "both", gen)
    # Metadata as strided views too.
    k_valid = k_valid.t().contiguous().to(DEVICE).t()
    meta = {key: t.t().contiguous().to(DEVICE).t() for key, t in meta.items()}
    g = torch.randn(B, H, N, d, generator=gen).to(dtype).to(DEVICE)
    _check(q, k, v, k_valid, meta, g)
    # Rows that start 2 bytes past a 16-byte boundary (a padded copy on the tensor-core path) and
    # a broadcast (stride 0) head dimension.
    buf = torch.randn(B, H, N, d + 1, generator=gen).to(dtype).to(DEVICE)
    k_b = torch.randn(B, 1, N, d, generator=gen).to(dtype).to(DEVICE).expand(B, H, N, d)
    _check(buf[..., 1:], k_b, v, k_valid, meta, g)
    # A grad_out with every stride 0, as out.sum().backward() hands it over.
    g0 = torch.randn(1, 1, 1, 1, generator=gen).to(dtype).to(DEVICE).expand(B, H, N, d)
    _check(q, k, v, k_valid, meta, g0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_queries_that_see_nothing(dtype):
    B, H, N, d = 2, 3, 70, 64
    gen = torch.Generator().manual_seed(11)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen).to(dtype).to(DEVICE) for _ in range(4))
    k_valid = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    k_valid[1] = False  # the whole second sample is padding
    k_valid[0, 66:] = False
    q_seg = torch.zeros(B, N, dtype=torch.int32, device=DEVICE)
    q_seg[0, :5] = 9  # a segment without keys
    k_seg = torch.zeros(B, N, dtype=torch.int32, device=DEVICE)
    meta = dict(q_segment=q_seg, k_segment=k_seg, q_limit=None, k_rank=None)
    out, lse, dq, dk, dv = _check(q, k, v, k_valid, meta, g)
    assert (out[1] == 0).all() and (out[0, :, :5] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, :5]).all()
    assert (dq[1] == 0).all() and (dq[0, :, :5] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all() and (dk[0, :, 66:] == 0).all() and (dv[0, :, 66:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Nq,Nk", [(0, 2, 5, 5), (2, 0, 5, 5), (2, 2, 0, 5), (2, 2, 5, 0), (2, 2, 0, 0)])
def test_cuda_empty(B, H, Nq, Nk, dtype):
    d = 32
    q, g = (torch.randn(B, H, Nq, d, device=DEVICE).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Nk, d, device=DEVICE).to(dtype) for _ in range(2))
    k_valid = torch.ones(B, Nk, dtype=torch.bool, device=DEVICE)
    meta = dict(q_segment=None, k_segment=None, q_limit=None, k_rank=None)
    out, lse, dq, dk, dv = _fwd_bwd(q, k, v, k_valid, meta, g, 0.5)
    assert out.shape == q.shape and lse.shape == (B, H, Nq) and dq.shape == q.shape and dk.shape == k.shape
    assert (out == 0).all() and torch.isneginf(lse).all() and (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_4m_decoder_rule_from_parity_data(dtype):
    # As tests/test_attention.py: with q = k = 0 and v = identity, out[i, j] = 1/|visible(i)| or 0,
    # so the output's support is the visibility pattern of ml-4m's adapt_decoder_attention_mask.
    data = load_safetensors("decoder_mask.safetensors")
    for case in load_json("decoder_mask.json")["cases"]:
        dam, mod = data[f"{case}.decoder_attention_mask"], data[f"{case}.mod_mask"]
        for flags in ("causal0_sep1", "causal0_sep0", "causal1_sep1", "causal1_sep0"):
            blocked = data[f"{case}.out.{flags}"]
            meta = decoder_metadata_4m(dam, mod, causal=flags.startswith("causal1"), sep=flags.endswith("sep1"))
            k_valid, q_seg, k_seg, q_lim, k_rank = (_to(t, DEVICE) for t in meta)
            B, M = dam.shape
            q = torch.zeros(B, 1, M, M, device=DEVICE, dtype=dtype)
            v = torch.eye(M, device=DEVICE, dtype=dtype).expand(B, 1, M, M).contiguous()
            out = masked_attention(q, q.clone(), v, k_valid, q_seg, k_seg, q_lim, k_rank)
            assert torch.equal(out[:, 0].cpu() > 0, ~blocked), f"{case} {flags}"
            cpu_meta = (_to(t, "cpu") for t in (k_valid, q_seg, k_seg, q_lim, k_rank))
            cpu = masked_attention(q.cpu(), q.cpu(), v.cpu(), *cpu_meta)
            torch.testing.assert_close(out.cpu(), cpu, atol=0, rtol=0 if dtype == torch.float32 else 2**-8)
            g = torch.randn(B, 1, M, M, device=DEVICE).to(dtype)
            qr = torch.randn(B, 1, M, M, device=DEVICE).to(dtype)
            _check(qr, qr.flip(2), v, k_valid, dict(q_segment=q_seg, k_segment=k_seg, q_limit=q_lim, k_rank=k_rank), g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_long_block_sparse_decoder(dtype):
    # Many tiles, most of them skipped: contiguous modalities of a long decoder sequence.
    gen = torch.Generator().manual_seed(4)
    B, H, M, d = 2, 2, 1000, 64
    q, k, v, g = (torch.randn(B, H, M, d, generator=gen).to(dtype).to(DEVICE) for _ in range(4))
    k_valid, meta = decoder_layout_metadata(B, M, gen)
    _check(q, k, v, k_valid.to(DEVICE), {key: t.to(DEVICE) for key, t in meta.items()}, g)


def _leaf_inputs(B, H, N, d, gen):
    """q, k, v on the GPU requiring grad, with "both" metadata (segments and ranks) there too."""
    q, k, v = (torch.randn(B, H, N, d, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    k_valid, meta = _metadata(B, N, N, "both", gen)
    return q, k, v, k_valid.to(DEVICE), {key: t.to(DEVICE) for key, t in meta.items()}


def test_cuda_public_api_autograd_opcheck_and_determinism():
    gen = torch.Generator().manual_seed(2)
    B, H, N, d = 2, 3, 67, 32
    q, k, v, k_valid, meta = _leaf_inputs(B, H, N, d, gen)
    out = masked_attention(q, k, v, k_valid, **meta)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    qc, kc, vc = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    out_c = masked_attention(qc, kc, vc, k_valid.cpu(), **{key: t.cpu() for key, t in meta.items()})
    grads_c = torch.autograd.grad(out_c.square().sum(), (qc, kc, vc))
    torch.testing.assert_close(out.cpu(), out_c, atol=2e-5, rtol=2e-5)
    for a, b in zip(grads, grads_c):
        torch.testing.assert_close(a.cpu(), b, atol=2e-4, rtol=2e-4)
    args = (q, k, v, k_valid, meta["q_segment"], meta["k_segment"], meta["q_limit"], meta["k_rank"], 0.25)
    torch.library.opcheck(torch.ops.fourm_fast.masked_attention_fwd.default, args)
    # No atomics: the backward pass is bitwise reproducible.
    for dtype in DTYPES:
        x = [t.detach().to(dtype) for t in (q, k, v)]
        g = torch.randn_like(x[0])
        first = _fwd_bwd(*x, k_valid, meta, g, 0.3)
        second = _fwd_bwd(*x, k_valid, meta, g, 0.3)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_cuda_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 3, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="one device"):
        masked_attention(q, q, q, torch.ones(2, 5, dtype=torch.bool))
    kv = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="q_segment is on"):
        masked_attention(q, q, q, kv, q_segment=torch.zeros(2, 5, dtype=torch.int32),
                         k_segment=torch.zeros(2, 5, dtype=torch.int32, device=DEVICE))
    none4 = (None, None, None, None)
    out, lse = torch.ops.fourm_fast.masked_attention_fwd.default(q, q, q, kv, *none4, 0.5)
    with pytest.raises(TypeError, match="grad_out and out must have q's dtype"):
        torch.ops.fourm_fast.masked_attention_bwd.default(out.half(), q, q, q, out, lse, kv, *none4, 0.5)
    with pytest.raises(ValueError, match="lse must be float32"):
        torch.ops.fourm_fast.masked_attention_bwd.default(out, q, q, q, out, lse[:, :, :2], kv, *none4, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_huge_finite_values_in_masked_keys_do_not_reach_gradients(dtype):
    # dS is 0 where P is 0 (shared attn_dscore): dO V^T overflowing for a masked key's V row near
    # FLT_MAX must not turn dq NaN; the gradients equal those with ordinary values there
    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(2, 2, 70, 64, generator=g) for _ in range(4))
    k_valid = torch.ones(2, 70, dtype=torch.bool)
    k_valid[0, 5] = k_valid[1, 33] = False
    huge = v.clone()
    huge[0, :, 5] = 1e38
    huge[1, :, 33] = -3e38
    grads = []
    for vv in (v, huge):
        ins = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, vv)]
        out = masked_attention(*ins, k_valid.to(DEVICE))
        grads.append(torch.autograd.grad(out, ins, do.to(DEVICE, dtype)))
    for name, a, b in zip("qk", grads[0][:2], grads[1][:2]):
        assert torch.isfinite(b).all(), name
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_cuda_compiles_into_one_graph_and_takes_autocast_qk_norm():
    # Two GPU-only paths a CPU run cannot reach: the backend check used to break the graph at every
    # attention call on CUDA (fullgraph raised), and CUDA autocast keeps QK-norm's LayerNorm in
    # float32 next to a bfloat16 v (the op raised "must share a dtype").
    from fourm_fast.nn import Attention

    gen = torch.Generator().manual_seed(9)
    B, H, N, d = 2, 3, 33, 32
    q, k, v, k_valid, meta = _leaf_inputs(B, H, N, d, gen)

    def f(q, k, v):
        return masked_attention(q, k, v, k_valid, **meta).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(q, k, v), f(q, k, v)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(a, b)
    layer = Attention(H * d, H, qk_norm=True).to(DEVICE)
    x = torch.randn(B, N, H * d, generator=gen).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x, torch.ones(B, N, dtype=torch.bool, device=DEVICE))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
