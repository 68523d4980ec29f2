// CUDA executor of masked_attention (forward and backward): the host side, launching the kernels
// of attention_kernels.cuh (which tests/test_gpu_kernels_on_host.py also runs on a CPU
// through an emulation of the CUDA features they use). Semantics match
// csrc/cpu/attention_cpu.cpp: visibility from O(N) metadata (attn_visible), lse saved by the
// forward pass (-inf and zero output for a query that sees no key), probabilities recomputed from
// lse in the backward pass (attn_prob, or its base-2 form attn_prob2 in the tensor-core kernels;
// attn_dscore), all in fp32.
//
// Tile skipping. A small kernel computes AttnTileBounds per (batch, tile) of queries and of keys
// (attn_*_tile_start / _add); every block owns one tile of one side and walks only the tiles
// of the other side that attn_tiles_may_meet admits. The walk is block-uniform (all threads scan
// the same bounds), and a block that meets nothing still writes its zeros (and lse = -inf).
// Tiles that attn_tiles_all_visible proves fully visible (the full tiles of an unpadded encoder,
// the inside of a decoder image modality) skip the per-element rule in the
// tensor-core kernels. Those kernels exponentiate in base 2 (attn_prob2: scale * log2 e folded
// into the scores, one ex2 per probability); lse is stored in natural log, as the CPU stores it.
//
// Tensor-core path (bf16 / fp16, head dim up to 128, templated on kD = 32, 64 or 128; sm80+):
// 128 threads = 4 warps, every warp owns 16 rows of the block's 64-row tile; the other side is
// streamed through a 2-stage cp.async pipeline. mma.m16n8k16 with fp32 accumulators; scores stay
// in registers and feed the second product as A fragments (rounded to the input dtype there, as
// flash attention does). Operands are read straight from q, k, v when rows are 16-byte aligned
// with contiguous d (d % 8 == 0); otherwise a zero-padded contiguous copy is made (O(N*d)).
//  - forward: block = 64 queries; per 64-key tile S = Q K^T, mask, online softmax, O += P V.
//  - backward, two deterministic kernels (no atomics, no fp32 dq workspace; 7 matrix products
//    per tile pair instead of flash attention's 5, the price of writing every gradient once):
//      dq:   block = 64 queries; per key tile S, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
//      dkdv: block = 64 keys; per query tile S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
//            dS^T, dK += dS^T Q.
//    Their streamed tiles are 64 rows, 32 at kD = 128 so that the accumulators stay in registers.
//    delta = rowsum(dO * O) is computed first by its own kernel.
//  Dynamic smem (bytes), kD = 32 / 64 / 128: fwd 27,136 / 47,616 / 88,576; dq 32,256 / 56,832 /
//  70,400; dkdv 32,768 / 57,344 / 70,656 (opt-in above 48 KiB; sm80 allows 163 KiB).
//
// SIMT path (fp32; also bf16 / fp16 with head dim > 128, run on fp32 copies): 256 threads as
// 16 x 16, 64 x 64 tiles, each thread a 4 x 4 micro-tile (rows ty + 16 i, columns tx + 16 j).
// Dot products over d stream the operands through smem in chunks of 32 (any d, any strides);
// outputs are produced in column slices of 64 (blockIdx carries the slice), so registers stay
// bounded for every d at the cost of recomputing scores once per extra slice. Same three kernels
// and the same algebra as the tensor-core path, with P and dS kept in fp32. Smem: 54,784 bytes.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../attention_checks.h"
#include "../kernels/attention_math.h"
#include "attention_kernels.cuh"
#include "attention_tiles.cuh"
#include "ptx.cuh"

namespace fourm_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Host side (the kernels are in attention_kernels.cuh).

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Operand make_operand(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Contiguous metadata (O(N) copies when a view is strided) and the kernels' view of it.
struct MetaHolder {
  at::Tensor valid, qseg, kseg, qlim, krank;
  AttnMetaArgs args{};

  explicit MetaHolder(const AttnInputs& in) {
    valid = in.k_valid.contiguous();
    args.k_valid = valid.const_data_ptr<bool>();
    args.has_segments = in.has_segments;
    args.has_ranks = in.has_ranks;
    if (in.has_segments) {
      qseg = in.q_segment.contiguous();
      kseg = in.k_segment.contiguous();
      args.q_segment = qseg.const_data_ptr<int32_t>();
      args.k_segment = kseg.const_data_ptr<int32_t>();
    }
    if (in.has_ranks) {
      qlim = in.q_limit.contiguous();
      krank = in.k_rank.contiguous();
      args.q_limit = qlim.const_data_ptr<int32_t>();
      args.k_rank = krank.const_data_ptr<int32_t>();
    }
  }
};

void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "masked_attention (CUDA): ", what, " needs ", blocks,
                    " thread blocks, more than the supported 2^31 - 1; split the batch");
}

