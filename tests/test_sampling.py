"""sample_tokens / select_positions on the CPU: 4M parity, exact distribution, determinism, errors."""
import math

import numpy as np
import pytest
import torch

from fourm_fast.ops import sample_tokens, select_positions
from fourm_fast.reference.sampling import (
    effective_top_k,
    filter_mask_reference,
    filtered_probs_reference,
    guided_logits_reference,
    sample_tokens_4m,
    top_k_top_p_filtering_4m,
)
from parity import load_json, load_safetensors

PARITY = load_safetensors("sampling_filter.safetensors")
PARITY_META = load_json("sampling_filter.json")


def _ours_from_4m(top_k, top_k_type, top_p):
    """4M uses top_p = 0 for 'off'; fourm_fast uses 1. A float top_k is a fraction of V."""
    return (float(top_k) if top_k_type == "float" else int(top_k)), (1.0 if top_p == 0 else top_p)


@pytest.mark.parametrize("setting", PARITY_META["settings"], ids=lambda s: s["key"])
def test_reference_filter_matches_4m_masks(setting):
    top_k, top_p = _ours_from_4m(setting["top_k"], setting["top_k_type"], setting["top_p"])
    mask = filter_mask_reference(PARITY[setting["input"]], top_k=top_k, top_p=top_p)
    assert torch.equal(mask, PARITY[setting["key"]])


@pytest.mark.parametrize("setting", PARITY_META["settings"], ids=lambda s: s["key"])
def test_4m_restatement_filter_matches_4m_masks(setting):
    """The benchmarks' restatement of 4M's filter (4M's own conventions: top_p 0 is off, an int or
    float top_k) keeps exactly the tokens the reference 4M kept."""
    top_k = float(setting["top_k"]) if setting["top_k_type"] == "float" else int(setting["top_k"])
    kept = top_k_top_p_filtering_4m(PARITY[setting["input"]], top_k=top_k, top_p=setting["top_p"]) > -math.inf
    assert torch.equal(kept, PARITY[setting["key"]])


@pytest.mark.parametrize("setting", PARITY_META["settings"], ids=lambda s: s["key"])
def test_draws_stay_inside_4m_masks(setting):
    top_k, top_p = _ours_from_4m(setting["top_k"], setting["top_k_type"], setting["top_p"])
    logits = PARITY[setting["input"]]
    mask = PARITY[setting["key"]]
    reps = 200  # each repetition of a row gets its own Philox stream (row index)
    tokens, _ = sample_tokens(logits.repeat(reps, 1), top_k=top_k, top_p=top_p, temperature=50.0, seed=1)
    tokens = tokens.reshape(reps, -1).T  # (64, reps)
    assert mask.gather(1, tokens).all(), "a token outside 4M's kept set was drawn"
    if int(mask.sum(1).max()) <= 10:  # small supports: 200 near-uniform draws cover them (miss < 1e-8)
        hits = torch.zeros_like(mask).scatter_(1, tokens, True)
        assert torch.equal(hits, mask)


@pytest.mark.parametrize("entry", PARITY_META["probs"], ids=lambda s: s["key"])
def test_probs_match_4m(entry):
    top_k, top_p = _ours_from_4m(entry["top_k"], "int", entry["top_p"])
    logits = PARITY["logits"]
    expected = PARITY[entry["key"]]
    for seed in range(5):
        tokens, probs = sample_tokens(logits, top_k=top_k, top_p=top_p, temperature=entry["temperature"], seed=seed)
        ref = expected.gather(1, tokens[:, None])[:, 0]
        assert (ref > 0).all()
        torch.testing.assert_close(probs, ref, rtol=2e-5, atol=1e-9)


