"""nn.Modules built on fourm_fast's ops."""
from .vector_quantizer import VectorQuantizer, VQOutput

__all__ = ["VectorQuantizer", "VQOutput"]
