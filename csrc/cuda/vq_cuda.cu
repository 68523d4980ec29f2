// CUDA executor of vq_lookup, the host side; the kernels are in vq_kernels.cuh. A tiled GEMM
// x * C'^T whose epilogue turns each dot product into a score (csrc/kernels/vq_math.h) and folds
// it into a running per-row argmin held in registers, so the N x K distance matrix never exists.
// Semantics match csrc/cpu/vq_cpu.cpp.
//
// Three kernels, all on the current stream:
//  1. prepare: one thread per code (K rounded up to a tile) computes |c|^2 and the finite flag in
//     index order (the CPU's order, so the biases agree bit for bit), then writes the prepared code
//     c' = c / divisor and bias[K_pad]; padding codes and padding dims are zero, padding codes
//     get bias +inf. c' is stored tile-major: one contiguous block per (code tile, D chunk), in the
//     order the search streams it, so each pipeline step copies one contiguous run.
//  2. search, grid (row tiles of 128, code splits), 256 threads, a 3-stage cp.async pipeline over
//     the (code tile, D chunk) steps of the block's code range:
//     - tensor cores (bf16/fp16, sm80+): tiles of 128 rows x 128 codes, D in chunks of 32. 8 warps
//       as 2 (rows) x 4 (codes); a warp owns 64 rows x 32 codes = 4 x 4 mma.m16n8k16 tiles with
//       fp32 accumulators, fed by ldmatrix from smem rows whose pitch is 16 bytes past a multiple
//       of 64 (the 8 row addresses of an ldmatrix phase hit 8 distinct 16-byte bank groups). The
//       x tile stays resident in smem for the whole code loop when two blocks still fit per SM
//       (D <= 288 on H100, D <= 160 on A100), which halves the L2 traffic; otherwise x is streamed
//       with the codes. The epilogue reads the accumulators straight from registers (the mma
//       fragment layout is fixed by PTX): each thread owns 8 rows x 8 codes of a tile.
//       Smem: codes 3 x 10,752 B + x (resident 256 * (D_pad + 8) B, streamed 3 x 10,240 B) + 4 KiB.
//     - SIMT fp32 (also the pre-sm80 fallback for bf16/fp16, on fp32 copies): tiles of 128 x 128,
//       D in chunks of 16; threads as 16 x 16, each an 8 x 8 micro-tile (rows ty*4+i and
//       64+ty*4+i, codes tx*4+j and 64+tx*4+j) read as float4 from smem. x is staged transposed
//       and zero-padded (x^T [D_pad][N_pad]) so every copy is an aligned, unpredicated 16-byte
//       cp.async. Smem: 3 x 16,896 B.
//     Every thread scans its codes in increasing index order with a strict '<', so it keeps the
//     smallest of tied indices; merges across threads (shuffles, then smem across warps for the
//     mma kernel) use vq_better. Each block writes one (score, index) candidate per row and split.
//  3. finalize: one thread per row merges the splits in order with vq_better, then maps a row
//     with a non-finite entry or no winner to (-1, NaN) and otherwise recomputes the distance
//     exactly from the original row and code (vq_exact_distance), like the CPU executor.
// Code splits exist so that small N still fills the GPU: with N = 65536 there is one split.
// Temporaries are O(K*D) (prepared codebook) and O(N*D + N*splits), never O(N*K).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../kernels/vq_math.h"
#include "../vq_checks.h"
#include "ptx.cuh"
#include "smem_optin.h"
#include "vq_kernels.cuh"

