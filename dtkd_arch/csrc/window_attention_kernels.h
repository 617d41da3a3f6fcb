// Window attention kernels for one (window, head) pair, fp32, without any dependency on torch: included by
// window_attention.cpp (the torch operators) and usable on their own. See window_attention.cpp for the layout.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dtkd_wa {

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

#if defined(__clang__)
#define DTKD_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DTKD_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// Pairwise sums within each 128-bit half, as x86's hadd: [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7].
inline v8 hadd(v8 a, v8 b) {
  return DTKD_SHUFFLE2(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + DTKD_SHUFFLE2(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The sums of four vectors: {sum(a), sum(b), sum(c), sum(d)}, in the first four lanes.
inline void hsum4(v8 a, v8 b, v8 c, v8 d, float* out) {
  const v8 h = hadd(hadd(a, b), hadd(c, d));  // [a, b, c, d low-half sums, a, b, c, d high-half sums]
  for (int k = 0; k < 4; ++k) out[k] = h[k] + h[k + 4];
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^t, about 1.6 ulp: t = n + f with n = round(t) and |f| <= 1/2, a degree-6 polynomial for 2^f (least-squares
// fit, relative, on Chebyshev nodes; max relative error 9.7e-8 in float32) and 2^n through the exponent bits.
// t is clamped at -127, where the exponent bits become 0: the result is exactly 0 for t < -126.5 (e^x for
// x < -87.7, below the smallest normal float), for t = -inf (masked-out keys) and for NaN.
inline v8 vexp2(v8 t) {
  t = t > splat(-127.f) ? t : splat(-127.f);
  const v8 magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const v8 m = t + magic;
  const v8 f = t - (m - magic);
  v8 p = splat(1.5370705e-04f);
  p = p * f + splat(1.3399848e-03f);
  p = p * f + splat(9.6183736e-03f);
  p = p * f + splat(5.5503290e-02f);
  p = p * f + splat(2.4022648e-01f);
  p = p * f + splat(6.9314718e-01f);
  p = p * f + splat(1.f);
  // The bits of m are those of 1.5 * 2^23 plus n; shifted left by 23 the constant's bits vanish (its low 23
  // bits are 0 but for bit 22, which moves past bit 31), leaving (n + 127) << 23, the float 2^n.
  const v8i bits = (reinterpret_cast<const v8i&>(m) + 127) << 23;
  return p * reinterpret_cast<const v8&>(bits);
}

// e^(s - mx) as 2^(s log2e - mx log2e): mx_log2e holds the maxima times log2(e).
inline v8 vexp_shifted(v8 s, v8 mx_log2e) { return vexp2(s * splat(kLog2e) - mx_log2e); }

// The products below run over the N queries in register blocks of NV vectors (NV <= kBlock); `blocks`
// calls a block function once per 8 * kBlock queries with NV fixed at compile time.
template <template <int> class Op, typename... Args>
inline void blocks(int64_t n, Args&&... args) {
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

// dst[j][i] = epilogue(mask[j][i] + sum_e a[j * a_stride + e] * bt[e][i], j, i)   (j < n rows, i in the block,
// in vectors of 8 queries starting at i). a: n rows of `depth` scalars with row stride a_stride; bt: (depth, n);
// mask may be null. The epilogue turns the row of products into what is stored while it is in registers.
template <int NV>
struct RowsTimesTransposed {
  template <typename Epilogue>
  static void run(int64_t i0, const float* a, int64_t a_stride, const float* bt, const float* mask, float* dst,
                  int64_t n, int64_t depth, const Epilogue& epilogue) {
    for (int64_t j = 0; j < n; ++j) {
      const float* arow = a + j * a_stride;
      v8 acc[NV];
      for (int k = 0; k < NV; ++k) acc[k] = mask ? load(mask + j * n + i0 + k * kLanes) : splat(0.f);
      for (int64_t e = 0; e < depth; ++e) {
        const v8 s = splat(arow[e]);
        const float* brow = bt + e * n + i0;
        for (int k = 0; k < NV; ++k) acc[k] += s * load(brow + k * kLanes);
      }
      for (int k = 0; k < NV; ++k) store(dst + j * n + i0 + k * kLanes, epilogue(acc[k], j, i0 + k * kLanes));
    }
  }
};

struct Identity {
  v8 operator()(v8 x, int64_t, int64_t) const { return x; }
};

template <typename Epilogue = Identity>
inline void rows_times_transposed(const float* a, int64_t a_stride, const float* bt, const float* mask, float* dst,
                                  int64_t n, int64_t depth, const Epilogue& epilogue = Epilogue()) {
  blocks<RowsTimesTransposed>(n, a, a_stride, bt, mask, dst, n, depth, epilogue);
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

inline void transposed_times_rows(const float* a, int64_t a_stride, const float* pt, float* dst, int64_t n,
                                  int64_t depth) {
  blocks<TransposedTimesRows>(n, a, a_stride, pt, dst, n, depth);
}

// out[j * out_stride + e] = sum_i x[j][i] * yt[e][i]   (j < n, e < depth): dot products along the queries.
// For n <= 64 a row of x stays in NV registers while it meets every row of yt.
template <int NV>
struct RowsDotRows {
  static void run(const float* x, const float* yt, float* out, int64_t out_stride, int64_t n, int64_t depth) {
    for (int64_t j = 0; j < n; ++j) {
      v8 xr[NV];
      for (int k = 0; k < NV; ++k) xr[k] = load(x + j * n + k * kLanes);
      int64_t e = 0;
      for (; e + 4 <= depth; e += 4) {  // four outputs at a time, reduced together
        const float* y0 = yt + e * n;
        v8 a0 = xr[0] * load(y0), a1 = xr[0] * load(y0 + n), a2 = xr[0] * load(y0 + 2 * n),
           a3 = xr[0] * load(y0 + 3 * n);
        for (int k = 1; k < NV; ++k) {
          a0 += xr[k] * load(y0 + k * kLanes);
          a1 += xr[k] * load(y0 + n + k * kLanes);
          a2 += xr[k] * load(y0 + 2 * n + k * kLanes);
          a3 += xr[k] * load(y0 + 3 * n + k * kLanes);
        }
        hsum4(a0, a1, a2, a3, out + j * out_stride + e);
      }
      for (; e < depth; ++e) {
        const float* yrow = yt + e * n;
        v8 acc = xr[0] * load(yrow);
        for (int k = 1; k < NV; ++k) acc += xr[k] * load(yrow + k * kLanes);
        out[j * out_stride + e] = hsum(acc);
      }
    }
  }
};

inline void rows_dot_rows(const float* x, const float* yt, float* out, int64_t out_stride, int64_t n, int64_t depth) {
  switch (n / kLanes) {
    case 8: return RowsDotRows<8>::run(x, yt, out, out_stride, n, depth);
    case 4: return RowsDotRows<4>::run(x, yt, out, out_stride, n, depth);
    case 2: return RowsDotRows<2>::run(x, yt, out, out_stride, n, depth);
    case 1: return RowsDotRows<1>::run(x, yt, out, out_stride, n, depth);
    default: break;
  }
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
      out[j * out_stride + e] = hsum(acc0 + acc1);
    }
  }
}

// qt[e][i] = scale * q[i][e] for one window and head (q rows with stride c3).
inline void gather_transposed(const float* q, int64_t c3, float* qt, int64_t n, int64_t d, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < d; ++e) qt[e * n + i] = q[i * c3 + e] * scale;
  }
}

// Scratch floats that forward_pair / backward_pair need for n tokens and head dimension d.
inline int64_t forward_scratch(int64_t n, int64_t d) { return n * n + 2 * d * n + 4 * n; }
inline int64_t backward_scratch(int64_t n, int64_t d) { return 2 * n * n + 3 * d * n + 2 * n; }

// One (window, head): base points at q of this head in the window's first qkv row (row stride c3, k at
// +c, v at +2c); mask_t (n, n) transposed; out at this head's first output column (row stride c);
// stats (2, n) or null.
inline void forward_pair(const float* base, int64_t c, const float* mask_t, float* out, float* stats, int64_t n,
                         int64_t d, float scale, float* scratch) {
  const int64_t c3 = 3 * c;
  float* st = scratch;
  float* qt = st + n * n;
  float* ot = qt + d * n;
  float* mx = ot + d * n;
  float* sum = mx + n;
  float* inv = sum + n;
  float* mxl = inv + n;
  gather_transposed(base, c3, qt, n, d, scale);
  for (int64_t i = 0; i < n; i += kLanes) store(mx + i, splat(-__builtin_inff()));
  // S^T = mask^T + K (scale Q)^T, with the running maximum over keys of each query
  rows_times_transposed(base + c, c3, qt, mask_t, st, n, d, [mx](v8 s, int64_t, int64_t i) {
    store(mx + i, vmax(load(mx + i), s));
    return s;
  });
  for (int64_t i = 0; i < n; i += kLanes) {
    store(sum + i, splat(0.f));
    store(mxl + i, load(mx + i) * splat(kLog2e));
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < n; i += kLanes) {
      const v8 e = vexp_shifted(load(st + j * n + i), load(mxl + i));
      store(st + j * n + i, e);
      store(sum + i, load(sum + i) + e);
    }
  }
  for (int64_t i = 0; i < n; i += kLanes) store(inv + i, splat(1.f) / load(sum + i));
  transposed_times_rows(base + 2 * c, c3, st, ot, n, d);  // O^T (unnormalised) = V^T E^T
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < d; ++e) out[i * c + e] = ot[e * n + i] * inv[i];
  }
  if (stats) {
    for (int64_t i = 0; i < n; ++i) {
      stats[i] = mx[i];
      stats[n + i] = inv[i];
    }
  }
}

