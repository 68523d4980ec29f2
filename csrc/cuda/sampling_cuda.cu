// CUDA executor of sample_tokens, the host side; the kernel is in sampling_kernels.cuh.
// Semantics and every per-token decision come from
// csrc/kernels/sampling_math.h; the row algorithm mirrors csrc/cpu/sampling_cpu_rows.h, and the
// results (tokens, probs, errors) are bit-identical to the CPU executor. That holds because every
// float that decides something is computed by the shared __host__ __device__ functions from the
// same inputs, and every sum that decides something is a uint64 sum, which no reduction or scan
// order can change.
//
// Layout: one thread block of kThreads = 512 threads per row (a 1-D grid of min(R, 2^31 - 1)
// blocks that loop over rows when R is larger), __launch_bounds__(512, 2) so two blocks share an
// SM and one block's global loads overlap the other's arithmetic. Shared memory: ~27 KB static
// (histograms, reduction buffers) plus the row copy, V + 16 elements of the stored type rounded
// up to 16 bytes, as long as both fit the device's opt-in limit (227 KB on H100: V <= ~100k for
// bf16/fp16 without CFG, ~50k for fp32 or with CFG; 163 KB on A100: ~69k / ~34k).
//
// Per row:
//  1. Parameters: five float32 pointers with stride 0 (0-d tensor) or the tensor's stride (one
//     value per row); validate_sample_params. A bad row writes (-1, NaN, status) and stops.
//  2. Load: the row is read from global memory exactly once (16-byte vector loads when the row is
//     contiguous, with scalar head/tail so any base alignment vectorizes; strided rows use scalar
//     loads). Without CFG the raw logits are kept in dynamic shared memory as they are (bf16/fp16
//     take half the room of float, so a 30k vocabulary still leaves room for a second block); with
//     CFG the guided floats are kept. The same pass computes the max, the NaN / +inf flags and,
//     when top-k is on, the histogram of the first radix digit. If the row does not fit in shared
//     memory, a second instantiation keeps nothing and re-reads the row (mostly from L2) in every
//     later pass: slower, same results.
//  3. temperature == 0: the first index with g == m (the filters cannot change it, so they are
//     skipped), prob 1.
//  4. top-k and top-p thresholds: threshold_select on the GPU as radix selection over
//     ordered_key(g) with three digits of 11, 11 and 10 bits (2048-bucket histograms in shared
//     memory: a uint32 count and, for top-p, a uint64 mass per bucket kept as two uint32 halves
//     so that only native 32-bit shared atomics are used; filled over the tokens whose key
//     matches the digits chosen so far, each pass rescanning the row). After each histogram the
//     buckets are walked from the top as in the CPU loop, but by the whole block: a block-wide
//     exclusive scan of the bucket masses (in descending bucket order) gives every bucket the
//     mass above it, and the chosen bucket is the lowest non-empty one whose mass above still fits
//     the budget (a block-wide min). The result does not depend on the digit split (so it need
//     not match the CPU's layout): each level keeps the bucket containing v* = the smallest key
//     present whose mass strictly above is <= budget (a bucket qualifies iff its largest key
//     does, and the mass above a key only grows as the key falls), so after the last digit the
//     prefix is v* for any split. Wider digits mean fewer passes and far fewer same-address atomics in the
//     first pass (top byte = sign + 7 exponent bits would put most logits in a handful of
//     buckets). The top-p total Q is the sum of its first histogram, so no extra pass is needed.
//  5. Draw: each warp owns a contiguous range of the row; lanes sum the fixed-point weights of
//     their tokens, and the warp records its total per chunk of its range (at most 16 chunks).
//     Warp totals are scanned in warp order, the Philox target picks the warp whose range holds
//     the crossing, its chunk totals pick the chunk, and that warp re-walks only that chunk, 32
//     vectors at a time with a warp inclusive scan, to find the first token whose inclusive
//     prefix sum exceeds the target.
//
// The hot loops use two exact shortcuts (both produce the very bits of the shared functions):
//  - kernels::mass_weight is the integer-shift form (no double conversions on the GPU);
//  - tempered(g, m, 1) is ff_sub(g, m) (IEEE x / 1 == x), so the division is skipped at T == 1.
// Sign of zero: the block max uses fmaxf, so m may be -0 where the CPU's sequential max holds +0
// (or the reverse). No decision can see it: comparisons treat them as equal, ff_sub(g, m) differs
// only in the sign of a zero result, and ff_exp(+-0) == 1.
//
// Outputs: tokens int64 (R,), probs float32 (R,), and a device int32 status per row. Unless the
// stream is capturing a CUDA graph, the host then checks status and raises the CPU executor's
// error for the first bad row. seed and offset are read inside the kernel from their device
// tensors, so a captured graph replays with whatever values were written into them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../kernels/sampling_math.h"
#include "../sampling_checks.h"
#include "sampling_kernels.cuh"
#include "smem_optin.h"

namespace fourm_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side (the kernel is in sampling_kernels.cuh).

