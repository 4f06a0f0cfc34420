// GELU and its derivative on Vectorized<float>, shared by gelu_cpu.cpp and ffn_cpu.cpp.
//
// The same formulas as csrc/common/ckpt_math.h (which the scalar tails and fp64 use):
//   erf form:  cdf = 0.5 (1 + erf(u / sqrt 2));  gelu = u cdf;  gelu' = cdf + u exp(-u^2 / 2) / sqrt(2 pi)
//   tanh form: s = sigmoid(2 z), z = sqrt(2/pi) (u + 0.044715 u^3);  gelu = u s;  gelu' = s + 2 u s (1 - s) dz/du
// erf(x) is Abramowitz & Stegun 7.1.26, erf(x) = sign(x) (1 - t P(t) exp(-x^2)), t = 1 / (1 + p |x|), |error| <=
// 1.5e-7 (the formula of ATen's own Vectorized<float>::erf). With x = u / sqrt 2, exp(-x^2) = exp(-u^2 / 2) is the
// density's exponential too, so gelu' and the fused (gelu, gelu') pay for one exp per value, not two.
// Every helper is always-inlined: as out-of-line calls their Vec arguments and results would go through memory.
// exp: under AVX512 the inline exp_avx512 (~1 ulp) for every dtype; otherwise by the storage type T of the result:
// fp32 Sleef's exp (1 ulp), bf16/fp16 (8/11 mantissa bits) ATen's inline exp_u20 (~20 fp32 ulp, below their rounding).
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include <c10/macros/Macros.h>

#include "../common/ckpt_math.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {

using host::parse_approximate;

// Whether results stored as T may use the fast exp where there is no exp_avx512 (16-bit storage types).
template <typename T>
constexpr bool kFastExp = !std::is_same_v<T, float> && !std::is_same_v<T, double>;

#if defined(CPU_CAPABILITY_AVX512)
// exp(x), about 1 ulp, inline: x = n ln2 + r (Cody-Waite, ln2 split so n * kLn2Hi is exact, |r| <= ln2 / 2),
// exp(r) by its degree-7 Taylor polynomial (truncation < 6e-9), 2^n applied by vscalefps (which also gives inf / 0
// past the float range). x is first clamped to [-104, 89] with the clamp constant as the first operand of min/max,
// so NaN passes through and -inf gives 0.
C10_ALWAYS_INLINE Vec exp_avx512(const Vec& x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860676533018724e-06f;
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.f), _mm512_max_ps(_mm512_set1_ps(-104.f), __m512(x)));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 5040.f), r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename T>
C10_ALWAYS_INLINE Vec vexp(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return exp_avx512(x);
#else
  if constexpr (kFastExp<T>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
#endif
}

// sigmoid(2 z) of the tanh form.
template <typename T>
C10_ALWAYS_INLINE Vec gelu_tanh_s(const Vec& u, const Vec& u2) {
  const Vec z = Vec(float(math::kSqrt2OverPi)) * at::vec::fmadd(Vec(float(math::kTanhCoef)) * u2, u, u);
  return Vec(1.f) / (Vec(1.f) + vexp<T>(z * Vec(-2.f)));
}

// exp(-u^2 / 2) from u^2.
template <typename T>
C10_ALWAYS_INLINE Vec gauss_exp(const Vec& u2) {
  return vexp<T>(u2 * Vec(-0.5f));
}

// 0.5 (1 + erf(u / sqrt 2)) given e = exp(-u^2 / 2).
C10_ALWAYS_INLINE Vec gelu_erf_cdf(const Vec& u, const Vec& e) {
  const Vec t = Vec(1.f) / at::vec::fmadd(Vec(0.3275911f * float(math::kInvSqrt2)), u.abs(), Vec(1.f));
  Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  r = at::vec::fmadd(r, t, Vec(1.421413741f));
  r = at::vec::fmadd(r, t, Vec(-0.284496736f));
  r = at::vec::fmadd(r, t, Vec(0.254829592f));
  // q = 0.5 (1 - |erf|) = cdf(-|u|): cdf is q for u < 0 and 1 - q otherwise (no cancellation in the negative tail).
  const Vec q = Vec(0.5f) * r * t * e;
  return Vec::blendv(Vec(1.f) - q, q, u < Vec(0.f));
}

// gelu(u), rounded later to T.
template <bool kTanh, typename T>
C10_ALWAYS_INLINE Vec gelu_vec(const Vec& u) {
  const Vec u2 = u * u;
  return u * (kTanh ? gelu_tanh_s<T>(u, u2) : gelu_erf_cdf(u, gauss_exp<T>(u2)));
}

// (gelu(u), gelu'(u)) with one exp shared, rounded later to T.
template <bool kTanh, typename T>
C10_ALWAYS_INLINE std::pair<Vec, Vec> gelu_and_grad_vec(const Vec& u) {
  const Vec u2 = u * u;
  if constexpr (kTanh) {
    const Vec s = gelu_tanh_s<T>(u, u2);
    const Vec dz = Vec(float(math::kSqrt2OverPi)) * at::vec::fmadd(Vec(float(3.0 * math::kTanhCoef)), u2, Vec(1.f));
    return {u * s, at::vec::fmadd(Vec(2.f) * u * s * (Vec(1.f) - s), dz, s)};
  } else {
    const Vec e = gauss_exp<T>(u2);
    const Vec cdf = gelu_erf_cdf(u, e);
    return {u * cdf, at::vec::fmadd(u * e, Vec(float(math::kInvSqrt2Pi)), cdf)};
  }
}

template <bool kTanh, typename T>
C10_ALWAYS_INLINE Vec gelu_grad_vec(const Vec& u) {
  return gelu_and_grad_vec<kTanh, T>(u).second;
}

}  // namespace cpu
}  // namespace ckpt_ext
