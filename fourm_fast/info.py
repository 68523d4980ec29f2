"""`fourm_fast.info()` / `fourm-fast info`: what this installation can do."""
from __future__ import annotations

import importlib.util
import platform

from ._extension import extension, load_error
from .version import __version__

OPTIONAL_BACKENDS = ("flash_attn", "faiss", "nvidia.dali", "triton")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def info(print_out: bool = True) -> dict:
    """Versions, compiled kernels, visible GPUs and optional backends, as a dict (also printed)."""
    import torch

    facts: dict = {
        "fourm_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }
    err = load_error()
    if err is None:
        build = extension().build_info()
        facts["extension"] = "loaded"
        facts["cuda_kernels"] = build["cuda_compiled"]
        facts["cuda_archs"] = build["cuda_archs"] if build["cuda_compiled"] else None
        if not build["cuda_compiled"]:
            facts["cuda_kernels_missing_because"] = build["no_cuda_reason"]
        facts["cpu_kernel"] = build["cpu_kernel"]
        facts["cpu_gemm"] = build["cpu_gemm"]  # "blas": attention tiles call sgemm_; "aten": through at::mm
    else:
        facts["extension"] = f"NOT LOADED ({err})"
        facts["cuda_kernels"] = False
    facts["gpu_visible"] = torch.cuda.is_available()
    if facts["gpu_visible"]:
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    facts["optional_backends"] = {name: _has_module(name) for name in OPTIONAL_BACKENDS}
    if print_out:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in value.items())
            print(f"{key:<{width}}  {value}")
    return facts
