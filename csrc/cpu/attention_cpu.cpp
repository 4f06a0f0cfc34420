// Grouped-query attention on CPU, fp32, no mask / dropout (causal or not): the `cpu_gqa` route of
// ckpt_ext/backends/aten_attention.py, called as ckpt_ext::cpu_gqa_attention_fwd / _bwd (CPU-only helper ops).
//
// q (B, T, h, dh), k/v (B, S, hk, dh), h % hk == 0, G = h / hk query heads per kv head, last dim contiguous;
// causal needs S == T (query t sees keys j <= t). scale multiplies q kᵀ. segment_ids (B, S) int32/int64, optional, needs
// S == T: query t sees key j iff ids[j] > 0 and |ids[t]| == ids[j] (ckpt_ext/segments.py); a row that sees no key gets
// out = 0, lse = -inf and zero gradients (reference_attention's empty-row rule). window w >= 0 (0 = none; w > 0 needs
// S == T): query t sees key j only if |t - j| <= w as well (a sliding window, on top of causal and the ids).
// fwd -> out (B, T, h, dh) fp32 contiguous, lse (B, h, T) fp32 (natural log of each row's softmax denominator)
// bwd(dout, q, k, v, out, lse) -> dq (B, T, h, dh), dk/dv (B, S, hk, dh), dk/dv summed over each group's G heads.
//
// Work item = (batch b, kv head g, tile of tq query rows); the tile stacks its G heads' rows (G·tq of them) so every
// product is one BLAS sgemm against the group's keys, never a repeated k/v. A tile reads the window of n keys its rows
// may see (all S; up to its last row when causal; with ids, from the first to the last key carrying one of its rows'
// ids; with a window w, keys t0 - w .. t1 - 1 + w: a local layer costs O(T·w), not O(T²)), so its softmax is exact per row with no online rescaling; keys inside the window that a row may not see
// (causal diagonal, other ids) get probability exactly 0:
//   forward   Qs = scale·Q_tile (G·tq, dh);  S = Qs Kᵀ (G·tq, n);  m = rowmax;  P = exp(S - m) (0 above the diagonal);
//             l = rowsum P;  out = (P V) / l;  lse = m + log l
//   backward  P = exp(Qs Kᵀ - lse);  D = rowsum(dO ∘ O);  dP = dO Vᵀ;  dS = P ∘ (dP - D)
//             dQ = scale · dS K (written per tile);  dK += dS^T Qs;  dV += Pᵀ dO (accumulated per item)
// Scratch per item is two (G·tq, n) fp32 tiles plus a few (G·tq, dh) ones; tq is 64 rows, fewer so that G·tq stays
// near kStackedRows (the causal diagonal's wasted half-tile shrinks), and fewer as S grows so a tile stays under
// kTileFloats (the Python route sends S > CPU_GQA_MAX_KEYS to aten's flash kernel instead). Backward items cover a chunk of
// query tiles of one (b, g); with fewer than kMinItems (b, g) pairs the query tiles are split into chunks whose dK/dV
// partials (fp32, beside the output) are added in chunk order: the split depends on shapes only, never on threads.
// GEMMs are the BLAS sgemm_ ATen itself calls (MKL in the x86 wheels), looked up in libtorch_cpu (only there); inside
// at::parallel_for it runs on the calling thread. Without it, cpu_gqa_available() is false and Python routes elsewhere.
// k/v whose row stride cannot be sgemm's leading dimension (expanded over S, size-1 S, > INT_MAX) are copied first.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "vec_io.h"

