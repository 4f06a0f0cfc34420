// The gated-MLP row loops (h = gate(g) u, gate = silu for SwiGLU, gelu_tanh for GeGLU) shared by gated_cpu.cpp
// (swiglu/geglu_fwd/bwd_kernel) and swiglu_ffn_cpu.cpp (the epilogues of the matmul-fused SwiGLU ops): a contiguous
// run of len values, kW per step on Vectorized<float>, then a scalar tail (all of it when any operand is fp64) with
// csrc/common/ckpt_math.h (math::gated / gated_and_grad). acc_t math (fp32, fp64 for fp64), each result rounded once
// to its storage type.
//   a = gate(g), a' = gate'(g);  h = a u;  dg = dh u a';  du = dh a
//   silu:      s = sigmoid(g) = 1 / (1 + exp(-g));  a = g s;  a' = s + g s (1 - s)
//   gelu_tanh: gelu_vec.h's tanh form, one exp per value for a and a'
// Each operand has its own storage type (T, acc_t, ...), so a GEMM's fp32 result is read as it is. Optional acc_t
// biases bg, bu (nullptr: none) are added to g and u first (the fused ops' linear biases).
#pragma once

#include <type_traits>
#include <utility>

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

// The Vectorized<float> form of a math:: gate: value<T>(g) = a, value_and_grad<T>(g) = (a, a'); T picks the exp.
template <typename Gate>
struct VecGate;

template <>
struct VecGate<math::SiluGate> {
  template <typename T>
  static C10_ALWAYS_INLINE Vec value(const Vec& g) {
    return g * sigmoid_vec<T>(g);
  }
  template <typename T>
  static C10_ALWAYS_INLINE std::pair<Vec, Vec> value_and_grad(const Vec& g) {
    const Vec s = sigmoid_vec<T>(g), gs = g * s;
    return {gs, at::vec::fmadd(gs, Vec(1.f) - s, s)};
  }
};

template <>
struct VecGate<math::GeluTanhGate> {
  template <typename T>
  static C10_ALWAYS_INLINE Vec value(const Vec& g) {
    return gelu_vec<true, T>(g);
  }
  template <typename T>
  static C10_ALWAYS_INLINE std::pair<Vec, Vec> value_and_grad(const Vec& g) {
    return gelu_and_grad_vec<true, T>(g);
  }
};

template <typename... Ts>
constexpr bool kAllVectorized = (kVectorized<Ts> && ...);

C10_ALWAYS_INLINE Vec load_bias(const Vec& v, const float* b, int64_t j) {
  return b != nullptr ? v + Vec::loadu(b + j) : v;
}

// h[j] = gate(g[j] + bg[j]) (u[j] + bu[j]), rounded to R's precision and stored as H (R = H unless h is kept in fp32
// holding values rounded to a 16-bit R, as the CPU wgrad GEMM reads it).
template <typename Gate, typename R, typename G, typename U, typename H>
void gated_fwd_range(const G* g, const U* u, const acc_type<H>* bg, const acc_type<H>* bu, H* h, int64_t len) {
  using acc_t = acc_type<H>;
  int64_t j = 0;
  if constexpr (kAllVectorized<G, U, H>) {
    for (; j + kW <= len; j += kW) {
      const Vec gv = load_bias(load_f(g + j), bg, j), uv = load_bias(load_f(u + j), bu, j);
      store_f(h + j, round_to<R>(VecGate<Gate>::template value<R>(gv) * uv));
    }
  }
  for (; j < len; ++j) {
    const acc_t gv = static_cast<acc_t>(g[j]) + (bg ? bg[j] : acc_t(0));
    const acc_t uv = static_cast<acc_t>(u[j]) + (bu ? bu[j] : acc_t(0));
    h[j] = static_cast<H>(static_cast<acc_t>(static_cast<R>(math::gated<Gate, acc_t>(gv, uv))));
  }
}

// dg[j], du[j] (and h[j] when h != nullptr, stored like dg) of h = gate(g + bg) (u + bu) given dh. dg may be dh itself
// (in place, same type).
template <typename Gate, typename D, typename G, typename U, typename OG, typename OU>
void gated_bwd_range(const D* dh, const G* g, const U* u, const acc_type<OG>* bg, const acc_type<OG>* bu, OG* dg,
                     OU* du, OG* h, int64_t len) {
  using acc_t = acc_type<OG>;
  int64_t j = 0;
  if constexpr (kAllVectorized<D, G, U, OG, OU>) {
    for (; j + kW <= len; j += kW) {
      const Vec gv = load_bias(load_f(g + j), bg, j), uv = load_bias(load_f(u + j), bu, j);
      const Vec dhv = load_f(dh + j);
      const auto [a, da] = VecGate<Gate>::template value_and_grad<OG>(gv);
      store_f(du + j, dhv * a);
      store_f(dg + j, dhv * uv * da);
      if (h != nullptr) store_f(h + j, a * uv);
    }
  }
  for (; j < len; ++j) {
    const acc_t gv = static_cast<acc_t>(g[j]) + (bg ? bg[j] : acc_t(0));
    const acc_t uv = static_cast<acc_t>(u[j]) + (bu ? bu[j] : acc_t(0));
    acc_t dgv, duv;
    const acc_t hv = math::gated_and_grad<Gate, acc_t>(static_cast<acc_t>(dh[j]), gv, uv, &dgv, &duv);
    dg[j] = static_cast<OG>(dgv);
    du[j] = static_cast<OU>(duv);
    if (h != nullptr) h[j] = static_cast<OG>(hv);
  }
}

}  // namespace cpu
}  // namespace ckpt_ext
