// Input validation shared by the CPU and CUDA executors of the masking ops (sample_budgets,
// token_layout, span_mask). Value checks that need the data (alphas, weights) run on the small
// configuration tensors only; per-sample budgets are checked inside the kernels, which never write
// out of bounds and report a status the launcher turns into an error.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <string>

#include "kernels/masking_math.h"

namespace fourm_fast {

inline void check_config_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                                int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name, " is on ", b.device(), " but the other inputs are on ",
                    a.device());
}

// size[M] int32 and is_image[M] bool: the modality table.
inline int64_t check_modality_table(const at::Tensor& size, const at::Tensor& is_image, const char* op) {
  check_config_tensor(size, op, "size", at::kInt, 1);
  check_config_tensor(is_image, op, "is_image", at::kBool, 1);
  check_same_device(size, is_image, op, "is_image");
  const int64_t M = size.size(0);
  TORCH_CHECK_VALUE(M >= 1 && M <= kernels::kMaskMaxModalities, op, ": between 1 and ",
                    kernels::kMaskMaxModalities, " modalities are supported, got ", M);
  TORCH_CHECK_VALUE(is_image.size(0) == M, op, ": is_image has ", is_image.size(0), " entries for ", M, " modalities");
  const at::Tensor s = size.cpu();
  TORCH_CHECK_VALUE(s.min().item<int32_t>() >= 1, op, ": every modality needs size >= 1, got ", s);
  TORCH_CHECK_VALUE(s.max().item<int32_t>() <= (1 << 20), op, ": modality sizes above 2^20 are not supported");
  return M;
}

inline void check_alphas(const at::Tensor& alpha, int64_t M, const char* op, const char* name) {
  check_config_tensor(alpha, op, name, at::kFloat, 2);
  TORCH_CHECK_VALUE(alpha.size(1) == M, op, ": ", name, " must be [components, ", M, "], got ", alpha.sizes());
  TORCH_CHECK_VALUE(alpha.size(0) >= 1 && alpha.size(0) <= kernels::kMaskMaxComponents, op, ": between 1 and ",
                    kernels::kMaskMaxComponents, " mixture components are supported, got ", alpha.size(0));
  const at::Tensor a = alpha.cpu();
  TORCH_CHECK_VALUE(at::isfinite(a).all().item<bool>() && (a >= 0).all().item<bool>(), op, ": ", name,
                    " must be finite and >= 0, got ", a);
  // Below it, log(U) / alpha in the log-gamma draw overflows to -inf, and a component whose
  // every draw is -inf has no argmax to hand tokens to.
  TORCH_CHECK_VALUE(((a == 0) | (a >= kernels::kMinPositiveAlpha)).all().item<bool>(), op, ": ", name,
                    " must be 0 or at least ", kernels::kMinPositiveAlpha, ", got ", a);
  const at::Tensor positive = (a > 0).any(1);
  TORCH_CHECK_VALUE(positive.all().item<bool>(), op, ": ", name, " is all zero in mixture component(s) ",
                    at::nonzero(~positive).flatten(), "; each component needs one alpha > 0");
}

// Validated, contiguous arguments of sample_budgets, on the inputs' device.
struct BudgetArgs {
  at::Tensor alpha_in, alpha_tg, weights, size, is_image;
  int64_t B, M, C;
  int32_t in_lo, in_hi, tg_lo, tg_hi;
};

