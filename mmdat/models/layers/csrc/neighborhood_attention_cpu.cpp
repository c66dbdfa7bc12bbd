// 2D neighborhood attention with a relative position bias on CPU, NATTEN 0.14 semantics: each query
// (i, j) of an H x W map attends to the K x K keys from (rs(i), cs(j)), the neighborhood centred on
// it and shifted inwards at the borders (start = clamp(i - K / 2, 0, H - K)), with the bias
// rpb[head, key row - i + K - 1, key col - j + K - 1]. Exactly K * K scores per query.
//
// Layout: query, key, value and out are (B, heads, H, W, d), contiguous. One task is one row of
// queries of one (batch, head), so every DAT++ map gives batch * heads * H tasks. The dot products
// and sums over the head dim are loops written for the compiler's vectoriser (`omp simd`), with
// the head dims fixed at compile time for DAT++'s 32 (see with_head_dims).
//
// Forward also returns each query's K * K probabilities (when a backward will follow): with 49
// keys a query they cost about half the size of q, k and v (32 head dims), and spare backward a
// second pass over the scores. Backward runs in three race-free passes:
//   1. per query row: dP = dO . v, dS = P * (dP - sum(P * dP)), dq = scale * dS k, and the row's
//      part of the bias gradient; dS is kept;
//   2. per key row: each key gathers dk = scale * sum dS q and dv = sum P dO over the queries
//      whose neighborhood holds it (a rectangle of queries: the starts are monotone);
//   3. the bias gradient: the row parts added up in a fixed order.
// No pass depends on the thread count, so results do not either.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Largest kernel side: the scores of a query live on the stack (MAX_K * MAX_K).
constexpr int64_t MAX_K = 13;

struct Shapes {
  int64_t batch, heads, rows, cols, dims, kernel, side;  // side = 2K - 1, of the bias table
  int64_t area() const { return kernel * kernel; }
};

Shapes shapes_of(const at::Tensor& query, int64_t kernel) {
  TORCH_CHECK(query.dim() == 5, "query, key and value must be (B, heads, H, W, d)");
  TORCH_CHECK(kernel % 2 == 1 && kernel >= 3 && kernel <= MAX_K, "kernel_size must be odd, 3 to ", MAX_K);
  Shapes s{query.size(0), query.size(1), query.size(2), query.size(3), query.size(4), kernel, 2 * kernel - 1};
  TORCH_CHECK(s.rows >= kernel && s.cols >= kernel, "the map must be at least kernel_size a side");
  return s;
}

// First key of each query's neighborhood along an axis of `length` pixels.
std::vector<int64_t> starts(int64_t length, int64_t kernel) {
  std::vector<int64_t> start(length);
  for (int64_t i = 0; i < length; ++i) start[i] = std::min(std::max<int64_t>(i - kernel / 2, 0), length - kernel);
  return start;
}

// The queries whose neighborhood holds each key, along an axis: [first[y], last[y]].
void attending(const std::vector<int64_t>& start, int64_t kernel, std::vector<int64_t>& first,
               std::vector<int64_t>& last) {
  const int64_t length = start.size();
  first.assign(length, length);
  last.assign(length, -1);
  for (int64_t i = 0; i < length; ++i)
    for (int64_t y = start[i]; y < start[i] + kernel; ++y) {
      first[y] = std::min(first[y], i);
      last[y] = std::max(last[y], i);
    }
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) sum += a[t] * b[t];
  return sum;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) y[t] += alpha * x[t];
}

// Runs body(std::integral_constant<int64_t, D>{}): D = 32, the head dims of every DAT++ model, so
// that the compiler unrolls the head-dim loops into whole vectors; D = 0 (dims known at run time)
// for other head dims.
template <typename Body>
void with_head_dims(int64_t dims, Body&& body) {
  if (dims == 32) {
    body(std::integral_constant<int64_t, 32>{});
  } else {
    body(std::integral_constant<int64_t, 0>{});
  }
}

