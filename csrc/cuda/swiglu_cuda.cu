// CUDA executor of swiglu and swiglu_backward: launches the grid-stride kernels of
// swiglu_kernels.cuh, whose arithmetic (csrc/kernels/swiglu_math.h) gives the CPU loops' bits.
// Memory bound: 3 (forward) or 5 (backward) tensors of the inputs' dtype move once.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../swiglu_checks.h"
#include "swiglu_kernels.cuh"

namespace fourm_fast {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU several times over; the grid-stride loop covers the rest.
unsigned int grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32);
  return static_cast<unsigned int>(std::max<int64_t>(blocks, 1));
}

at::Tensor swiglu_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check_swiglu_tensors("swiglu", {{"gate", &gate_in}, {"up", &up_in}});
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty_like(gate, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  swiglu_dtype_switch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(gate.const_data_ptr<T>(), up.const_data_ptr<T>(),
                                                                out.data_ptr<T>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& gate_in,
                                                        const at::Tensor& up_in) {
  check_swiglu_tensors("swiglu_backward", {{"grad", &grad_in}, {"gate", &gate_in}, {"up", &up_in}});
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor grad = grad_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor grad_gate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor grad_up = at::empty_like(up, at::MemoryFormat::Contiguous);
  const int64_t n = gate.numel();
  if (n == 0) return {grad_gate, grad_up};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  swiglu_dtype_switch(gate.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(grad.const_data_ptr<T>(), gate.const_data_ptr<T>(),
                                                                up.const_data_ptr<T>(), grad_gate.data_ptr<T>(),
                                                                grad_up.data_ptr<T>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace fourm_fast
