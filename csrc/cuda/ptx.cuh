// Thin wrappers over the sm_80+ PTX instructions the CUDA kernels use: asynchronous global->shared
// copies (cp.async), shared->register matrix loads (ldmatrix) and the 16x8x16 tensor-core MMA with
// fp32 accumulators, packing of two floats into a 16-bit pair, and the dynamic shared-memory
// declaration. ldmatrix and mma need sm80+ (callers guard them); cp.async degrades to a
// synchronous copy below sm80.
//
// Everything the attention kernels (attention_kernels.cuh) do that is not plain C++ goes through
// this header or a CUDA built-in, so tests/cuda_emulation/ can run those kernels on the host
// with its own ptx.cuh in place of this one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

// The kernel's dynamic shared memory, 16-byte aligned (cp.async and ldmatrix need it).
#define FF_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

// 1 in the device pass for sm80+ (ldmatrix, mma.sync and asynchronous cp.async exist), else 0.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FF_CUDA_SM80 1
#else
#define FF_CUDA_SM80 0
#endif

namespace fourm_fast {
namespace cuda_ptx {

__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Copies 16 bytes global -> shared without staging through registers. When `valid` is false the
// source is not read (src-size 0) and the 16 destination bytes are zero-filled, which is how the
// kernels pad partial row tiles. `gmem` must still be a mapped address; callers pass the base.
// Below sm80 it is a plain synchronous copy (commit / wait then do nothing; the callers'
// __syncthreads publishes the data), so the SIMT kernel stays correct there.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (valid) v = *static_cast<const uint4*>(gmem);
  *static_cast<uint4*>(smem) = v;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane l supplies the row address of matrix l / 8, row l % 8, and receives
// in r[i] the elements (l / 4, 2 * (l % 4) .. +1) of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
#endif
}

// Four transposed 8x8 b16 matrices: lane l supplies the row address of matrix l / 8, row l % 8,
// and receives in r[i] the elements (2 * (l % 4), l / 4) and (2 * (l % 4) + 1, l / 4) of matrix
// i, i.e. the B fragment of a k x n operand stored row-major as [k][n].
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem_row)));
#endif
}

// Two floats -> one register of two 16-bit values (round to nearest even), `lo` in the low half
// (the lower column).
template <bool kBf16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    __builtin_memcpy(&bits, &v, sizeof(bits));
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    __builtin_memcpy(&bits, &v, sizeof(bits));
  }
  return bits;
}

// acc(16x8, fp32) += A(16x16, row-major) * B(16x8, "col": stored as 8 rows of 16 k-values).
// kBf16 picks bfloat16 inputs, otherwise float16.
template <bool kBf16>
__device__ __forceinline__ void mma_16x8x16(float (&acc)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

}  // namespace cuda_ptx
}  // namespace fourm_fast
