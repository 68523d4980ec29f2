// CPU executor of the token-budget sampler ops: sample_budgets, token_layout (both also on CUDA)
// and span_mask (data side, CPU only). Samples run in parallel; each calls the shared per-sample
// code in csrc/kernels/masking_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include "../kernels/masking_math.h"
#include "../masking_checks.h"
#include "parallel.h"

namespace fourm_fast {
namespace {

// Samples per parallel task: a sample costs a few microseconds.
constexpr int64_t kSampleGrain = 64;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_budgets_cpu(
    int64_t batch_size, const at::Tensor& alpha_in, const at::Tensor& alpha_tg, const std::optional<at::Tensor>& weights,
    const at::Tensor& size, const at::Tensor& is_image, int64_t in_lo, int64_t in_hi, int64_t tg_lo, int64_t tg_hi,
    int64_t seed, int64_t offset) {
  const BudgetArgs a = check_budget_inputs(batch_size, alpha_in, alpha_tg, weights, size, is_image, in_lo, in_hi,
                                           tg_lo, tg_hi);
  TORCH_CHECK_VALUE(size.device().is_cpu(), "sample_budgets (CPU): inputs must be on the CPU");
  const auto opts = size.options().dtype(at::kInt);
  at::Tensor component = at::empty({a.B}, opts);
  at::Tensor input = at::empty({a.B, a.M}, opts);
  at::Tensor target = at::empty({a.B, a.M}, opts);
  const kernels::BudgetConfig cfg = budget_config(a);
  int32_t* comp = component.data_ptr<int32_t>();
  int32_t* in = input.data_ptr<int32_t>();
  int32_t* tg = target.data_ptr<int32_t>();
  fourm_fast::parallel_for(0, a.B, kSampleGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      kernels::budget_sample(cfg, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<uint32_t>(b),
                             comp + b, in + b * a.M, tg + b * a.M);
    }
  });
  return {component, input, target};
}

