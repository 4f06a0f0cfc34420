// Fused FFN backward ops on CPU (reference.ffn_recompute / linear_gelu_bwd / gelu_linear_wgrad). CPU GEMMs have no
// epilogue hook, so each op is at::mm plus ONE vectorized pass that does all the pointwise work around it.
//
// ffn_recompute_kernel(x1 (N, d), mean (N,), rstd (N,), ln_w (d,), ln_b (d,), w1 (H, d), b1 (H,), dy (N, d),
//                      w2 (d, H), approx) -> a (N, H), du (N, H) in T = dy.dtype, db1 (H,) fp32 (fp64 for fp64)
//   1. y = (x1 - mean) * rstd * ln_w + ln_b in T, rows in parallel                 scratch (N, d) T
//   2. u = at::mm(y, w1ᵀ), dA = at::mm(dy, w2), both (N, H) in T; weights read through their strides (views)
//   3. epilogue over fixed 32-row chunks: u += b1; a = gelu(u) over u's buffer (which becomes the output a);
//      du = gelu'(u) * dA over dA's buffer (the output du); fp32 math (fp64 for fp64), one erf/exp per value shared
//      by gelu and gelu'; per-chunk column sums of the unrounded du, then summed over chunks in order (db1 is
//      bitwise independent of the thread count).
// linear_bias_gelu_kernel(x (N, K), w (H, K), b (H,)?, approx) -> a = gelu(x @ wᵀ + b) (N, H) in x.dtype
//   m = at::mm(x, wᵀ) in promote(x, w) (bf16 stays bf16, as the reference; w read through its strides), then ONE
//   row-parallel pass: a = gelu(m + b) in fp32 (fp64 for fp64), in place over m when m already has x's dtype (else m
//   is brought to fp32 and a is a fresh tensor). u = m + b is never written.
// linear_gelu_bwd_kernel(dy (N, d), w2 (d, H), u (N, H), approx) -> du (N, H) in u.dtype
//   m = at::mm(dy, w2) in promote(dy, w2) (bf16 stays bf16, as the reference); du = m * gelu'(u) in fp32, in place
//   over m when m already has u's dtype (else m is widened to fp32, exactly, and du is a fresh tensor).
// gelu_linear_wgrad_kernel(dy (N, d), u (N, H), approx) -> dW2 = dyᵀ @ gelu(u) (d, H) in dy.dtype
//   a = gelu(u) in u.dtype in one flat pass, then at::mm(dyᵀ, a) in promote(dy, u).
// The GEMMs, dtype rules and buffers of the last three are shared with the CUDA kernels (csrc/common/ffn_host.h).
// Outputs are always fresh tensors (never an input). Inputs of another dtype than T are first brought to T, or to
// fp32 when T is 16-bit and they are wider (so nothing is rounded twice). fp64 runs the scalar loops end to end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../common/ckpt_math.h"
#include "../common/ffn_host.h"
#include "gelu_rows.h"
#include "gelu_vec.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

constexpr int64_t kFlatGrain = 1 << 15;

// y[i, :] = (x[i, :] - mean[i]) * rstd[i] * w + b for rows [begin, end); X is T or acc_t.
template <typename T, typename X>
void ln_apply_rows(const X* x, const acc_type<T>* mean, const acc_type<T>* rstd, const acc_type<T>* w,
                   const acc_type<T>* b, T* y, int64_t d, int64_t begin, int64_t end) {
  using acc_t = acc_type<T>;
  const int64_t dv = kVectorized<T> ? d - d % kW : 0;
  for (int64_t i = begin; i < end; ++i) {
    const X* xr = x + i * d;
    T* yr = y + i * d;
    const acc_t mu = mean[i], r = rstd[i];
    if constexpr (kVectorized<T>) {
      const Vec vmu(mu), vr(r);
      for (int64_t j = 0; j < dv; j += kW) {
        const Vec xhat = (load_f(xr + j) - vmu) * vr;
        store_f(yr + j, at::vec::fmadd(xhat, Vec::loadu(w + j), Vec::loadu(b + j)));
      }
    }
    for (int64_t j = dv; j < d; ++j) yr[j] = static_cast<T>((static_cast<acc_t>(xr[j]) - mu) * r * w[j] + b[j]);
  }
}

// The ffn_recompute epilogue on one row of H: u = ua[j] + b1[j]; ua[j] = gelu(u); g = gelu'(u) * dd[j];
// dd[j] = g; colsum[j] += g (unrounded).
template <typename T, bool kTanh>
void ffn_epilogue_row(T* ua, const acc_type<T>* b1, T* dd, acc_type<T>* colsum, int64_t h) {
  using acc_t = acc_type<T>;
  for_vec_steps<T>(
      h,
      [&](auto j) {
        Vec u0, u1, d0, d1;
        load2_f(ua + j, u0, u1);
        load2_f(dd + j, d0, d1);
        const auto [a0, g0] = gelu_and_grad_vec<kTanh, T>(u0 + Vec::loadu(b1 + j));
        const auto [a1, g1] = gelu_and_grad_vec<kTanh, T>(u1 + Vec::loadu(b1 + j + kW));
        const Vec du0 = g0 * d0, du1 = g1 * d1;
        store2_f(ua + j, a0, a1);
        store2_f(dd + j, du0, du1);
        (Vec::loadu(colsum + j) + du0).store(colsum + j);
        (Vec::loadu(colsum + j + kW) + du1).store(colsum + j + kW);
      },
      [&](auto j) {
        const auto [a, g] = gelu_and_grad_vec<kTanh, T>(load_f(ua + j) + Vec::loadu(b1 + j));
        const Vec du = g * load_f(dd + j);
        store_f(ua + j, a);
        store_f(dd + j, du);
        (Vec::loadu(colsum + j) + du).store(colsum + j);
      },
      [&](int64_t j) {
        const acc_t u = static_cast<acc_t>(ua[j]) + b1[j];
        const acc_t du = math::gelu_grad<acc_t>(u, kTanh) * static_cast<acc_t>(dd[j]);
        ua[j] = static_cast<T>(math::gelu<acc_t>(u, kTanh));
        dd[j] = static_cast<T>(du);
        colsum[j] += du;
      });
}

