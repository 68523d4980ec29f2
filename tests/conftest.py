import pytest
import torch

from fourm_fast._extension import extension

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_ISA_CODES = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3, "amx": 4}
# On an AVX-512 CPU auto runs the AVX-512 copies, so the AVX2 ones get a run of their own there.
# (With AMX, auto also runs the bfloat16 attention tiles on AMX; generic and avx2 run their
# float32-widening copies.)
_ISA_PARAMS = ["auto", "generic"] + (["avx2"] if extension().build_info()["cpu_kernel"].startswith("avx512") else [])


@pytest.fixture(params=_ISA_PARAMS)
def cpu_isa(request):
    """Run a CPU test with the default micro-kernels, again with the portable ones, and on an AVX-512
    CPU with the AVX2 ones."""
    extension()._set_cpu_isa(_ISA_CODES[request.param])
    try:
        yield request.param
    finally:
        extension()._set_cpu_isa(0)


@pytest.fixture(params=["blas", "aten"])
def cpu_gemm(request):
    """Run a CPU test with the tile products on BLAS sgemm_ (where linked) and again through ATen."""
    extension()._set_cpu_gemm_aten(request.param == "aten")
    try:
        yield request.param
    finally:
        extension()._set_cpu_gemm_aten(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
