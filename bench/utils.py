"""One timing utility and one results writer for every benchmark in bench/.

CPU: repeated runs after warm-up, median and p20/p80 of wall time (methods compared side by side
can be timed interleaved, round by round). CUDA: CUDA events around each run, warm-up, an L2
flush before every run, median and p20/p80; with backlog=True the kernels are queued behind a
spin kernel first, so the span is device time without launch overhead. Results append as JSON
lines to bench/results/<name>.jsonl with the machine, device, git sha, versions and date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

# FOURM_FAST_RESULTS_DIR redirects the JSONL files (bench/device_check.sh points it at its staging folder).
RESULTS_DIR = Path(os.environ.get("FOURM_FAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def positive_int(text: str) -> int:
    """argparse type for counts (--repeats, --batch, --threads...): 0 or less gave empty timings,
    or a library traceback, instead of a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers, e.g. --sizes 64,224."""
    return [positive_int(part) for part in text.split(",")]


def fraction(low_open: bool):
    """argparse type for a number in [0, 1], or (0, 1] when low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((0 < value if low_open else 0 <= value) and value <= 1):
            raise argparse.ArgumentTypeError(f"expected a number in {'(0' if low_open else '[0'}, 1], got {value}")
        return value
    return parse


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summarise(samples_ms: list[float]) -> Timing:
    return Timing(statistics.median(samples_ms), _quantile(samples_ms, 0.2), _quantile(samples_ms, 0.8), len(samples_ms))


def time_cpu(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, max_seconds: float | None = None) -> Timing:
    """Median of `repeats` wall-clock runs after `warmup` runs; stops early past max_seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return _summarise(samples)


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                         max_seconds: float | None = None) -> dict[str, Timing]:
    """CPU, warmed up by the caller (a slow baseline may be left cold): `repeats` rounds of one run
    of each function, the order rotating every round; no new round starts after max_seconds (every
    method keeps the same number of runs). On a shared VM whose speed moves by tens of % within
    minutes, timing the methods one after the other let the drift decide the ratio (bench_train:
    0.87x and 1.14x in two back-to-back runs); interleaved, a slow spell costs every method alike."""
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(repeats):
        if r and max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t0) * 1e3)
    return {n: _summarise(s) for n, s in samples.items()}


_L2_FLUSH: torch.Tensor | None = None


def time_cuda(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, backlog: bool = False,
              max_seconds: float | None = None) -> Timing:
    """CUDA-event timing of fn on the current stream, flushing L2 (256 MiB write) before each run;
    no new run starts past max_seconds of wall time (warm-up excluded, as on the CPU).

    By default the GPU is idle (synchronised) when the start event is recorded, so the span
    includes the host's launch of fn's kernels: a call whose launches outlast its kernels
    (autograd, Python checks) measures the host. With backlog=True a spin kernel
    (torch.cuda._sleep) sits ahead of the start event, long enough (3x the host's launch time of
    fn, at least 1 ms) that every kernel of fn is queued before the start event fires: the span is
    then the device's time alone."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    spin_cycles = 0
    if backlog:
        t0 = time.perf_counter()
        fn()  # launches only: the host does not wait for the kernels
        launch_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        spin_cycles = int(max(1.0, 3.0 * launch_ms) * 2.0e6)  # cycles at 2 GHz (H100/H200 run at <= 1.98)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    done = 0
    start = time.perf_counter()
    for s, e in zip(starts, ends):
        if done and max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        _L2_FLUSH.zero_()
        if spin_cycles:
            torch.cuda._sleep(spin_cycles)
        else:
            # finish the flush first: else the start event fires while the GPU is still flushing
            # and the host's launch time of fn hides behind the flush
            torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        done += 1
        if spin_cycles:
            torch.cuda.synchronize()  # one backlog at a time: the next spin must not overlap this run
    torch.cuda.synchronize()
    return _summarise([s.elapsed_time(e) for s, e in zip(starts[:done], ends[:done])])


def time_fn(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1, max_seconds: float | None = None,
            backlog: bool = False) -> Timing:
    if device.startswith("cuda"):
        return time_cuda(fn, repeats=repeats, warmup=warmup, backlog=backlog, max_seconds=max_seconds)
    return time_cpu(fn, repeats=repeats, warmup=warmup, max_seconds=max_seconds)


def _read_vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the kernel (malloc_trim), so that memory a call reuses
    from earlier, freed tensors counts in its peak: without this, fn ran in pages already resident
    and the CPU peak of 4M's eager attention (N x N scores) often read 0."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(fn: Callable[[], object], device: str) -> float | None:
    """Extra memory one call of fn needs at its peak, in MiB.

    CUDA: torch's max_memory_allocated above the starting allocation. CPU (Linux): the rise of the
    process's peak resident set, after returning free heap pages to the kernel (malloc_trim) and
    resetting the high-water mark through /proc/self/clear_refs. It counts every page fn touches
    (tensors, scratch, allocator slack), so it reads a little above the live tensor bytes.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    base = _read_vm_hwm_kib()
    fn()
    peak = _read_vm_hwm_kib()
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


def git_sha() -> str:
    """Short sha of HEAD, "+dirty" when the tree (untracked, non-ignored files included) differs.

    The device machine gets a copy of the tree without .git: there FOURM_FAST_GIT_SHA, which the
    caller of device_check.sh sets (dirty marker included), is taken as given."""
    given = os.environ.get("FOURM_FAST_GIT_SHA")
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return given or "unknown"
    try:
        sha = given or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return given or "unknown"
    # a given label may carry its own marker (git describe --dirty): do not add a second one
    return sha + ("+dirty" if dirty and "dirty" not in sha else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    """Where a row was measured."""
    import fourm_fast

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fourm_fast": fourm_fast.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = env["cpu"]
    return env


def append_results(name: str, rows: list[dict], env: dict) -> Path:
    """Append rows (each merged with env) to bench/results/<name>.jsonl; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**env, **row}, sort_keys=True) + "\n")
    return path


def timing_dict(t: Timing) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(t).items()}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
