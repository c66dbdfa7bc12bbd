// 2D neighborhood attention with a relative position bias on CPU, NATTEN 0.14 semantics: each query
// (i, j) of an H x W map attends to the K x K keys from (rs(i), cs(j)), the neighborhood centred on
// it and shifted inwards at the borders (start = clamp(i - K / 2, 0, H - K)), with the bias
// rpb[head, key row - i + K - 1, key col - j + K - 1]. Exactly K * K scores per query.
//
// Layout: rows of q, k, v (and dO) are copied transposed, (d, W) with the columns along the vector
// lanes and K - 1 zero columns on either side; inputs may have any strides (views of one qkv
// projection). Queries are taken L = 16 columns at a time. For the key at offset (dy, dx) from its
// query, the 16 queries of a vector read 16 consecutive key columns, so a score is a vector
// product of the queries' transposed row with the key row shifted by dx: no horizontal sums, no
// gathers. A vector scores every offset dx that one of its queries uses (K for inner vectors, up
// to 2K - 1 at the borders, where windows are shifted), each lane masked to its own window; the
// bias is one table entry for all lanes. One task is a run of RUN_ROWS query rows of a (batch,
// head), which keeps the K key rows its current row reads transposed (RowCache).
//
// Forward keeps each query's log-sum-exp when a backward will follow. Backward recomputes the
// probabilities and, per query row: dP = dO . v, dS = P * (dP - sum(P * dP)), dq = scale * dS k,
// the row's part of the bias gradient, and the row's share of dk = scale * sum dS q and
// dv = sum P dO, added into the K key rows its window reaches (KeyRowSums; again vector products
// with shifted rows: a key column x takes query column x - dx). A key row is written out by the
// run that holds every query row reaching it, else summed from the runs' parts in run order; the
// bias gradient is summed from the row parts in a fixed order. No locks or atomics, and nothing
// depends on the thread count. The products are written with GCC/Clang vector types of 16 lanes,
// which the compiler maps to the machine's registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vector_math.h"

// The operator namespace; tests build a variant without AVX-512 under another one.
#ifndef MMDAT_LIBRARY
#define MMDAT_LIBRARY mmdat_neighborhood_cpu
#endif

namespace {

constexpr int64_t MAX_K = 13;
constexpr int64_t L = 16;  // queries per vector

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(L * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(L * sizeof(double))));
};
template <typename T>
using Vec = typename Lanes<T>::type;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <typename T>
inline Vec<T> exp_vec(Vec<T> x) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return (Vec<T>)mmdat_math::exp_ps((__m512)x);
#endif
  for (int64_t l = 0; l < L; ++l) x[l] = mmdat_math::exp_of(x[l]);
  return x;
}

struct Shapes {
  int64_t batch, heads, rows, cols, dims, kernel, side;  // side = 2K - 1, of the bias table
  int64_t wp;     // columns rounded up to whole vectors
  int64_t pad;    // zero columns on either side of a transposed row: K - 1
  int64_t width;  // of a transposed row: pad + wp + pad
  int64_t maps() const { return batch * heads * rows; }  // rows of all (batch, head)
};

