// CPU kernels of FastSwinIR, fp32, registered as torch operators (namespace dtkd_cpu):
//   window_attention_forward / window_attention_backward: fused window attention (window_attention_kernels.h);
//   layer_norm_forward / layer_norm_backward: LayerNorm over the last dimension (token_kernels.h);
//   linear_rows, linear_gelu / linear_gelu_backward: fully connected layers, and the first layer of an MLP with
//   its GELU (gemm_kernels.h);
//   winograd_f2_input / winograd_f2_output: the transforms of a Winograd F(2x2, 3x3) convolution
//   (winograd_kernels.h), whose products dtkd_arch/cpu_kernels.py runs as one batched GEMM.
// Built on first use by dtkd_arch/cpu_kernels.py (torch.utils.cpp_extension, -O3 -march=native).
//
// Window attention: softmax(q k^T * scale + mask) v for every window and head.
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
// Each window is computed head by head in a core's L1/L2 cache with the scores held transposed,
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
#include <optional>
#include <cstdint>
#include <tuple>
#include <vector>

#include "gemm_kernels.h"
#include "token_kernels.h"
#include "window_attention_kernels.h"
#include "winograd_kernels.h"

namespace {

using namespace dtkd_wa;

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

std::tuple<at::Tensor, at::Tensor> window_attention_forward(const at::Tensor& qkv, const at::Tensor& masks_t,
                                                            const at::Tensor& pattern, int64_t heads, double scale,
                                                            bool keep_stats) {
  const Shape s = check_inputs(qkv, masks_t, pattern, heads);
  const int64_t n = s.n, c = s.c, c3 = 3 * s.c, hh = s.heads;
  at::Tensor out = at::empty({s.windows * n, c}, qkv.options());
  at::Tensor stats = keep_stats ? at::empty({s.windows, hh, 2, n}, qkv.options()) : at::empty({0}, qkv.options());
  const float* qkv_p = qkv.const_data_ptr<float>();
  const float* mask_p = masks_t.const_data_ptr<float>();
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  float* out_p = out.data_ptr<float>();
  float* stats_p = keep_stats ? stats.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, s.windows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(forward_scratch(n, c));
    for (int64_t w = begin; w < end; ++w) {
      forward_window(qkv_p + w * n * c3, c, hh, mask_p + pat[w] * hh * n * n, out_p + w * n * c,
                     stats_p ? stats_p + w * hh * 2 * n : nullptr, n, sc, scratch.data());
    }
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                             const at::Tensor& masks_t, const at::Tensor& pattern,
                                                             const at::Tensor& stats, const at::Tensor& out,
                                                             int64_t heads, double scale, bool mask_grad) {
  const Shape s = check_inputs(qkv, masks_t, pattern, heads);
  const int64_t n = s.n, c = s.c, c3 = 3 * s.c, hh = s.heads;
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() && grad_out.dim() == 2 &&
                  grad_out.size(0) == s.windows * n && grad_out.size(1) == c,
              "dtkd_cpu window attention backward: contiguous float32 grad_out of shape (", s.windows * n, ", ", c,
              ") expected, got ", grad_out.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == s.windows * hh * 2 * n,
              "dtkd_cpu window attention backward: stats of the forward expected");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == grad_out.sizes(),
              "dtkd_cpu window attention backward: the forward's output expected");
  at::Tensor grad_qkv = at::empty_like(qkv);
  const int64_t threads = at::get_num_threads();
  const int64_t mask_numel = masks_t.numel();
  at::Tensor grad_masks_per_thread =
      mask_grad ? at::zeros({threads, mask_numel}, qkv.options()) : at::empty({0}, qkv.options());
  const float* qkv_p = qkv.const_data_ptr<float>();
  const float* mask_p = masks_t.const_data_ptr<float>();
  const int64_t* pat = pattern.const_data_ptr<int64_t>();
  const float* go_p = grad_out.const_data_ptr<float>();
  const float* out_p = out.const_data_ptr<float>();
  const float* stats_p = stats.const_data_ptr<float>();
  float* gq_p = grad_qkv.data_ptr<float>();
  float* gm_p = mask_grad ? grad_masks_per_thread.data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, s.windows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(backward_scratch(n, c));
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t mask_offset = pat[w] * hh * n * n;
      backward_window(qkv_p + w * n * c3, c, hh, mask_p + mask_offset, stats_p + w * hh * 2 * n, out_p + w * n * c,
                      go_p + w * n * c, gq_p + w * n * c3, gm_p ? gm_p + tid * mask_numel + mask_offset : nullptr, n,
                      sc, scratch.data());
    }
  });
  at::Tensor grad_masks = mask_grad ? grad_masks_per_thread.sum(0).view(masks_t.sizes()) : at::empty({0}, qkv.options());
  return {grad_qkv, grad_masks};
}


