// RMSNorm forward and backward on CPU (reference.rms_norm_fwd / rms_norm_bwd), Hugging Face's cast order.
//
// rms_norm_fwd_kernel(x (N, d), weight (d,), eps) -> y (N, d) in O = promote(x, weight), rstd (N,) acc_t
//   per row: rstd = 1 / sqrt(Σ x² / d + eps);  n = x * rstd rounded to x.dtype;  y = w * n   (rms_rows.h)
// rms_norm_bwd_kernel(dy (N, d), x, rstd, weight, dresidual (N, d)?, emit_y) -> dx (N, d) x.dtype,
//                                                                               dweight (d,) weight.dtype, y or (0,)
//   per row: x̂ = x * rstd, g = dy * w, c1 = Σ g x̂ / d;  dx = rstd (g - x̂ c1) (+ dresidual);
//            dweight += dy * n (n = x̂ rounded to x.dtype, as HF's autograd sees it);  y = w * n if emit_y
//   Rows are cut into fixed blocks of rows_per_block(N) rows (a function of N only, never of the thread count); a
//   block accumulates its fp32 dweight partial in row order, then the partials are summed over blocks in block order:
//   dweight is bitwise the same for any number of threads.
// acc_t = float (double for float64 x). dy/dresidual in x's dtype are read as they are, any other dtype is widened
// once to acc_t; y is written as x's dtype or acc_t (an fp32 weight with bf16 x), any other output dtype is cast once
// from acc_t. Vectorized<float> for fp32/bf16/fp16 rows (kW per step), scalar loops for the tails and fp64.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "../common/llama_host.h"
#include "rms_rows.h"
#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

// Rows per dweight partial: at least 8 rows, at most 128 blocks.
int64_t rows_per_block(int64_t n) { return std::max<int64_t>(8, (n + 127) / 128); }

template <typename T, typename O>
void rms_norm_fwd_impl(const T* x, const acc_type<T>* w, O* y, acc_type<T>* rstd, int64_t n, int64_t d, double eps) {
  using acc_t = acc_type<T>;
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * d;
      acc_t sq = 0;
      int64_t j = 0;
      if constexpr (kVectorized<T>) {
        Vec a0(0), a1(0);
        for (; j + 2 * kW <= d; j += 2 * kW) {
          const Vec v0 = load_f(xr + j), v1 = load_f(xr + j + kW);
          a0 = at::vec::fmadd(v0, v0, a0);
          a1 = at::vec::fmadd(v1, v1, a1);
        }
        for (; j + kW <= d; j += kW) {
          const Vec v = load_f(xr + j);
          a0 = at::vec::fmadd(v, v, a0);
        }
        sq = hsum(a0 + a1);
      }
      for (; j < d; ++j) sq += static_cast<acc_t>(xr[j]) * static_cast<acc_t>(xr[j]);
      const acc_t r = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
      rms_apply_row<T, O>(xr, r, w, y + i * d, d);
      rstd[i] = r;
    }
  });
}

template <typename acc_t>
struct RmsBwdArgs {
  const void* dy;
  const void* x;
  const acc_t* rstd;
  const acc_t* w;
  const void* dres;  // nullptr when there is no residual gradient
  void* dx;
  void* y;  // nullptr unless emit_y
  acc_t* partials;  // (blocks, d)
  int64_t n, d;
};

// One row: dx (+ dres), optional y, and the row's dweight contribution to its block's partial pw.
// G is the dtype of dy and dres (T, or acc_t when either came in another dtype); O the dtype of y.
template <typename T, typename G, typename O>
void rms_norm_bwd_row(const RmsBwdArgs<acc_type<T>>& a, int64_t i, acc_type<T>* pw) {
  using acc_t = acc_type<T>;
  const int64_t d = a.d;
  const T* xr = static_cast<const T*>(a.x) + i * d;
  const G* dyr = static_cast<const G*>(a.dy) + i * d;
  const G* dresr = a.dres ? static_cast<const G*>(a.dres) + i * d : nullptr;
  T* dxr = static_cast<T*>(a.dx) + i * d;
  O* yr = a.y ? static_cast<O*>(a.y) + i * d : nullptr;
  const acc_t r = a.rstd[i];
  acc_t sgx = 0;  // Σ dy w x, times r below
  int64_t j = 0;
  if constexpr (kVectorized<T>) {
    Vec a0(0), a1(0);
    for (; j + 2 * kW <= d; j += 2 * kW) {
      a0 = at::vec::fmadd(load_f(dyr + j) * Vec::loadu(a.w + j), load_f(xr + j), a0);
      a1 = at::vec::fmadd(load_f(dyr + j + kW) * Vec::loadu(a.w + j + kW), load_f(xr + j + kW), a1);
    }
    for (; j + kW <= d; j += kW) a0 = at::vec::fmadd(load_f(dyr + j) * Vec::loadu(a.w + j), load_f(xr + j), a0);
    sgx = hsum(a0 + a1);
  }
  for (; j < d; ++j) sgx += static_cast<acc_t>(dyr[j]) * a.w[j] * static_cast<acc_t>(xr[j]);
  const acc_t c1 = sgx * r / static_cast<acc_t>(d);
  j = 0;
  if constexpr (kVectorized<T>) {
    const Vec vr(r), vc1(c1);
    for (; j + kW <= d; j += kW) {
      const Vec xhat = load_f(xr + j) * vr, dyv = load_f(dyr + j), wv = Vec::loadu(a.w + j);
      Vec dx = (dyv * wv - xhat * vc1) * vr;
      if (dresr) dx += load_f(dresr + j);
      store_f(dxr + j, dx);
      const Vec nv = round_to<T>(xhat);
      at::vec::fmadd(dyv, nv, Vec::loadu(pw + j)).store(pw + j);
      if (yr) store_f(yr + j, wv * nv);
    }
  }
  for (; j < d; ++j) {
    const acc_t xhat = static_cast<acc_t>(xr[j]) * r, dyv = static_cast<acc_t>(dyr[j]);
    acc_t dx = (dyv * a.w[j] - xhat * c1) * r;
    if (dresr) dx += static_cast<acc_t>(dresr[j]);
    dxr[j] = static_cast<T>(dx);
    const acc_t nv = static_cast<acc_t>(static_cast<T>(xhat));
    pw[j] += dyv * nv;
    if (yr) yr[j] = static_cast<O>(a.w[j] * nv);
  }
}

