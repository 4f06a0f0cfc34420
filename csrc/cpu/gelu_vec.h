// GELU and its derivative on Vectorized<float> (Sleef erf/exp), shared by gelu_cpu.cpp and ffn_cpu.cpp.
//
// The same formulas as csrc/common/ckpt_math.h (which the scalar tails and fp64 use):
//   erf form:  cdf = 0.5 (1 + erf(u / sqrt 2));  gelu = u cdf;  gelu' = cdf + u exp(-u^2 / 2) / sqrt(2 pi)
//   tanh form: s = sigmoid(2 z), z = sqrt(2/pi) (u + 0.044715 u^3);  gelu = u s;  gelu' = s + 2 u s (1 - s) dz/du
// gelu_and_grad_vec shares cdf (or s) between the two, so the fused FFN epilogue pays for one erf/exp per value.
#pragma once

#include <string>
#include <utility>

#include "../common/ckpt_math.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

using host::parse_approximate;

// sigmoid(2 z) of the tanh form.
inline Vec gelu_tanh_s(const Vec& u, const Vec& u2) {
  const Vec z = Vec(float(math::kSqrt2OverPi)) * at::vec::fmadd(Vec(float(math::kTanhCoef)) * u2, u, u);
  return Vec(1.f) / (Vec(1.f) + (z * Vec(-2.f)).exp());
}

inline Vec gelu_erf_cdf(const Vec& u) { return Vec(0.5f) * (Vec(1.f) + (u * Vec(float(math::kInvSqrt2))).erf()); }

template <bool kTanh>
inline Vec gelu_vec(const Vec& u) {
  if constexpr (kTanh) {
    const Vec z = Vec(float(math::kSqrt2OverPi)) * at::vec::fmadd(Vec(float(math::kTanhCoef)) * u * u, u, u);
    return u / (Vec(1.f) + (z * Vec(-2.f)).exp());
  } else {
    return u * Vec(0.5f) * (Vec(1.f) + (u * Vec(float(math::kInvSqrt2))).erf());
  }
}

// gelu'(u) from s (tanh) or cdf (erf), u and u^2.
template <bool kTanh>
inline Vec gelu_grad_from(const Vec& u, const Vec& u2, const Vec& s_or_cdf) {
  if constexpr (kTanh) {
    const Vec& s = s_or_cdf;
    const Vec dz = Vec(float(math::kSqrt2OverPi)) * at::vec::fmadd(Vec(float(3.0 * math::kTanhCoef)), u2, Vec(1.f));
    return at::vec::fmadd(Vec(2.f) * u * s * (Vec(1.f) - s), dz, s);
  } else {
    // exp_u20 (2 ulp, no Sleef call) for the density: it is added to cdf <= 1, so its last bits hardly matter.
    return at::vec::fmadd(u * (u2 * Vec(-0.5f)).exp_u20(), Vec(float(math::kInvSqrt2Pi)), s_or_cdf);
  }
}

template <bool kTanh>
inline Vec gelu_grad_vec(const Vec& u) {
  const Vec u2 = u * u;
  return gelu_grad_from<kTanh>(u, u2, kTanh ? gelu_tanh_s(u, u2) : gelu_erf_cdf(u));
}

// (gelu(u), gelu'(u)) with one erf (or one exp for tanh's sigmoid) shared.
template <bool kTanh>
inline std::pair<Vec, Vec> gelu_and_grad_vec(const Vec& u) {
  const Vec u2 = u * u;
  const Vec c = kTanh ? gelu_tanh_s(u, u2) : gelu_erf_cdf(u);
  return {u * c, gelu_grad_from<kTanh>(u, u2, c)};
}

}  // namespace cpu
}  // namespace ckpt_ext
