// Input validation for vq_lookup, shared by the CPU and CUDA registrations so both raise the same
// errors for the same bad input.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string_view>
#include <utility>

#include "kernels/vq_math.h"

namespace fourm_fast {

inline kernels::VqMetric parse_vq_metric(std::string_view metric) {
  if (metric == "l2") return kernels::VqMetric::L2;
  if (metric == "cosine") return kernels::VqMetric::Cosine;
  TORCH_CHECK_VALUE(false, "vq_lookup: metric must be \"l2\" or \"cosine\", got \"", metric, "\"");
}

inline void check_vq_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vq_lookup: codebook must be 2-D (K, D), got shape ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "vq_lookup: x must have at least one dimension (..., D)");
  TORCH_CHECK_VALUE(codebook.size(0) > 0, "vq_lookup: the codebook is empty (K = 0)");
  TORCH_CHECK_VALUE(codebook.size(1) > 0, "vq_lookup: code dimension D must be positive");
  TORCH_CHECK_VALUE(x.size(-1) == codebook.size(1), "vq_lookup: x has D = ", x.size(-1),
                    " but the codebook has D = ", codebook.size(1), " (x ", x.sizes(),
                    ", codebook ", codebook.sizes(), ")");
  const auto ok_dtype = [](at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
  };
  TORCH_CHECK_TYPE(ok_dtype(x.scalar_type()),
                   "vq_lookup: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == codebook.scalar_type(),
                   "vq_lookup: x and codebook must share a dtype, got ", x.scalar_type(), " and ",
                   codebook.scalar_type(), " (cast one of them)");
  TORCH_CHECK_VALUE(x.device() == codebook.device(),
                    "vq_lookup: x and codebook must be on the same device, got ", x.device(),
                    " and ", codebook.device());
  TORCH_CHECK_VALUE(codebook.size(0) <= INT32_MAX, "vq_lookup: at most 2^31-1 codes are supported");
}

// Outputs of vq_lookup for x (..., D): int64 indices and float32 distances of shape x.shape[:-1].
inline std::pair<at::Tensor, at::Tensor> vq_empty_outputs(const at::Tensor& x) {
  const auto out_shape = x.sizes().slice(0, x.dim() - 1);
  return {at::empty(out_shape, x.options().dtype(at::kLong)), at::empty(out_shape, x.options().dtype(at::kFloat))};
}

}  // namespace fourm_fast
