// The LM head on CPU (reference.linear_cross_entropy_fwd / _bwd): linear + cross-entropy in chunks whose buffers fit
// chunk_bytes, never an (N, V) buffer. T = hidden.dtype = weight.dtype, acc_t = float (double for float64).
//
// linear_cross_entropy_fwd_kernel(hidden (N, d), weight (V, d), bias (V,)?, labels (N,) int, ignore_index, eps,
//                                 chunk_bytes) -> losses (N,) acc_t, lse (N,) acc_t
//   token chunks of r rows (r·V logits fit the budget): z = at::mm(hidden[r0:r0+r], weightᵀ) into an (r, V) T buffer
//   (bf16 logits rounded to bf16 as Hugging Face's lm_head output is), widened into the (r, V) acc_t buffer (the same
//   buffer for fp32); then rows in parallel: z += bias, m = max z, lse = m + log Σ exp(z - m),
//   loss = lse - (1-eps) z_y - eps mean(z) (0 where labels == ignore_index).
// linear_cross_entropy_bwd_kernel(dloss (N,), hidden, weight, bias?, labels, lse (N,), ignore_index, eps, chunk_bytes,
//                                 need_dweight) -> dhidden (N, d) T, dweight (V, d) T or (0,), dbias (V,) T or (0,)
//   vocabulary chunks of c columns (N·c logits fit the budget): rebuild z = hidden @ W[c0:c0+c]ᵀ (+ bias) from the
//   saved lse, then rows in parallel, in place: dz = g (exp(z - lse) - eps/V), dz_y -= g (1-eps) when the label is in
//   the chunk, g = dloss (0 on ignored rows); dz rounded to T (the GEMM copy) for
//     dweight[c0:c0+c] = dzᵀ @ hidden   one GEMM over all N rows: each dweight row is complete (fp32 accumulation
//                                       inside the GEMM), so no (V, d) accumulator exists;
//     dhidden += dz @ W[c0:c0+c]        fp32 accumulation across chunks (in dhidden for fp32; for 16-bit an (N, d)
//                                       fp32 accumulator, each chunk's product widened on load);
//     dbias[c0:c0+c] = Σ_rows dz        (acc_t, before rounding).
//   Chunking the vocabulary (the rows' lse is known from the forward) instead of the tokens keeps the cross-chunk sum
//   on dhidden (N·d) rather than on dweight (V·d, 32x larger at Llama-3's V = 128256, d = 4096 with 4096 tokens).
// Memory beyond the outputs: the chunk's acc_t buffer, its T copy for 16-bit, the (N, d) fp32 accumulator for 16-bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../common/host_args.h"
#include "../common/lm_head_host.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

using host::acc_dtype;
using host::chunk_len;

// Buffers of one chunk, flat: z acc_t, and its copy in T for the GEMMs when T is 16-bit (else z itself).
struct ChunkBuffers {
  at::Tensor z, zt;
  ChunkBuffers(int64_t elems, const at::Tensor& hidden) {
    const auto acc = acc_dtype(hidden.scalar_type());
    z = at::empty({elems}, hidden.options().dtype(acc));
    zt = hidden.scalar_type() == acc ? z : at::empty({elems}, hidden.options());
  }
  // (r, c) view of z = h @ wᵀ for h (r, d), w (c, d) (bias added by the row pass).
  at::Tensor logits(const at::Tensor& h, const at::Tensor& w) {
    const int64_t r = h.size(0), c = w.size(0);
    at::Tensor zc = z.narrow(0, 0, r * c).view({r, c}), ztc = zt.narrow(0, 0, r * c).view({r, c});
    at::mm_out(ztc, h, w.t());
    if (!ztc.is_same(zc)) zc.copy_(ztc);
    return zc;
  }
};

template <typename acc_t>
struct RowMath {
  using V = at::vec::Vectorized<acc_t>;
  static void add_bias(acc_t* z, const acc_t* b, int64_t v) {
    at::vec::map2<acc_t>([](V a, V c) { return a + c; }, z, z, b, v);
  }
  static acc_t max(const acc_t* z, int64_t v) {
    return at::vec::reduce_all<acc_t>([](V a, V c) { return at::vec::maximum(a, c); }, z, v);
  }
  static acc_t sum_exp(const acc_t* z, acc_t m, int64_t v) {
    return at::vec::map_reduce_all<acc_t>([m](V x) { return (x - V(m)).exp(); }, [](V a, V c) { return a + c; },
                                          z, v);
  }
  static acc_t sum(const acc_t* z, int64_t v) {
    return at::vec::reduce_all<acc_t>([](V a, V c) { return a + c; }, z, v);
  }
};

constexpr int64_t kRowGrain = 4;
constexpr int64_t kFlatGrain = 1 << 16;

