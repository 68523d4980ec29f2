"""Compile a C++ driver against the torch-free headers in csrc/ and run it: the tests of shared
kernel math that need no extension build (tile bounds, Philox)."""
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def run_driver(source: str, folder: Path, name: str) -> list[str]:
    """The whitespace-separated words the driver prints (it must exit 0)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a C++ compiler is needed to build fourm_fast, and this test uses it"
    src, exe = folder / f"{name}.cpp", folder / name
    src.write_text(source)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CSRC}", str(src), "-o", str(exe)], check=True, timeout=600)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=600).stdout.split()