LayoutTensors token_layout_cpu(const at::Tensor& input_budget, const at::Tensor& target_budget,
                               const at::Tensor& seq_input, const at::Tensor& seq_target, const at::Tensor& size,
                               const at::Tensor& is_image, int64_t num_encoder, int64_t num_decoder, int64_t seed,
                               int64_t offset) {
  check_layout_inputs(input_budget, target_budget, seq_input, seq_target, size, is_image, num_encoder, num_decoder);
  TORCH_CHECK_VALUE(size.device().is_cpu(), "token_layout (CPU): inputs must be on the CPU");
  const int64_t B = input_budget.size(0), M = size.size(0);
  const at::Tensor in_b = input_budget.contiguous(), tg_b = target_budget.contiguous();
  const at::Tensor s_in = seq_input.contiguous(), s_tg = seq_target.contiguous();
  const at::Tensor sz = size.contiguous(), img = is_image.contiguous();
  const at::Tensor offsets = modality_offsets(size, is_image);
  LayoutOutputs outs(B, num_encoder, num_decoder, size.options());
  const int32_t max_size = B > 0 ? sz.max().item<int32_t>() : 0;
  const int32_t* size_p = sz.const_data_ptr<int32_t>();
  const uint8_t* img_p = reinterpret_cast<const uint8_t*>(img.const_data_ptr<bool>());
  const int64_t* off_p = offsets.const_data_ptr<int64_t>();
  // The first failing sample with its own status, packed (b << 8 | status) so that one atomic
  // minimum keeps them together (a separate status was whichever chunk failed last).
  std::atomic<int64_t> first_bad{B << 8};
  fourm_fast::parallel_for(0, B, kSampleGrain, [&](int64_t b0, int64_t b1) {
    std::vector<int32_t> order(static_cast<size_t>(max_size));
    std::vector<uint8_t> role(static_cast<size_t>(max_size));
    for (int64_t b = b0; b < b1; ++b) {
      kernels::LayoutRow row = outs.row(b);
      const int st = kernels::layout_sample(
          size_p, img_p, off_p, static_cast<int>(M), in_b.const_data_ptr<int32_t>() + b * M,
          tg_b.const_data_ptr<int32_t>() + b * M, s_in.const_data_ptr<int32_t>() + b * M,
          s_tg.const_data_ptr<int32_t>() + b * M, num_encoder, num_decoder, static_cast<uint64_t>(seed),
          static_cast<uint64_t>(offset), static_cast<uint32_t>(b), order.data(), role.data(), row);
      if (st != 0) {
        const int64_t mine = (b << 8) | st;
        int64_t cur = first_bad.load();
        while (mine < cur && !first_bad.compare_exchange_weak(cur, mine)) {
        }
        return;
      }
    }
  });
  const int64_t bad = first_bad.load();
  if ((bad >> 8) < B) {
    raise_layout_error(bad >> 8, static_cast<int32_t>(bad & 0xff), in_b, tg_b, s_in, s_tg, num_encoder, num_decoder);
  }
  return outs.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> span_mask_cpu(
    const at::Tensor& lengths, const at::Tensor& input_budget, const at::Tensor& target_budget,
    const at::Tensor& keep_mode, int64_t max_tokens, int64_t modality, int64_t seed, int64_t offset) {
  const char* op = "span_mask";
  const at::Tensor* vecs[4] = {&lengths, &input_budget, &target_budget, &keep_mode};
  const char* names[4] = {"lengths", "input_budget", "target_budget", "keep_mode"};
  for (int i = 0; i < 4; ++i) {
    check_config_tensor(*vecs[i], op, names[i], at::kInt, 1);
    TORCH_CHECK_VALUE(vecs[i]->device().is_cpu(), op, ": runs on the CPU (data side); ", names[i], " is on ",
                      vecs[i]->device());
    TORCH_CHECK_VALUE(vecs[i]->size(0) == lengths.size(0), op, ": ", names[i], " has ", vecs[i]->size(0),
                      " entries, lengths has ", lengths.size(0));
  }
  TORCH_CHECK_VALUE(max_tokens >= 1 && max_tokens <= (1 << 20), op, ": max_tokens must be in [1, 2^20], got ", max_tokens);
  TORCH_CHECK_VALUE(modality >= 0 && modality < kernels::kMaskMaxModalities, op, ": modality index must be in [0, ",
                    kernels::kMaskMaxModalities, "), got ", modality);
  const int64_t B = lengths.size(0);
  const at::Tensor len = lengths.contiguous(), in_b = input_budget.contiguous(), tg_b = target_budget.contiguous(),
                   mode = keep_mode.contiguous();
  if (B > 0) {
    TORCH_CHECK_VALUE(len.min().item<int32_t>() >= 0, op, ": lengths must be >= 0");
    TORCH_CHECK_VALUE(in_b.min().item<int32_t>() >= 0 && in_b.max().item<int32_t>() <= max_tokens, op,
                      ": input_budget must be in [0, max_tokens = ", max_tokens, "]");
    TORCH_CHECK_VALUE(tg_b.min().item<int32_t>() >= 0 && tg_b.max().item<int32_t>() <= max_tokens, op,
                      ": target_budget must be in [0, max_tokens = ", max_tokens, "]");
    TORCH_CHECK_VALUE(mode.min().item<int32_t>() >= 0 && mode.max().item<int32_t>() <= 2, op,
                      ": keep_mode must be 0 (random), 1 (all) or 2 (binary)");
  }
  const int64_t slots = 2 * (max_tokens + 1);
  const auto i32 = lengths.options();
  at::Tensor source = at::empty({B, slots}, i32), n_in = at::empty({B}, i32), n_tg = at::empty({B}, i32),
             top_sentinel = at::empty({B}, i32);
  fourm_fast::parallel_for(0, B, kSampleGrain, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> keep(static_cast<size_t>(max_tokens));
    std::vector<int32_t> tgt(static_cast<size_t>(2 * max_tokens + 2));
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t L = std::min<int32_t>(len.const_data_ptr<int32_t>()[b], static_cast<int32_t>(max_tokens));
      top_sentinel.data_ptr<int32_t>()[b] = kernels::span_mask_sample(
          L, static_cast<int32_t>(max_tokens), in_b.const_data_ptr<int32_t>()[b], tg_b.const_data_ptr<int32_t>()[b],
          mode.const_data_ptr<int32_t>()[b], static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
          static_cast<uint32_t>(b), static_cast<uint32_t>(modality), keep.data(), tgt.data(),
          source.data_ptr<int32_t>() + b * slots, n_in.data_ptr<int32_t>() + b, n_tg.data_ptr<int32_t>() + b);
    }
  });
  return {source, n_in, n_tg, top_sentinel};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) {
  m.impl("sample_budgets", &sample_budgets_cpu);
  m.impl("token_layout", &token_layout_cpu);
  m.impl("span_mask", &span_mask_cpu);
}

}  // namespace fourm_fast