using host::with_form;

constexpr int64_t kSumRows = 32;  // rows per db1 partial: fixed, so db1 does not depend on the thread count

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_recompute_cpu(host::FfnRecomputeInputs& in,
                                                                 const at::Tensor& w1, const at::Tensor& dy,
                                                                 const at::Tensor& w2) {
  const int64_t n = in.n, d = in.d, h = in.h;
  const auto dt = in.dt, acc = in.acc;
  const at::Tensor &xc = in.xc, &mc = in.mc, &rc = in.rc, &wc = in.wc, &bc = in.bc, &b1c = in.b1c, &y = in.y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "ffn_recompute_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    auto run = [&](const auto* xp) {
      at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
        ln_apply_rows<scalar_t>(xp, mc.const_data_ptr<acc_t>(), rc.const_data_ptr<acc_t>(), wc.const_data_ptr<acc_t>(),
                                bc.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(), d, begin, end);
      });
    };
    xc.scalar_type() == dt ? run(xc.const_data_ptr<scalar_t>()) : run(xc.const_data_ptr<acc_t>());
  });
  auto [a, du] = host::ffn_gemms(in, w1, dy, w2);
  const int64_t chunks = (n + kSumRows - 1) / kSumRows;
  at::Tensor partial = at::zeros({std::max<int64_t>(chunks, 1), h}, dy.options().dtype(acc));
  if (n > 0 && h > 0) {
    TORCH_INTERNAL_ASSERT(a.is_contiguous() && du.is_contiguous());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "ffn_recompute_kernel", [&] {
      using acc_t = acc_type<scalar_t>;
      scalar_t* ap = a.mutable_data_ptr<scalar_t>();
      scalar_t* dup = du.mutable_data_ptr<scalar_t>();
      acc_t* pp = partial.mutable_data_ptr<acc_t>();
      const acc_t* bp = b1c.const_data_ptr<acc_t>();
      with_form(in.tanh_form, [&](auto tanh_tag) {
        constexpr bool kTanh = decltype(tanh_tag)::value;
        at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(h) / kSumRows), [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            for (int64_t i = c * kSumRows; i < std::min(n, (c + 1) * kSumRows); ++i) {
              ffn_epilogue_row<scalar_t, kTanh>(ap + i * h, bp, dup + i * h, pp + c * h, h);
            }
          }
        });
      });
    });
  }
  at::Tensor db1 = at::empty({h}, dy.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "ffn_recompute_kernel_db1", [&] {
    const scalar_t* pp = partial.const_data_ptr<scalar_t>();
    scalar_t* op = db1.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, h, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) op[j] = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t j = begin; j < end; ++j) op[j] += pp[c * h + j];
      }
    });
  });
  return {a, du, db1};
}

at::Tensor linear_bias_gelu_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                c10::string_view approximate) {
  const bool tanh_form = parse_approximate(approximate);
  const bool has_bias = host::check_linear_bias_gelu(x, w, b);
  const int64_t n = x.size(0), h = w.size(0);
  const host::PointwisePass pass = host::linear_bias_gelu_gemm(x, w);
  const at::Tensor bc = has_bias ? as_contig(*b, acc_dtype(x.scalar_type())) : at::Tensor();
  host::run_pointwise(pass, tanh_form, [&](const auto* mp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(mp)>>;
    const acc_type<T>* bp = has_bias ? bc.const_data_ptr<acc_type<T>>() : nullptr;
    at::parallel_for(0, n, row_grain(h), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        bias_gelu_range<T, M, decltype(tanh_tag)::value>(mp + i * h, bp, op + i * h, h);
      }
    });
  });
  return pass.out;
}

void gelu_bwd_pass_cpu(const host::PointwisePass& pass, const at::Tensor& uc, bool tanh_form) {
  host::run_pointwise(pass, tanh_form, [&](const auto* mp, auto* op, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(op)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(mp)>>;
    const T* up = uc.const_data_ptr<T>();
    at::parallel_for(0, uc.numel(), kFlatGrain, [&](int64_t begin, int64_t end) {
      gelu_bwd_range<T, M, decltype(tanh_tag)::value>(mp + begin, up + begin, op + begin, end - begin);
    });
  });
}

void gelu_pass_cpu(const host::PointwisePass& pass, bool tanh_form) {
  host::run_pointwise(pass, tanh_form, [&](const auto* up, auto* ap, auto tanh_tag) {
    using T = std::remove_pointer_t<decltype(ap)>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(up)>>;  // T (u is read as it is)
    at::parallel_for(0, pass.m.numel(), kFlatGrain, [&](int64_t begin, int64_t end) {
      bias_gelu_range<T, M, decltype(tanh_tag)::value>(up + begin, nullptr, ap + begin, end - begin);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("ffn_recompute_kernel", &host::ffn_recompute<&ffn_recompute_cpu, host::NoGuard>);
  m.impl("linear_bias_gelu_kernel", &linear_bias_gelu_cpu);
  m.impl("linear_gelu_bwd_kernel", &host::linear_gelu_bwd<&gelu_bwd_pass_cpu, host::NoGuard>);
  m.impl("gelu_linear_wgrad_kernel", &host::gelu_linear_wgrad<&gelu_pass_cpu, host::NoGuard>);
}

}  // namespace cpu
}  // namespace ckpt_ext
