// Winograd F(2x2, 3x3) transforms for 3x3 convolutions, stride 1, padding 1 (Lavin and Gray, "Fast
// Algorithms for Convolutional Neural Networks", CVPR 2016), fp32, one channel plane at a time.
//
// The output is cut into 2x2 tiles; tile (r, j) reads the 4x4 input patch at rows 2r-1 .. 2r+2 and
// columns 2j-1 .. 2j+2 (zeros outside the image). With d that patch, g a 3x3 filter and
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// the tile is Y = A^T [(G g G^T) . (B^T d B)] A, so that for every one of the 16 positions p of the
// 4x4 transformed tile the sum over input channels is one matrix product (caller's GEMM):
//   M[p][co][t] = sum_ci U[p][co][ci] V[p][ci][t],   U = G g G^T,  V = B^T d B,
// with t the tile index. These functions compute V for tile rows [row0, row0 + rows) of one input
// plane, and Y (plus the bias) from M for one output plane. The coefficients are 0, +-1 and +-1/2,
// so the transforms add no rounding beyond their sums: measured against float64, the result is as
// close as a direct fp32 convolution's (closer, in tests/test_cpu_kernels.py).
// The loops run along the tiles of a row, which the compiler vectorises.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

namespace dtkd_wg {

// scratch for input_rows: 2 * tw + 2 + 16 * tw floats
inline int64_t input_scratch(int64_t tw) { return 2 * tw + 2 + 16 * tw; }

// The column half of the input transform for one input row (d B along the row): with d_l(j) = x[2j - 1 + l]
// (zero outside the row), u0 = d0 - d2, u1 = d1 + d2, u2 = d2 - d1, u3 = d1 - d3 for every tile j.
// buf: 2 * tw + 2 floats; u: 4 arrays of tw floats.
inline void row_transform(const float* __restrict row, int64_t w, int64_t tw, float* __restrict buf,
                          float* __restrict u) {
  buf[0] = 0.f;
  std::memcpy(buf + 1, row, sizeof(float) * w);
  for (int64_t x = w + 1; x < 2 * tw + 2; ++x) buf[x] = 0.f;
  float* __restrict u0 = u;
  float* __restrict u1 = u + tw;
  float* __restrict u2 = u + 2 * tw;
  float* __restrict u3 = u + 3 * tw;
  for (int64_t j = 0; j < tw; ++j) {
    const float d0 = buf[2 * j], d1 = buf[2 * j + 1], d2 = buf[2 * j + 2], d3 = buf[2 * j + 3];
    u0[j] = d0 - d2;
    u1[j] = d1 + d2;
    u2[j] = d2 - d1;
    u3[j] = d1 - d3;
  }
}

// plane: (h, w) input channel; v: position p of tile t at v[p * pstride + t], t = (r - row0) * tw + j.
// Each input row's column transform is computed once and used by both tile rows that read it.
inline void input_rows(const float* __restrict plane, int64_t h, int64_t w, int64_t row0, int64_t rows,
                       int64_t tw, float* __restrict v, int64_t pstride, float* __restrict scratch) {
  float* buf = scratch;
  float* u[4];  // column transforms of input rows 2r - 1 .. 2r + 2 (4 arrays of tw floats each)
  for (int k = 0; k < 4; ++k) u[k] = scratch + 2 * tw + 2 + 4 * k * tw;
  auto load = [&](int64_t y, float* dst) {
    if (y < 0 || y >= h) {
      std::memset(dst, 0, sizeof(float) * 4 * tw);
    } else {
      row_transform(plane + y * w, w, tw, buf, dst);
    }
  };
  for (int64_t r = row0; r < row0 + rows; ++r) {
    if (r == row0) {
      for (int k = 0; k < 4; ++k) load(2 * r - 1 + k, u[k]);
    } else {  // rows 2r - 1, 2r were rows 2 and 3 of the previous tile row
      std::swap(u[0], u[2]);
      std::swap(u[1], u[3]);
      load(2 * r + 1, u[2]);
      load(2 * r + 2, u[3]);
    }
    float* __restrict out = v + (r - row0) * tw;
    // V = B^T u (rows u0 - u2, u1 + u2, u2 - u1, u1 - u3), for each of the four columns b
    for (int b = 0; b < 4; ++b) {
      const float* __restrict a0 = u[0] + b * tw;
      const float* __restrict a1 = u[1] + b * tw;
      const float* __restrict a2 = u[2] + b * tw;
      const float* __restrict a3 = u[3] + b * tw;
      float* __restrict o0 = out + (0 + b) * pstride;
      float* __restrict o1 = out + (4 + b) * pstride;
      float* __restrict o2 = out + (8 + b) * pstride;
      float* __restrict o3 = out + (12 + b) * pstride;
      for (int64_t j = 0; j < tw; ++j) {
        o0[j] = a0[j] - a2[j];
        o1[j] = a1[j] + a2[j];
        o2[j] = a2[j] - a1[j];
        o3[j] = a1[j] - a3[j];
      }
    }
  }
}

// scratch for output_rows: 4 * tw floats
inline int64_t output_scratch(int64_t tw) { return 4 * tw; }

// m: position p of tile t at m[p * pstride + t]; plane: (h, w) output channel, rows 2r, 2r + 1 of tile
// rows [row0, row0 + rows) written (those inside the image), plus bias.
inline void output_rows(const float* __restrict m, int64_t pstride, float bias, float* __restrict plane, int64_t h,
                        int64_t w, int64_t row0, int64_t rows, int64_t tw, float* __restrict scratch) {
  float* __restrict y00 = scratch;
  float* __restrict y01 = scratch + tw;
  float* __restrict y10 = scratch + 2 * tw;
  float* __restrict y11 = scratch + 3 * tw;
  for (int64_t r = row0; r < row0 + rows; ++r) {
    const float* __restrict in = m + (r - row0) * tw;
    for (int64_t j = 0; j < tw; ++j) {
      float q[16];
      for (int p = 0; p < 16; ++p) q[p] = in[p * pstride + j];
      // s = A^T m (rows m0 + m1 + m2, m1 - m2 - m3), then Y = s A (columns the same way)
      const float s00 = q[0] + q[4] + q[8], s01 = q[1] + q[5] + q[9], s02 = q[2] + q[6] + q[10],
                  s03 = q[3] + q[7] + q[11];
      const float s10 = q[4] - q[8] - q[12], s11 = q[5] - q[9] - q[13], s12 = q[6] - q[10] - q[14],
                  s13 = q[7] - q[11] - q[15];
      y00[j] = s00 + s01 + s02 + bias;
      y01[j] = s01 - s02 - s03 + bias;
      y10[j] = s10 + s11 + s12 + bias;
      y11[j] = s11 - s12 - s13 + bias;
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t y = 2 * r + i;
      if (y >= h) break;
      float* __restrict row = plane + y * w;
      const float* __restrict a = i == 0 ? y00 : y10;
      const float* __restrict b = i == 0 ? y01 : y11;
      const int64_t full = w / 2;  // tiles whose two columns are inside the image
      for (int64_t j = 0; j < full; ++j) {
        row[2 * j] = a[j];
        row[2 * j + 1] = b[j];
      }
      if (full < tw) row[2 * full] = a[full];  // odd width: the last tile's left column only
    }
  }
}

}  // namespace dtkd_wg
