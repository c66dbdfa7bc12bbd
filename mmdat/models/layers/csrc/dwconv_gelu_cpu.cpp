// The hidden map of DAT++'s MLP on CPU: a = gelu(h + dwconv(h) + bias), where dwconv is a K x K
// depthwise convolution (stride 1, zero padding K / 2, DAT++ uses K = 3) and gelu the exact one,
// x * normal_cdf(x).
//
// Layout: h is (B, H, W, C), contiguous (the MLP's channels-last map), the weight (K * K, C) (tap
// major), so the channels are the vector lanes. One task is one row (b, y) of the map. The plain
// operators need a pass for the conv, one for the sum and one for the GELU (with a new tensor for
// the conv), and in backward two more new tensors; here forward is one pass into one new tensor,
// and backward, given the GELU's output gradient in a buffer of its own, two:
//   1. per row: recompute the pre-activation p, overwrite the gradient g with d = g * gelu'(p)
//      and write this row's sums of d * h(shifted) and of d to its own slot of the weight and
//      bias gradients;
//   2. per row: dh = d + the transposed conv of d (the conv with the taps mirrored), into a new
//      tensor.
// Then the rows' slots are added up in row order, so no result depends on the thread count.
//
// With AVX-512, float and K = 3 (DAT++), a row is walked once per block of 16 channels with the
// nine weights in registers and a 3 x 3 window of the map sliding along it (three loads a
// pixel, not nine); elsewhere (double, other K or machines) portable loops over the channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vector_math.h"

// The operator namespace; tests build a variant without AVX-512 under another one.
#ifndef MMDAT_LIBRARY
#define MMDAT_LIBRARY mmdat_dwconv_gelu_cpu
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define MMDAT_DG_AVX512 1
#else
#define MMDAT_DG_AVX512 0
#endif

namespace {

using mmdat_math::normal_cdf;
using mmdat_math::normal_pdf;

// Largest kernel side: a pixel's taps are listed on the stack.
constexpr int64_t MAX_KERNEL = 7;

struct Shapes {
  int64_t batch, rows, cols, channels, kernel;
};

Shapes shapes_of(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(h.dim() == 4 && h.is_contiguous(), "h must be a contiguous (B, H, W, C) map");
  const int64_t channels = h.size(3), taps = weight.size(0);
  int64_t kernel = 1;
  while (kernel * kernel < taps) ++kernel;
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == channels && kernel * kernel == taps && kernel % 2 == 1 &&
                  kernel <= MAX_KERNEL && weight.is_contiguous(),
              "weight must be a contiguous (K * K, C) tensor with K odd, at most ", MAX_KERNEL);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == channels && bias.is_contiguous(), "bias must be (C)");
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && bias.scalar_type() == h.scalar_type(),
              "h, weight and bias must have one dtype");
  return {h.size(0), h.size(1), h.size(2), channels, kernel};
}

// The taps of the conv with the taps mirrored (the transposed conv's), (K * K, C).
at::Tensor mirrored(const at::Tensor& weight) { return weight.flip({0}).contiguous(); }

// ---------------------------------------------------------------------------------------------
// Portable code: any dtype and kernel side.

// Calls visit(tap, pixel) for each tap (ky * K + kx) of the kernel at pixel x of row (b, y) whose
// source pixel (y + ky - K / 2, x + kx - K / 2) is inside the map; pixel is its index in the map.
template <typename Visit>
inline void for_each_tap(const Shapes& s, int64_t b, int64_t y, int64_t x, Visit visit) {
  const int64_t pad = s.kernel / 2;
  for (int64_t ky = 0; ky < s.kernel; ++ky) {
    const int64_t yy = y + ky - pad;
    if (yy < 0 || yy >= s.rows) continue;
    for (int64_t kx = 0; kx < s.kernel; ++kx) {
      const int64_t xx = x + kx - pad;
      if (xx >= 0 && xx < s.cols) visit(ky * s.kernel + kx, (b * s.rows + yy) * s.cols + xx);
    }
  }
}

// out[c] = f(bias[c] + map(y, x)[c] + sum over taps of weight[tap][c] * map(y + dy, x + dx)[c]),
// zero outside the map; f is gelu or the identity.
template <typename T, bool GELU>
void conv_pixel(const Shapes& s, const T* map, const T* weight, const T* bias, int64_t b, int64_t y, int64_t x,
                T* out) {
  const int64_t C = s.channels;
  const T* centre = map + ((b * s.rows + y) * s.cols + x) * C;
  _Pragma("omp simd")
  for (int64_t c = 0; c < C; ++c) out[c] = centre[c] + bias[c];
  for_each_tap(s, b, y, x, [&](int64_t tap, int64_t pixel) {
    const T *source = map + pixel * C, *w = weight + tap * C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) out[c] += w[c] * source[c];
  });
  if (GELU) {
    _Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) out[c] = out[c] * normal_cdf(out[c]);
  }
}

