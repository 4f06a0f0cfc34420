// The GELU row loops shared by gelu_cpu.cpp (bias_gelu_kernel, gelu_bwd_kernel) and ffn_cpu.cpp (the fused FFN
// epilogues): a contiguous run of len values, 2 * kW per step (load2_f/store2_f), then kW, then a scalar tail (all of
// it for fp64). Math on fp32 (fp64 for fp64) via gelu_vec.h / ckpt_math.h; results rounded once to T.
#pragma once

#include "../common/ckpt_math.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

// out[j] = m[j] * gelu'(u[j]) for j < len; out may be m itself (in place). M is T or acc_t (fp32 for 16-bit T).
template <typename T, typename M, bool kTanh>
void gelu_bwd_range(const M* m, const T* u, T* out, int64_t len) {
  using acc_t = acc_type<T>;
  for_vec_steps<T>(
      len,
      [&](auto j) {
        Vec u0, u1, m0, m1;
        load2_f(u + j, u0, u1);
        load2_f(m + j, m0, m1);
        store2_f(out + j, m0 * gelu_grad_vec<kTanh, T>(u0), m1 * gelu_grad_vec<kTanh, T>(u1));
      },
      [&](auto j) { store_f(out + j, load_f(m + j) * gelu_grad_vec<kTanh, T>(load_f(u + j))); },
      [&](int64_t j) {
        out[j] = static_cast<T>(static_cast<acc_t>(m[j]) * math::gelu_grad<acc_t>(static_cast<acc_t>(u[j]), kTanh));
      });
}

// out[j] = gelu(m[j] + b[j]) for j < len (b may be nullptr); out may be m itself (in place). M is T or acc_t.
template <typename T, typename M, bool kTanh>
void bias_gelu_range(const M* m, const acc_type<T>* b, T* out, int64_t len) {
  using acc_t = acc_type<T>;
  for_vec_steps<T>(
      len,
      [&](auto j) {
        Vec u0, u1;
        load2_f(m + j, u0, u1);
        if (b != nullptr) {
          u0 += Vec::loadu(b + j);
          u1 += Vec::loadu(b + j + kW);
        }
        store2_f(out + j, gelu_vec<kTanh, T>(u0), gelu_vec<kTanh, T>(u1));
      },
      [&](auto j) {
        const Vec u = b != nullptr ? load_f(m + j) + Vec::loadu(b + j) : load_f(m + j);
        store_f(out + j, gelu_vec<kTanh, T>(u));
      },
      [&](int64_t j) {
        const acc_t u = static_cast<acc_t>(m[j]) + (b != nullptr ? b[j] : acc_t(0));
        out[j] = static_cast<T>(math::gelu<acc_t>(u, kTanh));
      });
}

}  // namespace cpu
}  // namespace ckpt_ext
