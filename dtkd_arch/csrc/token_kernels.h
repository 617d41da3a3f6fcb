// Token-wise kernels, fp32, without any dependency on torch: LayerNorm over the last dimension, forward and
// backward, for the (tokens, channels) streams of FastSwinIR. The vector type and helpers come from
// window_attention_kernels.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "window_attention_kernels.h"

namespace dtkd_tok {

using dtkd_wa::load;
using dtkd_wa::splat;
using dtkd_wa::store;
using dtkd_wa::v8;
using dtkd_wa::hsum;
constexpr int kLanes = dtkd_wa::kLanes;

// LayerNorm of `rows` rows of c floats: y = (x - mean) * rstd * w + b, with mean and rstd = 1 / sqrt(var + eps)
// (biased variance, two passes over the row, as torch) stored per row. w, b may be null (no affine).
inline void layer_norm_rows(const float* x, const float* w, const float* b, float eps, float* y, float* mean,
                            float* rstd, int64_t rows, int64_t c) {
  const int64_t cv = c - c % kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * c;
    float* yr = y + r * c;
    v8 acc = splat(0.f);
    for (int64_t k = 0; k < cv; k += kLanes) acc += load(xr + k);
    float s = hsum(acc);
    for (int64_t k = cv; k < c; ++k) s += xr[k];
    const float mu = s / static_cast<float>(c);
    acc = splat(0.f);
    for (int64_t k = 0; k < cv; k += kLanes) {
      const v8 dv = load(xr + k) - splat(mu);
      acc += dv * dv;
    }
    float q = hsum(acc);
    for (int64_t k = cv; k < c; ++k) q += (xr[k] - mu) * (xr[k] - mu);
    const float rs = 1.f / std::sqrt(q / static_cast<float>(c) + eps);
    mean[r] = mu;
    rstd[r] = rs;
    for (int64_t k = 0; k < cv; k += kLanes) {
      v8 v = (load(xr + k) - splat(mu)) * splat(rs);
      if (w) v = v * load(w + k);
      if (b) v = v + load(b + k);
      store(yr + k, v);
    }
    for (int64_t k = cv; k < c; ++k) {
      float v = (xr[k] - mu) * rs;
      if (w) v *= w[k];
      if (b) v += b[k];
      yr[k] = v;
    }
  }
}

// The backward of layer_norm_rows: dx = rstd * (g w - mean_k(g w) - xhat * mean_k(g w xhat)), xhat = (x - mean)
// * rstd; dw += g * xhat and db += g summed over the rows (accumulated into dw, db when not null).
inline void layer_norm_backward_rows(const float* g, const float* x, const float* mean, const float* rstd,
                                     const float* w, float* dx, float* dw, float* db, int64_t rows, int64_t c) {
  const int64_t cv = c - c % kLanes;
  const float inv_c = 1.f / static_cast<float>(c);
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * c;
    const float* xr = x + r * c;
    float* dxr = dx + r * c;
    const float mu = mean[r], rs = rstd[r];
    v8 a = splat(0.f), bsum = splat(0.f);
    for (int64_t k = 0; k < cv; k += kLanes) {
      const v8 xh = (load(xr + k) - splat(mu)) * splat(rs);
      const v8 gv = load(gr + k);
      const v8 gw = w ? gv * load(w + k) : gv;
      a += gw;
      bsum += gw * xh;
      if (dw) store(dw + k, load(dw + k) + gv * xh);
      if (db) store(db + k, load(db + k) + gv);
    }
    float as = hsum(a), bs = hsum(bsum);
    for (int64_t k = cv; k < c; ++k) {
      const float xh = (xr[k] - mu) * rs;
      const float gw = w ? gr[k] * w[k] : gr[k];
      as += gw;
      bs += gw * xh;
      if (dw) dw[k] += gr[k] * xh;
      if (db) db[k] += gr[k];
    }
    const float ma = as * inv_c, mb = bs * inv_c;
    for (int64_t k = 0; k < cv; k += kLanes) {
      const v8 xh = (load(xr + k) - splat(mu)) * splat(rs);
      const v8 gv = load(gr + k);
      const v8 gw = w ? gv * load(w + k) : gv;
      store(dxr + k, splat(rs) * (gw - splat(ma) - xh * splat(mb)));
    }
    for (int64_t k = cv; k < c; ++k) {
      const float xh = (xr[k] - mu) * rs;
      const float gw = w ? gr[k] * w[k] : gr[k];
      dxr[k] = rs * (gw - ma - xh * mb);
    }
  }
}

}  // namespace dtkd_tok
