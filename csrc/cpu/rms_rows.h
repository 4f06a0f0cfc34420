// The RMSNorm output rebuilt from x and rstd, one row at a time, shared by rms_norm_cpu.cpp (forward, and the
// backward's emit_y) and swiglu_ffn_cpu.cpp (the recompute prologue). Hugging Face's cast order:
//   n[j] = x[j] * rstd rounded to T (x's dtype);  y[j] = w[j] * n[j] in acc_t, stored as O (T or acc_t)
// Vectorized<float> for fp32/bf16/fp16 rows (kW per step, scalar tail), scalar loops for fp64.
#pragma once

#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

template <typename T, typename O>
inline void rms_apply_row(const T* x, acc_type<T> r, const acc_type<T>* w, O* y, int64_t d) {
  using acc_t = acc_type<T>;
  int64_t j = 0;
  if constexpr (kVectorized<T>) {
    const Vec vr(r);
    for (; j + kW <= d; j += kW) store_f(y + j, Vec::loadu(w + j) * round_to<T>(load_f(x + j) * vr));
  }
  for (; j < d; ++j) {
    const acc_t n = static_cast<acc_t>(static_cast<T>(static_cast<acc_t>(x[j]) * r));
    y[j] = static_cast<O>(w[j] * n);
  }
}

}  // namespace cpu
}  // namespace ckpt_ext
