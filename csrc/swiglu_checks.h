// Input validation for swiglu and swiglu_backward (mirrored by fourm_fast/ops/swiglu.py for fake
// tensors, so compiled code raises the same errors), and the dtype switch both executors use.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fourm_fast {

// Every tensor of the op: the first one's shape, dtype (float32, bfloat16 or float16) and device.
inline void check_swiglu_tensors(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const auto& [name0, t0] = *ts.begin();
  const auto st = t0->scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name0,
                   " must be float32, bfloat16 or float16, got ", st);
  for (const auto& [name, t] : ts) {
    TORCH_CHECK_TYPE(t->scalar_type() == st, op, ": ", name, " must have ", name0, "'s dtype ", st, ", got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == t0->device(), op, ": ", name, " is on ", t->device(), " but ", name0, " is on ",
                      t0->device());
    TORCH_CHECK_VALUE(t->sizes() == t0->sizes(), op, ": ", name, " has shape ", t->sizes(), " but ", name0,
                      " has shape ", t0->sizes());
  }
}

// Calls f with a value of the storage type for st: float, c10::BFloat16 or c10::Half (after
// check_swiglu_tensors, nothing else arrives).
template <class F>
void swiglu_dtype_switch(at::ScalarType st, const F& f) {
  switch (st) {
    case at::kFloat:
      return f(float());
    case at::kBFloat16:
      return f(c10::BFloat16());
    default:
      return f(c10::Half());
  }
}

}  // namespace fourm_fast
