// The LM head on CPU (reference.linear_cross_entropy_fwd / _bwd): linear + cross-entropy, chunk_rows rows at a time,
// never an (N, V) buffer. T = hidden.dtype = weight.dtype, acc_t = float (double for float64).
//
// linear_cross_entropy_fwd_kernel(hidden (N, d), weight (V, d), bias (V,)?, labels (N,) int, ignore_index, eps,
//                                 chunk_rows) -> losses (N,) acc_t, lse (N,) acc_t
//   per chunk of r rows: z = at::mm(hidden[r0:r1], weightᵀ) into a (r, V) T buffer (bf16 logits rounded to bf16 as
//   Hugging Face's lm_head output is), widened into the (r, V) acc_t buffer (the same buffer for fp32); then rows in
//   parallel: z += bias, m = max z, lse = m + log Σ exp(z - m), loss = lse - (1-eps) z_y - eps mean(z) (0 where
//   labels == ignore_index).
// linear_cross_entropy_bwd_kernel(dloss (N,), hidden, weight, bias?, labels, lse (N,), ignore_index, eps, chunk_rows,
//                                 need_dweight) -> dhidden (N, d) T, dweight (V, d) T or (0,), dbias (V,) T or (0,)
//   per chunk: rebuild z as above, then rows in parallel, in place: dz = g (exp(z - lse) - eps/V), dz_y -= g (1-eps),
//   g = dloss (0 on ignored rows); dz rounded to T (the GEMM copy) for dhidden[r0:r1] = dz @ weight (written in place)
//   and dweight += dzᵀ @ hidden[r0:r1]. fp32 weights accumulate straight into dweight (at::addmm_); 16-bit ones take
//   each chunk's product into dweight's own buffer and add it into an fp32 (V, d) accumulator (one chunk: no
//   accumulator). dbias sums dz (acc_t) over rows.
// Memory beyond the outputs: the (chunk_rows, V) acc_t buffer, its T copy for 16-bit, the fp32 dweight accumulator.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "../common/host_args.h"