def chi2_critical(df: int, z: float = 3.719016485455709) -> float:
    """Upper 1e-4 quantile of chi-square(df) by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SETTINGS = [
    dict(),
    dict(temperature=0.5, top_k=6),
    dict(temperature=1.5, top_p=0.8),
    dict(min_p=0.05),
    dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.02),
    dict(cfg_scale=2.5, top_p=0.95),
    dict(cfg_scale=0.5, temperature=1.2, top_k=0.5),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "plain")
def test_chi_square_one_million_draws(setting):
    g = torch.Generator().manual_seed(7)
    V, n = 24, 1_000_000
    row = torch.randn(V, generator=g) * 1.5
    uncond_row = row + torch.randn(V, generator=g) if "cfg_scale" in setting else None
    logits = row.expand(n, V)
    uncond = None if uncond_row is None else uncond_row.expand(n, V)
    tokens, probs = sample_tokens(logits, uncond_logits=uncond, seed=2024, **setting)
    expected = filtered_probs_reference(row[None], uncond_logits=None if uncond_row is None else uncond_row[None], **setting)[0]
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[expected == 0].sum() == 0, "draws outside the support"
    support = expected > 0
    e = expected[support] * n
    o = counts[support]
    small = e < 5  # pool sparse bins so the chi-square approximation holds
    if small.any():
        e = torch.cat([e[~small], e[small].sum()[None]])
        o = torch.cat([o[~small], o[small].sum()[None]])
    stat = float(((o - e) ** 2 / e).sum())
    df = max(int(e.numel()) - 1, 1)
    assert stat < chi2_critical(df), f"chi2 = {stat:.1f} with df = {df} (critical {chi2_critical(df):.1f})"
    # probs is the drawn token's probability under the very distribution drawn from.
    torch.testing.assert_close(probs.double(), expected[tokens], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("V", [1, 2, 97, 1031, 16384, 30000])
@pytest.mark.parametrize("setting", [dict(), dict(top_k=3), dict(top_p=0.3), dict(top_k=0.01, top_p=0.9, min_p=0.1, temperature=0.3)],
                         ids=["plain", "k3", "p03", "mixed"])
def test_support_on_hostile_vocab_sizes(cpu_isa, V, setting):
    logits = torch.randn(6, V) * 3
    logits[1, : V // 2] = -math.inf  # masked tokens never drawn
    probs_ref = filtered_probs_reference(logits, **setting)
    for seed in range(8):
        tokens, probs = sample_tokens(logits, seed=seed, **setting)
        ref = probs_ref.gather(1, tokens[:, None])[:, 0]
        assert (ref > 0).all(), f"seed {seed}: drew outside the kept set"
        torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-9)


def test_low_precision_logits_are_read_exactly():
    logits = (torch.randn(32, 500) * 2).to(torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        t_low, p_low = sample_tokens(x, top_p=0.9, seed=3)
        t_f32, p_f32 = sample_tokens(x.float(), top_p=0.9, seed=3)
        assert torch.equal(t_low, t_f32) and torch.equal(p_low, p_f32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(top_k=100),
        dict(top_p=0.9),
        dict(top_k=100, top_p=0.9, min_p=0.01, temperature=0.8),
        dict(cfg_scale=1.7, top_p=0.9),
    ],
    ids=["plain", "top_k", "top_p", "all_filters", "cfg"],
)
@pytest.mark.parametrize("isa", [2, 3], ids=["avx2", "avx512"])
def test_cpu_kernels_agree_bitwise(dtype, strided, kw, isa):
    """The AVX2 and AVX-512 row loops (vectorised load, fixed-point weights, block walk) equal the
    portable ones."""
    from fourm_fast._extension import extension

    try:
        extension()._set_cpu_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU cannot run ISA code {isa}")
    finally:
        extension()._set_cpu_isa(0)

    gen = torch.Generator().manual_seed(3)
    V = 3001  # odd: exercises the vector loops' scalar tails
    logits = (torch.randn(64, 2 * V, generator=gen) * 2).to(dtype)
    logits[5, ::3] = float("-inf")
    logits = logits[:, ::2] if strided else logits[:, :V]
    kw = dict(kw, seed=9)
    if "cfg_scale" in kw:
        kw["uncond_logits"] = logits + torch.randn(logits.shape, generator=gen).to(dtype)
    try:
        extension()._set_cpu_isa(1)
        generic = sample_tokens(logits, **kw)
        extension()._set_cpu_isa(isa)
        fast = sample_tokens(logits, **kw)
    finally:
        extension()._set_cpu_isa(0)
    assert torch.equal(generic[0], fast[0]) and torch.equal(generic[1], fast[1])


def test_greedy_is_first_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [-math.inf, -1.0, -1.0, -math.inf], [5.0, 5.0, 5.0, 5.0]])
    tokens, probs = sample_tokens(logits, temperature=0.0, top_p=0.5, seed=1)
    assert tokens.tolist() == [1, 1, 0] and probs.tolist() == [1.0, 1.0, 1.0]


def test_min_p_one_keeps_the_argmax_on_every_path():
    """min_p = 1 keeps only the tokens at the maximum: with top_p < 1 at temperature 1 the min-p
    test reuses top-p's exp values, a path of its own; on both the draw is a maximum (row 1 has two)."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0 - 1e-6], [2.0, -1.0, 2.0, 0.5], [7.0, 0.0, 0.0, 0.0]])
    for top_p in (1.0, 0.9, 0.5):
        for temperature in (1.0, 0.7):
            tokens, probs = sample_tokens(logits, temperature=temperature, top_p=top_p, min_p=1.0, seed=3)
            assert tokens.tolist()[0] == 1 and tokens.tolist()[2] == 0, (top_p, temperature)
            assert tokens.tolist()[1] in (0, 2) and torch.isfinite(probs).all(), (top_p, temperature)