// AttnTileBounds of every (batch, tile) of one side, as raw bytes on the device.
at::Tensor tile_bounds(const AttnInputs& in, const AttnMetaArgs& meta, bool keys, int tile, cudaStream_t stream) {
  const int64_t N = keys ? in.Nk : in.Nq;
  const int64_t tiles = ceil_div(N, tile);
  at::Tensor bytes = at::empty({in.B * tiles * static_cast<int64_t>(sizeof(AttnTileBounds))},
                               in.q.options().dtype(at::kByte));
  constexpr int kThreads = 128;
  const int64_t count = in.B * tiles;
  if (count == 0) return bytes;
  check_grid(ceil_div(count, kThreads), keys ? "the key tile bounds" : "the query tile bounds");
  tile_bounds_kernel<<<static_cast<unsigned>(ceil_div(count, kThreads)), kThreads, 0, stream>>>(
      meta, in.B, N, tile, static_cast<int>(tiles), keys, reinterpret_cast<AttnTileBounds*>(bytes.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return bytes;
}

const AttnTileBounds* bounds_ptr(const at::Tensor& t) {
  return reinterpret_cast<const AttnTileBounds*>(t.const_data_ptr());
}

// Tensor-core operands need contiguous d, 16-byte aligned rows and d % 8 == 0; anything else gets
// a zero-padded contiguous copy.
at::Tensor mma_operand(const at::Tensor& t) {
  const int64_t D = t.size(3);
  bool ok = D % 8 == 0 && t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  if (ok) return t;
  at::Tensor padded = at::zeros({t.size(0), t.size(1), t.size(2), ceil_div(D, 8) * 8}, t.options());
  padded.narrow(3, 0, D).copy_(t);
  return padded;
}

template <class Kernel>
void launch(Kernel kernel, int64_t blocks, int threads, int smem, const AttnArgs& args, cudaStream_t stream,
            const char* what) {
  check_grid(blocks, what);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= static_cast<int>(prop->sharedMemPerBlockOptin), "masked_attention (CUDA): ", what, " needs ",
              smem, " bytes of shared memory per block, this GPU allows ", prop->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(std::integral_constant<int, kD>) for the tensor-core head-dim tier of D (<= 128).
template <class F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else {
    f(std::integral_constant<int, 128>{});
  }
}

// Fields shared by every launch; the caller fills tensors, bounds and tile counts.
AttnArgs base_args(const AttnInputs& in, const MetaHolder& meta, double scale) {
  AttnArgs a{};
  a.meta = meta.args;
  a.H = in.H;
  a.Nq = in.Nq;
  a.Nk = in.Nk;
  a.D = static_cast<int>(in.D);
  a.slices = static_cast<int>(ceil_div(in.D, kSimtSlice));
  a.scale = static_cast<float>(scale);
  return a;
}

void check_cuda_inputs(const AttnInputs& in) {
  TORCH_CHECK_VALUE(in.q.is_cuda(), "masked_attention (CUDA): inputs must be CUDA tensors, got ", in.q.device());
  TORCH_CHECK_VALUE(in.Nq < INT32_MAX - kTile && in.Nk < INT32_MAX - kTile && in.D <= INT32_MAX,
                    "masked_attention (CUDA): at most 2^31 - 65 queries / keys and 2^31 - 1 head dims are "
                    "supported, got Nq = ", in.Nq, ", Nk = ", in.Nk, ", d = ", in.D);
}

// After the device guard: the properties are those of q's device.
void check_capability() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "masked_attention (CUDA): needs a GPU of compute capability 8.0 or newer (the "
              "kernels use cp.async and mma.sync), got ", prop->major, ".", prop->minor);
}

bool uses_tensor_cores(const AttnInputs& in) {
  return in.q.scalar_type() != at::kFloat && in.D <= kMaxMmaD;
}

// ---- forward ----

