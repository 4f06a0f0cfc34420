// LayerNorm backward on CPU, rebuilding x̂ from the saved statistics (reference.layer_norm_bwd).
//
// dy, x (N, d); mean, rstd (N,); weight, bias (d,); dresidual (N, d)? ->
//   dx (N, d) x.dtype = rstd * (g - c2 - x̂ * c1) (+ dresidual),  g = dy * w,  c1 = mean(g * x̂),  c2 = mean(g)
//   dweight = Σ_rows dy * x̂ (weight.dtype), dbias = Σ_rows dy (bias.dtype), y = x̂ * w + b if emit_y else (0,)
// Rows are cut into fixed blocks of kRowsPerBlock(N) rows (a function of N only, never of the thread count); each
// block accumulates its fp32 dweight/dbias partials in row order, then the partials are summed over blocks in block
// order, so dweight/dbias are bitwise reproducible for any number of threads.
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

// Rows per partial-sum block: at least 8 rows, at most 128 blocks.
int64_t rows_per_block(int64_t n) { return std::max<int64_t>(8, (n + 127) / 128); }

template <typename acc_t>
struct LnBwdArgs {
  const void* dy;
  const void* x;
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* w;
  const acc_t* b;
  const void* dres;  // nullptr when there is no residual gradient
  void* dx;
  void* y;  // nullptr unless emit_y
  acc_t* partials;  // (2 * blocks, d): dweight partials of every block, then dbias partials
  int64_t n, d;
};

// One row: dx (+dres), optional y, and the row's contribution to its block's partials pw/pb.
template <typename T, typename D, typename R>
void layer_norm_bwd_row(const LnBwdArgs<acc_type<T>>& a, int64_t i, acc_type<T>* pw, acc_type<T>* pb) {
  using acc_t = acc_type<T>;
  const int64_t d = a.d;
  const int64_t dv = kVectorized<T> ? d - d % kW : 0;
  const T* xr = static_cast<const T*>(a.x) + i * d;
  const D* dyr = static_cast<const D*>(a.dy) + i * d;
  const R* dresr = a.dres ? static_cast<const R*>(a.dres) + i * d : nullptr;
  T* dxr = static_cast<T*>(a.dx) + i * d;
  T* yr = a.y ? static_cast<T*>(a.y) + i * d : nullptr;
  const acc_t mu = a.mean[i], r = a.rstd[i], shift = -mu * r;
  acc_t sgx = 0, sg = 0;
  if constexpr (kVectorized<T>) {
    const Vec vr(r), vs(shift);
    Vec agx(0), ag(0);
    for (int64_t j = 0; j < dv; j += kW) {
      const Vec xhat = at::vec::fmadd(load_f(xr + j), vr, vs);
      const Vec g = load_f(dyr + j) * Vec::loadu(a.w + j);
      agx = at::vec::fmadd(g, xhat, agx);
      ag += g;
    }
    sgx = hsum(agx);
    sg = hsum(ag);
  }
  for (int64_t j = dv; j < d; ++j) {
    const acc_t xhat = static_cast<acc_t>(xr[j]) * r + shift;
    const acc_t g = static_cast<acc_t>(dyr[j]) * a.w[j];
    sgx += g * xhat;
    sg += g;
  }
  const acc_t c1 = sgx / static_cast<acc_t>(d), c2 = sg / static_cast<acc_t>(d);
  if constexpr (kVectorized<T>) {
    const Vec vr(r), vs(shift), vc1(c1), vc2(c2);
    for (int64_t j = 0; j < dv; j += kW) {
      const Vec xhat = at::vec::fmadd(load_f(xr + j), vr, vs);
      const Vec dyv = load_f(dyr + j);
      const Vec wv = Vec::loadu(a.w + j);
      Vec dx = (dyv * wv - vc2 - xhat * vc1) * vr;
      if (dresr) dx += load_f(dresr + j);
      store_f(dxr + j, dx);
      at::vec::fmadd(dyv, xhat, Vec::loadu(pw + j)).store(pw + j);
      (dyv + Vec::loadu(pb + j)).store(pb + j);
      if (yr) store_f(yr + j, at::vec::fmadd(xhat, wv, Vec::loadu(a.b + j)));
    }
  }
  for (int64_t j = dv; j < d; ++j) {
    const acc_t xhat = static_cast<acc_t>(xr[j]) * r + shift;
    const acc_t dyv = static_cast<acc_t>(dyr[j]);
    acc_t dx = (dyv * a.w[j] - c2 - xhat * c1) * r;
    if (dresr) dx += static_cast<acc_t>(dresr[j]);
    dxr[j] = static_cast<T>(dx);
    pw[j] += dyv * xhat;
    pb[j] += dyv;
    if (yr) yr[j] = static_cast<T>(xhat * a.w[j] + a.b[j]);
  }
}

