"""The CUDA kernels of masked_attention, vq_lookup, sample_tokens and swiglu, run without a GPU.

csrc/cuda/*_kernels.cuh (the exact device code the extension compiles) are built as host C++ on tests/cuda_emulation/cuda_emu.h: a std::thread per GPU thread, barriers
for __syncthreads, the PTX ISA's fragment layouts for ldmatrix / mma, cp.async copies that poison
their destination until their wait retires them, NaN-filled smem and outputs. The harnesses launch
the kernels as csrc/cuda/*_cuda.cu do and check the results against float64 references (for
sample_tokens: bit for bit against the CPU executor's torch-free row code), under
AddressSanitizer and UndefinedBehaviorSanitizer. Built once more under ThreadSanitizer, the
emulation is a race check: GPU threads are host threads, so a shared-memory access that no
__syncthreads / __syncwarp orders against another thread's is a data race there.

CI has no GPU; this is what checks the CUDA kernels' logic there (tiling, masking, tile skipping,
pipelining, barriers, fragment bookkeeping). Timing, the hardware's memory model and register
limits stay for a GPU (bench/device_check.sh). Each mutation test plants a bug and checks that
the emulation sees it, so a too-forgiving emulator fails here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emulation"
KERNEL_HEADERS = ("attention_kernels.cuh", "attention_tiles.cuh", "vq_kernels.cuh", "sampling_kernels.cuh",
                  "swiglu_kernels.cuh")
CPU_HEADERS = ("sampling_cpu_rows.h", "threshold_select.h")  # the sampling oracle
SANITIZERS = {
    "memory": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
    None: ["-O1"],
}


def _compiler() -> str | None:
    """A C++20 compiler with <barrier> (GCC 11+, Clang 14+), or None."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    probe = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    return cxx if probe.returncode == 0 else None


COMPILER = _compiler()
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C++20 compiler with <barrier> (g++ 11+)")


def _stage(root: Path, mutate=None) -> Path:
    """The kernel headers in their csrc layout, the emulated ptx.cuh in place of the real one."""
    (root / "cuda").mkdir(parents=True)
    (root / "kernels").mkdir()
    (root / "cpu").mkdir()
    for name in CPU_HEADERS:
        shutil.copy(ROOT / "csrc" / "cpu" / name, root / "cpu" / name)
    for name in KERNEL_HEADERS:
        shutil.copy(ROOT / "csrc" / "cuda" / name, root / "cuda" / name)
    shutil.copy(EMU / "ptx.cuh", root / "cuda" / "ptx.cuh")
    for header in (ROOT / "csrc" / "kernels").glob("*.h"):
        shutil.copy(header, root / "kernels" / header.name)
    for source in [*EMU.glob("*.cpp"), *EMU.glob("*.h")]:  # harnesses, cuda_emu.h, harness_main.h
        shutil.copy(source, root / source.name)
    if mutate:
        mutate(root)
    return root


def _build(root: Path, harness: str, sanitize: str | None) -> Path:
    exe = root / f"{harness}_{sanitize or 'plain'}"
    cmd = [COMPILER, "-std=c++20", *SANITIZERS[sanitize], "-pthread", f"-I{root}", str(root / f"{harness}.cpp"),
           "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"building {harness} failed:\n{done.stderr[-4000:]}"
    return exe


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1")  # a race fails at once
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900, env=env)


def _assert_clean(done: subprocess.CompletedProcess) -> None:
    tail = (done.stdout[-3000:] + done.stderr[-3000:]).strip()
    assert done.returncode == 0 and "fails: 0" in done.stdout, f"exit {done.returncode}:\n{tail}"
    assert "FAIL" not in done.stdout and "runtime error" not in done.stderr, tail
    assert "ThreadSanitizer" not in done.stderr, tail


def _replace_once(root: Path, header: str, old: str, new: str) -> None:
    src = root / "cuda" / header
    text = src.read_text()
    assert text.count(old) == 1, f"{header}: the mutation's target moved"
    src.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return _stage(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module")
def attention(staged) -> Path:
    return _build(staged, "attention_harness", "memory")


# ---- masked_attention ----------------------------------------------------------------------

def test_attention_kernels_match_float64_on_the_fixed_cases(attention):
    # every kernel (fwd / dq / dkdv at tiers 32, 64, 128, the SIMT trio, delta, tile bounds),
    # partial tiles, the full-tile fast path, causal and 4M-decoder layouts, empty rows and samples
    _assert_clean(_run(attention, "fixed"))


def test_attention_kernels_match_float64_on_random_cases(attention):
    _assert_clean(_run(attention, "random", "7", "24"))


def test_attention_kernels_have_no_shared_memory_races(staged):
    _assert_clean(_run(_build(staged, "attention_harness", "thread"), "race"))


def test_the_emulation_catches_a_pipeline_that_does_not_wait(tmp_path):
    # Waiting for one group fewer than the pipeline needs reads tiles whose copies have not landed.
    root = _stage(tmp_path, lambda r: _replace_once(r, "attention_kernels.cuh", "cuda_ptx::cp_async_wait<1>();",
                                                    "cuda_ptx::cp_async_wait<2>();"))
    done = _run(_build(root, "attention_harness", None), "fixed", "3")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]


