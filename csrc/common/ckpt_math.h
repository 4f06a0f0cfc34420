// Shared scalar math of the row-wise ops, usable from host C++ and CUDA device code (CKPT_HD).
//
// Dropout hash (must equal ckpt_ext/reference.py bit for bit): with key = fmix32((seed ^ 0x9E3779B9) mod 2^32),
// element i (flat, row-major) is kept iff (fmix32(fmix32(i ^ key) + key) >> 8) >= floor(p * 2^24); kept elements
// are scaled by 1 / (1 - p). All arithmetic is uint32 (wrapping), i is taken mod 2^32.
// GELU (acc = float, or double for float64 tensors):
//   erf form:  gelu(u) = u * cdf,  cdf = 0.5 (1 + erf(u / sqrt 2));  gelu'(u) = cdf + u * exp(-u^2 / 2) / sqrt(2 pi)
//   tanh form: z = sqrt(2/pi) (u + 0.044715 u^3), s = sigmoid(2 z) = 0.5 (1 + tanh z);  gelu(u) = u * s,
//              gelu'(u) = s + 2 u s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 u^2)
// SwiGLU (Llama MLP), s = sigmoid(g):  h = silu(g) u = g s u;  given dh:  dg = dh u s (1 + g (1 - s)),  du = dh g s
// GeGLU (Gemma / ModernBERT MLP), tanh-form gelu:  h = gelu(g) u;  given dh:  dg = dh u gelu'(g),  du = dh gelu(g)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CKPT_HD __host__ __device__ __forceinline__
#else
#define CKPT_HD inline
#endif

namespace ckpt_ext {
namespace math {

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kTanhCoef = 0.044715;

CKPT_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

CKPT_HD uint32_t seed_key(int64_t seed) { return fmix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u); }

// floor(p * 2^24) as Python's int() computes it for p in [0, 1).
CKPT_HD uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

CKPT_HD bool dropout_keep(int64_t i, uint32_t key, uint32_t threshold) {
  const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(i) ^ key) + key);
  return (h >> 8) >= threshold;
}

CKPT_HD float erf_(float x) {
#if defined(__CUDA_ARCH__)
  return erff(x);
#else
  return std::erf(x);
#endif
}
CKPT_HD double erf_(double x) {
#if defined(__CUDA_ARCH__)
  return ::erf(x);
#else
  return std::erf(x);
#endif
}
CKPT_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
CKPT_HD double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// gelu(u) for approximate "none" (tanh_form = false) or "tanh".
template <typename acc_t>
CKPT_HD acc_t gelu(acc_t u, bool tanh_form) {
  if (tanh_form) {
    const acc_t z = acc_t(kSqrt2OverPi) * (u + acc_t(kTanhCoef) * u * u * u);
    return u / (acc_t(1) + exp_(acc_t(-2) * z));
  }
  return u * acc_t(0.5) * (acc_t(1) + erf_(u * acc_t(kInvSqrt2)));
}

// gelu'(u), recomputed from the pre-activation.
template <typename acc_t>
CKPT_HD acc_t gelu_grad(acc_t u, bool tanh_form) {
  if (tanh_form) {
    const acc_t u2 = u * u;
    const acc_t z = acc_t(kSqrt2OverPi) * (u + acc_t(kTanhCoef) * u2 * u);
    const acc_t s = acc_t(1) / (acc_t(1) + exp_(acc_t(-2) * z));
    const acc_t dz = acc_t(kSqrt2OverPi) * (acc_t(1) + acc_t(3.0 * kTanhCoef) * u2);
    return s + acc_t(2) * u * s * (acc_t(1) - s) * dz;
  }
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_(u * acc_t(kInvSqrt2)));
  return cdf + u * exp_(acc_t(-0.5) * u * u) * acc_t(kInvSqrt2Pi);
}

// gelu(u), with gelu'(u) in *grad: one erf (or one exp) shared by both (the fused FFN epilogues).
template <typename acc_t>
CKPT_HD acc_t gelu_and_grad(acc_t u, bool tanh_form, acc_t* grad) {
  const acc_t u2 = u * u;
  if (tanh_form) {
    const acc_t z = acc_t(kSqrt2OverPi) * (u + acc_t(kTanhCoef) * u2 * u);
    const acc_t s = acc_t(1) / (acc_t(1) + exp_(acc_t(-2) * z));
    const acc_t dz = acc_t(kSqrt2OverPi) * (acc_t(1) + acc_t(3.0 * kTanhCoef) * u2);
    *grad = s + acc_t(2) * u * s * (acc_t(1) - s) * dz;
    return u * s;
  }
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_(u * acc_t(kInvSqrt2)));
  *grad = cdf + u * exp_(acc_t(-0.5) * u2) * acc_t(kInvSqrt2Pi);
  return u * cdf;
}

// sigmoid(g) = 1 / (1 + exp(-g)): exp overflows to inf for very negative g, giving 0 (no NaN).
template <typename acc_t>
CKPT_HD acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + exp_(-g));
}

// The gates of the gated MLPs, h = gate(g) u: value(g) = gate(g); value_and_grad(g, &grad) = gate(g), gate'(g) in
// *grad. silu (SwiGLU, Llama): a = g s, s = sigmoid(g), a' = s + g s (1 - s). gelu_tanh (GeGLU, Gemma / ModernBERT).
struct SiluGate {
  template <typename acc_t>
  static CKPT_HD acc_t value(acc_t g) {
    return g * sigmoid(g);
  }
  template <typename acc_t>
  static CKPT_HD acc_t value_and_grad(acc_t g, acc_t* grad) {
    const acc_t s = sigmoid(g), gs = g * s;
    *grad = s + gs * (acc_t(1) - s);
    return gs;
  }
};

struct GeluTanhGate {
  template <typename acc_t>
  static CKPT_HD acc_t value(acc_t g) {
    return gelu<acc_t>(g, true);
  }
  template <typename acc_t>
  static CKPT_HD acc_t value_and_grad(acc_t g, acc_t* grad) {
    return gelu_and_grad<acc_t>(g, true, grad);  // one exp for gelu and gelu'
  }
};

// h = gate(g) u.
template <typename Gate, typename acc_t>
CKPT_HD acc_t gated(acc_t g, acc_t u) {
  return Gate::template value<acc_t>(g) * u;
}

// (dg, du) of h = gate(g) u given dh, in *dg and *du; returns h (the fused recompute epilogue writes all three).
template <typename Gate, typename acc_t>
CKPT_HD acc_t gated_and_grad(acc_t dh, acc_t g, acc_t u, acc_t* dg, acc_t* du) {
  acc_t grad;
  const acc_t a = Gate::template value_and_grad<acc_t>(g, &grad);
  *du = dh * a;
  *dg = dh * u * grad;
  return a * u;
}

}  // namespace math
}  // namespace ckpt_ext
