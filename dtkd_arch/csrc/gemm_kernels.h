// Matrix products of fully connected layers over many token rows, fp32, without any dependency on torch:
// C (m, n) = A (m, k) B^T + bias, with A's rows contiguous (row stride lda) and B (n, k) row-major, i.e. the
// forward of a linear layer with weight B, or its input gradient with B = weight^T. Made for FastSwinIR's
// layers: many rows, few columns and a short inner dimension (60 to 180); dtkd_arch/cpu_ops.py times it against
// MKL and oneDNN per layer shape and pass and keeps the fastest. Epilogues fuse what follows the product
// (GELU, or the GELU derivative of the backward) while the products are in registers.
//
// B^T is packed once per call into panels of kPanel columns (zero beyond n): bp[(p * k + e) * kPanel + j] =
// B[p * kPanel + j][e]. A micro-kernel keeps a block of R <= kRows rows by kPanel columns of C in 2 * R
// vector registers and runs along k with one broadcast of A and two vectors of the panel per step.
#pragma once

#include <algorithm>
#include <cstdint>

#include "window_attention_kernels.h"

namespace dtkd_gemm {

using dtkd_wa::kLanes;
using dtkd_wa::load;
using dtkd_wa::splat;
using dtkd_wa::store;
using dtkd_wa::v8;

constexpr int kPanel = 2 * kLanes;  // columns of C per micro-kernel (two vectors)
constexpr int kRows = 6;            // rows of C per micro-kernel (12 accumulators)
constexpr int64_t kTaskRows = 96;  // rows per parallel task

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// Packs B (n, k) into panels of B^T (panels(n) * k * kPanel floats) and the bias into panels(n) * kPanel
// floats (zeros without bias).
inline void pack(const float* b, const float* bias, int64_t n, int64_t k, float* bp, float* bias_p) {
  const int64_t np = panels(n);
  for (int64_t p = 0; p < np; ++p) {
    for (int64_t e = 0; e < k; ++e) {
      float* dst = bp + (p * k + e) * kPanel;
      for (int j = 0; j < kPanel; ++j) {
        const int64_t col = p * kPanel + j;
        dst[j] = col < n ? b[col * k + e] : 0.f;
      }
    }
  }
  for (int64_t col = 0; col < np * kPanel; ++col) bias_p[col] = bias && col < n ? bias[col] : 0.f;
}

// Columns [col, col + cols) of one row of C from its two vectors (cols <= kPanel): the last panel of a layer whose
// width is not a multiple of kPanel goes through a buffer (indexing a vector by a run-time lane would keep every
// accumulator in memory instead of registers).
inline void store_columns(float* dst, v8 a0, v8 a1, int64_t cols) {
  if (cols == kPanel) {
    store(dst, a0);
    store(dst + kLanes, a1);
    return;
  }
  float buffer[kPanel];
  store(buffer, a0);
  store(buffer + kLanes, a1);
  for (int64_t j = 0; j < cols; ++j) dst[j] = buffer[j];
}

inline void load_columns(const float* src, v8& a0, v8& a1, int64_t cols) {
  if (cols == kPanel) {
    a0 = load(src);
    a1 = load(src + kLanes);
    return;
  }
  float buffer[kPanel] = {};
  for (int64_t j = 0; j < cols; ++j) buffer[j] = src[j];
  a0 = load(buffer);
  a1 = load(buffer + kLanes);
}

// erf(x) as Abramowitz and Stegun 7.1.26 (|error| <= 1.5e-7, the formula of torch's vectorised CPU erf):
// sign(x) (1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-x^2)), t = 1 / (1 + p |x|). Also returns e^(-x^2).
inline v8 verf(v8 x, v8& gauss) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8i bits = reinterpret_cast<const v8i&>(x);
  const v8i sign = bits & static_cast<int32_t>(0x80000000u);
  const v8i abs_bits = bits & 0x7fffffff;
  const v8 ax = reinterpret_cast<const v8&>(abs_bits);
  const v8 t = splat(1.f) / (splat(0.3275911f) * ax + splat(1.f));
  v8 poly = splat(1.061405429f);
  poly = poly * t + splat(-1.453152027f);
  poly = poly * t + splat(1.421413741f);
  poly = poly * t + splat(-0.284496736f);
  poly = poly * t + splat(0.254829592f);
  gauss = dtkd_wa::vexp2(-(x * x) * splat(dtkd_wa::kLog2e));
  const v8 r = splat(1.f) - poly * t * gauss;
  const v8i rbits = reinterpret_cast<const v8i&>(r) | sign;
  return reinterpret_cast<const v8&>(rbits);
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// GELU (exact form) x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, and its derivative Phi(x) + x phi(x).
inline v8 gelu(v8 x) {
  v8 gauss;
  return splat(0.5f) * x * (splat(1.f) + verf(x * splat(kSqrtHalf), gauss));
}

inline v8 gelu_derivative(v8 x) {
  v8 gauss;  // e^(-x^2 / 2)
  const v8 cdf = splat(0.5f) * (splat(1.f) + verf(x * splat(kSqrtHalf), gauss));
  return cdf + x * gauss * splat(kInvSqrt2Pi);
}

// Epilogues: what a micro-kernel does with a row of its block, columns [col, col + cols).
struct StoreProducts {  // C
  float* c;
  int64_t ldc;
  void operator()(int64_t row, int64_t col, v8 a0, v8 a1, int64_t cols) const {
    store_columns(c + row * ldc + col, a0, a1, cols);
  }
};

struct StoreGelu {  // h = C and a = gelu(C)
  float *h, *a;
  int64_t ld;
  void operator()(int64_t row, int64_t col, v8 a0, v8 a1, int64_t cols) const {
    store_columns(h + row * ld + col, a0, a1, cols);
    store_columns(a + row * ld + col, gelu(a0), gelu(a1), cols);
  }
};

struct StoreGeluOnly {  // gelu(C) (inference: no pre-activation kept for a backward)
  float* a;
  int64_t ld;
  void operator()(int64_t row, int64_t col, v8 a0, v8 a1, int64_t cols) const {
    store_columns(a + row * ld + col, gelu(a0), gelu(a1), cols);
  }
};

struct StoreGeluGradient {  // dh = C * gelu'(h)
  const float* h;
  float* dh;
  int64_t ld;
  void operator()(int64_t row, int64_t col, v8 a0, v8 a1, int64_t cols) const {
    v8 h0, h1;
    load_columns(h + row * ld + col, h0, h1, cols);
    store_columns(dh + row * ld + col, a0 * gelu_derivative(h0), a1 * gelu_derivative(h1), cols);
  }
};

// Rows row0 .. row0 + R - 1, panel columns [col, col + cols) of bias_p[j] + sum_e a[r * lda + e] * panel[e][j],
// handed to the epilogue row by row.
template <int R, typename Epilogue>
inline void micro(const float* a, int64_t lda, const float* panel, const float* bias_p, int64_t k, int64_t row0,
                  int64_t col, int64_t cols, const Epilogue& epilogue) {
  v8 acc[R][2];
  const v8 b0 = load(bias_p), b1 = load(bias_p + kLanes);
  for (int r = 0; r < R; ++r) {
    acc[r][0] = b0;
    acc[r][1] = b1;
  }
  for (int64_t e = 0; e < k; ++e) {
    const v8 w0 = load(panel + e * kPanel), w1 = load(panel + e * kPanel + kLanes);
    for (int r = 0; r < R; ++r) {
      const v8 s = splat(a[r * lda + e]);
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
    }
  }
  for (int r = 0; r < R; ++r) epilogue(row0 + r, col, acc[r][0], acc[r][1], cols);
}

template <int R, typename Epilogue>
inline void micro_panel(const float* a, int64_t lda, const float* bp, const float* bias_p, int64_t n, int64_t k,
                        int64_t row0, int64_t p, const Epilogue& epilogue) {
  const int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
  micro<R>(a + row0 * lda, lda, bp + p * k * kPanel, bias_p + p * kPanel, k, row0, p * kPanel, cols, epilogue);
}

// Rows [row0, row1) of A B^T + bias, from the packed panels, through the epilogue: kRows rows at a time meet every
// panel in turn, so that each row of C is written whole while its lines are in cache (the packed B stays in L2: 46 KiB
// for SwinIR-small's widest layer; dtkd_arch/cpu_ops.py offers the kernel weights of at most 2^17 elements).
template <typename Epilogue>
inline void rows(const float* a, int64_t lda, const float* bp, const float* bias_p, int64_t n, int64_t k,
                 int64_t row0, int64_t row1, const Epilogue& epilogue) {
  const int64_t np = panels(n);
  int64_t r = row0;
  for (; r + kRows <= row1; r += kRows) {
    for (int64_t p = 0; p < np; ++p) micro_panel<kRows>(a, lda, bp, bias_p, n, k, r, p, epilogue);
  }
  for (; r < row1; ++r) {
    for (int64_t p = 0; p < np; ++p) micro_panel<1>(a, lda, bp, bias_p, n, k, r, p, epilogue);
  }
}

}  // namespace dtkd_gemm
