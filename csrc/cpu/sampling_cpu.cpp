// CPU executor of sample_tokens: validation, parameter gathering, rows in parallel
// (at::parallel_for), and the choice among the AVX-512, AVX2+FMA and portable copies of the row
// code (sampling_cpu_dispatch.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#define FF_ROWS_NS rows_generic
#include "sampling_cpu_rows.h"
#include "sampling_cpu_dispatch.h"
#include "../sampling_checks.h"
#include "cpu_isa.h"
#include "parallel.h"

namespace fourm_fast {

FF_DEFINE_SAMPLE_ROWS(sample_rows_generic, rows_generic)

namespace {

template <typename scalar_t>
void sample_tokens_cpu_impl(const SampleInputs& in, int64_t* tokens, float* probs) {
  const int64_t R = in.logits.size(0), V = in.logits.size(1);
  const scalar_t* cond = in.logits.const_data_ptr<scalar_t>();
  const scalar_t* uncond = in.uncond.defined() ? in.uncond.const_data_ptr<scalar_t>() : nullptr;
  const int64_t cs0 = in.logits.stride(0), cs1 = in.logits.stride(1);
  const int64_t us0 = uncond ? in.uncond.stride(0) : 0, us1 = uncond ? in.uncond.stride(1) : 0;
  const uint64_t seed = static_cast<uint64_t>(in.seed.item<int64_t>());
  const uint64_t offset = static_cast<uint64_t>(in.offset.item<int64_t>());
  const ParamReader reader(in);
  const bool per_row = in.temperature.dim() + in.top_k.dim() + in.top_p.dim() + in.min_p.dim() + in.cfg_scale.dim() > 0;
  std::vector<kernels::SampleParams> params(per_row ? static_cast<size_t>(R) : 1);
  for (size_t r = 0; r < params.size(); ++r) params[r] = reader.row(static_cast<int64_t>(r));
  std::vector<int32_t> status(static_cast<size_t>(R), kernels::kSampleOk);
#if defined(__x86_64__) || defined(_M_X64)
  const bool avx2 = cpu_isa_allows_avx2(), avx512 = cpu_isa_allows_avx512();
#endif
  fourm_fast::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__) || defined(_M_X64)
    if (avx512) {
      sample_rows_avx512(cond, cs0, cs1, uncond, us0, us1, V, params.data(), per_row ? 1 : 0, seed, offset, r0, r1,
                         tokens, probs, status.data());
      return;
    }
    if (avx2) {
      sample_rows_avx2(cond, cs0, cs1, uncond, us0, us1, V, params.data(), per_row ? 1 : 0, seed, offset, r0, r1,
                       tokens, probs, status.data());
      return;
    }
#endif
    sample_rows_generic(cond, cs0, cs1, uncond, us0, us1, V, params.data(), per_row ? 1 : 0, seed, offset, r0, r1,
                        tokens, probs, status.data());
  });
  for (int64_t r = 0; r < R; ++r) raise_sample_status(status[r], r, params[per_row ? r : 0]);
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& cfg_scale,
    const at::Tensor& seed, const at::Tensor& offset) {
  const SampleInputs in = check_sample_inputs(logits, uncond_logits, temperature, top_k, top_p, min_p,
                                              cfg_scale, seed, offset);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "sample_tokens (CPU): logits must be on the CPU");
  const int64_t R = logits.size(0);
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor probs = at::empty({R}, logits.options().dtype(at::kFloat));
  if (R == 0) return {tokens, probs};
  switch (logits.scalar_type()) {
    case at::kFloat: sample_tokens_cpu_impl<float>(in, tokens.data_ptr<int64_t>(), probs.data_ptr<float>()); break;
    case at::kBFloat16: sample_tokens_cpu_impl<c10::BFloat16>(in, tokens.data_ptr<int64_t>(), probs.data_ptr<float>()); break;
    case at::kHalf: sample_tokens_cpu_impl<c10::Half>(in, tokens.data_ptr<int64_t>(), probs.data_ptr<float>()); break;
    default: TORCH_CHECK_TYPE(false, "sample_tokens: unsupported dtype ", logits.scalar_type());
  }
  return {tokens, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) { m.impl("sample_tokens", &sample_tokens_cpu); }

}  // namespace fourm_fast
