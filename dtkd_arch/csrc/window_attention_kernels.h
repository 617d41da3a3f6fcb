// Window attention kernels for one window (all its heads), fp32, without any dependency on torch: included by
// cpu_kernels.cpp (the torch operators) and usable on their own. See cpu_kernels.cpp for the layout.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dtkd_wa {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));

constexpr int kLanes = 8;

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

// The products below are tiled into register blocks: a few rows of the output times one or two vectors of 8
// queries, so that every value loaded from memory (a broadcast scalar or a vector) feeds several FMAs and
// the accumulators of a block (at most 12) stay in the 16 vector registers of AVX2 with room for the operands.
constexpr int kColumnVectors = 2;  // vectors of queries per column block

// dst[j][i] = epilogue(mask[j][i] + sum_e a[j * a_stride + e] * bt[e][i]) for the rows j0 .. j0 + R - 1 and the
// NV vectors of queries from i0. a: rows of `depth` scalars with row stride a_stride; bt: (depth, n); mask
// may be null. The epilogue turns each vector of products into what is stored while it is in registers.
template <int R, int NV, typename Epilogue>
inline void rows_times_transposed_block(int64_t j0, int64_t i0, const float* a, int64_t a_stride, const float* bt,
                                        const float* mask, float* dst, int64_t n, int64_t depth,
                                        Epilogue& epilogue) {
  v8 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < NV; ++k) acc[r][k] = mask ? load(mask + (j0 + r) * n + i0 + k * kLanes) : splat(0.f);
  }
  for (int64_t e = 0; e < depth; ++e) {
    v8 b[NV];
    for (int k = 0; k < NV; ++k) b[k] = load(bt + e * n + i0 + k * kLanes);
    for (int r = 0; r < R; ++r) {
      const v8 s = splat(a[(j0 + r) * a_stride + e]);
      for (int k = 0; k < NV; ++k) acc[r][k] += s * b[k];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < NV; ++k) {
      store(dst + (j0 + r) * n + i0 + k * kLanes, epilogue.apply(acc[r][k], j0 + r, k));
    }
  }
}

template <int R, int NV, typename Epilogue>
inline void rows_times_transposed_columns(int64_t i0, const float* a, int64_t a_stride, const float* bt,
                                          const float* mask, float* dst, int64_t n, int64_t depth,
                                          Epilogue& epilogue) {
  epilogue.template begin<NV>(i0);
  int64_t j = 0;
  for (; j + R <= n; j += R) rows_times_transposed_block<R, NV>(j, i0, a, a_stride, bt, mask, dst, n, depth, epilogue);
  for (; j < n; ++j) rows_times_transposed_block<1, NV>(j, i0, a, a_stride, bt, mask, dst, n, depth, epilogue);
  epilogue.template end<NV>(i0);
}

// The whole (n, n) product, column block by column block: the epilogue's begin<NV>(i0) and end<NV>(i0)
// bracket the rows of a block, so it can hold per-query values (a running maximum, say) in registers.
// R rows per register block (R * kColumnVectors accumulators).
template <int R, typename Epilogue>
inline void rows_times_transposed(const float* a, int64_t a_stride, const float* bt, const float* mask, float* dst,
                                  int64_t n, int64_t depth, Epilogue& epilogue) {
  int64_t i0 = 0;
  for (; i0 + kColumnVectors * kLanes <= n; i0 += kColumnVectors * kLanes) {
    rows_times_transposed_columns<R, kColumnVectors>(i0, a, a_stride, bt, mask, dst, n, depth, epilogue);
  }
  for (; i0 < n; i0 += kLanes) rows_times_transposed_columns<R, 1>(i0, a, a_stride, bt, mask, dst, n, depth, epilogue);
}

// Epilogue base: stores the products unchanged, no per-block state.
struct Plain {
  template <int NV>
  void begin(int64_t) {}
  template <int NV>
  void end(int64_t) {}
  v8 apply(v8 x, int64_t, int) const { return x; }
};