// acc[i] += x[i] over a contiguous 16-bit tensor, widened on load (at::Tensor::add_ would first copy x to fp32).
void add_into_fp32(at::Tensor& acc, const at::Tensor& x) {
  float* ap = acc.mutable_data_ptr<float>();
  const int64_t numel = x.numel();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "linear_cross_entropy_bwd_kernel", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, numel, kFlatGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      for (; i + kW <= end; i += kW) (Vec::loadu(ap + i) + load_f(xp + i)).store(ap + i);
      for (; i < end; ++i) ap[i] += static_cast<float>(xp[i]);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const host::FwdInputs& in, const at::Tensor& weight, int64_t ignore_index,
                                           double eps, int64_t chunk_bytes) {
  const int64_t n = in.shape.n, v = in.shape.v;
  const at::Tensor &h = in.h, &y = in.y, &b = in.b;
  at::Tensor losses = in.losses, lse = in.lse;
  if (n == 0) return {losses, lse};
  const int64_t rows = chunk_len(chunk_bytes, v, h.scalar_type(), n);
  ChunkBuffers buf(rows * v, h);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "linear_cross_entropy_fwd_kernel", [&] {
    using acc_t = scalar_t;
    using M = RowMath<acc_t>;
    const int64_t* yp = y.const_data_ptr<int64_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    acc_t* lp = losses.mutable_data_ptr<acc_t>();
    acc_t* sp = lse.mutable_data_ptr<acc_t>();
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t r = std::min(rows, n - r0);
      at::Tensor z = buf.logits(h.narrow(0, r0, r), weight);  // (r, V) acc_t
      acc_t* zp = z.mutable_data_ptr<acc_t>();
      at::parallel_for(0, r, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t* zr = zp + i * v;
          if (bp != nullptr) M::add_bias(zr, bp, v);
          const acc_t m = M::max(zr, v);
          const acc_t s = m + std::log(M::sum_exp(zr, m, v));
          const int64_t label = yp[r0 + i];
          sp[r0 + i] = s;
          if (label == ignore_index) {
            lp[r0 + i] = acc_t(0);
            continue;
          }
          acc_t loss = s - static_cast<acc_t>(1.0 - eps) * zr[label];
          if (eps != 0.0) loss -= static_cast<acc_t>(eps) * M::sum(zr, v) / static_cast<acc_t>(v);
          lp[r0 + i] = loss;
        }
      });
    }
  });
  return {losses, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const host::BwdInputs& in, const at::Tensor& weight,
                                                       int64_t ignore_index, double eps, bool need_dweight) {
  const int64_t n = in.shape.n, d = in.shape.d, v = in.shape.v, cols = in.cols;
  const auto dt = in.dt, acc = in.acc;
  const at::Tensor &h = in.h, &y = in.y, &g = in.g, &s = in.s, &b = in.b;
  const bool has_bias = in.has_bias();
  at::Tensor dh = at::zeros({n, d}, h.options());
  const at::Tensor &dw = in.dw, &db = in.db;
  // 16-bit over several vocabulary chunks: each chunk's dz @ W_c lands in dh's buffer and is summed here in fp32.
  at::Tensor dh_acc = dt != acc && cols < v ? at::zeros({n, d}, h.options().dtype(acc)) : at::Tensor();
  if (n > 0) {
    ChunkBuffers buf(n * cols, h);
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_bwd_kernel", [&] {
      using acc_t = scalar_t;
      using Vv = at::vec::Vectorized<acc_t>;
      const int64_t* yp = y.const_data_ptr<int64_t>();
      const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const acc_t* sp = s.const_data_ptr<acc_t>();
      const acc_t smooth = static_cast<acc_t>(eps / static_cast<double>(v));
      const acc_t hit = static_cast<acc_t>(1.0 - eps);
      for (int64_t c0 = 0; c0 < v; c0 += cols) {
        const int64_t c = std::min(cols, v - c0);
        const at::Tensor wc = weight.narrow(0, c0, c);
        at::Tensor z = buf.logits(h, wc);  // (N, c) acc_t, becomes dz
        acc_t* zp = z.mutable_data_ptr<acc_t>();
        at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            acc_t* zr = zp + i * c;
            const int64_t label = yp[i];
            const acc_t gi = label == ignore_index ? acc_t(0) : gp[i];
            if (gi == acc_t(0)) {
              std::fill(zr, zr + c, acc_t(0));
              continue;
            }
            if (bp != nullptr) RowMath<acc_t>::add_bias(zr, bp + c0, c);
            const Vv vs(sp[i]), vg(gi), vsm(smooth);
            at::vec::map<acc_t>([&](Vv x) { return vg * ((x - vs).exp() - vsm); }, zr, zr, c);
            if (label >= c0 && label < c0 + c) zr[label - c0] -= gi * hit;
          }
        });
        at::Tensor zt = z;
        if (dt != acc) {
          zt = buf.zt.narrow(0, 0, n * c).view({n, c});
          zt.copy_(z);
        }
        if (need_dweight) {
          at::Tensor dw_c = dw.narrow(0, c0, c);
          at::mm_out(dw_c, zt.t(), h);  // complete: this chunk's columns see every row in one GEMM
        }
        if (dt == acc) {
          dh.addmm_(zt, wc);
        } else if (dh_acc.defined()) {
          at::mm_out(dh, zt, wc);
          add_into_fp32(dh_acc, dh);
        } else {
          at::mm_out(dh, zt, wc);
        }
        if (has_bias) db.narrow(0, c0, c).add_(z.sum(0));
      }
    });
  }
  if (dh_acc.defined()) dh.copy_(dh_acc);
  return {dh, dw, host::dbias_out(in)};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("linear_cross_entropy_fwd_kernel", &host::lce_fwd<&fwd_cpu>);
  m.impl("linear_cross_entropy_bwd_kernel", &host::lce_bwd<&bwd_cpu>);
}

}  // namespace cpu
}  // namespace ckpt_ext
