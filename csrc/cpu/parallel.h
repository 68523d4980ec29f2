// at::parallel_for with the caller's floating-point mode in every worker.
//
// torch.set_flush_denormal (like any FTZ/DAZ switch) changes the MXCSR of the calling OS thread
// only; at::parallel_for's workers keep their own. Units of work that land on the caller were then
// flushed and the others not, and where units go to whichever thread is free (attention's
// parallel_units) the same call on the same inputs gave different bits from run to run. Each
// worker here runs with the caller's control bits (FTZ, DAZ, rounding, exception masks) and gets its
// own back afterwards; the status flags are left alone.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fourm_fast {

#if defined(__x86_64__) || defined(_M_X64)
class CallerFloatMode {
 public:
  static constexpr unsigned int kControl = 0xFFC0u;  // MXCSR bits 6-15: DAZ, masks, rounding, FTZ
  explicit CallerFloatMode(unsigned int caller) : own_(_mm_getcsr()) {
    changed_ = ((own_ ^ caller) & kControl) != 0u;
    if (changed_) _mm_setcsr((own_ & ~kControl) | (caller & kControl));
  }
  ~CallerFloatMode() {
    if (changed_) _mm_setcsr((_mm_getcsr() & ~kControl) | (own_ & kControl));
  }
  CallerFloatMode(const CallerFloatMode&) = delete;
  CallerFloatMode& operator=(const CallerFloatMode&) = delete;

 private:
  unsigned int own_;
  bool changed_;
};
#endif

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
#if defined(__x86_64__) || defined(_M_X64)
  const unsigned int caller = _mm_getcsr();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    CallerFloatMode mode(caller);
    f(b, e);
  });
#else
  at::parallel_for(begin, end, grain, f);
#endif
}

}  // namespace fourm_fast
