// Opting kernels in to large dynamic shared memory, once per (kernel, device).
//
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) is per kernel and process-wide. Setting it to
// each launch's own size lets two host threads undo each other between the set and the launch
// (the larger launch then fails with "invalid argument"), so it is set once, to the most the
// device allows, and launches only check against that.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <mutex>
#include <tuple>
#include <vector>

namespace fourm_fast {

// Largest dynamic smem a launch of fn may use on this device: the opt-in limit minus the kernel's
// static smem.
inline int max_dynamic_smem(const void* fn, int device) {
  static std::mutex mu;
  static std::vector<std::tuple<const void*, int, int>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& [f, dev, bytes] : cache) {
    if (f == fn && dev == device) return bytes;
  }
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, fn));
  const int optin = static_cast<int>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin);
  int bytes = optin - static_cast<int>(attr.sharedSizeBytes);
  bytes = bytes > 0 ? bytes : 0;
  C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  cache.emplace_back(fn, device, bytes);
  return bytes;
}

}  // namespace fourm_fast