namespace ckpt_ext {
namespace cpu {
namespace {

using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

constexpr int64_t kTileFloats = int64_t{1} << 20;  // scores per tile: 4 MiB of fp32 at most
constexpr int64_t kMaxTileRows = 64;               // tq at most
constexpr int64_t kStackedRows = 128;              // G · tq at most where G allows (GQA: smaller causal waste, ~10%)
constexpr int64_t kMinItems = 32;                  // split backward (b, g) work below this many items
constexpr int64_t kMaxPartialFloats = int64_t{1} << 24;  // backward's dk/dv partials: 64 MiB of fp32 at most

// libtorch_cpu's own sgemm_ (the one ATen calls; LP64 ints), never another library's global symbol.
SgemmFn find_sgemm() {
  static const SgemmFn fn = [] {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || info.dli_fname == nullptr) {
      return SgemmFn{nullptr};
    }
    void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);  // already loaded; kept open for the process
    return lib == nullptr ? SgemmFn{nullptr} : reinterpret_cast<SgemmFn>(dlsym(lib, "sgemm_"));
  }();
  return fn;
}

// Row-major C (M, N; ldc) = alpha · op(A) · op(B) + beta · C, op = transpose when ta / tb. A row-major matrix is its
// transpose seen column-major, so this is the column-major product Cᵀ = op(B)ᵀ op(A)ᵀ with the same flags.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  find_sgemm()(&opb, &opa, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
}

struct Shape {
  int64_t B, T, S, h, hk, G, dh, tq, n_tiles;
  bool causal;
  int64_t window;  // 0: none; w > 0: |t - j| <= w
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Which keys the rows see: causality and the segment ids (ids (B, S) int64, or null), and per batch row the first and
// last key of every positive id (span; a row of id -s looks up s, one of id 0 finds nothing).
struct Visibility {
  const Shape& s;
  const int64_t* ids = nullptr;
  std::vector<std::unordered_map<int64_t, std::pair<int64_t, int64_t>>> span;  // per batch: id > 0 -> (first, last key)

  Visibility(const Shape& shape, const std::optional<at::Tensor>& seg) : s(shape) {
    if (!seg.has_value()) {
      return;
    }
    ids = seg->data_ptr<int64_t>();
    span.resize(s.B);
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t j = 0; j < s.S; ++j) {
        const int64_t id = ids[b * s.S + j];
        if (id > 0) {
          span[b].try_emplace(id, j, j).first->second.second = j;
        }
      }
    }
  }

  // [lo, hi): the keys rows t0..t1-1 of batch b may see, at most (lo >= hi: none).
  std::pair<int64_t, int64_t> keys(int64_t b, int64_t t0, int64_t t1) const {
    int64_t lo = 0, hi = s.causal ? t1 : s.S;
    if (s.window > 0) {
      lo = std::max<int64_t>(0, t0 - s.window), hi = std::min(hi, t1 + s.window);
    }
    if (ids != nullptr) {
      int64_t first = s.S, last = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const auto it = span[b].find(std::abs(ids[b * s.S + t]));
        if (it != span[b].end()) {
          first = std::min(first, it->second.first), last = std::max(last, it->second.second);
        }
      }
      lo = std::max(lo, first), hi = std::min(hi, last + 1);
    }
    return {lo, hi};
  }

  // Columns [c0, c1) of query t's row over the tile's keys lo..lo+n-1 that causality and the window leave visible
  // (c0 <= c1), inside which hide() masks other ids.
  std::pair<int64_t, int64_t> columns(int64_t t, int64_t lo, int64_t n) const {
    int64_t c0 = 0, c1 = s.causal ? std::clamp<int64_t>(t + 1 - lo, 0, n) : n;
    if (s.window > 0) {
      c0 = std::clamp<int64_t>(t - s.window - lo, 0, n), c1 = std::clamp<int64_t>(t + s.window + 1 - lo, 0, c1);
    }
    return {c0, std::max(c0, c1)};
  }

  // Sets row[c] = value for every column c < cols whose key lo + c does not carry query t's |id| as a positive id
  // (all, if t's id is 0); returns whether any column of the prefix stays visible.
  bool hide(float* row, int64_t b, int64_t t, int64_t lo, int64_t cols, float value) const {
    if (ids == nullptr) {
      return cols > 0;
    }
    const int64_t* kid = ids + b * s.S + lo;
    const int64_t id = std::abs(ids[b * s.S + t]);
    bool any = false;
    for (int64_t c = 0; c < cols; ++c) {
      const bool same = id != 0 && kid[c] == id;  // kid[c] == |id| > 0: a negative key id never matches
      row[c] = same ? row[c] : value;
      any = any || same;
    }
    return any;
  }
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, bool causal, int64_t window) {
  Shape s{};
  s.window = window;
  s.B = q.size(0), s.T = q.size(1), s.h = q.size(2), s.dh = q.size(3), s.S = k.size(1), s.hk = k.size(2);
  s.G = s.h / s.hk;
  s.causal = causal;
  const int64_t by_scratch = kTileFloats / std::max<int64_t>(1, s.G * s.S);
  s.tq = std::clamp<int64_t>(std::min(by_scratch, kStackedRows / s.G), 1, kMaxTileRows);
  s.n_tiles = (s.T + s.tq - 1) / s.tq;
  return s;
}

