"""Any-to-any generation: 4M's schedules, MaskGIT / ROAR / autoregressive steps, guidance."""
from .sampler import Generator, decode_images
from .schedules import (TargetSpec, build_chained_schedule, cosine_schedule, linear_schedule, linear_temp_schedule,
                        onex_temp_schedule, per_sample_table, temperature_schedule, token_schedule)
from .state import GenerationState

__all__ = ["Generator", "GenerationState", "TargetSpec", "build_chained_schedule", "cosine_schedule",
           "decode_images", "linear_schedule", "linear_temp_schedule", "onex_temp_schedule", "per_sample_table",
           "temperature_schedule", "token_schedule"]