// ---- LayerNorm over the last dimension, (rows, c) ----

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "dtkd_cpu ", what, ": a contiguous float32 CPU tensor (rows, channels) expected, got ", x.sizes());
}

const float* optional_vector(const std::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == c, "dtkd_cpu ", what,
              ": a contiguous float32 vector of ", c, " values expected");
  return t->const_data_ptr<float>();
}

constexpr int64_t kRowGrain = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  double eps) {
  check_rows(x, "layer_norm_forward");
  const int64_t rows = x.size(0), c = x.size(1);
  const float* w = optional_vector(weight, c, "layer_norm_forward weight");
  const float* b = optional_vector(bias, c, "layer_norm_forward bias");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options());
  at::Tensor rstd = at::empty({rows}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float *yp = y.data_ptr<float>(), *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    dtkd_tok::layer_norm_rows(xp + begin * c, w, b, e, yp + begin * c, mp + begin, rp + begin, end - begin, c);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   bool weight_grad, bool bias_grad) {
  check_rows(x, "layer_norm_backward");
  check_rows(grad, "layer_norm_backward grad");
  TORCH_CHECK(grad.sizes() == x.sizes(), "dtkd_cpu layer_norm_backward: grad and input shapes differ");
  const int64_t rows = x.size(0), c = x.size(1);
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.is_contiguous() && rstd.is_contiguous(),
              "dtkd_cpu layer_norm_backward: the forward's mean and rstd expected");
  const float* w = optional_vector(weight, c, "layer_norm_backward weight");
  at::Tensor dx = at::empty_like(x);
  const int64_t threads = at::get_num_threads();
  const bool partials = weight_grad || bias_grad;
  at::Tensor sums = partials ? at::zeros({threads, 2, c}, x.options()) : at::empty({0}, x.options());
  const float *gp = grad.const_data_ptr<float>(), *xp = x.const_data_ptr<float>();
  const float *mp = mean.const_data_ptr<float>(), *rp = rstd.const_data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* sp = partials ? sums.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    float* part = sp ? sp + std::min<int64_t>(at::get_thread_num(), threads - 1) * 2 * c : nullptr;
    dtkd_tok::layer_norm_backward_rows(gp + begin * c, xp + begin * c, mp + begin, rp + begin, w, dxp + begin * c,
                                       weight_grad ? part : nullptr, bias_grad ? part + c : nullptr, end - begin,
                                       c);
  });
  at::Tensor total = partials ? sums.sum(0) : at::empty({0}, x.options());
  at::Tensor dw = weight_grad ? total[0] : at::empty({0}, x.options());
  at::Tensor db = bias_grad ? total[1] : at::empty({0}, x.options());
  return {dx, dw, db};
}


// ---- Fully connected layers over token rows, and a first MLP layer with its GELU (gemm_kernels.h) ----
//   linear_rows(x (m, k), weight (n, k), bias) -> x weight^T + bias
//   linear_gelu(x, weight, bias, keep) -> (h, gelu(h)) with h = x weight^T + bias (GELU, exact form); h is empty
//     unless keep (the backward needs it)
//   linear_gelu_backward(g (m, k), weight (n, k), h (m, n)) -> (g weight^T) * gelu'(h)