// A (B, L, H, dh) tensor's strides (last one 1).
struct View {
  const float* p;
  int64_t sb, st, sh;
  const float* row(int64_t b, int64_t t, int64_t hh) const { return p + b * sb + t * st + hh * sh; }
};

View view_of(const at::Tensor& x) { return View{x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2)}; }

// segment_ids as a contiguous (B, S) int64 tensor (checked), or nullopt. INT64_MIN reads as 0 (padding: what the rule
// says of it, as its |id| is no positive id; std::abs of it is undefined).
std::optional<at::Tensor> ids_of(const char* op, const std::optional<at::Tensor>& seg, const at::Tensor& q,
                                 const at::Tensor& k) {
  if (!seg.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK(seg->device().is_cpu() && (seg->scalar_type() == at::kInt || seg->scalar_type() == at::kLong), op,
              ": segment_ids must be an int32/int64 CPU tensor");
  TORCH_CHECK(seg->dim() == 2 && seg->size(0) == k.size(0) && seg->size(1) == k.size(1), op,
              ": segment_ids must be (B, S)");
  TORCH_CHECK(q.size(1) == k.size(1), op, ": segment_ids need S == T");
  const at::Tensor ids = seg->to(at::kLong).contiguous();
  return ids.masked_fill(ids.eq(std::numeric_limits<int64_t>::min()), 0);
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                  int64_t window) {
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window); got ", window);
  TORCH_CHECK(window == 0 || q.size(1) == k.size(1), op, ": a window needs S == T");
  TORCH_CHECK(find_sgemm() != nullptr, op, ": no BLAS sgemm_ in libtorch_cpu (see cpu_gqa_available())");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D (B, T|S, heads, dh)");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": q, k, v must be float32 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1, op, ": q, k, v need a contiguous last dim");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": q and k differ in batch or head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": q's heads must be a multiple of k's");
  TORCH_CHECK(!causal || q.size(1) == k.size(1), op, ": causal needs S == T");
  TORCH_CHECK(q.size(1) > 0 && k.size(1) > 0 && q.size(3) > 0, op, ": empty T, S or head_dim");
}

// k or v as sgemm reads it: a row stride (its leading dimension) of at least dh that fits an int, else a contiguous
// copy (k/v expanded over S, a size-1 S with stride 1, a huge stride).
at::Tensor as_gemm_operand(const at::Tensor& x) {
  const int64_t st = x.stride(1);
  const bool ok = x.size(1) > 1 && st >= x.size(3) && st <= std::numeric_limits<int>::max();
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// Offset of row (b, t, head hh) in a contiguous (B, T, h, dh) output (out, dq).
int64_t row_offset(const Shape& s, int64_t b, int64_t t, int64_t hh) { return ((b * s.T + t) * s.h + hh) * s.dh; }

// dst[0:n] = f · src[0:n].
void scale_row(float* dst, const float* src, float f, int64_t n) {
  at::vec::map([f](Vec x) { return x * Vec(f); }, dst, src, n);
}

// Qs (G·tq, dh) = scale · the tile's rows of the group's G heads; row j·tq + r is head g·G + j, query t0 + r.
void pack_rows(const View& x, const Shape& s, int64_t b, int64_t g, int64_t t0, int64_t tq, float scale, float* out) {
  for (int64_t j = 0; j < s.G; ++j) {
    for (int64_t r = 0; r < tq; ++r) {
      scale_row(out + (j * tq + r) * s.dh, x.row(b, t0 + r, g * s.G + j), scale, s.dh);
    }
  }
}

// In place over a row of n scores whose first nvis are visible: p = exp(x - sub) there, 0 after; returns Σ p.
float exp_row(float* x, int64_t nvis, int64_t n, float sub) {
  Vec acc(0.f);
  const Vec vs(sub);
  int64_t c = 0;
  for (; c + kW <= nvis; c += kW) {
    const Vec p = (Vec::loadu(x + c) - vs).exp_u20();
    p.store(x + c);
    acc = acc + p;
  }
  float sum = hsum(acc);
  for (; c < nvis; ++c) {
    x[c] = std::exp(x[c] - sub);
    sum += x[c];
  }
  std::fill(x + nvis, x + n, 0.f);
  return sum;
}

float row_max(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
}

float row_sum(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x, n);
}

