// The bfloat16 tiles of the CPU masked_attention executor on Intel AMX (attention_cpu_amx_tiles.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../attention_checks.h"
#include "attention_cpu_blocks.h"

namespace fourm_fast {

// Forward and backward over a bfloat16 batch, the same blocks, row passes and algebra as the
// float32 tiles, with every product on the AMX GEMM (bf16_gemm.h): q, k, v, dO and O are read as
// bfloat16 in place, P and dS are rounded to bfloat16 for their products (as a GPU flash kernel
// does), everything accumulates in float32, and the outputs are written as bfloat16 directly.
// Callers check that q (and, for the backward, grad_out and out) are bfloat16 and that
// cpu_isa_allows_amx(), in builds with FOURM_FAST_WITH_AMX only.
std::tuple<at::Tensor, at::Tensor> masked_attention_fwd_amx(const attn_cpu::MetaView& meta, const AttnInputs& in,
                                                            float scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd_amx(const attn_cpu::MetaView& meta,
                                                                        const AttnInputs& in, const at::Tensor& grad_out,
                                                                        const at::Tensor& out, const at::Tensor& lse,
                                                                        float scale);

}  // namespace fourm_fast