template <typename T, typename D, typename R>
void layer_norm_bwd_impl(const LnBwdArgs<acc_type<T>>& a, int64_t blocks, int64_t rows) {
  using acc_t = acc_type<T>;
  at::parallel_for(0, blocks, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      acc_t* pw = a.partials + k * a.d;
      acc_t* pb = a.partials + (blocks + k) * a.d;
      std::memset(pw, 0, sizeof(acc_t) * a.d);
      std::memset(pb, 0, sizeof(acc_t) * a.d);
      for (int64_t i = k * rows; i < std::min(a.n, (k + 1) * rows); ++i) layer_norm_bwd_row<T, D, R>(a, i, pw, pb);
    }
  });
}

// out (2, d) = Σ_k partials[k] for the dweight and the dbias halves of partials (2 * blocks, d), k in fixed order.
template <typename acc_t>
void sum_blocks(const acc_t* partials, int64_t blocks, int64_t d, acc_t* out) {
  at::parallel_for(0, 2 * d, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end;) {
      const int64_t half = c / d, stop = std::min(end, (half + 1) * d);
      std::fill(out + c, out + stop, acc_t(0));
      for (int64_t k = 0; k < blocks; ++k) {
        const acc_t* row = partials + (half * blocks + k) * d - half * d;
        for (int64_t j = c; j < stop; ++j) out[j] += row[j];
      }
      c = stop;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& dresidual, bool emit_y) {
  const bool has_res = host::check_layer_norm_bwd(dy, x, mean, rstd, weight, bias, dresidual);
  const int64_t n = x.size(0), d = x.size(1);
  const auto xt = x.scalar_type(), acc = acc_dtype(xt);
  // dy/dresidual in x's dtype are read as they are; any other dtype is widened once to acc_t (exact).
  const bool dy_same = dy.scalar_type() == xt, res_same = !has_res || dresidual->scalar_type() == xt;
  const at::Tensor xc = x.contiguous(), dyc = dy_same ? dy.contiguous() : as_contig(dy, acc);
  const at::Tensor resc = !has_res ? at::Tensor() : (res_same ? dresidual->contiguous() : as_contig(*dresidual, acc));
  const at::Tensor m = as_contig(mean, acc), r = as_contig(rstd, acc);
  const at::Tensor w = as_contig(weight, acc), b = as_contig(bias, acc);
  at::Tensor dx = at::empty({n, d}, xc.options());
  at::Tensor y = emit_y ? at::empty({n, d}, xc.options()) : at::empty({0}, xc.options());
  const int64_t rows = rows_per_block(n), blocks = (n + rows - 1) / rows;
  at::Tensor partials = at::empty({2 * blocks, d}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xt, "layer_norm_bwd_kernel", [&] {
    using acc_t = acc_type<scalar_t>;
    const LnBwdArgs<acc_t> a{dyc.const_data_ptr(), xc.const_data_ptr(), m.const_data_ptr<acc_t>(),
                             r.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                             has_res ? resc.const_data_ptr() : nullptr, dx.mutable_data_ptr(),
                             emit_y ? y.mutable_data_ptr() : nullptr, partials.mutable_data_ptr<acc_t>(), n, d};
    if (dy_same && res_same) {
      layer_norm_bwd_impl<scalar_t, scalar_t, scalar_t>(a, blocks, rows);
    } else if (dy_same) {
      layer_norm_bwd_impl<scalar_t, scalar_t, acc_t>(a, blocks, rows);
    } else if (res_same) {
      layer_norm_bwd_impl<scalar_t, acc_t, scalar_t>(a, blocks, rows);
    } else {
      layer_norm_bwd_impl<scalar_t, acc_t, acc_t>(a, blocks, rows);
    }
  });
  at::Tensor sums = at::empty({2, d}, xc.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "layer_norm_bwd_kernel_reduce", [&] {
    sum_blocks<scalar_t>(partials.const_data_ptr<scalar_t>(), blocks, d, sums.mutable_data_ptr<scalar_t>());
  });
  at::Tensor dweight = sums[0].to(weight.scalar_type(), false, true).view(weight.sizes());
  at::Tensor dbias = sums[1].to(bias.scalar_type(), false, true).view(bias.sizes());
  return {dx, dweight, dbias, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) { m.impl("layer_norm_bwd_kernel", &layer_norm_bwd_cpu); }

}  // namespace cpu
}  // namespace ckpt_ext