float dot(const float* a, const float* b, int64_t n) {
  return at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, a, b,
                                         n);
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       bool causal, double scale_d, const std::optional<at::Tensor>& seg,
                                       int64_t window) {
  check_inputs("cpu_gqa_attention_fwd", q_in, k_in, v_in, causal, window);
  const Shape s = shape_of(q_in, k_in, causal, window);
  const std::optional<at::Tensor> ids = ids_of("cpu_gqa_attention_fwd", seg, q_in, k_in);
  const Visibility vis(s, ids);
  const at::Tensor k_op = as_gemm_operand(k_in), v_op = as_gemm_operand(v_in);
  const View q = view_of(q_in), k = view_of(k_op), v = view_of(v_op);
  at::Tensor out = at::empty({s.B, s.T, s.h, s.dh}, q_in.options());  // (B, T, h, dh)
  at::Tensor lse = at::empty({s.B, s.h, s.T}, q_in.options());        // (B, h, T)
  float* po = out.data_ptr<float>();
  float* pl = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t rows = s.G * s.tq;
  at::parallel_for(0, s.B * s.hk * s.n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(rows * s.dh), sc(rows * s.S), ob(rows * s.dh), inv(rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (s.hk * s.n_tiles), g = item / s.n_tiles % s.hk, tile = item % s.n_tiles;
      const int64_t t0 = tile * s.tq, tq = std::min(s.tq, s.T - t0), m = s.G * tq;
      const auto [lo, hi] = vis.keys(b, t0, t0 + tq);
      const int64_t n = std::max<int64_t>(0, hi - lo);
      if (n > 0) {
        pack_rows(q, s, b, g, t0, tq, scale, qs.data());
        gemm(false, true, m, n, s.dh, 1.f, qs.data(), s.dh, k.row(b, lo, g), k.st, 0.f, sc.data(), n);
      }
      for (int64_t r = 0; r < m; ++r) {
        float* row = sc.data() + r * n;
        const int64_t t = t0 + r % tq;
        const auto [c0, c1] = vis.columns(t, lo, n);
        float* seen = row + c0;  // the visible columns c0..c1-1; the others become exactly 0
        const int64_t cols = c1 - c0;
        float* lse_at = pl + (b * s.h + g * s.G + r / tq) * s.T + t;
        if (!vis.hide(seen, b, t, lo + c0, cols, kNegInf)) {  // the row sees no key
          std::fill(row, row + n, 0.f);
          inv[r] = 0.f, *lse_at = kNegInf;
          continue;
        }
        const float mx = row_max(seen, cols);
        float l = exp_row(seen, cols, n - c0, mx);
        std::fill(row, seen, 0.f);
        if (vis.ids != nullptr) {  // exp(-inf) is not relied on: hidden keys are set to exactly 0
          vis.hide(seen, b, t, lo + c0, cols, 0.f);
          l = row_sum(seen, cols);
        }
        inv[r] = 1.f / l, *lse_at = mx + std::log(l);
      }
      if (n > 0) {
        gemm(false, false, m, s.dh, n, 1.f, sc.data(), n, v.row(b, lo, g), v.st, 0.f, ob.data(), s.dh);
      } else {
        std::fill_n(ob.data(), m * s.dh, 0.f);
      }
      for (int64_t r = 0; r < m; ++r) {
        scale_row(po + row_offset(s, b, t0 + r % tq, g * s.G + r / tq), ob.data() + r * s.dh, inv[r], s.dh);
      }
    }
  });
  return {out, lse};
}

