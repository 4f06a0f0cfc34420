// The GeGLU row loops of geglu_cpu.cpp (geglu_fwd/bwd_kernel): a contiguous run of len values, kW per step on
// Vectorized<float> (gelu_vec.h's tanh-form GELU, one exp per value for gelu and gelu'), then a scalar tail (all of
// it when any operand is fp64) with csrc/common/ckpt_math.h. acc_t math (fp32, fp64 for fp64), each result rounded
// once to its storage type.
//   s = sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3);  a = gelu_tanh(g) = g s;  h = a u
//   dg = dh u gelu_tanh'(g),  gelu_tanh'(g) = s + 2 g s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 g^2);  du = dh a
// Each operand has its own storage type (T, or acc_t when it came in another dtype and was widened once).
#pragma once

#include <type_traits>

#include "../common/ckpt_math.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

template <typename... Ts>
constexpr bool kGegluVectorized = (kVectorized<Ts> && ...);

// h[j] = gelu_tanh(g[j]) u[j], stored as H.
template <typename G, typename U, typename H>
void geglu_fwd_range(const G* g, const U* u, H* h, int64_t len) {
  using acc_t = acc_type<H>;
  int64_t j = 0;
  if constexpr (kGegluVectorized<G, U, H>) {
    for (; j + kW <= len; j += kW) store_f(h + j, gelu_vec<true, H>(load_f(g + j)) * load_f(u + j));
  }
  for (; j < len; ++j) h[j] = static_cast<H>(math::geglu<acc_t>(static_cast<acc_t>(g[j]), static_cast<acc_t>(u[j])));
}

// dg[j] (stored as OG), du[j] (stored as OU) of h = gelu_tanh(g) u given dh.
template <typename D, typename G, typename U, typename OG, typename OU>
void geglu_bwd_range(const D* dh, const G* g, const U* u, OG* dg, OU* du, int64_t len) {
  using acc_t = acc_type<OG>;
  int64_t j = 0;
  if constexpr (kGegluVectorized<D, G, U, OG, OU>) {
    for (; j + kW <= len; j += kW) {
      const Vec dhv = load_f(dh + j);
      const auto [a, da] = gelu_and_grad_vec<true, OG>(load_f(g + j));
      store_f(du + j, dhv * a);
      store_f(dg + j, dhv * load_f(u + j) * da);
    }
  }
  for (; j < len; ++j) {
    acc_t dgv, duv;
    math::geglu_and_grad<acc_t>(static_cast<acc_t>(dh[j]), static_cast<acc_t>(g[j]), static_cast<acc_t>(u[j]), &dgv,
                                &duv);
    dg[j] = static_cast<OG>(dgv);
    du[j] = static_cast<OU>(duv);
  }
}

}  // namespace cpu
}  // namespace ckpt_ext