struct Packed {
  std::vector<float> data;
  const float* panels;
  const float* bias;
};

Packed pack_weight(const at::Tensor& x, const at::Tensor& weight, const float* bias, const char* what) {
  check_rows(x, what);
  check_rows(weight, what);
  TORCH_CHECK(weight.size(1) == x.size(1), "dtkd_cpu ", what, ": weight ", weight.sizes(), " does not match ",
              x.size(1), " input features");
  const int64_t n = weight.size(0), k = weight.size(1), np = dtkd_gemm::panels(n);
  Packed p;
  p.data.resize(np * k * dtkd_gemm::kPanel + np * dtkd_gemm::kPanel);
  float* bp = p.data.data();
  float* bias_p = bp + np * k * dtkd_gemm::kPanel;
  dtkd_gemm::pack(weight.const_data_ptr<float>(), bias, n, k, bp, bias_p);
  p.panels = bp;
  p.bias = bias_p;
  return p;
}

template <typename Epilogue>
void run_rows(const at::Tensor& x, const at::Tensor& weight, const Packed& p, const Epilogue& epilogue) {
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const float* xp = x.const_data_ptr<float>();
  const int64_t chunks = (m + dtkd_gemm::kTaskRows - 1) / dtkd_gemm::kTaskRows;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    dtkd_gemm::rows(xp, k, p.panels, p.bias, n, k, begin * dtkd_gemm::kTaskRows,
                    std::min(m, end * dtkd_gemm::kTaskRows), epilogue);
  });
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const Packed p = pack_weight(x, weight, optional_vector(bias, weight.size(0), "linear_rows bias"), "linear_rows");
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  run_rows(x, weight, p, dtkd_gemm::StoreProducts{out.data_ptr<float>(), weight.size(0)});
  return out;
}

std::tuple<at::Tensor, at::Tensor> linear_gelu(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, bool keep_pre_activation) {
  const Packed p = pack_weight(x, weight, optional_vector(bias, weight.size(0), "linear_gelu bias"), "linear_gelu");
  const int64_t n = weight.size(0);
  at::Tensor a = at::empty({x.size(0), n}, x.options());
  if (!keep_pre_activation) {
    run_rows(x, weight, p, dtkd_gemm::StoreGeluOnly{a.data_ptr<float>(), n});
    return {at::empty({0}, x.options()), a};
  }
  at::Tensor h = at::empty_like(a);
  run_rows(x, weight, p, dtkd_gemm::StoreGelu{h.data_ptr<float>(), a.data_ptr<float>(), n});
  return {h, a};
}

at::Tensor linear_gelu_backward(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& h) {
  const Packed p = pack_weight(g, weight, nullptr, "linear_gelu_backward");
  check_rows(h, "linear_gelu_backward h");
  TORCH_CHECK(h.size(0) == g.size(0) && h.size(1) == weight.size(0), "dtkd_cpu linear_gelu_backward: h ", h.sizes(),
              " does not match (", g.size(0), ", ", weight.size(0), ")");
  at::Tensor dh = at::empty_like(h);
  run_rows(g, weight, p, dtkd_gemm::StoreGeluGradient{h.const_data_ptr<float>(), dh.data_ptr<float>(), h.size(1)});
  return dh;
}

// ---- Winograd F(2x2, 3x3) transforms, one image and a block of tile rows at a time ----
//   x    (N, C, H, W)        input, contiguous float32
//   v    (16, C, rows * tw)  transformed input tiles of tile rows [row0, row0 + rows) of image n
//   m    (16, Co, rows * tw) their products with the transformed filters
//   out  (N, Co, H, W)       output rows 2 * row0 .. 2 * (row0 + rows) - 1 of image n (inside the image)
// with tw = ceil(W / 2) tiles per row and ceil(H / 2) tile rows.

void check_planes(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.is_contiguous(),
              "dtkd_cpu ", what, ": a contiguous float32 CPU tensor (N, C, H, W) expected, got ", t.sizes());
}