// dst[e][i] = sum_j a[j * a_stride + e] * pt[j][i] for e0 <= e < e0 + E and the NV vectors of queries from i0:
// the product A^T P^T, E outputs rows at a time.
template <int E, int NV>
inline void transposed_times_rows_block(int64_t e0, int64_t i0, const float* a, int64_t a_stride, const float* pt,
                                        float* dst, int64_t n) {
  v8 acc[E][NV];
  for (int r = 0; r < E; ++r) {
    for (int k = 0; k < NV; ++k) acc[r][k] = splat(0.f);
  }
  for (int64_t j = 0; j < n; ++j) {
    v8 p[NV];
    for (int k = 0; k < NV; ++k) p[k] = load(pt + j * n + i0 + k * kLanes);
    for (int r = 0; r < E; ++r) {
      const v8 s = splat(a[j * a_stride + e0 + r]);
      for (int k = 0; k < NV; ++k) acc[r][k] += s * p[k];
    }
  }
  for (int r = 0; r < E; ++r) {
    for (int k = 0; k < NV; ++k) store(dst + (e0 + r) * n + i0 + k * kLanes, acc[r][k]);
  }
}

constexpr int kOutputRows = 5;  // output rows per block of transposed_times_rows (10 accumulators)

template <int NV>
inline void transposed_times_rows_columns(int64_t i0, const float* a, int64_t a_stride, const float* pt, float* dst,
                                          int64_t n, int64_t depth) {
  int64_t e = 0;
  for (; e + kOutputRows <= depth; e += kOutputRows) {
    transposed_times_rows_block<kOutputRows, NV>(e, i0, a, a_stride, pt, dst, n);
  }
  for (; e < depth; ++e) transposed_times_rows_block<1, NV>(e, i0, a, a_stride, pt, dst, n);
}