namespace ckpt_ext {
namespace cpu {
namespace {

using host::acc_dtype;
using host::defined;

struct Shapes {
  int64_t n, d, v;
};

Shapes check_args(const char* name, const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t chunk_rows) {
  TORCH_CHECK(hidden.dim() == 2, name, ": hidden must be (N, d), got ", hidden.sizes());
  const int64_t n = hidden.size(0), d = hidden.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == d && weight.size(0) > 0, name, ": weight must be (V, ", d,
              "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), name, ": weight dtype must equal hidden's");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), name, ": hidden must be a floating tensor");
  const int64_t v = weight.size(0);
  TORCH_CHECK(!defined(bias) || (bias->sizes() == at::IntArrayRef{v} && bias->scalar_type() == hidden.scalar_type()),
              name, ": bias must be (V,) in hidden's dtype");
  TORCH_CHECK(labels.sizes() == at::IntArrayRef{n}, name, ": labels must be (N,)");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, name,
              ": labels must be int64 or int32");
  TORCH_CHECK(chunk_rows > 0, name, ": chunk_rows must be positive, got ", chunk_rows);
  return {n, d, v};
}

// labels as contiguous int64, every one in [0, V) or equal to ignore_index (the row passes index z with it).
at::Tensor checked_labels(const char* name, const at::Tensor& labels, int64_t v, int64_t ignore_index) {
  at::Tensor y = labels.to(at::kLong).contiguous();
  const bool bad = y.ne(ignore_index).logical_and(y.lt(0).logical_or(y.ge(v))).any().item<bool>();
  TORCH_CHECK(!bad, name, ": labels must be in [0, ", v, ") or ignore_index (", ignore_index, ")");
  return y;
}

// Buffers of one chunk: z (rows, V) acc_t, and its copy in T for the GEMMs when T is 16-bit (else z itself).
struct ChunkBuffers {
  at::Tensor z, zt;
  ChunkBuffers(int64_t rows, int64_t v, const at::Tensor& hidden) {
    const auto acc = acc_dtype(hidden.scalar_type());
    z = at::empty({rows, v}, hidden.options().dtype(acc));
    zt = hidden.scalar_type() == acc ? z : at::empty({rows, v}, hidden.options());
  }
  // z[:r] = hidden[r0:r0+r] @ weightᵀ (bias added by the row pass).
  at::Tensor logits(const at::Tensor& h_chunk, const at::Tensor& weight) {
    const int64_t r = h_chunk.size(0);
    at::Tensor zc = z.narrow(0, 0, r), ztc = zt.narrow(0, 0, r);
    at::mm_out(ztc, h_chunk, weight.t());
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

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& bias,
                                                                const at::Tensor& labels, int64_t ignore_index,
                                                                double eps, int64_t chunk_rows) {
  const auto [n, d, v] = check_args("linear_cross_entropy_fwd_kernel", hidden, weight, bias, labels, chunk_rows);
  const auto acc = acc_dtype(hidden.scalar_type());
  const at::Tensor h = hidden.contiguous();
  const at::Tensor y = checked_labels("linear_cross_entropy_fwd_kernel", labels, v, ignore_index);
  const at::Tensor b = defined(bias) ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor losses = at::empty({n}, hidden.options().dtype(acc)), lse = at::empty({n}, losses.options());
  if (n == 0) return {losses, lse};
  const int64_t rows = std::min(chunk_rows, n);
  ChunkBuffers buf(rows, v, h);
  AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_fwd_kernel", [&] {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& dloss, const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index, double eps, int64_t chunk_rows,
    bool need_dweight) {
  const auto [n, d, v] = check_args("linear_cross_entropy_bwd_kernel", hidden, weight, bias, labels, chunk_rows);
  TORCH_CHECK(dloss.sizes() == at::IntArrayRef{n} && lse.sizes() == at::IntArrayRef{n},
              "linear_cross_entropy_bwd_kernel: dloss and lse must be (N,)");
  const auto dt = hidden.scalar_type(), acc = acc_dtype(dt);
  const at::Tensor h = hidden.contiguous();
  const at::Tensor y = checked_labels("linear_cross_entropy_bwd_kernel", labels, v, ignore_index);
  const at::Tensor g = host::as_contig(dloss, acc), s = host::as_contig(lse, acc);
  const bool has_bias = defined(bias);
  const at::Tensor b = has_bias ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor dh = at::empty({n, d}, h.options());
  at::Tensor dw = need_dweight ? at::zeros({v, d}, h.options()) : at::empty({0}, h.options());
  at::Tensor db = has_bias ? at::zeros({v}, h.options().dtype(acc)) : at::Tensor();
  const int64_t rows = std::max<int64_t>(1, std::min(chunk_rows, n));
  const bool one_chunk = rows >= n;
  // 16-bit weights over several chunks: each chunk's dzᵀ @ hidden lands in dw's buffer, summed here in fp32.
  at::Tensor dw_acc = need_dweight && dt != acc && !one_chunk ? at::zeros({v, d}, h.options().dtype(acc)) : at::Tensor();
  if (n > 0) {
    ChunkBuffers buf(rows, v, h);
    AT_DISPATCH_FLOATING_TYPES(acc, "linear_cross_entropy_bwd_kernel", [&] {
      using acc_t = scalar_t;
      using Vv = at::vec::Vectorized<acc_t>;
      const int64_t* yp = y.const_data_ptr<int64_t>();
      const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : nullptr;
      const acc_t* gp = g.const_data_ptr<acc_t>();
      const acc_t* sp = s.const_data_ptr<acc_t>();
      const acc_t smooth = static_cast<acc_t>(eps / static_cast<double>(v));
      const acc_t hit = static_cast<acc_t>(1.0 - eps);
      for (int64_t r0 = 0; r0 < n; r0 += rows) {
        const int64_t r = std::min(rows, n - r0);
        const at::Tensor hc = h.narrow(0, r0, r);
        at::Tensor z = buf.logits(hc, weight);  // (r, V) acc_t, becomes dz
        acc_t* zp = z.mutable_data_ptr<acc_t>();
        at::parallel_for(0, r, kRowGrain, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            acc_t* zr = zp + i * v;
            const int64_t label = yp[r0 + i];
            const acc_t gi = label == ignore_index ? acc_t(0) : gp[r0 + i];
            if (gi == acc_t(0)) {
              std::fill(zr, zr + v, acc_t(0));
              continue;
            }
            if (bp != nullptr) RowMath<acc_t>::add_bias(zr, bp, v);
            const Vv vs(sp[r0 + i]), vg(gi), vsm(smooth);
            at::vec::map<acc_t>([&](Vv x) { return vg * ((x - vs).exp() - vsm); }, zr, zr, v);
            zr[label] -= gi * hit;
          }
        });
        at::Tensor zt = z;
        if (dt != acc) {
          zt = buf.zt.narrow(0, 0, r);
          zt.copy_(z);
        }
        at::Tensor dh_chunk = dh.narrow(0, r0, r);
        at::mm_out(dh_chunk, zt, weight);
        if (need_dweight) {
          if (dt == acc) {
            dw.addmm_(zt.t(), hc);
          } else {
            at::mm_out(dw, zt.t(), hc);
            if (!one_chunk) dw_acc.add_(dw);
          }
        }
        if (has_bias) db.add_(z.sum(0));
      }
    });
  }
  if (dw_acc.defined()) dw.copy_(dw_acc);
  at::Tensor dbias = has_bias ? db.to(dt) : at::empty({0}, h.options());
  return {dh, dw, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("linear_cross_entropy_fwd_kernel", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd_kernel", &linear_cross_entropy_bwd_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