def test_raw_op_refuses_per_row_parameters_of_another_length():
    """The C++ check itself (the Python wrapper checks first): a (2,) temperature for 6 rows
    would be read past its end."""
    logits = torch.randn(6, 50)
    ones = torch.ones(6)
    params = dict(temperature=ones, top_k=torch.zeros(6), top_p=ones, min_p=torch.zeros(6), cfg_scale=ones)
    for name in params:
        bad = dict(params, **{name: params[name][:2].clone()})
        with pytest.raises(ValueError, match=name):
            torch.ops.fourm_fast.sample_tokens(logits, None, bad["temperature"], bad["top_k"], bad["top_p"],
                                               bad["min_p"], bad["cfg_scale"], torch.tensor(0), torch.tensor(0))


def test_vocab_of_one():
    tokens, probs = sample_tokens(torch.zeros(5, 1), top_k=1, top_p=0.1, seed=4)
    assert tokens.tolist() == [0] * 5 and probs.tolist() == [1.0] * 5


def test_determinism_and_streams():
    logits = torch.randn(2000, 300)
    a = sample_tokens(logits, seed=11, offset=0)
    b = sample_tokens(logits, seed=11, offset=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = sample_tokens(logits, seed=11, offset=1)
    d = sample_tokens(logits, seed=12, offset=0)
    assert (a[0] != c[0]).float().mean() > 0.5 and (a[0] != d[0]).float().mean() > 0.5
    e = sample_tokens(logits, seed=torch.tensor(11), offset=torch.tensor(0))
    assert torch.equal(a[0], e[0])
    big = sample_tokens(logits, seed=2**64 - 1, offset=2**63 + 5)  # full 64-bit range: the same bits as int64
    same = sample_tokens(logits, seed=-1, offset=-(2**63) + 5)
    assert torch.equal(big[0], same[0]) and not torch.equal(big[0], a[0])
    edge = sample_tokens(logits, seed=2**63, offset=0)
    assert torch.equal(edge[0], sample_tokens(logits, seed=-(2**63), offset=0)[0])
    # the offset's high 32 bits are part of the stream ((epoch << 32) | step is a distinct offset)
    high = sample_tokens(logits, seed=11, offset=2**32)
    assert (a[0] != high[0]).float().mean() > 0.5


def test_per_row_parameters_equal_scalar_calls():
    R = 7
    logits = torch.randn(R, 400) * 2
    uncond = torch.randn(R, 400)
    params = dict(
        temperature=torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.8, 1.3]),
        top_k=torch.tensor([0.0, 5.0, 0.0, 0.1, 40.0, 0.0, 3.0]),
        top_p=torch.tensor([1.0, 0.9, 0.5, 1.0, 0.7, 0.3, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.05, 0.0, 0.2, 0.0]),
        cfg_scale=torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.5, 0.0]),
    )
    tokens, probs = sample_tokens(logits, uncond_logits=uncond, seed=5, **params)
    for r in range(R):
        scalar = {k: v[r].item() for k, v in params.items()}
        t_r, p_r = sample_tokens(logits, uncond_logits=uncond, seed=5, **scalar)
        assert t_r[r] == tokens[r] and p_r[r] == probs[r], f"row {r}"


def test_cfg_scale_one_equals_conditional():
    logits = torch.randn(300, 50)
    uncond = torch.randn(300, 50)
    a = sample_tokens(logits, uncond_logits=uncond, cfg_scale=1.0, top_p=0.8, seed=1)
    b = sample_tokens(logits, top_p=0.8, seed=1)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    g = guided_logits_reference(logits, uncond, 3.0)
    torch.testing.assert_close(g, (uncond + 3.0 * (logits - uncond)).double(), rtol=1e-6, atol=1e-6)


