"""Thin driver for the CMake build of fourm_fast._C (CMakeLists.txt is the build's one definition).

Environment:
  FOURM_FAST_CUDA=0|1        force the CUDA kernels off/on (default: on when torch is a CUDA build
                             and nvcc is found)
  FOURM_FAST_CUDA_ARCHS      e.g. "80;90" (default) or "9.0"; PTX is embedded for the newest
  FOURM_FAST_DEBUG=1         -O0 -g build
  CUDA_HOME                  toolkit root (default /usr/local/cuda when it exists)
  MAX_JOBS                   parallel compile jobs (default: CPU count)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "fourm_fast" / "version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _tool(name: str) -> str | None:
    """The tool installed next to this Python (pip's cmake/ninja in a venv that is not activated)
    before the one on PATH, which may be an older system copy."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None or ninja is None:
            raise RuntimeError("fourm_fast: cmake >= 3.26 and ninja are needed (pip install 'cmake>=4' ninja)")
        env = os.environ.copy()
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        cuda_flag = {"0": "OFF", "1": "ON"}.get(env.get("FOURM_FAST_CUDA", ""), "AUTO")
        archs = env.get("FOURM_FAST_CUDA_ARCHS", "80;90").replace(",", ";")
        debug = env.get("FOURM_FAST_DEBUG") == "1"
        build_dir = ROOT / "build" / ("debug" if debug else "release")
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DFOURM_FAST_CUDA={cuda_flag}",
            f"-DFOURM_FAST_CUDA_ARCHS={archs}",
            f"-DFOURM_FAST_VERSION={_version()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
        ]
        jobs = env.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"fourm_fast: configuring in {build_dir} (CUDA={cuda_flag}, archs={archs})", flush=True)
        subprocess.run(configure, check=True, env=env)
        print(f"fourm_fast: compiling with {jobs} jobs (CUDA sources take a few minutes)", flush=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True, env=env)
        built = sorted(build_dir.glob("_C*.so"))
        if not built:
            raise RuntimeError(f"fourm_fast: the build produced no _C*.so in {build_dir}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], target)


setup(
    version=_version(),
    ext_modules=[CMakeExtension("fourm_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