Shapes shapes_of(const at::Tensor& query, int64_t kernel) {
  TORCH_CHECK(query.dim() == 5, "query, key and value must be (B, heads, H, W, d)");
  TORCH_CHECK(kernel % 2 == 1 && kernel >= 3 && kernel <= MAX_K, "kernel_size must be odd, 3 to ", MAX_K);
  Shapes s{query.size(0), query.size(1), query.size(2), query.size(3), query.size(4), kernel, 2 * kernel - 1};
  TORCH_CHECK(s.rows >= kernel && s.cols >= kernel, "the map must be at least kernel_size a side");
  s.wp = (s.cols + L - 1) / L * L;
  s.pad = kernel - 1;
  s.width = s.wp + 2 * s.pad;
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

// Per vector of query columns: the offsets dx = key col - query col its queries use, [low, high],
// and each lane's window start relative to its column, cs(j) - j (lanes past the map: no window).
template <typename T>
struct QueryVectors {
  std::vector<int64_t> low, high;
  std::vector<Vec<T>> offset;
};

template <typename T>
QueryVectors<T> query_vectors(const Shapes& s, const std::vector<int64_t>& col_start) {
  QueryVectors<T> qv;
  for (int64_t j0 = 0; j0 < s.wp; j0 += L) {
    Vec<T> offset = splat<T>(T(2 * MAX_K));  // past the map: matches no dx
    int64_t low = s.kernel, high = -s.kernel;
    for (int64_t l = 0; l < L && j0 + l < s.cols; ++l) {
      const int64_t o = col_start[j0 + l] - (j0 + l);
      offset[l] = T(o);
      low = std::min(low, o);
      high = std::max(high, o + s.kernel - 1);
    }
    qv.low.push_back(low);
    qv.high.push_back(high);
    qv.offset.push_back(offset);
  }
  return qv;
}

// Row m = (b * heads + h) * H + y of x (B, heads, H, W, d), any strides, transposed into out
// (d, width): column j at pad + j, zeros around. In tiles of 16 x 16, so that reads and writes
// both run along rows.
template <typename T>
void transpose_row(const at::Tensor& x, const Shapes& s, int64_t m, T* out) {
  constexpr int64_t B = 16;
  const auto st = x.strides();
  const int64_t b = m / (s.heads * s.rows), h = m / s.rows % s.heads, y = m % s.rows;
  const T* row = x.data_ptr<T>() + b * st[0] + h * st[1] + y * st[2];
  for (int64_t t = 0; t < s.dims; ++t) {
    std::fill(out + t * s.width, out + t * s.width + s.pad, T(0));
    std::fill(out + t * s.width + s.pad + s.cols, out + (t + 1) * s.width, T(0));
  }
  T tile[B][B];
  for (int64_t j0 = 0; j0 < s.cols; j0 += B)
    for (int64_t t0 = 0; t0 < s.dims; t0 += B) {
      const int64_t nj = std::min(B, s.cols - j0), nt = std::min(B, s.dims - t0);
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t t = 0; t < nt; ++t) tile[t][j] = row[(j0 + j) * st[3] + (t0 + t) * st[4]];
      for (int64_t t = 0; t < nt; ++t) std::copy(tile[t], tile[t] + nj, out + (t0 + t) * s.width + s.pad + j0);
    }
}

// Transposed rows of one input, made on first use and kept in `slots` slots (row y in slot
// y % slots): a task walks consecutive rows, whose neighborhoods share all but one key row, so
// each row is transposed once per task and read from cache.
template <typename T>
class RowCache {
 public:
  RowCache(const at::Tensor& x, const Shapes& s, int64_t slots)
      : x_(x), s_(s), slots_(slots), data_(slots * s.dims * s.width), held_(slots, -1) {}

  // Row y of the map bh = b * heads + h.
  const T* row(int64_t bh, int64_t y) {
    const int64_t slot = y % slots_, m = bh * s_.rows + y;
    T* out = data_.data() + slot * s_.dims * s_.width;
    if (held_[slot] != m) {
      transpose_row<T>(x_, s_, m, out);
      held_[slot] = m;
    }
    return out;
  }

 private:
  const at::Tensor& x_;
  const Shapes& s_;
  const int64_t slots_;
  std::vector<T> data_;
  std::vector<int64_t> held_;
};

// Tasks: runs of RUN_ROWS consecutive rows of one (batch, head). The runs do not depend on the
// thread count, and neither do results: backward adds up the key gradients of rows that two runs
// reach in run order.
constexpr int64_t RUN_ROWS = 8;
struct Runs {
  int64_t per_map;  // runs per (batch, head)
  explicit Runs(const Shapes& s) : per_map((s.rows + RUN_ROWS - 1) / RUN_ROWS) {}
  int64_t tasks(const Shapes& s) const { return s.batch * s.heads * per_map; }
  int64_t map(int64_t task) const { return task / per_map; }
  int64_t first(int64_t task) const { return task % per_map * RUN_ROWS; }
  int64_t end(int64_t task, const Shapes& s) const { return std::min(first(task) + RUN_ROWS, s.rows); }
};