template <bool kBf16>
void forward_mma(const AttnInputs& in, const MetaHolder& meta, double scale, at::Tensor& out, at::Tensor& lse,
                 cudaStream_t stream) {
  const at::Tensor q = mma_operand(in.q), k = mma_operand(in.k), v = mma_operand(in.v);
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.d_cols = static_cast<int>(q.size(3));
  a.out = out.data_ptr();
  a.lse_out = lse.data_ptr<float>();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  dispatch_head_dim(in.D, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    launch(attn_fwd_mma_kernel<kBf16, kD>, in.B * in.H * a.q_tiles, kMmaThreads, MmaCfg<kD>::kFwdSmem, a, stream,
           "the forward kernel");
  });
}

// fp32 SIMT forward; `out` is a contiguous fp32 tensor.
void forward_simt(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.out = out.data_ptr();
  a.lse_out = lse.data_ptr<float>();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  launch(attn_fwd_simt_kernel, in.B * in.H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the forward kernel");
}

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_valid,
    const std::optional<at::Tensor>& q_segment, const std::optional<at::Tensor>& k_segment,
    const std::optional<at::Tensor>& q_limit, const std::optional<at::Tensor>& k_rank, double scale) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  check_cuda_inputs(in);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_capability();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({in.B, in.H, in.Nq, in.D}, q.options());
  at::Tensor lse = at::empty({in.B, in.H, in.Nq}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (in.Nk == 0) {  // no key at all: every query sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const MetaHolder meta(in);
  switch (q.scalar_type()) {
    case at::kBFloat16:
    case at::kHalf:
      if (uses_tensor_cores(in)) {
        if (q.scalar_type() == at::kBFloat16) {
          forward_mma<true>(in, meta, scale, out, lse, stream);
        } else {
          forward_mma<false>(in, meta, scale, out, lse, stream);
        }
      } else {  // head dim > 128: the SIMT kernels on fp32 copies
        at::Tensor out_f = at::empty({in.B, in.H, in.Nq, in.D}, q.options().dtype(at::kFloat));
        forward_simt(in, meta, scale, q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), out_f, lse, stream);
        out.copy_(out_f);
      }
      break;
    case at::kFloat:
      forward_simt(in, meta, scale, q, k, v, out, lse, stream);
      break;
    default:  // check_attention_inputs already rejected every other dtype
      TORCH_CHECK_TYPE(false, "masked_attention (CUDA): unsupported dtype ", q.scalar_type());
  }
  return {out, lse};
}

// ---- backward ----

at::Tensor compute_delta(const AttnInputs& in, const at::Tensor& out, const at::Tensor& grad_out,
                         cudaStream_t stream) {
  at::Tensor delta = at::empty({in.B, in.H, in.Nq}, in.q.options().dtype(at::kFloat));
  const int64_t rows = in.B * in.H * in.Nq;
  constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  check_grid(blocks, "the delta kernel");
  const Operand o = make_operand(out), g = make_operand(grad_out);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    delta_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(o, g, in.H, in.Nq, static_cast<int>(in.D),
                                                                            rows, delta.data_ptr<float>());
  };
  switch (out.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "masked_attention (CUDA): unsupported dtype ", out.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return delta;
}

template <bool kBf16>
void backward_mma(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& grad_out,
                  const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                  cudaStream_t stream) {
  const at::Tensor q = mma_operand(in.q), k = mma_operand(in.k), v = mma_operand(in.v), g = mma_operand(grad_out);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.dout = make_operand(g);
  a.d_cols = static_cast<int>(q.size(3));
  a.lse = lse.const_data_ptr<float>();
  a.delta = delta.const_data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.k_bounds = bounds_ptr(kb);
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  dispatch_head_dim(in.D, [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    using Cfg = MmaCfg<kD>;
    // dq walks key tiles of Cfg::kBk rows and dkdv query tiles of Cfg::kBq rows: bounds at those sizes.
    const at::Tensor kb_dq = Cfg::kBk == kTile ? kb : tile_bounds(in, meta.args, true, Cfg::kBk, stream);
    AttnArgs dq_args = a;
    dq_args.q_bounds = bounds_ptr(qb);
    dq_args.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
    dq_args.k_bounds = bounds_ptr(kb_dq);
    dq_args.k_tiles = static_cast<int>(ceil_div(in.Nk, Cfg::kBk));
    launch(attn_bwd_dq_mma_kernel<kBf16, kD>, in.B * in.H * dq_args.q_tiles, kMmaThreads, Cfg::kDqSmem, dq_args,
           stream, "the dq kernel");
    const at::Tensor qb_small = Cfg::kBq == kTile ? qb : tile_bounds(in, meta.args, false, Cfg::kBq, stream);
    AttnArgs kv_args = a;
    kv_args.q_bounds = bounds_ptr(qb_small);
    kv_args.q_tiles = static_cast<int>(ceil_div(in.Nq, Cfg::kBq));
    launch(attn_bwd_dkdv_mma_kernel<kBf16, kD>, in.B * in.H * a.k_tiles, kMmaThreads, Cfg::kDkdvSmem, kv_args,
           stream, "the dk/dv kernel");
  });
}

