"""Reads the parity vectors (produced by the reference 4M) copied into tests/data/."""
import json
import struct
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "BOOL": np.bool_, "I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8}


def load_safetensors(name: str) -> dict[str, torch.Tensor]:
    """Minimal safetensors reader (header length, JSON header, raw little-endian data)."""
    raw = (DATA / name).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        buf = body[start:end]
        if meta["dtype"] == "BF16":
            t = torch.frombuffer(bytearray(buf), dtype=torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(buf, dtype=_DTYPES[meta["dtype"]]).copy())
        out[key] = t.reshape(meta["shape"])
    return out


def load_json(name: str) -> dict:
    return json.loads((DATA / name).read_text())