template <typename T, bool GELU>
void conv_row(const Shapes& s, const T* map, const T* weight, const T* bias, int64_t b, int64_t y, T* out) {
  for (int64_t x = 0; x < s.cols; ++x) conv_pixel<T, GELU>(s, map, weight, bias, b, y, x, out + x * s.channels);
}

// Pass 1 of backward for row (b, y): d = g * gelu'(p) over g, the row's weight gradient sums
// in part[tap] and its bias gradient sum in part[K * K].
template <typename T>
void gradient_row(const Shapes& s, const T* h, const T* weight, const T* bias, int64_t b, int64_t y, T* g, T* part) {
  const int64_t C = s.channels, taps = s.kernel * s.kernel;
  std::vector<T> p(C);
  for (int64_t x = 0; x < s.cols; ++x) {
    conv_pixel<T, false>(s, h, weight, bias, b, y, x, p.data());
    T* d = g + x * C;
    T* bias_part = part + taps * C;
    _Pragma("omp simd")
    for (int64_t c = 0; c < C; ++c) {
      const T v = p[c];
      d[c] *= normal_cdf(v) + v * normal_pdf(v);
      bias_part[c] += d[c];
    }
    for_each_tap(s, b, y, x, [&](int64_t tap, int64_t pixel) {
      const T* source = h + pixel * C;
      T* w_part = part + tap * C;
      _Pragma("omp simd")
      for (int64_t c = 0; c < C; ++c) w_part[c] += d[c] * source[c];
    });
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512, float, K = 3, C a multiple of 16.
#if MMDAT_DG_AVX512
using mmdat_math::normal_cdf_ps;
using mmdat_math::normal_pdf_ps;

// A 3 x 3 window of 16 channels of the map around (y, x), sliding along the row: w[ky][kx] holds
// the pixel (y + ky - 1, x + kx - 1), zero outside the map.
struct Window {
  const float* rows[3];  // the map's rows y - 1, y, y + 1 at channel c0, or null outside it
  int64_t cols, C;
  __m512 w[3][3];

  Window(const Shapes& s, const float* map, int64_t b, int64_t y, int64_t c0) : cols(s.cols), C(s.channels) {
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t yy = y + ky - 1;
      rows[ky] = (yy >= 0 && yy < s.rows) ? map + (b * s.rows + yy) * s.cols * C + c0 : nullptr;
      w[ky][0] = _mm512_setzero_ps();
      w[ky][1] = column(ky, 0);
      w[ky][2] = column(ky, 1);
    }
  }
  __m512 column(int ky, int64_t x) const {
    return (rows[ky] != nullptr && x < cols) ? _mm512_loadu_ps(rows[ky] + x * C) : _mm512_setzero_ps();
  }
  // Moves the window from x to x + 1.
  void slide(int64_t x) {
    for (int ky = 0; ky < 3; ++ky) {
      w[ky][0] = w[ky][1];
      w[ky][1] = w[ky][2];
      w[ky][2] = column(ky, x + 2);
    }
  }
  __m512 conv(const __m512* weights, __m512 start) const {
    __m512 acc = _mm512_add_ps(start, w[1][1]);
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx) acc = _mm512_fmadd_ps(weights[ky * 3 + kx], w[ky][kx], acc);
    return acc;
  }
};

bool fast_path(const Shapes& s) { return s.kernel == 3 && s.channels % 16 == 0; }

template <bool GELU>
void conv_row_3x3(const Shapes& s, const float* map, const float* weight, const float* bias, int64_t b, int64_t y,
                  float* out) {
  for (int64_t c0 = 0; c0 < s.channels; c0 += 16) {
    __m512 weights[9];
    for (int t = 0; t < 9; ++t) weights[t] = _mm512_loadu_ps(weight + t * s.channels + c0);
    const __m512 start = _mm512_loadu_ps(bias + c0);
    Window window(s, map, b, y, c0);
    for (int64_t x = 0; x < s.cols; ++x) {
      const __m512 p = window.conv(weights, start);
      _mm512_storeu_ps(out + x * s.channels + c0, GELU ? _mm512_mul_ps(p, normal_cdf_ps(p)) : p);
      window.slide(x);
    }
  }
}

