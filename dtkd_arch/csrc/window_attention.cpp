// Fused window attention for the CPU, fp32: softmax(q k^T * scale + mask) v for every window and head.
//
// Built on first use by dtkd_arch/cpu_kernels.py (torch.utils.cpp_extension, -O3 -march=native) and
// registered as torch.ops.dtkd_cpu.window_attention_forward / window_attention_backward.
//
// Layout (the window-ordered token stream of FastSwinIR):
//   qkv      (W * N, 3C)   rows of window w are w*N .. w*N+N-1; columns q | k | v, head h at h*d .. h*d+d-1
//   masks_t  (P, H, N, N)  additive masks (relative position bias plus shift pattern), TRANSPOSED:
//                          masks_t[g][h][j][i] is the mask of query i and key j
//   pattern  (W,) int64    mask index g of each window
//   out      (W * N, C)
//   stats    (W, H, 2, N)  per query: the score maximum and 1 / sum of the exponentials (forward, for
//                          the backward, which recomputes the probabilities instead of storing them)
//
// Each (window, head) pair is computed in a core's L1 cache with the scores held transposed,
// S^T[j][i] (key j, query i): every product then runs along the N queries of a window in 8-wide
// vectors with scalar broadcasts of k, v (or the gradient), and the softmax over keys becomes
// element-wise maxima and sums of rows, with no horizontal reductions. Only dK and dV need dot
// products along the queries. The vectors are GCC vector extensions; the compiler lowers them to
// AVX2 / AVX-512 / NEON as -march=native allows. N must be a multiple of 8 (window size 8: N = 64).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

constexpr int kLanes = 8;
constexpr int kBlock = 8;  // vectors per register block (64 queries)

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// exp(x) for x <= 0 (scores minus their maximum). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, 2^n through the exponent bits; about 1 ulp. Below -87.34 (e^x < 2^-126, the
// smallest normal float) the result is 0, which also covers -inf (masked-out keys).
inline v8 vexp_nonpositive(v8 x) {
  const v8 lo = splat(-87.3365447505531f);
  v8 xc = x < lo ? lo : x;
  xc = xc > splat(0.f) ? splat(0.f) : xc;
  v8 n = xc * splat(1.44269504088896341f) + splat(12582912.f);  // round to nearest (1.5 * 2^23 trick)
  n = n - splat(12582912.f);
  v8 r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.f);
  v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 y = p * reinterpret_cast<v8&>(e);
  return x < lo ? splat(0.f) : y;
}

struct Shape {
  int64_t windows, n, heads, d, c;
};

Shape check_inputs(const at::Tensor& qkv, const at::Tensor& masks_t, const at::Tensor& pattern, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && masks_t.device().is_cpu() && pattern.device().is_cpu(),
              "dtkd_cpu window attention: CPU tensors expected");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && masks_t.scalar_type() == at::kFloat,
              "dtkd_cpu window attention: float32 qkv and masks expected");
  TORCH_CHECK(pattern.scalar_type() == at::kLong, "dtkd_cpu window attention: int64 pattern expected");
  TORCH_CHECK(qkv.dim() == 2 && masks_t.dim() == 4 && pattern.dim() == 1,
              "dtkd_cpu window attention: qkv (T, 3C), masks_t (P, H, N, N), pattern (W,) expected");
  TORCH_CHECK(qkv.is_contiguous() && masks_t.is_contiguous() && pattern.is_contiguous(),
              "dtkd_cpu window attention: contiguous tensors expected");
  Shape s;
  s.n = masks_t.size(2);
  s.heads = heads;
  s.windows = pattern.size(0);
  TORCH_CHECK(masks_t.size(1) == heads && masks_t.size(3) == s.n, "dtkd_cpu window attention: masks_t shape ",
              masks_t.sizes(), " does not match ", heads, " heads");
  TORCH_CHECK(s.n % kLanes == 0, "dtkd_cpu window attention: tokens per window must be a multiple of 8, got ", s.n);
  TORCH_CHECK(qkv.size(0) == s.windows * s.n, "dtkd_cpu window attention: ", qkv.size(0), " rows for ", s.windows,
              " windows of ", s.n, " tokens");
  TORCH_CHECK(qkv.size(1) % (3 * heads) == 0, "dtkd_cpu window attention: 3C = ", qkv.size(1),
              " is not a multiple of 3 * heads");
  s.c = qkv.size(1) / 3;
  s.d = s.c / heads;
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  for (int64_t w = 0; w < s.windows; ++w) {
    TORCH_CHECK(pat[w] >= 0 && pat[w] < masks_t.size(0), "dtkd_cpu window attention: pattern ", pat[w],
                " of window ", w, " out of range [0, ", masks_t.size(0), ")");
  }
  return s;
}

