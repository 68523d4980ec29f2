"""The 4M encoder-decoder on fourm_fast's ops, with ml-4m checkpoint and batch compatibility."""
from .batch import FourMBatch, batch_from_layout, decoder_order
from .config import PRESETS, FourMConfig, ModalityConfig, preset
from .fourm import FourM

__all__ = ["FourM", "FourMConfig", "ModalityConfig", "FourMBatch", "batch_from_layout", "decoder_order", "PRESETS", "preset"]
