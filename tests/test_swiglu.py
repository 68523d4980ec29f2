"""swiglu (silu(gate) * up): float64 parity within one rounding of the dtype on hostile shapes, the
gradients likewise, the same bits from every CPU copy, thread count and layout, PyTorch's silu
on non-finite values, bad input, opcheck, torch.compile, the tensors autograd keeps, the model's
MLP on it, and CPU == CUDA where a GPU is present."""
import pytest
import torch
import torch.nn.functional as F

from fourm_fast._extension import extension
from fourm_fast.model import FourM, ModalityConfig, preset
from fourm_fast.model.blocks import Mlp
from fourm_fast.ops import swiglu
from fourm_fast.reference.swiglu import swiglu_eager, swiglu_reference

from conftest import requires_cuda

op = torch.ops.fourm_fast.swiglu.default
op_bwd = torch.ops.fourm_fast.swiglu_backward.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (17,), (3, 97), (2, 13, 1031), (5, 0), (0,), (8, 128, 259)]
# Stored significand bits: a value rounded once from float32 is within 2^-bits of it (one ulp,
# a margin over the half ulp of the rounding for the float32 arithmetic before it).
_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _operands(shape, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(shape, generator=g) * scale).to(dtype)
    b = torch.randn(shape, generator=g).to(dtype)
    return a, b