// The products below run over the N queries in register blocks of NV vectors (NV <= kBlock); `blocks`
// calls a block function once per 8 * kBlock queries with NV fixed at compile time.
template <template <int> class Op, typename... Args>
inline void blocks(int64_t n, Args... args) {
  for (int64_t i0 = 0; i0 < n; i0 += kLanes * kBlock) {
    switch (std::min<int64_t>(kBlock, (n - i0) / kLanes)) {
      case 8: Op<8>::run(i0, args...); break;
      case 7: Op<7>::run(i0, args...); break;
      case 6: Op<6>::run(i0, args...); break;
      case 5: Op<5>::run(i0, args...); break;
      case 4: Op<4>::run(i0, args...); break;
      case 3: Op<3>::run(i0, args...); break;
      case 2: Op<2>::run(i0, args...); break;
      default: Op<1>::run(i0, args...); break;
    }
  }
}

// dst[j][i] = mask[j][i] + sum_e a[j * a_stride + e] * bt[e][i]   (j < n rows, i in the block)
// a: n rows of `depth` scalars with row stride a_stride; bt: (depth, n); mask may be null.
template <int NV>
struct RowsTimesTransposed {
  static void run(int64_t i0, const float* a, int64_t a_stride, const float* bt, const float* mask, float* dst,
                  int64_t n, int64_t depth) {
    for (int64_t j = 0; j < n; ++j) {
      const float* arow = a + j * a_stride;
      v8 acc[NV];
      for (int k = 0; k < NV; ++k) acc[k] = mask ? load(mask + j * n + i0 + k * kLanes) : splat(0.f);
      for (int64_t e = 0; e < depth; ++e) {
        const v8 s = splat(arow[e]);
        const float* brow = bt + e * n + i0;
        for (int k = 0; k < NV; ++k) acc[k] += s * load(brow + k * kLanes);
      }
      for (int k = 0; k < NV; ++k) store(dst + j * n + i0 + k * kLanes, acc[k]);
    }
  }
};

void rows_times_transposed(const float* a, int64_t a_stride, const float* bt, const float* mask, float* dst,
                           int64_t n, int64_t depth) {
  blocks<RowsTimesTransposed>(n, a, a_stride, bt, mask, dst, n, depth);
}

// dst[e][i] = sum_j a[j * a_stride + e] * pt[j][i]   (e < depth, i in the block): the product A^T P^T.
template <int NV>
struct TransposedTimesRows {
  static void run(int64_t i0, const float* a, int64_t a_stride, const float* pt, float* dst, int64_t n,
                  int64_t depth) {
    for (int64_t e = 0; e < depth; ++e) {
      v8 acc[NV];
      for (int k = 0; k < NV; ++k) acc[k] = splat(0.f);
      for (int64_t j = 0; j < n; ++j) {
        const v8 s = splat(a[j * a_stride + e]);
        const float* prow = pt + j * n + i0;
        for (int k = 0; k < NV; ++k) acc[k] += s * load(prow + k * kLanes);
      }
      for (int k = 0; k < NV; ++k) store(dst + e * n + i0 + k * kLanes, acc[k]);
    }
  }
};

void transposed_times_rows(const float* a, int64_t a_stride, const float* pt, float* dst, int64_t n, int64_t depth) {
  blocks<TransposedTimesRows>(n, a, a_stride, pt, dst, n, depth);
}