inline BudgetArgs check_budget_inputs(int64_t batch_size, const at::Tensor& alpha_in, const at::Tensor& alpha_tg,
                                      const std::optional<at::Tensor>& weights, const at::Tensor& size,
                                      const at::Tensor& is_image, int64_t in_lo, int64_t in_hi, int64_t tg_lo,
                                      int64_t tg_hi) {
  const char* op = "sample_budgets";
  TORCH_CHECK_VALUE(batch_size >= 0 && batch_size <= (int64_t{1} << 31) - 1, op, ": batch_size must be in [0, 2^31), got ",
                    batch_size);
  const int64_t M = check_modality_table(size, is_image, op);
  check_alphas(alpha_in, M, op, "alpha_in");
  check_alphas(alpha_tg, M, op, "alpha_tg");
  check_same_device(size, alpha_in, op, "alpha_in");
  check_same_device(size, alpha_tg, op, "alpha_tg");
  const int64_t C = alpha_in.size(0);
  TORCH_CHECK_VALUE(alpha_tg.size(0) == C, op, ": alpha_in has ", C, " mixture components but alpha_tg has ",
                    alpha_tg.size(0));
  BudgetArgs a;
  if (weights.has_value()) {
    check_config_tensor(*weights, op, "weights", at::kFloat, 1);
    check_same_device(size, *weights, op, "weights");
    TORCH_CHECK_VALUE(weights->size(0) == C, op, ": ", C, " mixture components but ", weights->size(0), " weights");
    const at::Tensor w = weights->cpu();
    TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>() && (w >= 0).all().item<bool>() && w.sum().item<float>() > 0,
                      op, ": weights must be finite, >= 0 and not all zero, got ", w);
    // The draw scales a uniform by the float32 sum, added in the kernel's order: a sum that
    // overflows (2e38 + 2e38) or is subnormal no longer splits by weight.
    float wsum = 0.0f;
    const at::Tensor wc = w.contiguous();
    for (int64_t i = 0; i < C; ++i) wsum += wc.data_ptr<float>()[i];
    TORCH_CHECK_VALUE(std::isfinite(wsum) && wsum >= std::numeric_limits<float>::min(), op,
                      ": weights must add up to a finite, normal float32 number, got a sum of ", wsum,
                      "; scale them (e.g. divide by their sum)");
    a.weights = weights->contiguous();
  }
  const int64_t kMax = (int64_t{1} << 24);
  TORCH_CHECK_VALUE(0 <= in_lo && in_lo <= in_hi && in_hi <= kMax, op, ": input token range must satisfy 0 <= min <= max <= 2^24, got [",
                    in_lo, ", ", in_hi, "]");
  TORCH_CHECK_VALUE(0 <= tg_lo && tg_lo <= tg_hi && tg_hi <= kMax, op, ": target token range must satisfy 0 <= min <= max <= 2^24, got [",
                    tg_lo, ", ", tg_hi, "]");
  a.alpha_in = alpha_in.contiguous();
  a.alpha_tg = alpha_tg.contiguous();
  a.size = size.contiguous();
  a.is_image = is_image.contiguous();
  a.B = batch_size;
  a.M = M;
  a.C = C;
  a.in_lo = static_cast<int32_t>(in_lo);
  a.in_hi = static_cast<int32_t>(in_hi);
  a.tg_lo = static_cast<int32_t>(tg_lo);
  a.tg_hi = static_cast<int32_t>(tg_hi);
  return a;
}

inline kernels::BudgetConfig budget_config(const BudgetArgs& a) {
  kernels::BudgetConfig cfg;
  cfg.M = static_cast<int>(a.M);
  cfg.C = static_cast<int>(a.C);
  cfg.alpha_in = a.alpha_in.const_data_ptr<float>();
  cfg.alpha_tg = a.alpha_tg.const_data_ptr<float>();
  cfg.weights = a.weights.defined() ? a.weights.const_data_ptr<float>() : nullptr;
  cfg.size = a.size.const_data_ptr<int32_t>();
  cfg.is_image = reinterpret_cast<const uint8_t*>(a.is_image.const_data_ptr<bool>());
  cfg.in_lo = a.in_lo;
  cfg.in_hi = a.in_hi;
  cfg.tg_lo = a.tg_lo;
  cfg.tg_hi = a.tg_hi;
  return cfg;
}

// token_layout's per-sample tables, [B, M] int32 each, all on one device.
inline void check_layout_inputs(const at::Tensor& input_budget, const at::Tensor& target_budget,
                                const at::Tensor& seq_input, const at::Tensor& seq_target, const at::Tensor& size,
                                const at::Tensor& is_image, int64_t num_encoder, int64_t num_decoder) {
  const char* op = "token_layout";
  const int64_t M = check_modality_table(size, is_image, op);
  const at::Tensor* tables[4] = {&input_budget, &target_budget, &seq_input, &seq_target};
  const char* names[4] = {"input_budget", "target_budget", "seq_input", "seq_target"};
  for (int i = 0; i < 4; ++i) {
    check_config_tensor(*tables[i], op, names[i], at::kInt, 2);
    check_same_device(size, *tables[i], op, names[i]);
    TORCH_CHECK_VALUE(tables[i]->size(1) == M && tables[i]->size(0) == input_budget.size(0), op, ": ", names[i],
                      " must be [batch, ", M, "] = [", input_budget.size(0), ", ", M, "], got ", tables[i]->sizes());
  }
  TORCH_CHECK_VALUE(num_encoder >= 0 && num_decoder >= 0, op, ": slot counts must be >= 0, got ", num_encoder, " and ",
                    num_decoder);
}