void check_tiles(const at::Tensor& t, int64_t channels, int64_t tiles, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 &&
                  t.size(0) == 16 && t.size(1) == channels && t.size(2) == tiles,
              "dtkd_cpu ", what, ": a contiguous float32 tensor (16, ", channels, ", ", tiles, ") expected, got ",
              t.sizes());
}

void check_block(const at::Tensor& planes, int64_t image, int64_t row0, int64_t rows, const char* what) {
  const int64_t th = (planes.size(2) + 1) / 2;
  TORCH_CHECK(image >= 0 && image < planes.size(0) && row0 >= 0 && rows > 0 && row0 + rows <= th, "dtkd_cpu ",
              what, ": image ", image, ", tile rows [", row0, ", ", row0 + rows, ") outside ", planes.size(0),
              " images of ", th, " tile rows");
}

void winograd_f2_input(const at::Tensor& x, int64_t image, int64_t row0, int64_t rows, const at::Tensor& v) {
  check_planes(x, "winograd_f2_input");
  check_block(x, image, row0, rows, "winograd_f2_input");
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3), tw = (w + 1) / 2, tiles = rows * tw;
  check_tiles(v, c, tiles, "winograd_f2_input v");
  const float* xp = x.const_data_ptr<float>() + image * c * h * w;
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dtkd_wg::input_scratch(tw));
    for (int64_t ci = begin; ci < end; ++ci) {
      dtkd_wg::input_rows(xp + ci * h * w, h, w, row0, rows, tw, vp + ci * tiles, c * tiles, scratch.data());
    }
  });
}

void winograd_f2_output(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t image, int64_t row0,
                        int64_t rows, const at::Tensor& out) {
  check_planes(out, "winograd_f2_output out");
  check_block(out, image, row0, rows, "winograd_f2_output");
  const int64_t co = out.size(1), h = out.size(2), w = out.size(3), tw = (w + 1) / 2, tiles = rows * tw;
  check_tiles(m, co, tiles, "winograd_f2_output m");
  const float* b = optional_vector(bias, co, "winograd_f2_output bias");
  const float* mp = m.const_data_ptr<float>();
  float* op = out.data_ptr<float>() + image * co * h * w;
  at::parallel_for(0, co, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dtkd_wg::output_scratch(tw));
    for (int64_t o = begin; o < end; ++o) {
      dtkd_wg::output_rows(mp + o * tiles, co * tiles, b ? b[o] : 0.f, op + o * h * w, h, w, row0, rows, tw,
                           scratch.data());
    }
  });
}

}  // namespace

TORCH_LIBRARY(dtkd_cpu, m) {
  m.def("window_attention_forward(Tensor qkv, Tensor masks_t, Tensor pattern, int heads, float scale, "
        "bool keep_stats) -> (Tensor, Tensor)");
  m.def("window_attention_backward(Tensor grad_out, Tensor qkv, Tensor masks_t, Tensor pattern, Tensor stats, "
        "Tensor out, int heads, float scale, bool mask_grad) -> (Tensor, Tensor)");
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, bool weight_grad, "
        "bool bias_grad) -> (Tensor, Tensor, Tensor)");
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_gelu(Tensor x, Tensor weight, Tensor? bias, bool keep_pre_activation) -> (Tensor, Tensor)");
  m.def("linear_gelu_backward(Tensor grad, Tensor weight, Tensor h) -> Tensor");
  m.def("winograd_f2_input(Tensor x, int image, int row0, int rows, Tensor(a!) v) -> ()");
  m.def("winograd_f2_output(Tensor m, Tensor? bias, int image, int row0, int rows, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(dtkd_cpu, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("window_attention_forward", &window_attention_forward);
  m.impl("window_attention_backward", &window_attention_backward);
  m.impl("linear_rows", &linear_rows);
  m.impl("linear_gelu", &linear_gelu);
  m.impl("linear_gelu_backward", &linear_gelu_backward);
  m.impl("winograd_f2_input", &winograd_f2_input);
  m.impl("winograd_f2_output", &winograd_f2_output);
}