void gradient_row_3x3(const Shapes& s, const float* h, const float* weight, const float* bias, int64_t b, int64_t y,
                      float* g, float* part) {
  for (int64_t c0 = 0; c0 < s.channels; c0 += 16) {
    __m512 weights[9], sums[9];
    for (int t = 0; t < 9; ++t) {
      weights[t] = _mm512_loadu_ps(weight + t * s.channels + c0);
      sums[t] = _mm512_setzero_ps();
    }
    __m512 bias_sum = _mm512_setzero_ps();
    const __m512 start = _mm512_loadu_ps(bias + c0);
    Window window(s, h, b, y, c0);
    for (int64_t x = 0; x < s.cols; ++x) {
      const __m512 p = window.conv(weights, start);
      const __m512 slope = _mm512_fmadd_ps(p, normal_pdf_ps(p), normal_cdf_ps(p));
      float* d = g + x * s.channels + c0;
      const __m512 dv = _mm512_mul_ps(_mm512_loadu_ps(d), slope);
      _mm512_storeu_ps(d, dv);
      bias_sum = _mm512_add_ps(bias_sum, dv);
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) sums[ky * 3 + kx] = _mm512_fmadd_ps(dv, window.w[ky][kx], sums[ky * 3 + kx]);
      window.slide(x);
    }
    for (int t = 0; t < 9; ++t) _mm512_storeu_ps(part + t * s.channels + c0, sums[t]);
    _mm512_storeu_ps(part + 9 * s.channels + c0, bias_sum);
  }
}
#endif

// One row of the conv (and gelu), on the fast path where it applies.
template <typename T, bool GELU>
void any_conv_row(const Shapes& s, const T* map, const T* weight, const T* bias, int64_t b, int64_t y, T* out) {
#if MMDAT_DG_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (fast_path(s)) return conv_row_3x3<GELU>(s, map, weight, bias, b, y, out);
  }
#endif
  conv_row<T, GELU>(s, map, weight, bias, b, y, out);
}

template <typename T>
void any_gradient_row(const Shapes& s, const T* h, const T* weight, const T* bias, int64_t b, int64_t y, T* g,
                      T* part) {
#if MMDAT_DG_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (fast_path(s)) return gradient_row_3x3(s, h, weight, bias, b, y, g, part);
  }
#endif
  gradient_row<T>(s, h, weight, bias, b, y, g, part);
}

// ---------------------------------------------------------------------------------------------

at::Tensor forward(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  const Shapes s = shapes_of(h, weight, bias);
  at::Tensor out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dwconv_gelu_forward", [&] {
    const scalar_t *hp = h.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch * s.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        any_conv_row<scalar_t, true>(s, hp, wp, bp, row / s.rows, row % s.rows, op + row * s.cols * s.channels);
      }
    });
  });
  return out;
}

// Returns (grad_h, grad_weight (K * K, C), grad_bias (C)); grad (the GELU output's gradient, a
// buffer the caller gives up) is overwritten by the pre-activation's gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(at::Tensor grad, const at::Tensor& h, const at::Tensor& weight,
                                                        const at::Tensor& bias) {
  const Shapes s = shapes_of(h, weight, bias);
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.is_contiguous() && grad.scalar_type() == h.scalar_type(),
              "grad must be a contiguous tensor of h's shape and dtype");
  const int64_t C = s.channels, taps = s.kernel * s.kernel, tasks = s.batch * s.rows;
  // each row's share of the weight (taps rows) and bias (last row) gradients
  at::Tensor parts = at::zeros({tasks, taps + 1, C}, h.options());
  at::Tensor grad_h = at::empty_like(h);
  at::Tensor total = at::zeros({taps + 1, C}, h.options());
  const at::Tensor transposed = mirrored(weight), no_bias = at::zeros_like(bias);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dwconv_gelu_backward", [&] {
    const scalar_t *hp = h.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    scalar_t *gp = grad.data_ptr<scalar_t>(), *partp = parts.data_ptr<scalar_t>(), *dhp = grad_h.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        any_gradient_row<scalar_t>(s, hp, wp, bp, row / s.rows, row % s.rows, gp + row * s.cols * C,
                                   partp + row * (taps + 1) * C);
      }
    });
    // dh = d + the conv of d with the taps mirrored (needs every row of d)
    const scalar_t *tp = transposed.data_ptr<scalar_t>(), *zp = no_bias.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        any_conv_row<scalar_t, false>(s, gp, tp, zp, row / s.rows, row % s.rows, dhp + row * s.cols * C);
      }
    });
    // the rows' shares added up in row order
    scalar_t* sp = total.data_ptr<scalar_t>();
    at::parallel_for(0, taps + 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* sum = sp + t * C;
        for (int64_t row = 0; row < tasks; ++row) {
          const scalar_t* part = partp + (row * (taps + 1) + t) * C;
          _Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) sum[c] += part[c];
        }
      }
    });
  });
  return {grad_h, total.narrow(0, 0, taps), total[taps]};
}

}  // namespace

TORCH_LIBRARY(MMDAT_LIBRARY, m) {
  m.def("forward(Tensor h, Tensor weight, Tensor bias) -> Tensor");
  m.def("backward(Tensor(a!) grad, Tensor h, Tensor weight, Tensor bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(MMDAT_LIBRARY, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