namespace fourm_fast {
namespace {

using kernels::VqMetric;

// ---------------------------------------------------------------------------------------------
// Host side (the kernels are in vq_kernels.cuh).

// Shapes of one search: paddings, chunk counts and the code split. The caller sets the pointers.
VqSearchArgs plan_search(int64_t n, int64_t D, int64_t K, int chunk, VqMetric metric) {
  VqSearchArgs args{};
  args.n = n;
  args.d_pad = round_up(D, chunk);
  args.num_chunks = static_cast<int>(args.d_pad / chunk);
  args.num_tiles = static_cast<int>(round_up(K, kTileCodes) / kTileCodes);
  args.scale = kernels::vq_score_scale(metric);
  // Split the code tiles over blockIdx.y when the row tiles alone would not fill the GPU.
  const int64_t row_blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (kMinBlocksPerSm * sms + row_blocks - 1) / row_blocks;
  const int64_t splits = std::clamp<int64_t>(wanted, 1, args.num_tiles);
  args.tiles_per_split = static_cast<int>((args.num_tiles + splits - 1) / splits);
  return args;
}

int num_splits(const VqSearchArgs& args) {
  return (args.num_tiles + args.tiles_per_split - 1) / args.tiles_per_split;  // none empty
}

struct Partials {
  at::Tensor score;  // float32 [splits][n]
  at::Tensor index;  // int32 [splits][n]
  int splits = 0;
};

// Allocates the per-split candidates, points args at them and returns the grid.
dim3 attach_partials(const at::Tensor& like, VqSearchArgs& args, Partials& partials) {
  partials.splits = num_splits(args);
  partials.score = at::empty({partials.splits, args.n}, like.options().dtype(at::kFloat));
  partials.index = at::empty({partials.splits, args.n}, like.options().dtype(at::kInt));
  args.part_score = partials.score.data_ptr<float>();
  args.part_index = partials.index.data_ptr<int32_t>();
  const int64_t row_blocks = (args.n + kTileRows - 1) / kTileRows;
  return dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(partials.splits));
}

// Prepared codebook (tile-major, see tiled_code_offset) and biases.
template <typename scalar_t, typename out_t, int kChunk, bool kDimMajor>
void prepare_codes(const at::Tensor& codebook, VqMetric metric, const VqSearchArgs& args,
                   at::Tensor& prepared, at::Tensor& bias, cudaStream_t stream) {
  const int64_t k_pad = static_cast<int64_t>(args.num_tiles) * kTileCodes;
  prepared = at::empty({k_pad * args.d_pad},
                       codebook.options().dtype(c10::CppTypeToScalarType<out_t>::value));
  bias = at::empty({k_pad}, codebook.options().dtype(at::kFloat));
  constexpr int kPrepThreads = 256;
  const int64_t blocks = (k_pad + kPrepThreads - 1) / kPrepThreads;
  vq_prepare_codes_kernel<scalar_t, out_t, kChunk, kDimMajor><<<blocks, kPrepThreads, 0, stream>>>(
      codebook.const_data_ptr<scalar_t>(), codebook.stride(0), codebook.stride(1),
      codebook.size(0), codebook.size(1), k_pad, args.d_pad, metric,
      prepared.data_ptr<out_t>(), bias.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x as [n][x_ld] rows the mma copies can read in aligned 16-byte pieces: x2 itself when it
// already is, otherwise a zero-padded contiguous copy (O(N*D)).
at::Tensor mma_row_operand(const at::Tensor& x2) {
  const int64_t D = x2.size(1);
  const bool usable = x2.is_contiguous() && D % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 == 0;
  if (usable) return x2;
  at::Tensor padded = at::zeros({x2.size(0), round_up(D, 8)}, x2.options());
  padded.narrow(1, 0, D).copy_(x2);
  return padded;
}

template <bool kBf16, bool kResidentX>
void launch_mma_search(const VqSearchArgs& args, dim3 grid, int smem_bytes, cudaStream_t stream) {
  const auto kernel = vq_search_mma_kernel<kBf16, kResidentX>;
  // opted in once to the device's maximum: the resident size varies with D, and a per-launch
  // setting could be undone by another thread before this launch
  const int allowed = max_dynamic_smem(reinterpret_cast<const void*>(kernel), c10::cuda::current_device());
  TORCH_CHECK(smem_bytes <= allowed, "vq_lookup (CUDA): the search needs ", smem_bytes,
              " bytes of shared memory per block, this GPU allows ", allowed);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
Partials search_tensor_cores(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                             cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  VqSearchArgs args = plan_search(x2.size(0), x2.size(1), codebook.size(0), kMmaChunk, metric);
  at::Tensor prepared, bias;
  prepare_codes<scalar_t, scalar_t, kMmaChunk, false>(codebook, metric, args, prepared, bias,
                                                      stream);
  const at::Tensor rows = mma_row_operand(x2);
  args.x = rows.const_data_ptr();
  args.x_ld = rows.size(1);
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();
  Partials partials;
  const dim3 grid = attach_partials(x2, args, partials);

  // Keep the x tile resident when two blocks still fit per SM (1 KiB: the per-block reserve).
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t resident_bytes = kTileRows * (args.d_pad + 8) * 2 + kStages * kMmaCodeStageBytes;
  const int64_t resident_per_sm = kMinBlocksPerSm * (resident_bytes + kMmaStaticSmemBytes + 1024);
  const bool resident = resident_per_sm <= static_cast<int64_t>(prop->sharedMemPerMultiprocessor) &&
                        resident_bytes + kMmaStaticSmemBytes <=
                            static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  if (resident) {
    launch_mma_search<kBf16, true>(args, grid, static_cast<int>(resident_bytes), stream);
  } else {
    launch_mma_search<kBf16, false>(args, grid, kStages * (kMmaTileBytes + kMmaCodeStageBytes),
                                    stream);
  }
  return partials;
}

// fp32 SIMT search; bf16/fp16 come here only on pre-sm80 GPUs, converted to fp32 copies.
template <typename scalar_t>
Partials search_simt(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                     cudaStream_t stream) {
  const int64_t n = x2.size(0), D = x2.size(1);
  VqSearchArgs args = plan_search(n, D, codebook.size(0), kSimtChunk, metric);
  at::Tensor prepared, bias;
  prepare_codes<scalar_t, float, kSimtChunk, true>(codebook, metric, args, prepared, bias, stream);
  // x^T, zero-padded to [d_pad][n rounded up to a row tile]: O(N*D), cheap next to the search.
  const int64_t n_pad = round_up(n, kTileRows);
  at::Tensor xt = at::zeros({args.d_pad, n_pad}, x2.options().dtype(at::kFloat));
  xt.narrow(0, 0, D).narrow(1, 0, n).copy_(x2.t());
  args.x = xt.const_data_ptr();
  args.x_ld = n_pad;
  args.codes = prepared.const_data_ptr();
  args.bias = bias.const_data_ptr<float>();
  Partials partials;
  const dim3 grid = attach_partials(x2, args, partials);
  TORCH_CHECK(kSimtSmemBytes <= max_dynamic_smem(reinterpret_cast<const void*>(vq_search_simt_kernel),
                                                 c10::cuda::current_device()),
              "vq_lookup (CUDA): the SIMT search needs ", kSimtSmemBytes, " bytes of shared memory per block");
  vq_search_simt_kernel<<<grid, kThreads, kSimtSmemBytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

template <typename scalar_t>
void vq_lookup_cuda_typed(const at::Tensor& x2, const at::Tensor& codebook, VqMetric metric,
                          at::Tensor& indices, at::Tensor& distance) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Partials partials;
  if constexpr (std::is_same_v<scalar_t, float>) {
    partials = search_simt<float>(x2, codebook, metric, stream);
  } else if (at::cuda::getCurrentDeviceProperties()->major >= 8) {
    partials = search_tensor_cores<scalar_t>(x2, codebook, metric, stream);
  } else {
    partials = search_simt<scalar_t>(x2, codebook, metric, stream);
  }
  const int64_t n = x2.size(0);
  constexpr int kFinalizeThreads = 256;
  const int64_t blocks = (n + kFinalizeThreads - 1) / kFinalizeThreads;
  vq_finalize_kernel<scalar_t><<<blocks, kFinalizeThreads, 0, stream>>>(
      x2.const_data_ptr<scalar_t>(), x2.stride(0), x2.stride(1),
      codebook.const_data_ptr<scalar_t>(), codebook.stride(0), codebook.stride(1),
      partials.score.const_data_ptr<float>(), partials.index.const_data_ptr<int32_t>(),
      partials.splits, n, x2.size(1), metric, indices.data_ptr<int64_t>(),
      distance.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> vq_lookup_cuda(const at::Tensor& x, const at::Tensor& codebook,
                                                  c10::string_view metric_name) {
  check_vq_inputs(x, codebook);
  const VqMetric metric = parse_vq_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK_VALUE(x.is_cuda(), "vq_lookup (CUDA): x must be a CUDA tensor, got ", x.device());
  // Code indices, padding included, are int32 inside the kernels.
  TORCH_CHECK_VALUE(codebook.size(0) <= INT32_MAX - kTileCodes,
                    "vq_lookup (CUDA): at most 2^31 - 129 codes are supported, got ",
                    codebook.size(0));
  const c10::cuda::CUDAGuard device_guard(x.device());

  const int64_t D = codebook.size(1);
  auto [indices, distance] = vq_empty_outputs(x);
  if (indices.numel() == 0) return {indices, distance};
  const at::Tensor x2 = x.reshape({-1, D});

  switch (x.scalar_type()) {
    case at::kFloat:
      vq_lookup_cuda_typed<float>(x2, codebook, metric, indices, distance);
      break;
    case at::kBFloat16:
      vq_lookup_cuda_typed<c10::BFloat16>(x2, codebook, metric, indices, distance);
      break;
    case at::kHalf:
      vq_lookup_cuda_typed<c10::Half>(x2, codebook, metric, indices, distance);
      break;
    default:  // check_vq_inputs already rejected every other dtype
      TORCH_CHECK_TYPE(false, "vq_lookup (CUDA): unsupported dtype ", x.scalar_type());
  }
  return {indices, distance};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) { m.impl("vq_lookup", &vq_lookup_cuda); }

}  // namespace fourm_fast