std::vector<at::Tensor> forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& rpb, int64_t kernel, bool keep_probabilities) {
  const Shapes s = shapes_of(query, kernel);
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == s.heads && rpb.size(1) == s.side && rpb.size(2) == s.side,
              "rpb must be (heads, 2K - 1, 2K - 1)");
  auto out = at::empty_like(query);
  auto probabilities = keep_probabilities
                           ? at::empty({s.batch, s.heads, s.rows, s.cols, s.area()}, query.options())
                           : at::empty({0}, query.options());
  const auto row_start = starts(s.rows, kernel), col_start = starts(s.cols, kernel);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighborhood_forward", [&] {
    using T = scalar_t;
    with_head_dims(s.dims, [&](auto fixed) {
      const int64_t dims = decltype(fixed)::value ? decltype(fixed)::value : s.dims;
      const T scale = T(1) / std::sqrt(T(dims));
      const T *q = query.data_ptr<T>(), *k = key.data_ptr<T>(), *v = value.data_ptr<T>(), *bias = rpb.data_ptr<T>();
      T* o = out.data_ptr<T>();
      T* p = keep_probabilities ? probabilities.data_ptr<T>() : nullptr;
      const int64_t map = s.rows * s.cols * dims;
      at::parallel_for(0, s.batch * s.heads * s.rows, 1, [&](int64_t begin, int64_t end) {
        T score[MAX_K * MAX_K];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bh = task / s.rows, i = task % s.rows, head = bh % s.heads;
          const int64_t rs = row_start[i];
          const T *kb = k + bh * map, *vb = v + bh * map;
          // bias row of the first key row; a query's first key column adds cs - j
          const T* bias_rows = bias + (head * s.side + rs - i + kernel - 1) * s.side + kernel - 1;
          for (int64_t j = 0; j < s.cols; ++j) {
            const int64_t cs = col_start[j], qi = (i * s.cols + j);
            const T* qj = q + bh * map + qi * dims;
            T top = -std::numeric_limits<T>::infinity();
            for (int64_t a = 0; a < kernel; ++a) {
              const T* keys = kb + ((rs + a) * s.cols + cs) * dims;
              const T* b = bias_rows + a * s.side + cs - j;
              for (int64_t c = 0; c < kernel; ++c) {
                const T x = dot(qj, keys + c * dims, dims) * scale + b[c];
                score[a * kernel + c] = x;
                top = std::max(top, x);
              }
            }
            T total = 0;
            for (int64_t n = 0; n < s.area(); ++n) total += (score[n] = std::exp(score[n] - top));
            const T inverse = T(1) / total;
            T* oj = o + bh * map + qi * dims;
            std::fill(oj, oj + dims, T(0));
            for (int64_t a = 0; a < kernel; ++a) {
              const T* values = vb + ((rs + a) * s.cols + cs) * dims;
              for (int64_t c = 0; c < kernel; ++c) {
                const T weight = score[a * kernel + c] *= inverse;
                axpy(weight, values + c * dims, oj, dims);
              }
            }
            if (p) std::copy(score, score + s.area(), p + (bh * s.rows * s.cols + qi) * s.area());
          }
        }
      });
    });
  });
  return {out, probabilities};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& probabilities, int64_t kernel) {
  const Shapes s = shapes_of(query, kernel);
  TORCH_CHECK(probabilities.numel() == s.batch * s.heads * s.rows * s.cols * s.area(),
              "backward needs the probabilities of forward");
  auto grad_query = at::empty_like(query), grad_key = at::empty_like(key), grad_value = at::empty_like(value);
  auto grad_scores = at::empty_like(probabilities);
  // per (batch, head, query row): that row's part of the bias gradient
  auto bias_parts = at::zeros({s.batch, s.heads, s.rows, s.side * s.side}, query.options());
  auto grad_rpb = at::empty({s.heads, s.side, s.side}, query.options());
  const auto row_start = starts(s.rows, kernel), col_start = starts(s.cols, kernel);
  std::vector<int64_t> row_first, row_last, col_first, col_last;
  attending(row_start, kernel, row_first, row_last);
  attending(col_start, kernel, col_first, col_last);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighborhood_backward", [&] {
    using T = scalar_t;
    with_head_dims(s.dims, [&](auto fixed) {
      const int64_t dims = decltype(fixed)::value ? decltype(fixed)::value : s.dims;
      const T scale = T(1) / std::sqrt(T(dims));
      const T *q = query.data_ptr<T>(), *k = key.data_ptr<T>(), *v = value.data_ptr<T>();
      const T *go = grad_out.data_ptr<T>(), *p = probabilities.data_ptr<T>();
      T *gq = grad_query.data_ptr<T>(), *gk = grad_key.data_ptr<T>(), *gv = grad_value.data_ptr<T>();
      T *gs = grad_scores.data_ptr<T>(), *parts = bias_parts.data_ptr<T>();
      const int64_t map = s.rows * s.cols * dims, pixels = s.rows * s.cols, area = s.area();
      // 1. per query row: dS, dq and the row's bias gradient
      at::parallel_for(0, s.batch * s.heads * s.rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bh = task / s.rows, i = task % s.rows, rs = row_start[i];
          const T *kb = k + bh * map, *vb = v + bh * map;
          T* part = parts + task * s.side * s.side + (rs - i + kernel - 1) * s.side + kernel - 1;
          for (int64_t j = 0; j < s.cols; ++j) {
            const int64_t cs = col_start[j], qi = i * s.cols + j;
            const T* gj = go + bh * map + qi * dims;
            const T* pj = p + (bh * pixels + qi) * area;
            T* sj = gs + (bh * pixels + qi) * area;
            T weighted = 0;  // sum over the keys of P * dP
            for (int64_t a = 0; a < kernel; ++a) {
              const T* values = vb + ((rs + a) * s.cols + cs) * dims;
              for (int64_t c = 0; c < kernel; ++c) {
                const T dp = dot(gj, values + c * dims, dims);
                sj[a * kernel + c] = dp;
                weighted += pj[a * kernel + c] * dp;
              }
            }
            T* qgrad = gq + bh * map + qi * dims;
            std::fill(qgrad, qgrad + dims, T(0));
            for (int64_t a = 0; a < kernel; ++a) {
              const T* keys = kb + ((rs + a) * s.cols + cs) * dims;
              T* b = part + a * s.side + cs - j;
              for (int64_t c = 0; c < kernel; ++c) {
                const int64_t n = a * kernel + c;
                const T ds = sj[n] = pj[n] * (sj[n] - weighted);
                b[c] += ds;
                axpy(ds * scale, keys + c * dims, qgrad, dims);
              }
            }
          }
        }
      });
      // 2. per key row: dk and dv gathered from the queries that attend to each key
      at::parallel_for(0, s.batch * s.heads * s.rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bh = task / s.rows, y = task % s.rows;
          const T *qb = q + bh * map, *gb = go + bh * map;
          const T *pb = p + bh * pixels * area, *sb = gs + bh * pixels * area;
          for (int64_t x = 0; x < s.cols; ++x) {
            T* kgrad = gk + bh * map + (y * s.cols + x) * dims;
            T* vgrad = gv + bh * map + (y * s.cols + x) * dims;
            std::fill(kgrad, kgrad + dims, T(0));
            std::fill(vgrad, vgrad + dims, T(0));
            for (int64_t i = row_first[y]; i <= row_last[y]; ++i) {
              const int64_t a = y - row_start[i];
              for (int64_t j = col_first[x]; j <= col_last[x]; ++j) {
                const int64_t qi = i * s.cols + j, n = a * kernel + x - col_start[j];
                axpy(sb[qi * area + n], qb + qi * dims, kgrad, dims);
                axpy(pb[qi * area + n], gb + qi * dims, vgrad, dims);
              }
            }
            for (int64_t t = 0; t < dims; ++t) kgrad[t] *= scale;
          }
        }
      });
      // 3. the bias gradient: row parts added in (batch, row) order
      T* gr = grad_rpb.data_ptr<T>();
      const int64_t entries = s.side * s.side;
      at::parallel_for(0, s.heads, 1, [&](int64_t begin, int64_t end) {
        for (int64_t head = begin; head < end; ++head) {
          T* total = gr + head * entries;
          std::fill(total, total + entries, T(0));
          for (int64_t b = 0; b < s.batch; ++b)
            for (int64_t i = 0; i < s.rows; ++i)
              axpy(T(1), parts + ((b * s.heads + head) * s.rows + i) * entries, total, entries);
        }
      });
    });
  });
  return {grad_query, grad_key, grad_value, grad_rpb};
}

}  // namespace

TORCH_LIBRARY(mmdat_neighborhood_cpu, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, Tensor rpb, int kernel_size, bool keep_probabilities) "
        "-> Tensor[]");
  m.def("backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor probabilities, "
        "int kernel_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mmdat_neighborhood_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
