// AMX tile plumbing shared by the *_amx.cpp files (compiled with AMX flags only): the tile
// configuration and one block of C += op(A) op(B) in all eight tile registers. Static on purpose,
// as transpose8x8_avx.h: each AMX translation unit keeps its own copy.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace fourm_fast {

// The 64-byte tile configuration (palette 1): tiles 0-3 accumulators, 4-5 A, 6-7 B, each 16 rows
// of 64 bytes.
struct AmxTileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static inline void load_tile_config() {
  AmxTileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// A block's operands. a0 / a1: the first 16 rows of each of its two A row groups (bfloat16, 32
// per k step), lda0 / lda1 bytes apart. b0 / b1: its two B tile columns in the pair layout (16
// words per row, a row per pair of k), ldb bytes apart. k32: the summed length, a multiple of 32.
struct AmxOperands {
  const void* a0;
  int64_t lda0;
  const void* a1;
  int64_t lda1;
  const void* b0;
  const void* b1;
  int64_t ldb;
  int64_t k32;
};

// One (16 MT) x (16 NT) block of C += op(A) op(B) (C read first when load_c, else 0) with C's rows
// at out, out_ld bytes apart.
template <int MT, int NT>
static inline void amx_block_t(const AmxOperands& o, float* out, int64_t out_ld, bool load_c) {
  const char* a0 = static_cast<const char*>(o.a0);
  const char* a1 = static_cast<const char*>(o.a1);
  const char* b0 = static_cast<const char*>(o.b0);
  const char* b1 = static_cast<const char*>(o.b1);
  char* c = reinterpret_cast<char*>(out);
  if (load_c) {
    _tile_loadd(0, c, out_ld);
    if (NT > 1) _tile_loadd(1, c + 64, out_ld);
    if (MT > 1) _tile_loadd(2, c + 16 * out_ld, out_ld);
    if (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * out_ld + 64, out_ld);
  } else {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (MT > 1) _tile_zero(2);
    if (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int64_t kk = 0; kk < o.k32; kk += 32) {
    const int64_t boff = (kk / 2) * o.ldb;  // 16 pair rows per k step
    _tile_loadd(4, a0 + kk * 2, o.lda0);
    _tile_loadd(6, b0 + boff, o.ldb);
    _tile_dpbf16ps(0, 4, 6);
    if (NT > 1) {
      _tile_loadd(7, b1 + boff, o.ldb);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (MT > 1) {
      _tile_loadd(5, a1 + kk * 2, o.lda1);
      _tile_dpbf16ps(2, 5, 6);
      if (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, out_ld);
  if (NT > 1) _tile_stored(1, c + 64, out_ld);
  if (MT > 1) _tile_stored(2, c + 16 * out_ld, out_ld);
  if (MT > 1 && NT > 1) _tile_stored(3, c + 16 * out_ld + 64, out_ld);
}

static inline void amx_block(int mt, int nt, const AmxOperands& o, float* out, int64_t out_ld, bool load_c) {
  if (mt == 2 && nt == 2) {
    amx_block_t<2, 2>(o, out, out_ld, load_c);
  } else if (mt == 2) {
    amx_block_t<2, 1>(o, out, out_ld, load_c);
  } else if (nt == 2) {
    amx_block_t<1, 2>(o, out, out_ld, load_c);
  } else {
    amx_block_t<1, 1>(o, out, out_ld, load_c);
  }
}

}  // namespace fourm_fast