def _assert_same_bits(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bit for bit (-0 is not +0), except that any NaN matches any NaN."""
    assert x.dtype == y.dtype and x.shape == y.shape
    nan = torch.isnan(y)
    assert torch.equal(torch.isnan(x), nan)
    ints = torch.int32 if x.dtype == torch.float32 else torch.int16
    assert torch.equal(x[~nan].view(ints), y[~nan].view(ints))


def _rel(dtype) -> float:
    # float32: silu's exp (2 ulp), add, divide, then the product: 8 ulp covers it
    return 8 * 2.0**-24 if dtype == torch.float32 else 2.0 ** -_BITS[dtype]


def _tiny(dtype) -> float:
    return torch.finfo(dtype).smallest_normal if dtype != torch.float16 else 2.0**-24  # float16 subnormals


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_within_one_rounding(cpu_isa, shape, dtype):
    a, b = _operands(shape, dtype, seed=len(shape))
    out = swiglu(a, b)
    assert out.shape == a.shape and out.dtype == dtype and out.is_contiguous()
    ref = swiglu_reference(a, b)
    err = (out.double() - ref).abs()
    assert bool((err <= _rel(dtype) * ref.abs() + _tiny(dtype)).all()), f"max error {err.max().item() if err.numel() else 0:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 97), (2, 13, 1031), (4, 0)])
def test_gradients_match_float64(cpu_isa, shape, dtype):
    a, b = _operands(shape, dtype, seed=7)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    got = torch.autograd.grad(swiglu(a.requires_grad_(), b.requires_grad_()), (a, b), g)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    want = torch.autograd.grad(swiglu_reference(ad, bd), (ad, bd), g.double())
    # d gate = g b silu'(a) cancels inside silu' (1 + a (1 - s) is 0 near a = -1.28): its float32
    # error is relative to |g b|, not to the result
    scale = (g.double() * b.double()).abs()
    for name, x, w in zip(("gate", "up"), got, want):
        assert x.dtype == dtype and x.shape == a.shape
        err = (x.double() - w).abs()
        bound = _rel(dtype) * w.abs() + 1e-6 * scale + _tiny(dtype)
        assert bool((err <= bound).all()), f"d {name}: max error {err.max().item() if err.numel() else 0:.3g}"


def test_one_rounding_is_no_worse_than_eager_in_16_bit():
    # eager rounds silu(a) to the dtype and then the product; the op rounds once
    for dtype in (torch.bfloat16, torch.float16):
        a, b = _operands((4096,), dtype, seed=3)
        ref = swiglu_reference(a, b)
        ours = (swiglu(a, b).double() - ref).abs().max()
        eager = (swiglu_eager(a, b).double() - ref).abs().max()
        assert ours <= eager, (dtype, ours.item(), eager.item())


@pytest.mark.skipif(extension().build_info()["cpu_kernel"] == "generic", reason="this CPU runs the portable loops only")
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_cpu_copy_and_thread_count_gives_the_same_bits(dtype):
    a, b = _operands((3, 50021), dtype, seed=5)
    g = torch.randn(a.shape).to(dtype)
    a[0, :8] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0, -90.0, 1e-30]).to(dtype)
    ext, threads = extension(), torch.get_num_threads()
    results = []
    try:
        for isa in (0, 1, 2):
            for n in (1, threads):
                ext._set_cpu_isa(isa)
                torch.set_num_threads(n)
                results.append((swiglu(a, b), *op_bwd(g, a, b)))
    finally:
        ext._set_cpu_isa(0)
        torch.set_num_threads(threads)
    for r in results[1:]:
        for x, y in zip(r, results[0]):
            _assert_same_bits(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_the_contiguous_bits(dtype):
    a, b = _operands((37, 61), dtype, seed=9)
    g = torch.randn(61, 37).to(dtype)
    at, bt = a.t(), b.t()  # transposed views
    assert not at.is_contiguous()
    _assert_same_bits(swiglu(at, bt), swiglu(at.contiguous(), bt.contiguous()))
    for x, y in zip(op_bwd(g.t().contiguous().t(), at, bt), op_bwd(g, at.contiguous(), bt.contiguous())):
        _assert_same_bits(x, y)
    sl = a[:, ::3]  # a strided slice
    _assert_same_bits(swiglu(sl, b[:, ::3]), swiglu(sl.contiguous(), b[:, ::3].contiguous()))


def test_non_finite_values_follow_pytorchs_silu():
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 100.0, -100.0, -88.0, 89.0, 1e-38])
    a = special.repeat_interleave(len(special))
    b = special.repeat(len(special))
    torch.testing.assert_close(swiglu(a, b), swiglu_eager(a, b), rtol=1e-6, atol=0, equal_nan=True)
    g = torch.ones_like(a)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.autograd.grad(swiglu_eager(ar, br), (ar, br), g)
    for x, y in zip(op_bwd(g, a, b), want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad, exc, message", [
    (lambda a, b: (a, b[:, :-1]), ValueError, r"swiglu: up has shape \[7, 4\] but gate has shape \[7, 5\]"),
    (lambda a, b: (a, b.double()), TypeError, "swiglu: up must have gate's dtype Float, got Double"),
    (lambda a, b: (a.double(), b.double()), TypeError, "swiglu: gate must be float32, bfloat16 or float16, got Double"),
    (lambda a, b: (a.int(), b.int()), TypeError, "swiglu: gate must be float32, bfloat16 or float16, got Int"),
    (lambda a, b: (a[None], b), ValueError, r"swiglu: up has shape \[7, 5\] but gate has shape \[1, 7, 5\]"),
])
def test_bad_input_raises_clear_errors(bad, exc, message):
    a, b = _operands((7, 5), torch.float32)
    with pytest.raises(exc, match=message):
        swiglu(*bad(a, b))
    with pytest.raises(exc, match=message):  # the fake impl agrees with the kernel's checks
        swiglu(*bad(a.to("meta"), b.to("meta")))


def test_backward_op_checks_its_inputs():
    a, b = _operands((7, 5), torch.float32)
    with pytest.raises(ValueError, match=r"swiglu_backward: gate has shape \[7, 5\] but grad has shape \[7, 4\]"):
        op_bwd(a[:, :4], a, b)
    with pytest.raises(TypeError, match="swiglu_backward: up must have grad's dtype Float, got BFloat16"):
        op_bwd(a, a, b.bfloat16())


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    a, b = _operands((6, 23), dtype, seed=2)
    torch.library.opcheck(op, (a.clone().requires_grad_(), b.clone().requires_grad_()))
    torch.library.opcheck(op, (a, b))
    torch.library.opcheck(op_bwd, (torch.randn(6, 23).to(dtype), a, b))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(a, b):
        return (swiglu(a, b) * 2).sum()

    a, b = _operands((9, 33), torch.float32, seed=4)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    f(ar, br).backward()
    ae, be = a.clone().requires_grad_(), b.clone().requires_grad_()
    (swiglu(ae, be) * 2).sum().backward()
    _assert_same_bits(ar.grad, ae.grad)
    _assert_same_bits(br.grad, be.grad)


def test_autograd_keeps_only_the_two_inputs():
    # the point of the fusion for memory: eager keeps silu(gate) as well
    a, b = _operands((4, 64), torch.float32)
    a.requires_grad_()
    b.requires_grad_()

    def saved(fn):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            fn(a, b)
        return {t.data_ptr() for t in packed}

    assert saved(swiglu) == {a.data_ptr(), b.data_ptr()}
    assert len(saved(swiglu_eager)) == 3


def test_one_input_requiring_grad_gets_its_gradient_alone():
    a, b = _operands((3, 4), torch.float32)
    b.requires_grad_()
    swiglu(a, b).sum().backward()
    assert a.grad is None
    torch.testing.assert_close(b.grad, F.silu(a), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_order_gradients_match_float64(dtype):
    # create_graph backward: the gradient of the gradients (swiglu_backward's own autograd)
    a, b = _operands((5, 41), dtype, seed=12, scale=3.0)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(13)).to(dtype)
    u, w = torch.randn(a.shape).to(dtype), torch.randn(a.shape).to(dtype)

    def second(fn, a, b, g):
        a, b, g = a.clone().requires_grad_(), b.clone().requires_grad_(), g.clone().requires_grad_()
        ga, gb = torch.autograd.grad(fn(a, b), (a, b), g, create_graph=True)
        return torch.autograd.grad((ga * u.to(ga.dtype) + gb * w.to(gb.dtype)).sum(), (a, b, g))

    got = second(swiglu, a, b, g)
    want = second(swiglu_reference, a.double(), b.double(), g.double())
    scale = (g.double().abs() + 1) * (b.double().abs() + 1) * (u.double().abs() + w.double().abs())
    for x, y in zip(got, want):
        assert x.dtype == dtype
        err = (x.double() - y).abs()
        tol = (1e-5 if dtype == torch.float32 else 2.0 ** -_BITS[dtype]) * scale + _tiny(dtype)
        assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


def _mlp(act: str, gated: bool) -> Mlp:
    mods = (ModalityConfig(name="rgb", kind="image", vocab_size=16, grid=2),)
    cfg = preset("tiny", mods, dim=48, num_heads=3, encoder_depth=1, decoder_depth=1, act=act, gated_mlp=gated)
    torch.manual_seed(0)
    return FourM(cfg).encoder[0].mlp


def test_model_mlp_runs_the_op_only_where_it_has_a_kernel():
    mlp = _mlp("silu", True)
    x = torch.randn(2, 7, 48)
    calls = []
    real = torch.ops.fourm_fast.swiglu.default
    try:
        import fourm_fast.model.blocks as blocks
        blocks.swiglu = lambda a, b: calls.append(a.dtype) or real(a, b)
        mlp(x)
        y64 = mlp.double()(x.double())  # float64: no kernel, the two ops run
        assert y64.dtype == torch.float64
        torch._dynamo.reset()
        torch.compile(mlp.float(), fullgraph=True)(x)  # compiled: Inductor fuses silu * mul itself
    finally:
        blocks.swiglu = swiglu
    assert calls == [torch.float32]


@pytest.mark.parametrize("act, gated", [("silu", True), ("gelu", True), ("silu", False), ("gelu", False)])
def test_model_mlp_computes_4ms_mlp(act, gated):
    mlp = _mlp(act, gated)
    x = torch.randn(2, 7, 48)
    h = mlp.act(mlp.fc1(x))
    want = mlp.fc2(h * mlp.fc3(x) if gated else h)
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_gives_the_cpu_bits(dtype):
    a, b = _operands((5, 4099), dtype, seed=6)
    a[0, :6] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 100.0, -90.0]).to(dtype)
    g = torch.randn(a.shape).to(dtype)
    cpu = (swiglu(a, b), *op_bwd(g, a, b))
    gpu = (swiglu(a.cuda(), b.cuda()), *op_bwd(g.cuda(), a.cuda(), b.cuda()))
    for x, y in zip(gpu, cpu):
        assert x.device.type == "cuda"
        _assert_same_bits(x.cpu(), y)


@requires_cuda
def test_cuda_grid_stride_strided_empty_and_autograd():
    n = 3_000_001  # past one pass of the grid (sms * 32 blocks of 256 threads)
    a, b = _operands((n,), torch.bfloat16, seed=14)
    _assert_same_bits(swiglu(a.cuda(), b.cuda()).cpu(), swiglu(a, b))
    a2, b2 = _operands((61, 37), torch.float32, seed=15)
    _assert_same_bits(swiglu(a2.cuda().t(), b2.cuda().t()).cpu(), swiglu(a2.t(), b2.t()))
    assert swiglu(torch.empty(0, 5, device="cuda"), torch.empty(0, 5, device="cuda")).shape == (0, 5)
    ac, bc = a2.cuda().requires_grad_(), b2.cuda().requires_grad_()
    g = torch.randn(a2.shape)
    swiglu(ac, bc).backward(g.cuda())
    for x, y in zip((ac.grad, bc.grad), op_bwd(g, a2, b2)):
        _assert_same_bits(x.cpu(), y)


@requires_cuda
def test_cuda_bad_input_and_mixed_devices():
    a, b = _operands((7, 5), torch.float32)
    with pytest.raises(ValueError, match="swiglu: up is on cpu but gate is on cuda"):
        swiglu(a.cuda(), b)
    torch.library.opcheck(op, (a.cuda().requires_grad_(), b.cuda().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_results_are_the_float32_results_rounded_once(cpu_isa, dtype):
    # widening is exact, so the 16-bit path must return the float32 op's values rounded by torch's
    # own conversion (round to nearest even), overflow, NaN and subnormals included
    a, b = _operands((70001,), dtype, seed=11, scale=30.0)
    a[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30]).to(dtype)
    b[6:9] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, 1e-30]).to(dtype)
    g = torch.randn(a.shape).to(dtype) * 100
    got = (swiglu(a, b), *op_bwd(g, a, b))
    want = (swiglu(a.float(), b.float()), *op_bwd(g.float(), a.float(), b.float()))
    for x, w in zip(got, want):
        _assert_same_bits(x, w.to(dtype))
