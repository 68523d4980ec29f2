// Input validation for rows_linear (mirrored by fourm_fast/ops/rows_linear.py for fake tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fourm_fast {

inline void check_rows_linear_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 2, "rows_linear: x must be 2-D (R, K), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "rows_linear: weight must be 2-D (N, K), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "rows_linear: x has K = ", x.size(1), " but weight has K = ",
                    weight.size(1), " (x ", x.sizes(), ", weight ", weight.sizes(), ")");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE((st == at::kFloat || st == at::kBFloat16 || st == at::kHalf) && weight.scalar_type() == st,
                   "rows_linear: x and weight must both be float32, bfloat16 or float16, got x ", st, " and weight ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(x.device() == weight.device(), "rows_linear: x and weight must be on the same device, got ",
                    x.device(), " and ", weight.device());
}

}  // namespace fourm_fast
