"""ATen's scalar type names (Float, BFloat16, ...), which the C++ checks print: the fake impls
print the same, so traced/compiled code raises the messages eager code raises."""
from __future__ import annotations

import torch

_ATEN_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
               torch.int8: "Char", torch.uint8: "Byte", torch.int16: "Short", torch.int32: "Int",
               torch.int64: "Long", torch.bool: "Bool"}


def aten_name(dtype: torch.dtype) -> str:
    return _ATEN_NAMES.get(dtype, str(dtype))
