// Residual + dropout with a hash mask reproducible from the seed, on CPU (reference.dropout_add).
//
// dropout_add_kernel(x (...), residual (...)?, p, seed) -> out (...) in result_type(x, residual):
//   out[i] = (keep(i) ? x[i] / (1 - p) : 0) + residual[i],  keep = math::dropout_keep (csrc/common/ckpt_math.h),
// i the flat row-major index. Computed in fp32 (fp64 for fp64 outputs); the inputs are first brought to the output
// dtype, which is exact (it is at least as wide as each). Per chunk of kChunk elements the scale-or-zero factors are
// computed by a plain uint32 loop (compiler-vectorized), then applied with Vectorized<float>. The output is always a
// fresh tensor, also for p == 0.
//
// attention_tile_dropout_kernel(x (B, G, R, N) fp32/fp64 contiguous, heads, seq_q, seq_k, head0, row0, p, seed):
// in place, x[b, g, r, c] = keep(i) ? x[b, g, r, c] / (1 - p) : 0 with i = ((b·heads + head0 + g)·seq_q + row0 + r)·
// seq_k + c, the flat (B, heads, seq_q, seq_k) index of the attention probability the tile holds (the tiles of
// ckpt_ext/backends/aten_attention.py: G query heads of one kv group, R query rows from row0, the first N keys).
// Parallel over the tile's rows; the hash per element is the same keep as dropout_add's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/ckpt_math.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kChunk = 256;

template <typename T>
void dropout_add_range(const T* x, const T* res, T* out, int64_t start, int64_t len, uint32_t key, uint32_t thr,
                       bool drop, acc_type<T> scale) {
  using acc_t = acc_type<T>;
  acc_t factor[kChunk];
  for (int64_t c = 0; c < len; c += kChunk) {
    const int64_t m = std::min(kChunk, len - c);
    for (int64_t t = 0; t < m; ++t) {
      factor[t] = (!drop || math::dropout_keep(start + c + t, key, thr)) ? scale : acc_t(0);
    }
    const T* xc = x + c;
    const T* rc = res ? res + c : nullptr;
    T* oc = out + c;
    const int64_t mv = kVectorized<T> ? m - m % kW : 0;
    if constexpr (kVectorized<T>) {
      for (int64_t t = 0; t < mv; t += kW) {
        Vec v = load_f(xc + t) * Vec::loadu(factor + t);
        if (rc) v += load_f(rc + t);
        store_f(oc + t, v);
      }
    }
    for (int64_t t = mv; t < m; ++t) {
      acc_t v = static_cast<acc_t>(xc[t]) * factor[t];
      if (rc) v += static_cast<acc_t>(rc[t]);
      oc[t] = static_cast<T>(v);
    }
  }
}

at::Tensor dropout_add_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p, int64_t seed) {
  const host::DropoutAddBuffers buf = host::dropout_add_buffers(x, residual, p, seed);
  const int64_t numel = x.numel();
  if (numel == 0) return buf.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buf.args.out_dtype, "dropout_add_kernel", [&] {
    const host::DropoutAddPtrs<scalar_t> ptr = buf.data<scalar_t>();
    const auto scale = static_cast<acc_type<scalar_t>>(buf.scale);
    at::parallel_for(0, numel, 1 << 15, [&](int64_t begin, int64_t end) {
      dropout_add_range<scalar_t>(ptr.x + begin, ptr.res ? ptr.res + begin : nullptr, ptr.out + begin, begin,
                                  end - begin, buf.key, buf.threshold, buf.drop, scale);
    });
  });
  return buf.out;
}

void attention_tile_dropout_cpu(const at::Tensor& x, int64_t heads, int64_t seq_q, int64_t seq_k, int64_t head0,
                                int64_t row0, double p, int64_t seed) {
  const host::TileDropoutArgs a = host::check_tile_dropout(x, heads, seq_q, seq_k, head0, row0, p);
  if (x.numel() == 0 || p == 0.0) return;
  const uint32_t key = math::seed_key(seed), thr = math::dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_tile_dropout_kernel", [&] {
    const scalar_t scale = static_cast<scalar_t>(1.0 / (1.0 - p));
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.b * a.g * a.r, 8, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t r = row % a.r, bg = row / a.r;
        const int64_t base = ((bg / a.g * heads + head0 + bg % a.g) * seq_q + row0 + r) * seq_k;
        scalar_t* xr = xp + row * a.n;
        for (int64_t c = 0; c < a.n; ++c) {
          xr[c] = math::dropout_keep(base + c, key, thr) ? xr[c] * scale : scalar_t(0);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("dropout_add_kernel", &dropout_add_cpu);
  m.impl("attention_tile_dropout_kernel", &attention_tile_dropout_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