def test_non_contiguous_logits():
    base = torch.randn(300, 80)
    view = base.T  # (80, 300) with strides (1, 80)
    a = sample_tokens(view, top_k=10, seed=2)
    b = sample_tokens(view.contiguous(), top_k=10, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_rows():
    tokens, probs = sample_tokens(torch.randn(0, 10))
    assert tokens.shape == (0,) and probs.shape == (0,)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 10)
    nan = x.clone()
    nan[2, 3] = math.nan
    with pytest.raises(ValueError, match="row 2 has a NaN"):
        sample_tokens(nan)
    with pytest.raises(ValueError, match="row 1 has no finite logit"):
        sample_tokens(torch.cat([x[:1], torch.full((1, 10), -math.inf)]))
    pinf = x.clone()
    pinf[0, 0] = math.inf
    with pytest.raises(ValueError, match="finite or -inf"):
        sample_tokens(pinf)
    big = torch.full((1, 10), 3e38)  # finite logits whose guided value overflows to +inf
    with pytest.raises(ValueError, match="with guidance, u \\+ cfg_scale \\(c - u\\) can overflow"):
        sample_tokens(big, uncond_logits=-big, cfg_scale=2.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(x, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(x, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(x, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(x, top_k=2.5)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(x, top_k=-1)
    with pytest.raises(ValueError, match="min_p"):
        sample_tokens(x, min_p=1.5)
    with pytest.raises(ValueError, match="cfg_scale"):
        sample_tokens(x, uncond_logits=x, cfg_scale=math.inf)
    # a fraction of a small vocabulary that rounds to 0 keeps one token (it turned filtering off)
    small = torch.randn(64, 5)
    for k in (0.1, torch.full((64,), 0.1)):
        tokens, _ = sample_tokens(small, top_k=k, seed=3)
        assert torch.equal(tokens, small.argmax(1)), k
    assert effective_top_k(0.1, 5) == 1 and effective_top_k(0.4, 5) == 2
    # int32 indexing with 16-byte vectors: V stops 17 short of 2^31 (a stride-0 row costs no memory)
    with pytest.raises(ValueError, match="V <= 2\\^31 - 17, got R = 1, V = 2147483645"):
        sample_tokens(torch.zeros(1, 1).expand(1, 2**31 - 3))
    with pytest.raises(ValueError, match="uncond_logits has shape"):
        sample_tokens(x, uncond_logits=torch.randn(4, 11))
    with pytest.raises(TypeError, match="uncond_logits must have the logits' dtype"):
        sample_tokens(x, uncond_logits=x.half())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sample_tokens(x.double())
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        sample_tokens(x.long())
    with pytest.raises(ValueError, match="2-D"):
        sample_tokens(torch.randn(10))
    with pytest.raises(ValueError, match="one value per row"):
        sample_tokens(x, temperature=torch.ones(3))
    with pytest.raises(TypeError, match="seed"):
        sample_tokens(x, seed=1.5)
    # a bool tensor and a 1-element tensor were taken as seeds; the docs ask for a 0-d integer tensor
    for bad_seed in (torch.tensor(True), torch.tensor([3]), torch.tensor(3 + 0j)):
        with pytest.raises(TypeError, match="seed must be an integer scalar or a 0-d integer tensor"):
            sample_tokens(x, seed=bad_seed)
    # a complex temperature lost its imaginary part (with only torch's cast warning)
    with pytest.raises(TypeError, match="temperature must hold real numbers"):
        sample_tokens(x, temperature=torch.tensor(1 + 1j))
    with pytest.raises(TypeError, match="top_p must be a number or a tensor, got str"):
        sample_tokens(x, top_p="0.9")
    # a numpy guidance scale without uncond_logits is refused like a Python one (numpy floats
    # became numbers here, and the guidance check still knew only int and float)
    for scale in (np.float32(2.0), np.int64(2)):
        with pytest.raises(ValueError, match="guides towards logits"):
            sample_tokens(x, cfg_scale=scale)
    # numpy scalars are numbers (np.float32 was refused while numpy integer seeds were taken)
    assert torch.equal(sample_tokens(x, temperature=np.float32(0.5), seed=np.int64(4))[0],
                       sample_tokens(x, temperature=0.5, seed=4)[0])
    with pytest.raises(ValueError, match="empty"):
        sample_tokens(torch.randn(3, 0))
    bad_rows = torch.tensor([1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="at row 1"):
        sample_tokens(x, temperature=bad_rows)


def test_a_guidance_scale_without_unconditional_logits_raises():
    x = torch.randn(3, 20)
    for scale in (3.0, 0, torch.full((3,), 2.0), torch.tensor(1.0)):  # a scale was ignored without a word
        with pytest.raises(ValueError, match="cfg_scale .* uncond_logits, which were not given"):
            sample_tokens(x, cfg_scale=scale)
    assert torch.equal(sample_tokens(x, cfg_scale=1.0, seed=2)[0], sample_tokens(x, seed=2)[0])


def test_backward_through_probs_raises():
    logits = torch.randn(4, 50, requires_grad=True)
    tokens, probs = sample_tokens(logits, seed=1)
    assert probs.requires_grad and not tokens.requires_grad
    with pytest.raises(RuntimeError, match="sample_tokens is not differentiable"):
        probs.log().sum().backward()  # left logits.grad None with only a warning before
    with torch.no_grad():
        assert torch.equal(sample_tokens(logits, seed=1)[0], tokens)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "top_k", "cfg_scale"])
def test_backward_through_probs_raises_for_parameter_tensors(name):
    # A learnable temperature (say) requires grad: its gradient used to stay None with a warning.
    value = {"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "top_k": 5.0, "cfg_scale": 2.0}[name]
    p = torch.tensor(value, requires_grad=True)
    logits = torch.randn(4, 50)
    extra = {"uncond_logits": torch.randn(4, 50)} if name == "cfg_scale" else {}
    tokens, probs = sample_tokens(logits, seed=1, **{name: p}, **extra)
    assert probs.requires_grad
    with pytest.raises(RuntimeError, match="sample_tokens is not differentiable"):
        probs.sum().backward()
    with torch.no_grad():
        assert torch.equal(sample_tokens(logits, seed=1, **{name: p.detach()}, **extra)[0], tokens)


def test_compiled_fullgraph_with_inputs_that_need_a_gradient():
    """torch.compile traces probs' backward while compiling the forward: a raise in it failed the
    compile of a call that never ran a backward. Now the forward compiles and a backward raises."""
    torch._dynamo.reset()
    logits = torch.randn(4, 50, requires_grad=True)
    temperature = torch.tensor(0.8, requires_grad=True)
    step = torch.compile(lambda lg, t: sample_tokens(lg, temperature=t, seed=5), fullgraph=True)
    tokens, probs = step(logits, temperature)
    with torch.no_grad():
        want_tokens, want_probs = sample_tokens(logits, temperature=temperature, seed=5)
    assert torch.equal(tokens, want_tokens) and torch.equal(probs.detach(), want_probs)
    with pytest.raises(RuntimeError, match="sample_tokens is not differentiable"):
        probs.sum().backward()
    assert logits.grad is None and temperature.grad is None


def test_opcheck_and_compile():
    op = torch.ops.fourm_fast.sample_tokens.default
    logits = torch.randn(9, 33)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    args = (logits, None, f32(0.8), f32(5.0), f32(0.9), f32(0.0), f32(1.0), torch.tensor(3), torch.tensor(0))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=utils)
    args_cfg = (logits, torch.randn(9, 33), torch.rand(9) + 0.5, f32(0.0), torch.rand(9) * 0.5 + 0.5, f32(0.05), f32(2.0), torch.tensor(3), torch.tensor(7))
    torch.library.opcheck(op, args_cfg, test_utils=utils)

    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(lg, seed):
        tokens, probs = sample_tokens(lg, temperature=0.7, top_k=5, seed=seed)
        return tokens, probs.log()

    seed = torch.tensor(21)
    t1, lp1 = step(logits, seed)
    t2, p2 = sample_tokens(logits, temperature=0.7, top_k=5, seed=21)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(lp1, p2.log())


def test_4m_restatement_draws_from_its_filtered_distribution():
    logits = PARITY["logits"][:8]
    gen = torch.Generator().manual_seed(0)
    tokens, probs = sample_tokens_4m(logits, temperature=1.0, top_k=10, top_p=0.0, generator=gen)
    assert PARITY["mask.5"][:8].gather(1, tokens[:, None]).all()


# select_positions -------------------------------------------------------------------------------

def test_select_positions_counts_and_ties():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3], [1.0, 0.0, 2.0, 3.0, 4.0]])
    cand = torch.tensor([[True, True, True, True, True], [True, False, True, True, True], [False, True, True, False, True]])
    mask = select_positions(conf, cand, torch.tensor([2, 2, 5]))
    assert mask.tolist() == [
        [False, True, False, True, False],
        [True, False, True, False, False],  # equal confidence: lower indices first
        [False, True, True, False, True],  # more than available: all candidates
    ]