// out[x] = sum_t load(a + t * lda) * load(b[x] + t * ldb), x < N, in registers.
template <typename T, int N>
void products_of(Vec<T>* out, const T* a, int64_t lda, const T* const* b, int64_t ldb, int64_t depth) {
  Vec<T> acc[N] = {};
  const T* bx[N];
  for (int x = 0; x < N; ++x) bx[x] = b[x];
  for (int64_t t = 0; t < depth; ++t) {
    const Vec<T> av = load(a + t * lda);
    for (int x = 0; x < N; ++x) acc[x] += av * load(bx[x] + t * ldb);
  }
  for (int x = 0; x < N; ++x) out[x] = acc[x];
}

// out[x] = sum_t load(a + t * lda) * load(b[x] + t * ldb) for x < count: the scores of a vector
// of queries (a: their transposed rows) against `count` shifted key rows.
template <typename T>
void products(Vec<T>* out, int64_t count, const T* a, int64_t lda, const T* const* b, int64_t ldb,
              int64_t depth) {
  constexpr int N = 8;
  for (int64_t x0 = 0; x0 < count; x0 += N) {
    const T* const* bx = b + x0;
    switch (std::min<int64_t>(N, count - x0)) {
      case 1: products_of<T, 1>(out + x0, a, lda, bx, ldb, depth); break;
      case 2: products_of<T, 2>(out + x0, a, lda, bx, ldb, depth); break;
      case 3: products_of<T, 3>(out + x0, a, lda, bx, ldb, depth); break;
      case 4: products_of<T, 4>(out + x0, a, lda, bx, ldb, depth); break;
      case 5: products_of<T, 5>(out + x0, a, lda, bx, ldb, depth); break;
      case 6: products_of<T, 6>(out + x0, a, lda, bx, ldb, depth); break;
      case 7: products_of<T, 7>(out + x0, a, lda, bx, ldb, depth); break;
      default: products_of<T, N>(out + x0, a, lda, bx, ldb, depth); break;
    }
  }
}

// c[t * ldc] (+)= sum_x load(w[x]) * load(b[x] + (t0 + t) * ldb) for t < D, in registers.
template <typename T, int D>
void weighted_sum_of(T* c, int64_t ldc, int64_t t0, int64_t count, const T* const* w, const T* const* b,
                     int64_t ldb, bool add) {
  Vec<T> acc[D] = {};
  if (add)
    for (int t = 0; t < D; ++t) acc[t] = load(c + (t0 + t) * ldc);
  for (int64_t x = 0; x < count; ++x) {
    const Vec<T> wx = load(w[x]);
    const T* bx = b[x] + t0 * ldb;
    for (int t = 0; t < D; ++t) acc[t] += wx * load(bx + t * ldb);
  }
  for (int t = 0; t < D; ++t) store(c + (t0 + t) * ldc, acc[t]);
}

// c[t * ldc] (+)= sum_x load(w[x]) * load(b[x] + t * ldb) for t < depth: `count` vectors of
// weights (probabilities, score gradients) times as many shifted rows, summed per head dim.
template <typename T>
void weighted_sum(T* c, int64_t ldc, int64_t depth, int64_t count, const T* const* w, const T* const* b,
                  int64_t ldb, bool add = false) {
  // 16 (float) or 8 (double, two registers a vector) accumulators of the head dims at a time
  constexpr int D = sizeof(T) == 4 ? 16 : 8;
  int64_t t0 = 0;
  for (; t0 + D <= depth; t0 += D) weighted_sum_of<T, D>(c, ldc, t0, count, w, b, ldb, add);
  for (; t0 < depth; ++t0) weighted_sum_of<T, 1>(c, ldc, t0, count, w, b, ldb, add);
}

// Transposed (d, wp) row `rows` (columns j < W), times `scale`, into row m = (b * heads + h) * H + y
// of out (B, heads, H, W, d), whose head dims are contiguous.
template <typename T>
void untranspose(const Shapes& s, const T* rows, T scale, const at::Tensor& out, int64_t m) {
  const auto st = out.strides();
  T* row = out.data_ptr<T>() + m / (s.heads * s.rows) * st[0] + m / s.rows % s.heads * st[1] + m % s.rows * st[2];
  for (int64_t j = 0; j < s.cols; ++j)
    for (int64_t t = 0; t < s.dims; ++t) row[j * st[3] + t] = rows[t * s.wp + j] * scale;
}

