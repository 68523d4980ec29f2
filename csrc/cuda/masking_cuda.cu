// CUDA executor of sample_budgets and token_layout: one thread per sample running the very
// per-sample functions of csrc/kernels/masking_math.h that the CPU executor runs, so a seed gives
// bit-identical budgets and layouts on both. (Every float that decides something goes through
// the ff_* operations, which nvcc does not contract; integers are integers.)
//
// token_layout keeps its per-sample scratch (the partial Fisher-Yates order and the role of each
// position) in global memory, [B, max(size)] each. A device status per sample reports budgets
// that do not fit; the host checks it (one synchronisation) and raises the CPU executor's message.
// span_mask is data-side work and runs on the CPU only; a CUDA call gets a clear error.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../kernels/masking_math.h"
#include "../masking_checks.h"

namespace fourm_fast {
namespace {

constexpr int kThreads = 128;

__global__ void budgets_kernel(kernels::BudgetConfig cfg, int64_t B, uint64_t seed, uint64_t offset,
                               int32_t* component, int32_t* input, int32_t* target) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  kernels::budget_sample(cfg, seed, offset, static_cast<uint32_t>(b), component + b, input + b * cfg.M,
                         target + b * cfg.M);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_budgets_cuda(
    int64_t batch_size, const at::Tensor& alpha_in, const at::Tensor& alpha_tg, const std::optional<at::Tensor>& weights,
    const at::Tensor& size, const at::Tensor& is_image, int64_t in_lo, int64_t in_hi, int64_t tg_lo, int64_t tg_hi,
    int64_t seed, int64_t offset) {
  const BudgetArgs a = check_budget_inputs(batch_size, alpha_in, alpha_tg, weights, size, is_image, in_lo, in_hi,
                                           tg_lo, tg_hi);
  TORCH_CHECK_VALUE(size.is_cuda(), "sample_budgets (CUDA): inputs must be CUDA tensors");
  c10::cuda::CUDAGuard guard(size.device());
  const auto opts = size.options().dtype(at::kInt);
  at::Tensor component = at::empty({a.B}, opts);
  at::Tensor input = at::empty({a.B, a.M}, opts);
  at::Tensor target = at::empty({a.B, a.M}, opts);
  if (a.B == 0) return {component, input, target};
  const kernels::BudgetConfig cfg = budget_config(a);
  const int64_t blocks = (a.B + kThreads - 1) / kThreads;
  budgets_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      cfg, a.B, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), component.data_ptr<int32_t>(),
      input.data_ptr<int32_t>(), target.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {component, input, target};
}

struct LayoutArgs {
  const int32_t* size;
  const uint8_t* is_image;
  const int64_t* offsets;
  const int32_t* in_budget;
  const int32_t* tg_budget;
  const int32_t* seq_in;
  const int32_t* seq_tg;
  int M;
  int64_t B, num_enc, num_dec, max_size;
  uint64_t seed, offset;
  int32_t* order;
  uint8_t* role;
  int32_t* status;
};

__global__ void layout_kernel(LayoutArgs a, kernels::LayoutRow base) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= a.B) return;
  const int64_t e = b * a.num_enc, d = b * a.num_dec;
  kernels::LayoutRow row{base.enc_index + e,   base.enc_modality + e, base.enc_position + e, base.enc_valid + e,
                         base.dec_index + d,   base.dec_modality + d, base.dec_position + d, base.dec_valid + d,
                         base.dec_segment + d, base.dec_rank + d,     base.dec_limit + d};
  a.status[b] = kernels::layout_sample(a.size, a.is_image, a.offsets, a.M, a.in_budget + b * a.M,
                                       a.tg_budget + b * a.M, a.seq_in + b * a.M, a.seq_tg + b * a.M, a.num_enc,
                                       a.num_dec, a.seed, a.offset, static_cast<uint32_t>(b),
                                       a.order + b * a.max_size, a.role + b * a.max_size, row);
}

LayoutTensors token_layout_cuda(const at::Tensor& input_budget, const at::Tensor& target_budget,
                                const at::Tensor& seq_input, const at::Tensor& seq_target, const at::Tensor& size,
                                const at::Tensor& is_image, int64_t num_encoder, int64_t num_decoder, int64_t seed,
                                int64_t offset) {
  check_layout_inputs(input_budget, target_budget, seq_input, seq_target, size, is_image, num_encoder, num_decoder);
  TORCH_CHECK_VALUE(size.is_cuda(), "token_layout (CUDA): inputs must be CUDA tensors");
  c10::cuda::CUDAGuard guard(size.device());
  const int64_t B = input_budget.size(0), M = size.size(0);
  const at::Tensor in_b = input_budget.contiguous(), tg_b = target_budget.contiguous();
  const at::Tensor s_in = seq_input.contiguous(), s_tg = seq_target.contiguous();
  const at::Tensor sz = size.contiguous(), img = is_image.contiguous();
  const at::Tensor offsets = modality_offsets(size, is_image).contiguous();
  LayoutOutputs outs(B, num_encoder, num_decoder, size.options());
  if (B == 0) return outs.as_tuple();
  const auto i32 = size.options().dtype(at::kInt);
  const int64_t max_size = size.cpu().max().item<int32_t>();
  at::Tensor order = at::empty({B, max_size}, i32);
  at::Tensor role = at::empty({B, max_size}, size.options().dtype(at::kByte));
  at::Tensor status = at::empty({B}, i32);
  LayoutArgs a;
  a.size = sz.const_data_ptr<int32_t>();
  a.is_image = reinterpret_cast<const uint8_t*>(img.const_data_ptr<bool>());
  a.offsets = offsets.const_data_ptr<int64_t>();
  a.in_budget = in_b.const_data_ptr<int32_t>();
  a.tg_budget = tg_b.const_data_ptr<int32_t>();
  a.seq_in = s_in.const_data_ptr<int32_t>();
  a.seq_tg = s_tg.const_data_ptr<int32_t>();
  a.M = static_cast<int>(M);
  a.B = B;
  a.num_enc = num_encoder;
  a.num_dec = num_decoder;
  a.max_size = max_size;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  a.order = order.data_ptr<int32_t>();
  a.role = role.data_ptr<uint8_t>();
  a.status = status.data_ptr<int32_t>();
  const kernels::LayoutRow base = outs.row(0);
  const int64_t blocks = (B + kThreads - 1) / kThreads;
  layout_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, base);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor bad = at::nonzero(status).flatten().cpu();
  if (bad.numel() > 0) {
    const int64_t b = bad[0].item<int64_t>();
    raise_layout_error(b, status[b].item<int32_t>(), in_b, tg_b, s_in, s_tg, num_encoder, num_decoder);
  }
  return outs.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> span_mask_cuda(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, const at::Tensor&, int64_t,
                                                                          int64_t, int64_t, int64_t) {
  TORCH_CHECK_VALUE(false,
                    "span_mask runs on the CPU (it is data-side work on token lists); pass CPU tensors. "
                    "TokenBudgetSampler does this for you and keeps the rest of the layout on the GPU.");
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("sample_budgets", &sample_budgets_cuda);
  m.impl("token_layout", &token_layout_cuda);
  m.impl("span_mask", &span_mask_cuda);
}

}  // namespace fourm_fast