def test_the_race_check_catches_a_missing_barrier(tmp_path):
    # run_tiles' barrier after compute(t) is what lets the next loads overwrite that stage. Whether
    # the values then go wrong depends on thread timing; the race check reports it every time.
    root = _stage(tmp_path, lambda r: _replace_once(r, "attention_kernels.cuh", "    compute(t, stage);\n    __syncthreads();\n",
                                                    "    compute(t, stage);\n"))
    done = _run(_build(root, "attention_harness", "thread"), "race")
    assert "ThreadSanitizer: data race" in done.stderr, (done.returncode, done.stderr[-2000:])


# ---- vq_lookup -----------------------------------------------------------------------------

def test_vq_kernels_pick_the_nearest_code_on_the_fixed_cases(staged):
    # prepare, both tensor-core searches (x resident and streamed), the SIMT search and finalize,
    # with several code splits, partial tiles, odd D, NaN/inf rows and a NaN code
    _assert_clean(_run(_build(staged, "vq_harness", "memory"), "fixed"))


def test_vq_kernels_have_no_shared_memory_races(staged):
    _assert_clean(_run(_build(staged, "vq_harness", "thread"), "race"))


def test_the_vq_check_catches_a_pipeline_that_does_not_wait(tmp_path):
    root = _stage(tmp_path, lambda r: _replace_once(r, "vq_kernels.cuh", "cuda_ptx::cp_async_wait<kStages - 2>();",
                                                    "cuda_ptx::cp_async_wait<kStages - 1>();"))
    done = _run(_build(root, "vq_harness", None), "fixed")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]


def test_the_race_check_catches_a_missing_vq_barrier(tmp_path):
    # the barrier after the wait publishes every thread's copies of the step before anyone reads them
    root = _stage(tmp_path, lambda r: _replace_once(r, "vq_kernels.cuh",
                                                    "    cuda_ptx::cp_async_wait<kStages - 2>();\n    __syncthreads();\n",
                                                    "    cuda_ptx::cp_async_wait<kStages - 2>();\n"))
    done = _run(_build(root, "vq_harness", "thread"), "race")
    assert "ThreadSanitizer: data race" in done.stderr, (done.returncode, done.stderr[-2000:])


# ---- sample_tokens -------------------------------------------------------------------------

def test_sampling_kernel_matches_the_cpu_executor_bit_for_bit(staged):
    # both kernel variants (row in smem, row re-read), a grid smaller than R (blocks loop over
    # rows), every dtype, CFG, all filters, argmax, per-row settings, bad parameters, NaN / +inf /
    # all -inf rows
    _assert_clean(_run(_build(staged, "sampling_harness", "memory"), "fixed"))


def test_sampling_kernel_has_no_shared_memory_races(staged):
    _assert_clean(_run(_build(staged, "sampling_harness", "thread"), "race"))


def test_the_sampling_check_catches_a_wrong_draw(tmp_path):
    # the warp holding the crossing of the draw target, picked one warp off
    root = _stage(tmp_path, lambda r: _replace_once(r, "sampling_kernels.cuh", "const int w = __ffs(hit) - 1;",
                                                    "const int w = (__ffs(hit) - 1) ^ 1;"))
    done = _run(_build(root, "sampling_harness", None), "fixed")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]


def test_the_race_check_catches_a_missing_sampling_barrier(tmp_path):
    # the barrier between zeroing the histogram and the load's atomics into it
    root = _stage(tmp_path, lambda r: _replace_once(r, "sampling_kernels.cuh",
                                                    "    __syncthreads();  // zeroed histogram before the load's atomics\n",
                                                    ""))
    done = _run(_build(root, "sampling_harness", "thread"), "race")
    assert "ThreadSanitizer: data race" in done.stderr, (done.returncode, done.stderr[-2000:])


# ---- swiglu --------------------------------------------------------------------------------

def test_swiglu_kernels_match_the_math_bit_for_bit(staged):
    # every dtype, grids smaller than n (threads loop), n = 0 and 1, +-inf / NaN / +-0 inputs,
    # the elements past n untouched
    _assert_clean(_run(_build(staged, "swiglu_harness", "memory"), "fixed"))


def test_swiglu_kernels_have_no_races(staged):
    _assert_clean(_run(_build(staged, "swiglu_harness", "thread"), "race"))


def test_the_swiglu_check_catches_a_grid_stride_that_skips_blocks(tmp_path):
    # without the block offset every block starts at element threadIdx.x and strides by the whole
    # grid, so the elements of every block but the first are never written
    root = _stage(tmp_path, lambda r: _replace_once(
        r, "swiglu_kernels.cuh",
        "  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {\n"
        "    out[i]",
        "  for (int64_t i = threadIdx.x; i < n; i += step) {\n    out[i]"))
    done = _run(_build(root, "swiglu_harness", None), "fixed")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]