// The backward of forward_pair. out: this head's forward output (row stride c); grad_out likewise; grad at
// this head's q column of the window's first grad_qkv row (row stride 3c); grad_mask_t (n, n) accumulated, or
// null. The probabilities are recomputed from the stats; delta_i = sum_j P_ij dP_ij is taken as O_i . dO_i
// (the same sum, since O_i = sum_j P_ij v_j), so dS can be formed while each row of dP is in registers.
inline void backward_pair(const float* base, int64_t c, const float* mask_t, const float* stats, const float* out,
                          const float* grad_out, float* grad, float* grad_mask_t, int64_t n, int64_t d, float scale,
                          float* scratch) {
  const int64_t c3 = 3 * c;
  float* pt = scratch;
  float* dst = pt + n * n;
  float* qt = dst + n * n;
  float* got = qt + d * n;
  float* dqt = got + d * n;
  float* delta = dqt + d * n;
  float* mxl = delta + n;
  const float* inv = stats + n;
  for (int64_t i = 0; i < n; ++i) {
    float acc = 0.f;
    for (int64_t e = 0; e < d; ++e) acc += out[i * c + e] * grad_out[i * c + e];
    delta[i] = acc;
  }
  for (int64_t i = 0; i < n; i += kLanes) store(mxl + i, load(stats + i) * splat(kLog2e));
  gather_transposed(base, c3, qt, n, d, scale);
  // P^T = exp(S^T - max) / sum, S^T recomputed as in the forward
  rows_times_transposed(base + c, c3, qt, mask_t, pt, n, d, [mxl, inv](v8 s, int64_t, int64_t i) {
    return vexp_shifted(s, load(mxl + i)) * load(inv + i);
  });
  gather_transposed(grad_out, c, got, n, d, 1.f);  // dO^T
  // dS^T = P^T * (dP^T - delta) with dP^T = V dO^T; the mask gradient is the sum of dS^T
  rows_times_transposed(base + 2 * c, c3, got, nullptr, dst, n, d,
                        [pt, delta, grad_mask_t, n](v8 dp, int64_t j, int64_t i) {
                          const v8 ds = load(pt + j * n + i) * (dp - load(delta + i));
                          if (grad_mask_t) store(grad_mask_t + j * n + i, load(grad_mask_t + j * n + i) + ds);
                          return ds;
                        });
  transposed_times_rows(base + c, c3, dst, dqt, n, d);  // dQ^T / scale = K^T dS^T
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = 0; e < d; ++e) grad[i * c3 + e] = dqt[e * n + i] * scale;
  }
  rows_dot_rows(dst, qt, grad + c, c3, n, d);      // dK = dS^T (scale Q)
  rows_dot_rows(pt, got, grad + 2 * c, c3, n, d);  // dV = P^T dO
}

}  // namespace dtkd_wa