// The scores of the queries of row i, columns [j0, j0 + L), for key rows rs + a (a < K; transposed:
// key_rows[a]) and offsets dx in [low, low + n): S[a * n + x], scaled, biased, and -inf outside
// each query's window. qt: the queries' transposed row.
template <typename T>
void scores_of(const Shapes& s, const T* qt, const T* const* key_rows, const T* rpb, int64_t i, int64_t rs,
               int64_t j0, int64_t low, int64_t n, const Vec<T>& offset, T scale, Vec<T>* S,
               std::vector<const T*>& shifted) {
  const Vec<T> outside = splat<T>(-std::numeric_limits<T>::infinity());
  for (int64_t a = 0; a < s.kernel; ++a) {
    const T* key_row = key_rows[a] + s.pad + j0 + low;
    for (int64_t x = 0; x < n; ++x) shifted[x] = key_row + x;
    products<T>(S + a * n, n, qt + s.pad + j0, s.width, shifted.data(), s.width, s.dims);
    const T* bias = rpb + (rs + a - i + s.kernel - 1) * s.side + low + s.kernel - 1;
    for (int64_t x = 0; x < n; ++x) {
      const T dx = T(low + x);
      const auto inside = (offset <= dx) & (dx <= offset + T(s.kernel - 1));
      S[a * n + x] = inside ? S[a * n + x] * scale + bias[x] : outside;
    }
  }
}

std::vector<at::Tensor> forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& rpb, int64_t kernel, bool with_lse) {
  const Shapes s = shapes_of(query, kernel);
  TORCH_CHECK(rpb.dim() == 3 && rpb.size(0) == s.heads && rpb.size(1) == s.side && rpb.size(2) == s.side &&
                  rpb.is_contiguous(), "rpb must be contiguous (heads, 2K - 1, 2K - 1)");
  // laid out (B, H, W, heads, d), so that the module's merge of the heads is a view
  auto out = at::empty({s.batch, s.rows, s.cols, s.heads, s.dims}, query.options()).permute({0, 3, 1, 2, 4});
  auto lse = with_lse ? at::empty({s.batch, s.heads, s.rows, s.cols}, query.options())
                      : at::empty({0}, query.options());
  const auto row_start = starts(s.rows, kernel), col_start = starts(s.cols, kernel);
  const Runs runs(s);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighborhood_forward", [&] {
    using T = scalar_t;
    const T scale = T(1) / std::sqrt(T(s.dims));
    const Vec<T> outside = splat<T>(-std::numeric_limits<T>::infinity());  // the scores outside a window
    const QueryVectors<T> qv = query_vectors<T>(s, col_start);
    const T* bias = rpb.data_ptr<T>();
    T* lse_all = with_lse ? lse.data_ptr<T>() : nullptr;
    at::parallel_for(0, runs.tasks(s), 1, [&](int64_t begin, int64_t end) {
      const c10::InferenceMode guard;
      RowCache<T> keys(key, s, s.kernel), values(value, s, s.kernel);
      std::vector<T> qt(s.dims * s.width), ot(s.dims * s.wp);
      std::vector<Vec<T>> S(s.kernel * s.side);
      std::vector<const T*> key_rows(s.kernel), shifted(s.side), weights(s.kernel * s.side),
          value_rows(s.kernel * s.side);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = runs.map(task);
        for (int64_t i = runs.first(task); i < runs.end(task, s); ++i) {
          const int64_t m = bh * s.rows + i, rs = row_start[i];
          transpose_row<T>(query, s, m, qt.data());
          for (int64_t a = 0; a < s.kernel; ++a) key_rows[a] = keys.row(bh, rs + a);
          for (int64_t vec = 0; vec * L < s.wp; ++vec) {
            const int64_t j0 = vec * L, low = qv.low[vec], n = qv.high[vec] - low + 1, count = s.kernel * n;
            scores_of<T>(s, qt.data(), key_rows.data(), bias + bh % s.heads * s.side * s.side, i, rs, j0, low, n,
                         qv.offset[vec], scale, S.data(), shifted);
            Vec<T> top = S[0];
            for (int64_t e = 1; e < count; ++e) top = S[e] > top ? S[e] : top;
            Vec<T> total{};
            for (int64_t e = 0; e < count; ++e) total += (S[e] = S[e] > outside ? exp_vec<T>(S[e] - top) : Vec<T>{});
            const Vec<T> inverse = total > 0 ? splat<T>(1) / total : Vec<T>{};  // lanes past the map: no keys
            for (int64_t a = 0; a < s.kernel; ++a) {
              const T* value_row = values.row(bh, rs + a) + s.pad + j0 + low;
              for (int64_t x = 0; x < n; ++x) {
                S[a * n + x] *= inverse;
                weights[a * n + x] = reinterpret_cast<const T*>(&S[a * n + x]);
                value_rows[a * n + x] = value_row + x;
              }
            }
            weighted_sum<T>(ot.data() + j0, s.wp, s.dims, count, weights.data(), value_rows.data(), s.width);
            if (lse_all)
              for (int64_t l = 0; l < L && j0 + l < s.cols; ++l)
                lse_all[m * s.cols + j0 + l] = top[l] + std::log(total[l]);
          }
          untranspose<T>(s, ot.data(), T(1), out, m);
        }
      }
    });
  });
  return {out, lse};
}