// Offsets of each modality in the concatenated per-sample buffer: image grids, then 4M's
// 2 (max_tokens + 1) slots per sequence.
inline at::Tensor modality_offsets(const at::Tensor& size, const at::Tensor& is_image) {
  const at::Tensor s = size.cpu().to(at::kLong), img = is_image.cpu();
  const at::Tensor width = at::where(img, s, 2 * (s + 1));
  return (at::cumsum(width, 0) - width).to(size.device());
}

inline const char* layout_status_message(int32_t status) {
  return status == 1 ? "more input or target tokens than encoder / decoder slots (num_encoder / num_decoder too small)"
                     : "a budget outside its modality (image: input + target <= size; sequence: seq_input <= "
                       "input_budget <= size and input_budget + seq_target <= 2 (size + 1))";
}

using LayoutTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// token_layout's eleven outputs, allocated once for both executors.
struct LayoutOutputs {
  at::Tensor enc_index, enc_modality, enc_position, enc_valid;
  at::Tensor dec_index, dec_modality, dec_position, dec_valid, dec_segment, dec_rank, dec_limit;
  int64_t num_enc, num_dec;

  LayoutOutputs(int64_t B, int64_t ne, int64_t nd, const at::TensorOptions& opts) : num_enc(ne), num_dec(nd) {
    const auto i32 = opts.dtype(at::kInt), i64 = opts.dtype(at::kLong), b8 = opts.dtype(at::kBool);
    enc_index = at::empty({B, ne}, i64);
    enc_modality = at::empty({B, ne}, i32);
    enc_position = at::empty({B, ne}, i32);
    enc_valid = at::empty({B, ne}, b8);
    dec_index = at::empty({B, nd}, i64);
    dec_modality = at::empty({B, nd}, i32);
    dec_position = at::empty({B, nd}, i32);
    dec_valid = at::empty({B, nd}, b8);
    dec_segment = at::empty({B, nd}, i32);
    dec_rank = at::empty({B, nd}, i32);
    dec_limit = at::empty({B, nd}, i32);
  }

  // Row pointers of sample b (b = 0: the base pointers a CUDA kernel offsets itself).
  kernels::LayoutRow row(int64_t b) {
    const int64_t e = b * num_enc, d = b * num_dec;
    return {enc_index.data_ptr<int64_t>() + e,   enc_modality.data_ptr<int32_t>() + e,
            enc_position.data_ptr<int32_t>() + e, enc_valid.data_ptr<bool>() + e,
            dec_index.data_ptr<int64_t>() + d,   dec_modality.data_ptr<int32_t>() + d,
            dec_position.data_ptr<int32_t>() + d, dec_valid.data_ptr<bool>() + d,
            dec_segment.data_ptr<int32_t>() + d,  dec_rank.data_ptr<int32_t>() + d,
            dec_limit.data_ptr<int32_t>() + d};
  }

  LayoutTensors as_tuple() const {
    return {enc_index, enc_modality, enc_position, enc_valid, dec_index, dec_modality,
            dec_position, dec_valid, dec_segment, dec_rank, dec_limit};
  }
};

// One sample's row as "[a, b, c]" (a tensor streamed into the message spans several lines).
inline std::string int_row(const at::Tensor& t, int64_t b) {
  const at::Tensor r = t[b].to(at::kCPU, at::kLong).contiguous();
  std::string s = "[";
  for (int64_t i = 0; i < r.numel(); ++i) s += (i ? ", " : "") + std::to_string(r.const_data_ptr<int64_t>()[i]);
  return s + "]";
}

[[noreturn]] inline void raise_layout_error(int64_t b, int32_t status, const at::Tensor& in_b, const at::Tensor& tg_b,
                                            const at::Tensor& s_in, const at::Tensor& s_tg, int64_t ne, int64_t nd) {
  TORCH_CHECK_VALUE(false, "token_layout: sample ", b, ": ", layout_status_message(status), "; input_budget ",
                    int_row(in_b, b), ", target_budget ", int_row(tg_b, b), ", seq_input ", int_row(s_in, b),
                    ", seq_target ", int_row(s_tg, b), ", slots ", ne, "/", nd);
}

}  // namespace fourm_fast
