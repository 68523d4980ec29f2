// CPU executor of swiglu and swiglu_backward: elementwise over contiguous buffers, split across
// threads in blocks, each block through the loops of the widest ISA allowed (swiglu_cpu_loops.h).
//
// Why an op for silu(a) * b: eagerly it is two passes forward (silu, then the product) and three
// backward (two products and silu's backward), each reading and writing hidden-size tensors, and
// autograd keeps silu(a) alive for the product's backward. Here it is one pass each way, and the
// saved tensors are the two inputs only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../swiglu_checks.h"
#include "parallel.h"
#include "swiglu_cpu_dispatch.h"

namespace fourm_fast {
namespace {

// Elements per parallel unit: enough that a unit's work (tens of microseconds) dwarfs the cost
// of handing it to a thread.
constexpr int64_t kGrain = 1 << 15;

template <class T>
const SwigluTypedLoops<T>& typed(const SwigluLoops& l) {
  if constexpr (std::is_same_v<T, float>) {
    return l.f32;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return l.bf16;
  } else {
    return l.f16;
  }
}

at::Tensor swiglu_cpu(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_tensors("swiglu", {{"gate", &gate_in}, {"up", &up_in}});
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  const SwigluLoops loops = swiglu_loops();
  swiglu_dtype_switch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto fwd = typed<T>(loops).fwd;
    const T *a = gate.const_data_ptr<T>(), *b = up.const_data_ptr<T>();
    T* o = out.data_ptr<T>();
    parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) { fwd(a + i0, b + i0, o + i0, i1 - i0); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                       const at::Tensor& up_in) {
  check_swiglu_tensors("swiglu_backward", {{"grad", &grad_in}, {"gate", &gate_in}, {"up", &up_in}});
  const at::Tensor grad = grad_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor grad_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor grad_up = at::empty_like(up, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return {grad_gate, grad_up};
  const SwigluLoops loops = swiglu_loops();
  swiglu_dtype_switch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto bwd = typed<T>(loops).bwd;
    const T *g = grad.const_data_ptr<T>(), *a = gate.const_data_ptr<T>(), *b = up.const_data_ptr<T>();
    T *da = grad_gate.data_ptr<T>(), *db = grad_up.data_ptr<T>();
    parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) { bwd(g + i0, a + i0, b + i0, da + i0, db + i0, i1 - i0); });
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace fourm_fast