// fp32 SIMT backward into contiguous fp32 dq, dk, dv.
void backward_simt(const AttnInputs& in, const MetaHolder& meta, double scale, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& lse,
                   const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, cudaStream_t stream) {
  const at::Tensor qb = tile_bounds(in, meta.args, false, kTile, stream);
  const at::Tensor kb = tile_bounds(in, meta.args, true, kTile, stream);
  AttnArgs a = base_args(in, meta, scale);
  a.q = make_operand(q);
  a.k = make_operand(k);
  a.v = make_operand(v);
  a.dout = make_operand(grad_out);
  a.lse = lse.const_data_ptr<float>();
  a.delta = delta.const_data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.q_bounds = bounds_ptr(qb);
  a.k_bounds = bounds_ptr(kb);
  a.q_tiles = static_cast<int>(ceil_div(in.Nq, kTile));
  a.k_tiles = static_cast<int>(ceil_div(in.Nk, kTile));
  launch(attn_bwd_dq_simt_kernel, in.B * in.H * a.q_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the dq kernel");
  launch(attn_bwd_dkdv_simt_kernel, in.B * in.H * a.k_tiles * a.slices, kSimtThreads, kSimtSmemBytes, a, stream,
         "the dk/dv kernel");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& k_valid, const std::optional<at::Tensor>& q_segment,
    const std::optional<at::Tensor>& k_segment, const std::optional<at::Tensor>& q_limit,
    const std::optional<at::Tensor>& k_rank, double scale) {
  const AttnInputs in = check_attention_inputs(q, k, v, k_valid, q_segment, k_segment, q_limit, k_rank);
  check_cuda_inputs(in);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "masked_attention backward: grad_out and out must have q's shape ", q.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == in.B && lse.size(1) == in.H && lse.size(2) == in.Nq &&
                        lse.scalar_type() == at::kFloat,
                    "masked_attention backward: lse must be float32 (B, H, Nq)");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "masked_attention backward (CUDA): grad_out and out must have q's dtype ", q.scalar_type(),
                   ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "masked_attention backward: grad_out, out and lse must be on q's device ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_capability();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor dq = at::empty({in.B, in.H, in.Nq, in.D}, q.options());
  at::Tensor dk = at::empty({in.B, in.H, in.Nk, in.D}, q.options());
  at::Tensor dv = at::empty({in.B, in.H, in.Nk, in.D}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0) {  // no (query, key) pair: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const MetaHolder meta(in);
  const at::Tensor lse_c = lse.contiguous();
  if (uses_tensor_cores(in)) {
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    if (q.scalar_type() == at::kBFloat16) {
      backward_mma<true>(in, meta, scale, grad_out, lse_c, delta, dq, dk, dv, stream);
    } else {
      backward_mma<false>(in, meta, scale, grad_out, lse_c, delta, dq, dk, dv, stream);
    }
  } else if (q.scalar_type() == at::kFloat) {
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    backward_simt(in, meta, scale, q, k, v, grad_out, lse_c, delta, dq, dk, dv, stream);
  } else {  // bf16 / fp16 with head dim > 128: the SIMT kernels on fp32 copies
    const at::Tensor delta = compute_delta(in, out, grad_out, stream);
    at::Tensor dq_f = at::empty(dq.sizes(), q.options().dtype(at::kFloat));
    at::Tensor dk_f = at::empty(dk.sizes(), q.options().dtype(at::kFloat));
    at::Tensor dv_f = at::empty(dv.sizes(), q.options().dtype(at::kFloat));
    backward_simt(in, meta, scale, q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), grad_out.to(at::kFloat),
                  lse_c, delta, dq_f, dk_f, dv_f, stream);
    dq.copy_(dq_f);
    dk.copy_(dk_f);
    dv.copy_(dv_f);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fourm_fast, CUDA, m) {
  m.impl("masked_attention_fwd", &masked_attention_fwd_cuda);
  m.impl("masked_attention_bwd", &masked_attention_bwd_cuda);
}

}  // namespace fourm_fast
