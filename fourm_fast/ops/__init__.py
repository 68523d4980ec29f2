"""Typed Python API over torch.ops.fourm_fast (each op also has fake and autograd rules)."""
from .._extension import extension as _extension

_extension()  # raise a clear ImportError here, not an obscure one inside torch.ops

from .attention import masked_attention  # noqa: E402
from .masking import sample_budgets, span_mask, token_layout  # noqa: E402
from .rows_linear import rows_linear  # noqa: E402
from .sampling import sample_tokens, select_positions  # noqa: E402
from .swiglu import swiglu  # noqa: E402
from .vq import vq_dequantize, vq_lookup  # noqa: E402

__all__ = ["vq_lookup", "vq_dequantize", "sample_tokens", "select_positions", "masked_attention",
           "sample_budgets", "token_layout", "span_mask", "rows_linear", "swiglu"]