// Gradient sums of the key rows of one (batch, head) that a task's query rows reach, transposed
// (dK / scale and dV, d x wp each), in K slots (row y in slot y % K): the query rows' window of
// key rows moves down one row at a time, and a row leaves it for good when the window passes.
template <typename T>
struct KeyRowSums {
  std::vector<T> data;
  std::vector<int64_t> held;  // key row in each slot, -1: none
  int64_t plane;
  KeyRowSums(const Shapes& s) : data(s.kernel * 2 * s.dims * s.wp), held(s.kernel, -1), plane(2 * s.dims * s.wp) {}
  T* dk(int64_t y, const Shapes& s) { return data.data() + y % s.kernel * plane; }
  T* dv(int64_t y, const Shapes& s) { return dk(y, s) + s.dims * s.wp; }
};

// A key row's gradient sums from the query rows of one task, when other tasks' query rows reach
// it too: added up after all tasks, in task order.
template <typename T>
struct PartialSums {
  int64_t map, row;
  std::vector<T> data;  // dK / scale and dV, transposed
};

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& rpb, const at::Tensor& lse,
                                 int64_t kernel) {
  const Shapes s = shapes_of(query, kernel);
  TORCH_CHECK(lse.numel() == s.batch * s.heads * s.rows * s.cols && lse.is_contiguous(),
              "backward needs the log-sum-exp of forward");
  auto grad_query = at::empty({s.batch, s.heads, s.rows, s.cols, s.dims}, query.options());
  auto grad_key = at::empty_like(grad_query), grad_value = at::empty_like(grad_query);
  // per (batch, head, query row): that row's part of the bias gradient
  auto bias_parts = at::zeros({s.batch, s.heads, s.rows, s.side * s.side}, query.options());
  auto grad_rpb = at::empty({s.heads, s.side, s.side}, query.options());
  const auto row_start = starts(s.rows, kernel), col_start = starts(s.cols, kernel);
  std::vector<int64_t> row_first, row_last, col_first, col_last;
  attending(row_start, kernel, row_first, row_last);
  attending(col_start, kernel, col_first, col_last);
  const Runs runs(s);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighborhood_backward", [&] {
    using T = scalar_t;
    const T scale = T(1) / std::sqrt(T(s.dims));
    const Vec<T> outside = splat<T>(-std::numeric_limits<T>::infinity());  // the scores outside a window
    const QueryVectors<T> qv = query_vectors<T>(s, col_start);
    // per vector of key columns: the offsets dx = key col - query col of the queries reaching it
    std::vector<int64_t> key_low, key_high;
    for (int64_t x0 = 0; x0 < s.wp; x0 += L) {
      int64_t low = s.kernel, high = -s.kernel;
      for (int64_t x = x0; x < std::min(x0 + L, s.cols); ++x) {
        low = std::min(low, x - col_last[x]);
        high = std::max(high, x - col_first[x]);
      }
      key_low.push_back(low);
      key_high.push_back(high);
    }
    const T *bias = rpb.data_ptr<T>(), *lse_all = lse.data_ptr<T>();
    T* parts = bias_parts.data_ptr<T>();
    std::vector<std::vector<PartialSums<T>>> partials(runs.tasks(s));
    // Key row y of map bh leaves a task's window: its gradients are final when the task holds
    // every query row reaching it, else a partial sum.
    auto finish_key_row = [&](int64_t task, int64_t bh, int64_t y, const T* dk, const T* dv) {
      const int64_t m = bh * s.rows + y;
      if (row_first[y] >= runs.first(task) && row_last[y] < runs.end(task, s)) {
        untranspose<T>(s, dk, scale, grad_key, m);
        untranspose<T>(s, dv, T(1), grad_value, m);
      } else {
        partials[task].push_back({bh, y, std::vector<T>(dk, dk + 2 * s.dims * s.wp)});
      }
    };
    at::parallel_for(0, runs.tasks(s), 1, [&](int64_t begin, int64_t end) {
      const c10::InferenceMode guard;
      RowCache<T> keys(key, s, s.kernel), values(value, s, s.kernel);
      KeyRowSums<T> sums(s);
      std::vector<T> qt(s.dims * s.width), dot(s.dims * s.width), dqt(s.dims * s.wp);
      // P and dS of the query row, by (key row a, offset slot dx + K - 1) and column pad + j;
      // zero outside each query's window and on the pad columns
      const int64_t slots = s.kernel * s.side;
      std::vector<T> probs(slots * s.width, T(0)), grad_scores(slots * s.width, T(0));
      std::vector<Vec<T>> S(slots), dP(slots), bias_sums(slots);
      std::vector<const T*> key_rows(s.kernel), shifted(s.side), weights(slots), rows(slots), p_terms(s.side),
          do_terms(s.side);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = runs.map(task);
        for (int64_t i = runs.first(task); i < runs.end(task, s); ++i) {
          const int64_t m = bh * s.rows + i, rs = row_start[i];
          // key rows above this row's window are done
          for (int64_t a = 0; a < s.kernel; ++a) {
            const int64_t y = sums.held[a];
            if (y >= 0 && y < rs) {
              finish_key_row(task, bh, y, sums.dk(y, s), sums.dv(y, s));
              sums.held[a] = -1;
            }
          }
          for (int64_t a = 0; a < s.kernel; ++a) {
            const int64_t y = rs + a;
            if (sums.held[y % s.kernel] != y) {
              std::fill(sums.dk(y, s), sums.dk(y, s) + 2 * s.dims * s.wp, T(0));
              sums.held[y % s.kernel] = y;
            }
          }
          transpose_row<T>(query, s, m, qt.data());
          transpose_row<T>(grad_out, s, m, dot.data());
          for (int64_t a = 0; a < s.kernel; ++a) key_rows[a] = keys.row(bh, rs + a);
          std::fill(bias_sums.begin(), bias_sums.end(), Vec<T>{});
          for (int64_t vec = 0; vec * L < s.wp; ++vec) {
            const int64_t j0 = vec * L, low = qv.low[vec], n = qv.high[vec] - low + 1, count = s.kernel * n;
            scores_of<T>(s, qt.data(), key_rows.data(), bias + bh % s.heads * s.side * s.side, i, rs, j0, low, n,
                         qv.offset[vec], scale, S.data(), shifted);
            Vec<T> lse_vec{};
            for (int64_t l = 0; l < L && j0 + l < s.cols; ++l) lse_vec[l] = lse_all[m * s.cols + j0 + l];
            for (int64_t e = 0; e < count; ++e)
              S[e] = S[e] > outside ? exp_vec<T>(S[e] - lse_vec) : Vec<T>{};  // P; 0 outside
            for (int64_t a = 0; a < s.kernel; ++a) {
              const T* value_row = values.row(bh, rs + a) + s.pad + j0 + low;
              for (int64_t x = 0; x < n; ++x) shifted[x] = value_row + x;
              products<T>(dP.data() + a * n, n, dot.data() + s.pad + j0, s.width, shifted.data(), s.width, s.dims);
            }
            Vec<T> delta{};  // sum over the keys of P * dP
            for (int64_t e = 0; e < count; ++e) delta += S[e] * dP[e];
            for (int64_t a = 0; a < s.kernel; ++a)
              for (int64_t dx = -(s.kernel - 1); dx < s.kernel; ++dx) {
                const int64_t x = dx - low, e = a * n + x, slot = a * s.side + dx + s.kernel - 1;
                T* p_at = probs.data() + slot * s.width + s.pad + j0;
                T* ds_at = grad_scores.data() + slot * s.width + s.pad + j0;
                if (x < 0 || x >= n) {  // no query of the vector uses this offset
                  store(p_at, Vec<T>{});
                  store(ds_at, Vec<T>{});
                  continue;
                }
                dP[e] = S[e] * (dP[e] - delta);  // dS
                bias_sums[slot] += dP[e];
                store(p_at, S[e]);
                store(ds_at, dP[e]);
                weights[e] = ds_at;
                rows[e] = key_rows[a] + s.pad + j0 + low + x;
              }
            weighted_sum<T>(dqt.data() + j0, s.wp, s.dims, count, weights.data(), rows.data(), s.width);
          }
          untranspose<T>(s, dqt.data(), scale, grad_query, m);
          T* part = parts + m * s.side * s.side + (rs - i + s.kernel - 1) * s.side;
          for (int64_t slot = 0; slot < slots; ++slot) {
            T sum = 0;
            for (int64_t l = 0; l < L; ++l) sum += bias_sums[slot][l];
            part[slot] += sum;
          }
          // this row's share of dk and dv: key column x0 + lane takes query column x0 + lane - dx
          for (int64_t a = 0; a < s.kernel; ++a) {
            T *dk = sums.dk(rs + a, s), *dv = sums.dv(rs + a, s);
            for (int64_t vec = 0; vec * L < s.wp; ++vec) {
              const int64_t x0 = vec * L;
              int64_t count = 0;
              for (int64_t dx = key_low[vec]; dx <= key_high[vec]; ++dx, ++count) {
                const int64_t slot = (a * s.side + dx + s.kernel - 1) * s.width, column = s.pad + x0 - dx;
                weights[count] = grad_scores.data() + slot + column;
                rows[count] = qt.data() + column;
                p_terms[count] = probs.data() + slot + column;
                do_terms[count] = dot.data() + column;
              }
              weighted_sum<T>(dk + x0, s.wp, s.dims, count, weights.data(), rows.data(), s.width, true);
              weighted_sum<T>(dv + x0, s.wp, s.dims, count, p_terms.data(), do_terms.data(), s.width, true);
            }
          }
        }
        for (int64_t a = 0; a < s.kernel; ++a) {  // the task's last rows
          const int64_t y = sums.held[a];
          if (y >= 0) finish_key_row(task, bh, y, sums.dk(y, s), sums.dv(y, s));
          sums.held[a] = -1;
        }
      }
    });
    // key rows reached by several tasks: their partial sums added up in task order
    std::vector<std::vector<T>> totals(s.maps());
    for (const auto& task_partials : partials)
      for (const auto& partial : task_partials) {
        auto& total = totals[partial.map * s.rows + partial.row];
        if (total.empty()) total.assign(partial.data.size(), T(0));
        for (size_t e = 0; e < total.size(); ++e) total[e] += partial.data[e];
      }
    at::parallel_for(0, s.maps(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        if (totals[m].empty()) continue;
        untranspose<T>(s, totals[m].data(), scale, grad_key, m);
        untranspose<T>(s, totals[m].data() + s.dims * s.wp, T(1), grad_value, m);
      }
    });
    // the bias gradient: row parts added in (batch, row) order
    T* gr = grad_rpb.data_ptr<T>();
    const int64_t entries = s.side * s.side;
    at::parallel_for(0, s.heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t head = begin; head < end; ++head) {
        T* total = gr + head * entries;
        std::fill(total, total + entries, T(0));
        for (int64_t b = 0; b < s.batch; ++b)
          for (int64_t i = 0; i < s.rows; ++i) {
            const T* part = parts + ((b * s.heads + head) * s.rows + i) * entries;
            for (int64_t e = 0; e < entries; ++e) total[e] += part[e];
          }
      }
    });
  });
  return {grad_query, grad_key, grad_value, grad_rpb};
}

}  // namespace

TORCH_LIBRARY(MMDAT_LIBRARY, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, Tensor rpb, int kernel_size, bool with_lse) "
        "-> Tensor[]");
  m.def("backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor rpb, Tensor lse, "
        "int kernel_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(MMDAT_LIBRARY, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