// out[j * out_stride + e] = sum_i x[j][i] * yt[e][i]   (j < n, e < depth): dot products along the queries.
void rows_dot_rows(const float* x, const float* yt, float* out, int64_t out_stride, int64_t n, int64_t depth,
                   float factor) {
  for (int64_t j = 0; j < n; ++j) {
    const float* xrow = x + j * n;
    for (int64_t e = 0; e < depth; ++e) {
      const float* yrow = yt + e * n;
      v8 acc0 = splat(0.f), acc1 = splat(0.f);
      int64_t i = 0;
      for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
        acc0 += load(xrow + i) * load(yrow + i);
        acc1 += load(xrow + i + kLanes) * load(yrow + i + kLanes);
      }
      for (; i < n; i += kLanes) acc0 += load(xrow + i) * load(yrow + i);
      out[j * out_stride + e] = hsum(acc0 + acc1) * factor;
    }
  }
}

// qt[e][i] = scale * q[i][e] for one window and head (q rows with stride c3).
void gather_transposed(const float* q, int64_t c3, float* qt, int64_t n, int64_t d, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < d; ++e) qt[e * n + i] = q[i * c3 + e] * scale;
  }
}

// Probabilities P^T (n x n, in place over the scores S^T) from the stored per-query max and 1 / sum.
void probabilities_from_stats(float* st, const float* mx, const float* inv, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < n; i += kLanes) {
      store(st + j * n + i, vexp_nonpositive(load(st + j * n + i) - load(mx + i)) * load(inv + i));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> window_attention_forward(const at::Tensor& qkv, const at::Tensor& masks_t,
                                                            const at::Tensor& pattern, int64_t heads, double scale,
                                                            bool keep_stats) {
  const Shape s = check_inputs(qkv, masks_t, pattern, heads);
  const int64_t n = s.n, d = s.d, c = s.c, c3 = 3 * s.c, hh = s.heads;
  at::Tensor out = at::empty({s.windows * n, c}, qkv.options());
  at::Tensor stats = keep_stats ? at::empty({s.windows, hh, 2, n}, qkv.options()) : at::empty({0}, qkv.options());
  const float* qkv_p = qkv.const_data_ptr<float>();
  const float* mask_p = masks_t.const_data_ptr<float>();
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  float* stats_p = keep_stats ? stats.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, s.windows * hh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n * n + 2 * d * n + 3 * n);
    float* st = buf.data();
    float* qt = st + n * n;
    float* ot = qt + d * n;
    float* mx = ot + d * n;
    float* sum = mx + n;
    float* inv = sum + n;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t w = idx / hh, h = idx % hh;
      const float* base = qkv_p + w * n * c3 + h * d;
      const float* mask = mask_p + (pat[w] * hh + h) * n * n;
      gather_transposed(base, c3, qt, n, d, sc);
      rows_times_transposed(base + c, c3, qt, mask, st, n, d);  // S^T = mask^T + K (scale Q)^T
      for (int64_t i = 0; i < n; i += kLanes) store(mx + i, load(st + i));
      for (int64_t j = 1; j < n; ++j) {
        for (int64_t i = 0; i < n; i += kLanes) store(mx + i, vmax(load(mx + i), load(st + j * n + i)));
      }
      for (int64_t i = 0; i < n; i += kLanes) store(sum + i, splat(0.f));
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < n; i += kLanes) {
          const v8 e = vexp_nonpositive(load(st + j * n + i) - load(mx + i));
          store(st + j * n + i, e);
          store(sum + i, load(sum + i) + e);
        }
      }
      for (int64_t i = 0; i < n; i += kLanes) store(inv + i, splat(1.f) / load(sum + i));
      transposed_times_rows(base + 2 * c, c3, st, ot, n, d);  // O^T (unnormalised) = V^T E^T
      float* orow = out_p + w * n * c + h * d;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t e = 0; e < d; ++e) orow[i * c + e] = ot[e * n + i] * inv[i];
      }
      if (stats_p) {
        float* sp = stats_p + idx * 2 * n;
        for (int64_t i = 0; i < n; ++i) {
          sp[i] = mx[i];
          sp[n + i] = inv[i];
        }
      }
    }
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                             const at::Tensor& masks_t, const at::Tensor& pattern,
                                                             const at::Tensor& stats, int64_t heads, double scale,
                                                             bool mask_grad) {
  const Shape s = check_inputs(qkv, masks_t, pattern, heads);
  const int64_t n = s.n, d = s.d, c = s.c, c3 = 3 * s.c, hh = s.heads;
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                  grad_out.size(0) == s.windows * n && grad_out.size(1) == c,
              "dtkd_cpu window attention backward: contiguous float32 grad_out of shape (", s.windows * n, ", ", c,
              ") expected, got ", grad_out.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == s.windows * hh * 2 * n,
              "dtkd_cpu window attention backward: stats of the forward expected");
  at::Tensor grad_qkv = at::empty_like(qkv);
  const int64_t threads = at::get_num_threads();
  const int64_t mask_numel = masks_t.numel();
  at::Tensor grad_masks_per_thread =
      mask_grad ? at::zeros({threads, mask_numel}, qkv.options()) : at::empty({0}, qkv.options());
  const float* qkv_p = qkv.const_data_ptr<float>();
  const float* mask_p = masks_t.const_data_ptr<float>();
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  const float* go_p = grad_out.const_data_ptr<float>();
  const float* stats_p = stats.const_data_ptr<float>();
  float* gq_p = grad_qkv.data_ptr<float>();
  float* gm_p = mask_grad ? grad_masks_per_thread.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, s.windows * hh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * n * n + 3 * d * n + n);
    float* pt = buf.data();
    float* dst = pt + n * n;
    float* qt = dst + n * n;
    float* got = qt + d * n;
    float* dqt = got + d * n;
    float* delta = dqt + d * n;
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t w = idx / hh, h = idx % hh;
      const float* base = qkv_p + w * n * c3 + h * d;
      const int64_t mask_offset = (pat[w] * hh + h) * n * n;
      const float* sp = stats_p + idx * 2 * n;
      gather_transposed(base, c3, qt, n, d, sc);
      rows_times_transposed(base + c, c3, qt, mask_p + mask_offset, pt, n, d);
      probabilities_from_stats(pt, sp, sp + n, n);  // P^T
      gather_transposed(go_p + w * n * c + h * d, c, got, n, d, 1.f);  // dO^T
      rows_times_transposed(base + 2 * c, c3, got, nullptr, dst, n, d);  // dP^T = V dO^T
      for (int64_t i = 0; i < n; i += kLanes) store(delta + i, splat(0.f));
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t i = 0; i < n; i += kLanes) {
          store(delta + i, load(delta + i) + load(pt + j * n + i) * load(dst + j * n + i));
        }
      }
      for (int64_t j = 0; j < n; ++j) {  // dS^T = P^T * (dP^T - delta)
        for (int64_t i = 0; i < n; i += kLanes) {
          store(dst + j * n + i, load(pt + j * n + i) * (load(dst + j * n + i) - load(delta + i)));
        }
      }
      if (gm_p) {
        float* gm = gm_p + tid * mask_numel + mask_offset;
        for (int64_t k = 0; k < n * n; k += kLanes) store(gm + k, load(gm + k) + load(dst + k));
      }
      float* gbase = gq_p + w * n * c3 + h * d;
      transposed_times_rows(base + c, c3, dst, dqt, n, d);  // dQ^T / scale = K^T dS^T
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t e = 0; e < d; ++e) gbase[i * c3 + e] = dqt[e * n + i] * sc;
      }
      rows_dot_rows(dst, qt, gbase + c, c3, n, d, 1.f);      // dK = dS^T (scale Q)
      rows_dot_rows(pt, got, gbase + 2 * c, c3, n, d, 1.f);  // dV = P^T dO
    }
  });
  at::Tensor grad_masks = mask_grad ? grad_masks_per_thread.sum(0).view(masks_t.sizes()) : at::empty({0}, qkv.options());
  return {grad_qkv, grad_masks};
}

}  // namespace

TORCH_LIBRARY(dtkd_cpu, m) {
  m.def("window_attention_forward(Tensor qkv, Tensor masks_t, Tensor pattern, int heads, float scale, "
        "bool keep_stats) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor grad_out, Tensor qkv, Tensor masks_t, Tensor pattern, Tensor stats, "
        "int heads, float scale, bool mask_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dtkd_cpu, CPU, m) {
  m.impl("window_attention_forward", &window_attention_forward);
  m.impl("window_attention_backward", &window_attention_backward);
}
