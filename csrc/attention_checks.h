// Input validation for masked_attention (forward and backward), shared by CPU and CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fourm_fast {

struct AttnInputs {
  at::Tensor q, k, v, k_valid;
  at::Tensor q_segment, k_segment, q_limit, k_rank;  // undefined when absent
  bool has_segments = false, has_ranks = false;
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0;
};

inline void check_meta(const at::Tensor& t, const char* name, int64_t B, int64_t N, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "masked_attention: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == N, "masked_attention: ", name, " must have shape (",
                    B, ", ", N, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), "masked_attention: ", name, " is on ", t.device(), " but q is on ",
                    q.device());
}

inline AttnInputs check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& k_valid, const std::optional<at::Tensor>& q_segment,
                                         const std::optional<at::Tensor>& k_segment,
                                         const std::optional<at::Tensor>& q_limit,
                                         const std::optional<at::Tensor>& k_rank) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "masked_attention: q, k, v must be 4-D (B, H, N, d), got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "masked_attention: q must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, "masked_attention: q, k, v must share a dtype, got ",
                   st, ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device() && k_valid.device() == q.device(),
                    "masked_attention: all inputs must be on one device (q is on ", q.device(), ")");
  AttnInputs in;
  in.B = q.size(0);
  in.H = q.size(1);
  in.Nq = q.size(2);
  in.D = q.size(3);
  in.Nk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == in.B && v.size(0) == in.B, "masked_attention: batch sizes differ: q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) == in.H && v.size(1) == in.H, "masked_attention: head counts differ: q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(2) == in.Nk, "masked_attention: k and v must have the same number of keys, got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == in.D && v.size(3) == in.D, "masked_attention: head dims differ: q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(in.D >= 1, "masked_attention: head dim must be positive");
  TORCH_CHECK_TYPE(k_valid.scalar_type() == at::kBool, "masked_attention: k_valid must be bool, got ",
                   k_valid.scalar_type());
  TORCH_CHECK_VALUE(k_valid.dim() == 2 && k_valid.size(0) == in.B && k_valid.size(1) == in.Nk,
                    "masked_attention: k_valid must have shape (", in.B, ", ", in.Nk, "), got ", k_valid.sizes());
  const bool qs = q_segment.has_value() && q_segment->defined();
  const bool ks = k_segment.has_value() && k_segment->defined();
  TORCH_CHECK_VALUE(qs == ks, "masked_attention: give both q_segment and k_segment, or neither");
  const bool ql = q_limit.has_value() && q_limit->defined();
  const bool kr = k_rank.has_value() && k_rank->defined();
  TORCH_CHECK_VALUE(ql == kr, "masked_attention: give both q_limit and k_rank, or neither");
  in.q = q;
  in.k = k;
  in.v = v;
  in.k_valid = k_valid;
  if (qs) {
    check_meta(*q_segment, "q_segment", in.B, in.Nq, q);
    check_meta(*k_segment, "k_segment", in.B, in.Nk, q);
    in.q_segment = *q_segment;
    in.k_segment = *k_segment;
    in.has_segments = true;
  }
  if (ql) {
    check_meta(*q_limit, "q_limit", in.B, in.Nq, q);
    check_meta(*k_rank, "k_rank", in.B, in.Nk, q);
    in.q_limit = *q_limit;
    in.k_rank = *k_rank;
    in.has_ranks = true;
  }
  return in;
}

}  // namespace fourm_fast
