// The SwiGLU row loops shared by swiglu_cpu.cpp (swiglu_fwd/bwd_kernel) and swiglu_ffn_cpu.cpp (the epilogues of the
// matmul-fused ops): a contiguous run of len values, kW per step on Vectorized<float>, then a scalar tail (all of it
// when any operand is fp64). acc_t math (fp32, fp64 for fp64), each result rounded once to its storage type.
//   s = sigmoid(g) = 1 / (1 + exp(-g));  h = g s u;  dg = dh u (s + g s (1 - s));  du = dh g s
// Each operand has its own storage type (T, acc_t, ...), so a GEMM's fp32 result is read as it is. Optional acc_t
// biases bg, bu (nullptr: none) are added to g and u first (the fused ops' linear biases).
#pragma once

#include <type_traits>

#include <c10/macros/Macros.h>

#include "../common/ckpt_math.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

// sigmoid(g); T is the storage type of the result (picks the exp, gelu_vec.h). exp(-g) = inf gives 0, not NaN.
template <typename T>
C10_ALWAYS_INLINE Vec sigmoid_vec(const Vec& g) {
  return Vec(1.f) / (Vec(1.f) + vexp<T>(Vec(0.f) - g));
}

template <typename... Ts>
constexpr bool kAllVectorized = (kVectorized<Ts> && ...);

C10_ALWAYS_INLINE Vec load_bias(const Vec& v, const float* b, int64_t j) {
  return b != nullptr ? v + Vec::loadu(b + j) : v;
}

// h[j] = silu(g[j] + bg[j]) (u[j] + bu[j]), rounded to R's precision and stored as H (R = H unless h is kept in fp32
// holding values rounded to a 16-bit R, as the CPU wgrad GEMM reads it).
template <typename R, typename G, typename U, typename H>
void swiglu_fwd_range(const G* g, const U* u, const acc_type<H>* bg, const acc_type<H>* bu, H* h, int64_t len) {
  using acc_t = acc_type<H>;
  int64_t j = 0;
  if constexpr (kAllVectorized<G, U, H>) {
    for (; j + kW <= len; j += kW) {
      const Vec gv = load_bias(load_f(g + j), bg, j), uv = load_bias(load_f(u + j), bu, j);
      store_f(h + j, round_to<R>(gv * sigmoid_vec<R>(gv) * uv));
    }
  }
  for (; j < len; ++j) {
    const acc_t gv = static_cast<acc_t>(g[j]) + (bg ? bg[j] : acc_t(0));
    const acc_t uv = static_cast<acc_t>(u[j]) + (bu ? bu[j] : acc_t(0));
    h[j] = static_cast<H>(static_cast<acc_t>(static_cast<R>(math::swiglu<acc_t>(gv, uv))));
  }
}

// dg[j], du[j] (and h[j] when h != nullptr, stored like dg) of h = silu(g + bg) (u + bu) given dh. dg may be dh itself
// (in place, same type).
template <typename D, typename G, typename U, typename OG, typename OU>
void swiglu_bwd_range(const D* dh, const G* g, const U* u, const acc_type<OG>* bg, const acc_type<OG>* bu, OG* dg,
                      OU* du, OG* h, int64_t len) {
  using acc_t = acc_type<OG>;
  int64_t j = 0;
  if constexpr (kAllVectorized<D, G, U, OG, OU>) {
    for (; j + kW <= len; j += kW) {
      const Vec gv = load_bias(load_f(g + j), bg, j), uv = load_bias(load_f(u + j), bu, j);
      const Vec dhv = load_f(dh + j);
      const Vec s = sigmoid_vec<OG>(gv), gs = gv * s;
      store_f(du + j, dhv * gs);
      store_f(dg + j, dhv * uv * at::vec::fmadd(gs, Vec(1.f) - s, s));
      if (h != nullptr) store_f(h + j, gs * uv);
    }
  }
  for (; j < len; ++j) {
    const acc_t gv = static_cast<acc_t>(g[j]) + (bg ? bg[j] : acc_t(0));
    const acc_t uv = static_cast<acc_t>(u[j]) + (bu ? bu[j] : acc_t(0));
    acc_t dgv, duv;
    const acc_t hv = math::swiglu_and_grad<acc_t>(static_cast<acc_t>(dh[j]), gv, uv, &dgv, &duv);
    dg[j] = static_cast<OG>(dgv);
    du[j] = static_cast<OU>(duv);
    if (h != nullptr) h[j] = static_cast<OG>(hv);
  }
}

}  // namespace cpu
}  // namespace ckpt_ext