inline void transposed_times_rows(const float* a, int64_t a_stride, const float* pt, float* dst, int64_t n,
                                  int64_t depth) {
  int64_t i0 = 0;
  for (; i0 + kColumnVectors * kLanes <= n; i0 += kColumnVectors * kLanes) {
    transposed_times_rows_columns<kColumnVectors>(i0, a, a_stride, pt, dst, n, depth);
  }
  for (; i0 < n; i0 += kLanes) transposed_times_rows_columns<1>(i0, a, a_stride, pt, dst, n, depth);
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

// The eight rows of an 8 x 8 block transposed in registers (unpack, shuffle and 128-bit lane permutes).
inline void transpose8(v8 r[8]) {
  v8 t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = DTKD_SHUFFLE2(r[2 * k], r[2 * k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * k + 1] = DTKD_SHUFFLE2(r[2 * k], r[2 * k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int k = 0; k < 2; ++k) {
    for (int h = 0; h < 2; ++h) {
      const v8 a = t[4 * k + h], b = t[4 * k + h + 2];
      u[4 * k + 2 * h] = DTKD_SHUFFLE2(a, b, 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * k + 2 * h + 1] = DTKD_SHUFFLE2(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = DTKD_SHUFFLE2(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[k + 4] = DTKD_SHUFFLE2(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// dst[j * dst_stride + i] = scale * src[i * src_stride + j] for i < rows, j < cols: 8 x 8 blocks in registers,
// scalar edges.
inline void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
                      int64_t cols, float scale) {
  const int64_t rows8 = rows - rows % kLanes, cols8 = cols - cols % kLanes;
  const v8 sc = splat(scale);
  for (int64_t i = 0; i < rows8; i += kLanes) {
    for (int64_t j = 0; j < cols8; j += kLanes) {
      v8 r[8];
      for (int k = 0; k < 8; ++k) r[k] = load(src + (i + k) * src_stride + j);
      transpose8(r);
      for (int k = 0; k < 8; ++k) store(dst + (j + k) * dst_stride + i, r[k] * sc);
    }
    for (int64_t j = cols8; j < cols; ++j) {
      for (int64_t k = i; k < i + kLanes; ++k) dst[j * dst_stride + k] = src[k * src_stride + j] * scale;
    }
  }
  for (int64_t i = rows8; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * src_stride + j] * scale;
  }
}

// Scratch floats that forward_window / backward_window need for n tokens and c channels.
inline int64_t forward_scratch(int64_t n, int64_t c) { return n * n + 2 * c * n + 2 * n; }
inline int64_t backward_scratch(int64_t n, int64_t c) { return 2 * n * n + 4 * c * n + 2 * n; }

// Epilogue of the forward scores: the running maximum over keys of each query, held in registers for a
// column block and stored into mx at its end.
struct RunningMax : Plain {
  float* mx;
  v8 m[kColumnVectors];
  explicit RunningMax(float* maxima) : mx(maxima) {}
  template <int NV>
  void begin(int64_t) {
    for (int k = 0; k < NV; ++k) m[k] = splat(-__builtin_inff());
  }
  template <int NV>
  void end(int64_t i0) {
    for (int k = 0; k < NV; ++k) store(mx + i0 + k * kLanes, m[k]);
  }
  v8 apply(v8 s, int64_t, int k) {
    m[k] = vmax(m[k], s);
    return s;
  }
};

// Epilogue of the backward's recomputed probabilities: P^T = exp(S^T - max) / sum from the forward's stats.
struct Probabilities : Plain {
  const float *mx_log2e, *inv;
  v8 m[kColumnVectors], v[kColumnVectors];
  Probabilities(const float* maxima_log2e, const float* inverse_sums) : mx_log2e(maxima_log2e), inv(inverse_sums) {}
  template <int NV>
  void begin(int64_t i0) {
    for (int k = 0; k < NV; ++k) {
      m[k] = load(mx_log2e + i0 + k * kLanes);
      v[k] = load(inv + i0 + k * kLanes);
    }
  }
  v8 apply(v8 s, int64_t, int k) const { return vexp_shifted(s, m[k]) * v[k]; }
};

// Epilogue of the backward's score gradients: dS^T = P^T * (dP^T - delta), added to grad_mask_t (when not null).
struct ScoreGradients : Plain {
  const float *pt, *delta;
  float* grad_mask_t;
  int64_t n, i0 = 0;
  v8 dl[kColumnVectors];
  ScoreGradients(const float* p, const float* d, float* gm, int64_t tokens) : pt(p), delta(d), grad_mask_t(gm), n(tokens) {}
  template <int NV>
  void begin(int64_t i) {
    i0 = i;
    for (int k = 0; k < NV; ++k) dl[k] = load(delta + i0 + k * kLanes);
  }
  v8 apply(v8 dp, int64_t j, int k) const {
    const int64_t o = j * n + i0 + k * kLanes;
    const v8 ds = load(pt + o) * (dp - dl[k]);
    if (grad_mask_t) store(grad_mask_t + o, load(grad_mask_t + o) + ds);
    return ds;
  }
};

// One window, all its heads. qkv: the window's first qkv row (row stride 3c; q, k, v at columns 0, c, 2c, head h at
// h * d); masks_t (heads, n, n), each transposed; out: the window's first output row (row stride c); stats
// (heads, 2, n) or null. Each head is computed with its scores transposed (see above); the queries and the
// outputs of all heads are transposed once per window, in 8 x 8 register blocks.
inline void forward_window(const float* qkv, int64_t c, int64_t heads, const float* masks_t, float* out, float* stats,
                           int64_t n, float scale, float* scratch) {
  const int64_t c3 = 3 * c, d = c / heads;
  float* st = scratch;
  float* qt = st + n * n;   // (c, n): scale * q^T
  float* ot = qt + c * n;   // (c, n): O^T
  float* mx = ot + c * n;
  float* inv = mx + n;
  transpose(qkv, c3, qt, n, n, c, scale);
  for (int64_t h = 0; h < heads; ++h) {
    float* oth = ot + h * d * n;
    // S^T = mask^T + K (scale Q)^T, with the maximum over keys of each query
    RunningMax running_max(mx);
    rows_times_transposed<5>(qkv + c + h * d, c3, qt + h * d * n, masks_t + h * n * n, st, n, d, running_max);
    // E^T = exp(S^T - max) in place, and 1 / (sum over keys) per query; two rows at a time (two sum chains)
    for (int64_t i = 0; i < n; i += kLanes) {
      const v8 ml = load(mx + i) * splat(kLog2e);
      v8 s0 = splat(0.f), s1 = splat(0.f);
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        const v8 e0 = vexp_shifted(load(st + j * n + i), ml);
        const v8 e1 = vexp_shifted(load(st + (j + 1) * n + i), ml);
        store(st + j * n + i, e0);
        store(st + (j + 1) * n + i, e1);
        s0 += e0;
        s1 += e1;
      }
      for (; j < n; ++j) {
        const v8 e0 = vexp_shifted(load(st + j * n + i), ml);
        store(st + j * n + i, e0);
        s0 += e0;
      }
      store(inv + i, splat(1.f) / (s0 + s1));
    }
    transposed_times_rows(qkv + 2 * c + h * d, c3, st, oth, n, d);  // O^T (unnormalised) = V^T E^T
    for (int64_t e = 0; e < d; ++e) {
      for (int64_t i = 0; i < n; i += kLanes) store(oth + e * n + i, load(oth + e * n + i) * load(inv + i));
    }
    if (stats) {
      for (int64_t i = 0; i < n; ++i) {
        stats[h * 2 * n + i] = mx[i];
        stats[h * 2 * n + n + i] = inv[i];
      }
    }
  }
  transpose(ot, n, out, c, c, n, 1.f);
}

// The backward of forward_window. out, grad_out: the window's forward output and its gradient (row stride c);
// grad: the window's first grad_qkv row (row stride 3c); grad_masks_t (heads, n, n) accumulated, or null.
// The probabilities are recomputed from the stats; delta_i = sum_j P_ij dP_ij is taken as O_i . dO_i (the
// same sum, since O_i = sum_j P_ij v_j), so dS can be formed while each row of dP is in registers.
inline void backward_window(const float* qkv, int64_t c, int64_t heads, const float* masks_t, const float* stats,
                            const float* out, const float* grad_out, float* grad, float* grad_masks_t, int64_t n,
                            float scale, float* scratch) {
  const int64_t c3 = 3 * c, d = c / heads;
  float* pt = scratch;
  float* dst = pt + n * n;
  float* qt = dst + n * n;  // (c, n): scale * q^T
  float* got = qt + c * n;  // (c, n): dO^T
  float* ot = got + c * n;  // (c, n): O^T
  float* dqt = ot + c * n;  // (c, n): dQ^T / scale
  float* delta = dqt + c * n;
  float* mxl = delta + n;
  transpose(qkv, c3, qt, n, n, c, scale);
  transpose(grad_out, c, got, n, n, c, 1.f);
  transpose(out, c, ot, n, n, c, 1.f);
  for (int64_t h = 0; h < heads; ++h) {
    const float* qth = qt + h * d * n;
    const float* goth = got + h * d * n;
    const float* sh = stats + h * 2 * n;
    for (int64_t i = 0; i < n; i += kLanes) {
      v8 acc = splat(0.f);
      for (int64_t e = 0; e < d; ++e) acc += load(ot + (h * d + e) * n + i) * load(goth + e * n + i);
      store(delta + i, acc);
      store(mxl + i, load(sh + i) * splat(kLog2e));
    }
    // P^T = exp(S^T - max) / sum, S^T recomputed as in the forward
    Probabilities probabilities(mxl, sh + n);
    rows_times_transposed<4>(qkv + c + h * d, c3, qth, masks_t + h * n * n, pt, n, d, probabilities);
    // dS^T = P^T * (dP^T - delta) with dP^T = V dO^T; the mask gradient is the sum of dS^T
    ScoreGradients score_gradients(pt, delta, grad_masks_t ? grad_masks_t + h * n * n : nullptr, n);
    rows_times_transposed<4>(qkv + 2 * c + h * d, c3, goth, nullptr, dst, n, d, score_gradients);
    transposed_times_rows(qkv + c + h * d, c3, dst, dqt + h * d * n, n, d);  // dQ^T / scale = K^T dS^T
    rows_dot_rows(dst, qth, grad + c + h * d, c3, n, d);       // dK = dS^T (scale Q)
    rows_dot_rows(pt, goth, grad + 2 * c + h * d, c3, n, d);   // dV = P^T dO
  }
  transpose(dqt, n, grad, c3, c, n, scale);
}

}  // namespace dtkd_wa
