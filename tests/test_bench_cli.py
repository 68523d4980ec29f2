"""The benchmark scripts' command lines: each starts (--help), and bad counts are usage errors."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in ("__init__.py", "utils.py", "flops.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_starts(script):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("script,args,message", [
    # each ran (or crashed in the library, or timed empty work) before
    ("bench_vq.py", ["--repeats", "-2"], "argument --repeats: expected a positive integer, got -2"),
    ("bench_train.py", ["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    ("bench_data.py", ["--sizes", "32,"], "argument --sizes: expected a positive integer, got ''"),
    ("bench_data.py", ["--flip", "2"], "argument --flip: expected a number in [0, 1], got 2.0"),
    ("bench_data.py", ["--workers", "0"], "argument --workers: expected a positive integer, got 0"),
    ("bench_masking.py", ["--batches", "0"], "argument --batches: expected a positive integer, got 0"),
    ("bench_attention.py", ["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    ("bench_swiglu.py", ["--dtypes", "float32,float64"], "--dtypes: 'float64' is not one of float32, bfloat16, float16"),
    ("bench_swiglu.py", ["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
])
def test_bad_arguments_are_usage_errors(script, args, message):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
