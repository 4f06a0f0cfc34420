// Rotary position embedding of q and k in one pass on CPU (reference.rope), and its exact adjoint (inverse=True).
//
// rope_kernel(q (B, T, hq, dh), k (B, T, hk, dh), cos (B|1, T, dh), sin (B|1, T, dh), inverse)
//   -> q_out, k_out contiguous in q.dtype / k.dtype.  With h = dh / 2, x = (x1, x2), c = (c1, c2), s = (s1, s2):
//   forward  (x cos + rotate_half(x) sin):         o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
//   inverse  (x cos + rotate_half_t(x sin)):       o1 = x1 c1 + x2 s2,   o2 = x2 c2 - x1 s1
//   i.e. o1 = x1 c1 - σ x2 sa, o2 = x2 c2 + σ x1 sb with (sa, sb, σ) = (s1, s2, 1) or (s2, s1, -1).
// at::parallel_for over the B*T token rows; a row rotates its hq query heads then its hk key heads against the same
// cos/sin row (converted once to acc_t = fp32, fp64 for fp64). q and k are read through their strides (unit last
// stride; e.g. views of a packed qkv projection); when their dtypes differ each gets its own pass.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/llama_host.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

// One tensor of heads: x (B, T, heads, dh) read with strides (sb, st, sh, 1), out contiguous.
struct Heads {
  const void* x;
  int64_t sb, st, sh, heads;
  void* out;
};

Heads heads_of(const at::Tensor& x, at::Tensor& out) {
  return {x.const_data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.size(2), out.mutable_data_ptr()};
}

template <typename T>
void rope_head(const T* x, T* out, const acc_type<T>* c, const acc_type<T>* sa, const acc_type<T>* sb,
               acc_type<T> sign, int64_t half) {
  using acc_t = acc_type<T>;
  int64_t j = 0;
  if constexpr (kVectorized<T>) {
    const Vec vs(sign);
    for (; j + kW <= half; j += kW) {
      const Vec x1 = load_f(x + j), x2 = load_f(x + half + j);
      store_f(out + j, x1 * Vec::loadu(c + j) - vs * x2 * Vec::loadu(sa + j));
      store_f(out + half + j, x2 * Vec::loadu(c + half + j) + vs * x1 * Vec::loadu(sb + j));
    }
  }
  for (; j < half; ++j) {
    const acc_t x1 = static_cast<acc_t>(x[j]), x2 = static_cast<acc_t>(x[half + j]);
    out[j] = static_cast<T>(x1 * c[j] - sign * x2 * sa[j]);
    out[half + j] = static_cast<T>(x2 * c[half + j] + sign * x1 * sb[j]);
  }
}

template <typename T>
void rope_pass(const std::vector<Heads>& parts, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
               const host::RopeDims& dims) {
  using acc_t = acc_type<T>;
  const int64_t t_len = dims.t, dh = dims.dh, half = dh / 2;
  const acc_t* cp = cos.const_data_ptr<acc_t>();
  const acc_t* sp = sin.const_data_ptr<acc_t>();
  const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
  int64_t width = 0;
  for (const Heads& p : parts) width += p.heads * dh;
  at::parallel_for(0, dims.b * t_len, row_grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / t_len, t = r - b * t_len;
      const int64_t cs = ((dims.cos_batched ? b : 0) * t_len + t) * dh;
      const acc_t* c = cp + cs;
      const acc_t* sa = sp + cs + (inverse ? half : 0);
      const acc_t* sb = sp + cs + (inverse ? 0 : half);
      for (const Heads& p : parts) {
        const T* x = static_cast<const T*>(p.x) + b * p.sb + t * p.st;
        T* out = static_cast<T*>(p.out) + r * p.heads * dh;
        for (int64_t h = 0; h < p.heads; ++h) rope_head<T>(x + h * p.sh, out + h * dh, c, sa, sb, sign, half);
      }
    }
  });
}

at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin, bool inverse) {
  const host::RopeDims dims = host::check_rope(q, k, cos, sin);
  const at::Tensor qc = unit_last_stride(q), kc = unit_last_stride(k);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor k_out = at::empty(k.sizes(), k.options().memory_format(contiguous));
  if (dims.dh == 0) return {q_out, k_out};
  auto run = [&](at::ScalarType dt, const std::vector<Heads>& parts) {
    const auto acc = acc_dtype(dt);
    const at::Tensor c = as_contig(cos, acc), s = as_contig(sin, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rope_kernel",
                                    [&] { rope_pass<scalar_t>(parts, c, s, inverse, dims); });
  };
  if (q.scalar_type() == k.scalar_type()) {
    run(q.scalar_type(), {heads_of(qc, q_out), heads_of(kc, k_out)});
  } else {
    run(q.scalar_type(), {heads_of(qc, q_out)});
    run(k.scalar_type(), {heads_of(kc, k_out)});
  }
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) { m.impl("rope_kernel", &rope_cpu); }

}  // namespace cpu
}  // namespace ckpt_ext