template <typename T, typename G, typename O>
void rms_norm_bwd_impl(const RmsBwdArgs<acc_type<T>>& a, int64_t blocks, int64_t rows) {
  using acc_t = acc_type<T>;
  at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      acc_t* pw = a.partials + k * a.d;
      std::memset(pw, 0, sizeof(acc_t) * a.d);
      for (int64_t i = k * rows; i < std::min(a.n, (k + 1) * rows); ++i) rms_norm_bwd_row<T, G, O>(a, i, pw);
    }
  });
}

// out (d,) = Σ_k partials[k] (blocks, d), k in fixed order.
template <typename acc_t>
void sum_blocks(const acc_t* partials, int64_t blocks, int64_t d, acc_t* out) {
  at::parallel_for(0, d, 1024, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, acc_t(0));
    for (int64_t k = 0; k < blocks; ++k) {
      const acc_t* row = partials + k * d;
      for (int64_t j = begin; j < end; ++j) out[j] += row[j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  host::check_rms_norm_fwd(x, weight);
  const int64_t n = x.size(0), d = x.size(1);
  const auto xt = x.scalar_type(), acc = acc_dtype(xt);
  const auto od = c10::promoteTypes(xt, weight.scalar_type());
  const at::Tensor xc = x.contiguous(), w = as_contig(weight, acc);
  const bool y_same = od == xt;  // else y is computed as acc_t (and cast once when od is neither)
  at::Tensor y = at::empty({n, d}, xc.options().dtype(y_same ? xt : acc));
  at::Tensor rstd = at::empty({n}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "rms_norm_fwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    if (y_same) {
      rms_norm_fwd_impl<scalar_t, scalar_t>(xp, wp, y.mutable_data_ptr<scalar_t>(), rp, n, d, eps);
    } else {
      rms_norm_fwd_impl<scalar_t, acc_t>(xp, wp, y.mutable_data_ptr<acc_t>(), rp, n, d, eps);
    }
  });
  return {y.scalar_type() == od ? y : y.to(od), rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                const at::Tensor& rstd, const at::Tensor& weight,
                                                                const std::optional<at::Tensor>& dresidual,
                                                                bool emit_y) {
  const bool has_res = host::check_rms_norm_bwd(dy, x, rstd, weight, dresidual);
  const int64_t n = x.size(0), d = x.size(1);
  const auto xt = x.scalar_type(), acc = acc_dtype(xt);
  const auto od = c10::promoteTypes(xt, weight.scalar_type());
  const bool g_same = dy.scalar_type() == xt && (!has_res || dresidual->scalar_type() == xt);
  const auto gt = g_same ? xt : acc;
  const at::Tensor xc = x.contiguous(), dyc = as_contig(dy, gt);
  const at::Tensor resc = has_res ? as_contig(*dresidual, gt) : at::Tensor();
  const at::Tensor r = as_contig(rstd, acc), w = as_contig(weight, acc);
  at::Tensor dx = at::empty({n, d}, xc.options());
  const bool y_same = od == xt;
  at::Tensor y = emit_y ? at::empty({n, d}, xc.options().dtype(y_same ? xt : acc)) : at::empty({0}, xc.options());
  const int64_t rows = rows_per_block(n), blocks = (n + rows - 1) / rows;
  at::Tensor partials = at::empty({blocks, d}, xc.options().dtype(acc));
  at::Tensor dweight = at::empty({d}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "rms_norm_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const RmsBwdArgs<acc_t> a{dyc.const_data_ptr(),
                              xc.const_data_ptr(),
                              r.const_data_ptr<acc_t>(),
                              w.const_data_ptr<acc_t>(),
                              has_res ? resc.const_data_ptr() : nullptr,
                              dx.mutable_data_ptr(),
                              emit_y ? y.mutable_data_ptr() : nullptr,
                              partials.mutable_data_ptr<acc_t>(),
                              n,
                              d};
    if (g_same && y_same) {
      rms_norm_bwd_impl<scalar_t, scalar_t, scalar_t>(a, blocks, rows);
    } else if (g_same) {
      rms_norm_bwd_impl<scalar_t, scalar_t, acc_t>(a, blocks, rows);
    } else if (y_same) {
      rms_norm_bwd_impl<scalar_t, acc_t, scalar_t>(a, blocks, rows);
    } else {
      rms_norm_bwd_impl<scalar_t, acc_t, acc_t>(a, blocks, rows);
    }
    sum_blocks<acc_t>(partials.const_data_ptr<acc_t>(), blocks, d, dweight.mutable_data_ptr<acc_t>());
  });
  if (emit_y && y.scalar_type() != od) y = y.to(od);
  return {dx, dweight.to(weight.scalar_type()), y};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("rms_norm_fwd_kernel", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd_kernel", &rms_norm_bwd_cpu);
}

}  // namespace cpu
}  // namespace ckpt_ext