// Query-tile chunks per (b, g) in backward: enough items for kMinItems, at most one chunk per tile, and partial dk/dv
// buffers of kMaxPartialFloats at most.
int64_t bwd_chunks(const Shape& s) {
  const int64_t pairs = s.B * s.hk, per_chunk = pairs * 2 * s.S * s.dh;
  const int64_t wanted = std::min((kMinItems + pairs - 1) / pairs, s.n_tiles);
  return std::clamp<int64_t>(std::min(wanted, 1 + kMaxPartialFloats / per_chunk), 1, s.n_tiles);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                   const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
                                                   double scale_d, const std::optional<at::Tensor>& seg,
                                                   int64_t window) {
  check_inputs("cpu_gqa_attention_bwd", q_in, k_in, v_in, causal, window);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "cpu_gqa_attention_bwd: dout and out must have q's shape");
  TORCH_CHECK(dout_in.scalar_type() == at::kFloat && out_in.scalar_type() == at::kFloat &&
                  lse_in.scalar_type() == at::kFloat,
              "cpu_gqa_attention_bwd: dout, out and lse must be float32");
  const Shape s = shape_of(q_in, k_in, causal, window);
  const std::optional<at::Tensor> ids = ids_of("cpu_gqa_attention_bwd", seg, q_in, k_in);
  const Visibility vis(s, ids);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == s.B && lse_in.size(1) == s.h && lse_in.size(2) == s.T,
              "cpu_gqa_attention_bwd: lse must be (B, h, T)");
  const at::Tensor dout_c = dout_in.stride(3) == 1 ? dout_in : dout_in.contiguous();
  const at::Tensor out_c = out_in.stride(3) == 1 ? out_in : out_in.contiguous();
  const at::Tensor lse_c = lse_in.contiguous();
  const at::Tensor k_op = as_gemm_operand(k_in), v_op = as_gemm_operand(v_in);
  const View q = view_of(q_in), k = view_of(k_op), v = view_of(v_op), dout = view_of(dout_c), out = view_of(out_c);
  const float* pl = lse_c.data_ptr<float>();
  const int64_t chunks = bwd_chunks(s), tiles_per_chunk = (s.n_tiles + chunks - 1) / chunks;
  at::Tensor dq = at::empty({s.B, s.T, s.h, s.dh}, q_in.options());  // (B, T, h, dh)
  at::Tensor dk = at::zeros({s.B, s.S, s.hk, s.dh}, q_in.options());  // (B, S, hk, dh)
  at::Tensor dv = at::zeros({s.B, s.S, s.hk, s.dh}, q_in.options());
  // Chunks 1.. of each (b, g) accumulate into their own (S, dh) partials, added to dk/dv in chunk order below.
  at::Tensor part = at::zeros({chunks > 1 ? s.B * s.hk * (chunks - 1) : 0, 2, s.S, s.dh}, q_in.options());
  float *pdq = dq.data_ptr<float>(), *pdk = dk.data_ptr<float>(), *pdv = dv.data_ptr<float>();
  float* ppart = part.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t rows = s.G * s.tq, kv_ld = s.hk * s.dh;
  at::parallel_for(0, s.B * s.hk * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(rows * s.dh), dos(rows * s.dh), dqb(rows * s.dh), pb(rows * s.S), dpb(rows * s.S);
    std::vector<float> delta(rows), lrow(rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t pair = item / chunks, c = item % chunks, b = pair / s.hk, g = pair % s.hk;
      float *dk_acc = pdk + b * s.S * kv_ld + g * s.dh, *dv_acc = pdv + b * s.S * kv_ld + g * s.dh;
      int64_t ld_acc = kv_ld;
      if (c > 0) {
        dk_acc = ppart + ((pair * (chunks - 1) + c - 1) * 2) * s.S * s.dh;
        dv_acc = dk_acc + s.S * s.dh;
        ld_acc = s.dh;
      }
      const int64_t tile_end = std::min(s.n_tiles, (c + 1) * tiles_per_chunk);
      for (int64_t tile = c * tiles_per_chunk; tile < tile_end; ++tile) {
        const int64_t t0 = tile * s.tq, tq = std::min(s.tq, s.T - t0), m = s.G * tq;
        const auto [lo, hi] = vis.keys(b, t0, t0 + tq);
        const int64_t n = std::max<int64_t>(0, hi - lo);
        if (n == 0) {  // no row of the tile sees a key: zero dq rows, nothing for dk/dv
          for (int64_t r = 0; r < m; ++r) {
            std::fill_n(pdq + row_offset(s, b, t0 + r % tq, g * s.G + r / tq), s.dh, 0.f);
          }
          continue;
        }
        pack_rows(q, s, b, g, t0, tq, scale, qs.data());
        pack_rows(dout, s, b, g, t0, tq, 1.f, dos.data());
        for (int64_t r = 0; r < m; ++r) {
          const int64_t t = t0 + r % tq, hh = g * s.G + r / tq;
          delta[r] = dot(dos.data() + r * s.dh, out.row(b, t, hh), s.dh);
          lrow[r] = pl[(b * s.h + hh) * s.T + t];
        }
        gemm(false, true, m, n, s.dh, 1.f, qs.data(), s.dh, k.row(b, lo, g), k.st, 0.f, pb.data(), n);
        for (int64_t r = 0; r < m; ++r) {
          float* row = pb.data() + r * n;
          const int64_t t = t0 + r % tq;
          if (std::isinf(lrow[r]) && lrow[r] < 0) {  // an empty row: P = 0
            std::fill(row, row + n, 0.f);
            continue;
          }
          const auto [c0, c1] = vis.columns(t, lo, n);
          exp_row(row + c0, c1 - c0, n - c0, lrow[r]);
          std::fill(row, row + c0, 0.f);
          vis.hide(row + c0, b, t, lo + c0, c1 - c0, 0.f);
        }
        gemm(false, true, m, n, s.dh, 1.f, dos.data(), s.dh, v.row(b, lo, g), v.st, 0.f, dpb.data(), n);
        gemm(true, false, n, s.dh, m, 1.f, pb.data(), n, dos.data(), s.dh, 1.f, dv_acc + lo * ld_acc, ld_acc);
        for (int64_t r = 0; r < m; ++r) {  // dS = P ∘ (dP - D), over dP in place
          float* dp = dpb.data() + r * n;
          const Vec vd(delta[r]);
          at::vec::map2([vd](Vec p, Vec x) { return p * (x - vd); }, dp, pb.data() + r * n, dp, n);
        }
        gemm(false, false, m, s.dh, n, scale, dpb.data(), n, k.row(b, lo, g), k.st, 0.f, dqb.data(), s.dh);
        gemm(true, false, n, s.dh, m, 1.f, dpb.data(), n, qs.data(), s.dh, 1.f, dk_acc + lo * ld_acc, ld_acc);
        for (int64_t r = 0; r < m; ++r) {
          std::copy_n(dqb.data() + r * s.dh, s.dh, pdq + row_offset(s, b, t0 + r % tq, g * s.G + r / tq));
        }
      }
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, s.B * s.hk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = pair / s.hk, g = pair % s.hk;
        for (int64_t c = 1; c < chunks; ++c) {
          const float* src = ppart + ((pair * (chunks - 1) + c - 1) * 2) * s.S * s.dh;
          for (int64_t which = 0; which < 2; ++which) {
            float* dst = (which == 0 ? pdk : pdv) + b * s.S * kv_ld + g * s.dh;
            for (int64_t j = 0; j < s.S; ++j) {
              float* o = dst + j * kv_ld;
              at::vec::map2([](Vec x, Vec y) { return x + y; }, o, o, src + (which * s.S + j) * s.dh, s.dh);
            }
          }
        }
      }
    });
  }
  return {dq, dk, dv};
}

bool available() { return find_sgemm() != nullptr; }

}  // namespace

// Whether libtorch_cpu exports the BLAS sgemm_ these kernels call (the op cpu_gqa_available, csrc/ckpt_ext.cpp).
bool cpu_gqa_available() { return available(); }

TORCH_LIBRARY_IMPL(ckpt_ext, CPU, m) {
  m.impl("cpu_gqa_attention_fwd", &fwd);
  m.impl("cpu_gqa_attention_bwd", &bwd);
}

}  // namespace cpu
}  // namespace ckpt_ext