def test_select_positions_never_picks_non_candidates():
    conf = torch.randn(16, 97)
    cand = torch.rand(16, 97) < 0.4
    conf[~cand] = 100.0  # tempting but not allowed
    cand[3] = False
    num = torch.randint(0, 50, (16,))
    mask = select_positions(conf, cand, num)
    assert not (mask & ~cand).any()
    assert torch.equal(mask.sum(1), torch.minimum(num, cand.sum(1)))
    for b in range(16):
        chosen = conf[b][mask[b]]
        rest = conf[b][cand[b] & ~mask[b]]
        if chosen.numel() and rest.numel():
            assert chosen.min() >= rest.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guidance_scale_one_and_zero_are_the_branches_exactly(dtype):
    # u + s (c - u) rounds c - u: at s = 1 that moved logits (and broke ties of c), so the draw and
    # its probability differed from sampling c alone
    g = torch.Generator().manual_seed(7)
    c, u = (torch.randn(64, 1000, generator=g).mul(4).to(dtype) for _ in range(2))
    c[:, 10] = c[:, 11] = c.max() + 1  # a tie at the top
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=1), dict(temperature=1.0, top_p=0.9)):
        want = sample_tokens(c, **kw, seed=3)
        got = sample_tokens(c, uncond_logits=u, cfg_scale=1.0, **kw, seed=3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kw
        want0 = sample_tokens(u, **kw, seed=3)
        got0 = sample_tokens(c, uncond_logits=u, cfg_scale=0.0, **kw, seed=3)
        assert torch.equal(got0[0], want0[0]) and torch.equal(got0[1], want0[1]), kw


def test_guidance_shortcuts_still_reject_nan_and_inf_in_the_other_branch():
    # scale 1 returns c and scale 0 returns u exactly, but only where the other branch is finite
    c, u = torch.randn(3, 20), torch.randn(3, 20)
    for scale, branch in ((1.0, "u"), (0.0, "c")):
        for bad in (math.nan, math.inf):
            cc, uu = c.clone(), u.clone()
            (uu if branch == "u" else cc)[1, 4] = bad
            with pytest.raises(ValueError, match="row 1"):
                sample_tokens(cc, uncond_logits=uu, cfg_scale=scale, seed=0)
            with pytest.raises(ValueError, match="row 1"):  # per-row scales too
                sample_tokens(cc, uncond_logits=uu, cfg_scale=torch.full((3,), scale), seed=0)


def test_top_k_beyond_the_vocabulary_keeps_everything():
    # counts past int64's range included (their cast to an integer was undefined behaviour)
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    off = sample_tokens(logits, top_k=0, seed=9)
    for k in (40.0, 41.0, 1e12, 1e30, 3e38):
        got = sample_tokens(logits, top_k=k, seed=9)
        assert torch.equal(got[0], off[0]) and torch.equal(got[1], off[1]), k


def test_select_positions_ranks_float64_in_float64():
    # confidences apart by less than float32 resolution, and beyond float32's range
    conf = torch.tensor([[1.0, 1.0 + 1e-12, 0.5], [1e300, 1e301, 0.0]], dtype=torch.float64)
    pick = select_positions(conf, torch.ones(2, 3, dtype=torch.bool), torch.tensor([1, 1]))
    assert pick.tolist() == [[False, True, False], [False, True, False]]


def test_select_positions_inf_and_errors():
    conf = torch.tensor([[-math.inf, -math.inf, 0.5]])
    cand = torch.tensor([[False, True, True]])
    assert select_positions(conf, cand, torch.tensor([2])).tolist() == [[False, True, True]]
    with pytest.raises(ValueError, match="NaN"):
        select_positions(torch.tensor([[math.nan, 1.0]]), torch.tensor([[True, True]]), torch.tensor([1]))
    with pytest.raises(ValueError, match=">= 0"):
        select_positions(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([-1]))
    with pytest.raises(TypeError, match="bool"):
        select_positions(torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        select_positions(torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.tensor([1]))
