"""The masked_attention CUDA kernels, run without a GPU.

csrc/cuda/attention_kernels.cuh (the exact device code the extension compiles) is built as host
C++ on tests/cuda_emulation/cuda_emu.h: a std::thread per GPU thread, barriers for
__syncthreads, the PTX ISA's fragment layouts for ldmatrix / mma, cp.async copies deferred to the
latest moment the ISA allows, NaN-filled smem and outputs. The harness launches the kernels as
csrc/cuda/attention_cuda.cu does and compares out, lse, dq, dk, dv with a float64 reference of
the op's rule, under AddressSanitizer and UndefinedBehaviorSanitizer. Built once more under
ThreadSanitizer, the emulation is a race check: GPU threads are host threads, so a shared-memory
access that no __syncthreads / __syncwarp orders against another thread's is a data race there.
CI has no GPU; this is what checks the CUDA kernels' logic there (tiling, masking, tile skipping,
pipelining, barriers, fragment bookkeeping). Timing, the hardware's memory model and register
limits stay for a GPU (bench/device_check.sh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emulation"
COMPILER = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C++20 compiler (g++ 11+) to build the emulation")


def _stage(root: Path, mutate=None) -> Path:
    """The kernel headers in their csrc layout, the emulated ptx.cuh in place of the real one."""
    (root / "cuda").mkdir(parents=True)
    (root / "kernels").mkdir()
    for name in ("attention_kernels.cuh", "attention_tiles.cuh"):
        shutil.copy(ROOT / "csrc" / "cuda" / name, root / "cuda" / name)
    shutil.copy(EMU / "ptx.cuh", root / "cuda" / "ptx.cuh")
    for header in (ROOT / "csrc" / "kernels").glob("*.h"):
        shutil.copy(header, root / "kernels" / header.name)
    for name in ("cuda_emu.h", "attention_harness.cpp"):
        shutil.copy(EMU / name, root / name)
    if mutate:
        mutate(root)
    return root


SANITIZERS = {
    "memory": ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
    None: ["-O1"],
}


def _build(root: Path, sanitize: str | None) -> Path:
    exe = root / "harness"
    flags = SANITIZERS[sanitize]
    cmd = [COMPILER, "-std=c++20", *flags, "-pthread", f"-I{root}", str(root / "attention_harness.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"building the emulation failed:\n{done.stderr[-4000:]}"
    return exe


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1")  # a race fails at once
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    return _build(_stage(tmp_path_factory.mktemp("attention_emulation")), sanitize="memory")


def _drop_barrier_after_compute(root: Path) -> None:
    # run_tiles' barrier after compute(t) is what lets the next loads overwrite that stage
    src = root / "cuda" / "attention_kernels.cuh"
    text = src.read_text()
    old = "    compute(t, stage);\n    __syncthreads();\n"
    assert text.count(old) == 1
    src.write_text(text.replace(old, "    compute(t, stage);\n"))


def _assert_clean(done: subprocess.CompletedProcess) -> None:
    tail = (done.stdout[-3000:] + done.stderr[-3000:]).strip()
    assert done.returncode == 0 and "fails: 0" in done.stdout, f"exit {done.returncode}:\n{tail}"
    assert "FAIL" not in done.stdout and "runtime error" not in done.stderr, tail


def test_kernels_match_float64_on_the_fixed_cases(harness):
    # every kernel (fwd / dq / dkdv at tiers 32, 64, 128, the SIMT trio, delta, tile bounds),
    # partial tiles, the full-tile fast path, causal and 4M-decoder layouts, empty rows and samples
    _assert_clean(_run(harness, "fixed"))


def test_kernels_match_float64_on_random_cases(harness):
    _assert_clean(_run(harness, "random", "7", "24"))


def test_the_emulation_catches_a_pipeline_that_does_not_wait(tmp_path):
    # Waiting for one group fewer than the pipeline needs reads tiles whose copies have not landed:
    # the deferred cp.async must turn that into wrong results (the emulation is not too forgiving).
    def drop_a_wait(root: Path) -> None:
        src = root / "cuda" / "attention_kernels.cuh"
        text = src.read_text()
        assert text.count("cuda_ptx::cp_async_wait<1>();") == 1
        src.write_text(text.replace("cuda_ptx::cp_async_wait<1>();", "cuda_ptx::cp_async_wait<2>();"))

    exe = _build(_stage(tmp_path / "mutant", drop_a_wait), sanitize=None)
    done = _run(exe, "fixed", "3")
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout[-2000:]


def test_no_shared_memory_races_in_the_kernels(tmp_path):
    done = _run(_build(_stage(tmp_path / "tsan"), sanitize="thread"), "race")
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-4000:]
    _assert_clean(done)


def test_the_race_check_catches_a_missing_barrier(tmp_path):
    # Without that barrier the results still match (the emulated copies land at the next wait),
    # so only the race check can see it.
    done = _run(_build(_stage(tmp_path / "tsan_mutant", _drop_barrier_after_compute), sanitize="thread"), "race")
    assert "ThreadSanitizer: data race" in done.stderr, (done.returncode, done.stderr[-2000:])
