"""nn.Modules built on fourm_fast's ops."""
from .attention import Attention, CrossAttention, LayerNorm
from .vector_quantizer import VectorQuantizer, VQOutput

__all__ = ["Attention", "CrossAttention", "LayerNorm", "VectorQuantizer", "VQOutput"]
