// Input validation and parameter access for sample_tokens, shared by the CPU and CUDA
// registrations so both raise the same errors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "kernels/sampling_math.h"

namespace fourm_fast {

struct SampleInputs {
  at::Tensor logits, uncond;  // uncond undefined when CFG is off
  at::Tensor temperature, top_k, top_p, min_p, cfg_scale;  // float32, 0-d or (R,)
  at::Tensor seed, offset;                                 // int64, 0-d
};

inline void check_param(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "sample_tokens: ", name, " must be a float32 tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.size(0) == logits.size(0)), "sample_tokens: ", name,
                    " must be a scalar or have one value per row (", logits.size(0), "), got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), "sample_tokens: ", name, " is on ", t.device(),
                    " but logits are on ", logits.device());
}

inline SampleInputs check_sample_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& uncond,
                                        const at::Tensor& temperature, const at::Tensor& top_k,
                                        const at::Tensor& top_p, const at::Tensor& min_p,
                                        const at::Tensor& cfg_scale, const at::Tensor& seed,
                                        const at::Tensor& offset) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "sample_tokens: logits must be 2-D (R, V), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, "sample_tokens: the vocabulary is empty (V = 0)");
  // V: int32 indexing in the kernels, whose 16-byte vectors may start up to 15 slots before a row
  TORCH_CHECK_VALUE(logits.size(1) <= (int64_t{1} << 31) - 17 && logits.size(0) <= (int64_t{1} << 32) - 1,
                    "sample_tokens: R must be < 2^32 and V <= 2^31 - 17, got R = ", logits.size(0), ", V = ",
                    logits.size(1));
  const auto st = logits.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "sample_tokens: logits must be float32, bfloat16 or float16, got ", st);
  SampleInputs in{logits, at::Tensor(), temperature, top_k, top_p, min_p, cfg_scale, seed, offset};
  if (uncond.has_value() && uncond->defined()) {
    TORCH_CHECK_VALUE(uncond->sizes() == logits.sizes(), "sample_tokens: uncond_logits has shape ",
                      uncond->sizes(), " but logits have shape ", logits.sizes());
    TORCH_CHECK_TYPE(uncond->scalar_type() == st, "sample_tokens: uncond_logits must have the logits' dtype ",
                     st, ", got ", uncond->scalar_type());
    TORCH_CHECK_VALUE(uncond->device() == logits.device(), "sample_tokens: uncond_logits is on ",
                      uncond->device(), " but logits are on ", logits.device());
    in.uncond = *uncond;
  }
  check_param(temperature, "temperature", logits);
  check_param(top_k, "top_k", logits);
  check_param(top_p, "top_p", logits);
  check_param(min_p, "min_p", logits);
  check_param(cfg_scale, "cfg_scale", logits);
  for (const auto* t : {&seed, &offset}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong && t->dim() == 0,
                     "sample_tokens: seed and offset must be 0-d int64 tensors, got ", t->scalar_type(),
                     " with shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == logits.device(), "sample_tokens: seed/offset are on ", t->device(),
                      " but logits are on ", logits.device());
  }
  return in;
}

// Per-row parameters from CPU tensors (a 0-d tensor applies to every row).
class ParamReader {
 public:
  explicit ParamReader(const SampleInputs& in)
      : t_(in.temperature), k_(in.top_k), p_(in.top_p), mp_(in.min_p), s_(in.cfg_scale) {}
  kernels::SampleParams row(int64_t r) const {
    return {get(t_, r), get(k_, r), get(p_, r), get(mp_, r), get(s_, r)};
  }

 private:
  static float get(const at::Tensor& t, int64_t r) {
    const float* p = t.const_data_ptr<float>();
    return t.dim() == 0 ? p[0] : p[r * t.stride(0)];
  }
  at::Tensor t_, k_, p_, mp_, s_;
};

inline void raise_sample_status(int32_t status, int64_t row, const kernels::SampleParams& p) {
  using namespace kernels;
  switch (status) {
    case kSampleOk:
      return;
    case kSampleNaN:
      TORCH_CHECK_VALUE(false, "sample_tokens: row ", row, " has a NaN logit (after guidance, if any)");
    case kSampleNoFinite:
      TORCH_CHECK_VALUE(false, "sample_tokens: row ", row,
                        " has no finite logit or a +inf logit (logits must be finite or -inf; with guidance, "
                        "u + cfg_scale (c - u) can overflow to +inf from finite logits)");
    case kSampleBadTemperature:
      TORCH_CHECK_VALUE(false, "sample_tokens: temperature must be finite and >= 0, got ", p.temperature,
                        " at row ", row);
    case kSampleBadTopK:
      TORCH_CHECK_VALUE(false, "sample_tokens: top_k must be 0 (off), an integer >= 1 or a fraction in (0, 1), got ",
                        p.top_k, " at row ", row);
    case kSampleBadTopP:
      TORCH_CHECK_VALUE(false, "sample_tokens: top_p must be in (0, 1] (1 = off), got ", p.top_p, " at row ", row);
    case kSampleBadMinP:
      TORCH_CHECK_VALUE(false, "sample_tokens: min_p must be in [0, 1] (0 = off), got ", p.min_p, " at row ", row);
    case kSampleBadCfg:
      TORCH_CHECK_VALUE(false, "sample_tokens: cfg_scale must be finite, got ", p.cfg_scale, " at row ", row);
    default:
      TORCH_CHECK(false, "sample_tokens: internal error, status ", status, " at row ", row);
  }
}

}  // namespace fourm_fast
