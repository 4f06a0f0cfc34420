// Helpers shared by the CPU kernels: fp32 vector loads/stores from any storage dtype, dtype plumbing, row chunking.
// load2_f/store2_f move 2 * kW values per call (one full Vectorized<T> of a 16-bit T): the hot loops' width.
// Built for avx512_bf16 (setup.py), bf16 stores use the AVX512_BF16 conversion instructions.
//
// Every kernel computes in acc_t = float (double for float64 tensors). Vectorized<float> holds kW floats; 16-bit
// inputs are widened on load (load_f) and narrowed on store (store_f, one 128/256-bit store under
// AVX2/AVX512). float64 rows take the scalar loops only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>

#include "../common/host_args.h"
#include <type_traits>

namespace ckpt_ext {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

using host::acc_type;

// Whether rows of T run the Vectorized<float> loop (everything but float64).
template <typename T>
constexpr bool kVectorized = !std::is_same_v<T, double>;

template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

template <typename T>
inline void store_f(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
    return;
  }
#if defined(CKPT_EXT_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(__m512(v))));
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    const __m256i h = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(__m512(v)) : at::vec::cvtfp32_fp16(__m512(v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    const __m128i h = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v)) : at::vec::cvtfp32_fp16(__m256(v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return;
  }
#endif
  if constexpr (!std::is_same_v<T, float>) at::vec::convert_from_float<T>(v, v).store(p, kW);
}

// Two Vecs (2 * kW values) at once: 16-bit inputs as one whole Vectorized<T> load + one widening conversion
// (a 512-bit load of 32 bf16 under AVX512), instead of two half-width loads. fp32 is two plain loads.
template <typename T>
inline void load2_f(const T* p, Vec& lo, Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo = Vec::loadu(p);
    hi = Vec::loadu(p + kW);
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2_f(T* p, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(p);
    hi.store(p + kW);
#if defined(CKPT_EXT_AVX512_BF16)
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // One vcvtne2ps2bf16 (round to nearest even like c10's conversion, except that it flushes subnormals to ±0 and
    // keeps a NaN's sign and payload): the low 16 values come from its second operand.
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo))));
#endif
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(p);
  }
}

// v rounded to T's precision and widened back (identity for float): where the reference rounds an intermediate.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  }
}

// v (or a scalar of acc_t) rounded to the precision of the run-time dtype st (bf16/fp16/fp32; anything else is kept):
// for a rounding whose dtype is not a template parameter. The switch is uniform over a loop: well predicted.
inline Vec round_as(const Vec& v, at::ScalarType st) {
  switch (st) {
    case at::kBFloat16:
      return round_to<c10::BFloat16>(v);
    case at::kHalf:
      return round_to<c10::Half>(v);
    default:
      return v;
  }
}

template <typename acc_t>
inline acc_t round_as(acc_t v, at::ScalarType st) {
  switch (st) {
    case at::kBFloat16:
      return static_cast<acc_t>(static_cast<c10::BFloat16>(v));
    case at::kHalf:
      return static_cast<acc_t>(static_cast<c10::Half>(v));
    case at::kFloat:
      return static_cast<acc_t>(static_cast<float>(v));
    default:
      return v;
  }
}

// The row loop every vectorized kernel runs over a contiguous run of len values: step2(j) covers j..j+2kW (the hot
// width), step1(j) j..j+kW, tail(j) one value (all of them for types without a vector path, e.g. fp64). Pass the
// vector steps as generic lambdas ([&](auto j) {...}): their bodies are then instantiated only where called.
template <typename T, typename Step2, typename Step1, typename Tail>
inline void for_vec_steps(int64_t len, Step2&& step2, Step1&& step1, Tail&& tail) {
  int64_t j = 0;
  if constexpr (kVectorized<T>) {
    for (; j + 2 * kW <= len; j += 2 * kW) step2(j);
    for (; j + kW <= len; j += kW) step1(j);
  }
  for (; j < len; ++j) tail(j);
}

// Horizontal sum of a Vectorized<float> (fixed lane order: deterministic).
inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

using host::acc_dtype;
using host::as_contig;

// Rows per parallel task so that each task touches about 64 KiB of one row stream (at least one row).
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(d, 1)); }

}  // namespace cpu
}  // namespace ckpt_ext