template <typename scalar_t, bool kCfg>
void launch_sample(const SampleArgs<scalar_t>& args, int device, cudaStream_t stream) {
  using S = store_t<scalar_t, kCfg>;
  const int64_t grid = std::min<int64_t>(args.R, INT_MAX);
  // The smem copy holds V elements plus up to 16 of alignment padding, rounded to 16 bytes.
  const size_t row_bytes = ((static_cast<size_t>(args.V) + 16) * sizeof(S) + 15) / 16 * 16;
  auto* smem_kernel = &sample_tokens_kernel<scalar_t, kCfg, true>;
  const int max_dyn = max_dynamic_smem(reinterpret_cast<const void*>(smem_kernel), device);
  if (row_bytes <= static_cast<size_t>(max_dyn)) {
    smem_kernel<<<static_cast<unsigned>(grid), kThreads, row_bytes, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    sample_tokens_kernel<scalar_t, kCfg, false><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void sample_tokens_cuda_impl(const SampleInputs& in, const at::Tensor& tokens, const at::Tensor& probs,
                             const at::Tensor& status) {
  SampleArgs<scalar_t> args;
  args.cond = in.logits.const_data_ptr<scalar_t>();
  args.cs0 = in.logits.stride(0);
  args.cs1 = in.logits.stride(1);
  const bool cfg = in.uncond.defined();
  args.uncond = cfg ? in.uncond.const_data_ptr<scalar_t>() : nullptr;
  args.us0 = cfg ? in.uncond.stride(0) : 0;
  args.us1 = cfg ? in.uncond.stride(1) : 0;
  args.R = in.logits.size(0);
  args.V = static_cast<int>(in.logits.size(1));
  const at::Tensor* params[5] = {&in.temperature, &in.top_k, &in.top_p, &in.min_p, &in.cfg_scale};
  for (int i = 0; i < 5; ++i) {
    args.params.ptr[i] = params[i]->const_data_ptr<float>();
    args.params.stride[i] = params[i]->dim() == 0 ? 0 : params[i]->stride(0);
  }
  args.seed = in.seed.const_data_ptr<int64_t>();
  args.offset = in.offset.const_data_ptr<int64_t>();
  args.tokens = tokens.data_ptr<int64_t>();
  args.probs = probs.data_ptr<float>();
  args.status = status.data_ptr<int32_t>();
  const int device = in.logits.get_device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (cfg) {
    launch_sample<scalar_t, true>(args, device, stream);
  } else {
    launch_sample<scalar_t, false>(args, device, stream);
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& cfg_scale,
    const at::Tensor& seed, const at::Tensor& offset) {
  const SampleInputs in =
      check_sample_inputs(logits, uncond_logits, temperature, top_k, top_p, min_p, cfg_scale, seed, offset);
  TORCH_CHECK_VALUE(logits.is_cuda(), "sample_tokens (CUDA): logits must be on a CUDA device");
  c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t R = logits.size(0);
  at::Tensor tokens = at::empty({R}, logits.options().dtype(at::kLong));
  at::Tensor probs = at::empty({R}, logits.options().dtype(at::kFloat));
  if (R == 0) return {tokens, probs};
  at::Tensor status = at::empty({R}, logits.options().dtype(at::kInt));
  switch (logits.scalar_type()) {
    case at::kFloat: sample_tokens_cuda_impl<float>(in, tokens, probs, status); break;
    case at::kBFloat16: sample_tokens_cuda_impl<c10::BFloat16>(in, tokens, probs, status); break;
    case at::kHalf: sample_tokens_cuda_impl<c10::Half>(in, tokens, probs, status); break;
    default: TORCH_CHECK_TYPE(false, "sample_tokens: unsupported dtype ", logits.scalar_type());
  }

  // Errors: the status check needs the host to wait for the kernel, which a stream being captured
  // into a CUDA graph cannot do. While capturing the check is skipped, so bad rows of a graph
  // replay just hold token -1 and prob NaN; otherwise the first bad row raises exactly the CPU
  // executor's error.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture == cudaStreamCaptureStatusNone && status.ne(0).any().item<bool>()) {
    const at::Tensor status_cpu = status.cpu();
    const int32_t* st = status_cpu.const_data_ptr<int32_t>();
    int64_t bad = 0;
    while (bad < R && st[bad] == kernels::kSampleOk) ++bad;
    if (bad < R) {
      SampleInputs cpu_in = in;
      cpu_in.temperature = in.temperature.cpu();
      cpu_in.top_k = in.top_k.cpu();
      cpu_in.top_p = in.top_p.cpu();
      cpu_in.min_p = in.min_p.cpu();
      cpu_in.cfg_scale = in.cfg_scale.cpu();
      const ParamReader reader(cpu_in);
      raise_sample_status(st[bad], bad, reader.row(bad));
    }
  }
  return {tokens, probs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) { m.impl("sample_tokens", &sample_tokens_cuda); }

}  // namespace fourm_fast
