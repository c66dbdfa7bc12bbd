// Deformable attention with the sampled relative position bias on CPU, without an N x N tensor.
//
// For batch b, head h of offset group g, query (r, c) of a separable grid (ys[r], xs[c]) and key n
// at positions[b * groups + g, n] = (py, px), the bias is the bilinear sample (zero outside,
// align_corners=True) of table[h] at half the query-key displacement. In table pixels:
//
//     iy = ys[r] * (Th - 1) / 4 + (Th - 1) / 2 - py * (Th - 1) / 4     (ix alike with xs, px, Tw)
//
// so both coordinates are one subtraction of pre-scaled query and key coordinates. Queries of one
// row share iy, so the table is interpolated along y once per (key, query row) into a padded row
// `ty`, and then only along x per (query, key): two reads instead of four.
//
// Work is done one query row at a time (`Wq x Nk` scores): the scores by a matmul, the bias added
// in place, softmax, and a matmul with the values. Backward recomputes the scores and
// probabilities of each row. Threads split forward over (batch, head, query row) and backward
// over (batch, head), so the accumulations of a backward task need no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Coordinates are clamped to [-PAD, size + 1] and shifted by PAD, so every corner index lies in a
// zero-padded row of size + 2 * PAD + 1 entries. Clamping changes neither values nor gradients:
// beyond -1 and size both corners are outside the table.
constexpr int PAD = 2;

template <typename T>
inline void locate(T coord, int64_t size, int64_t& index, T& weight) {
  const T c = std::min(std::max(coord, T(-PAD)), T(size + 1)) + T(PAD);
  index = static_cast<int64_t>(c);  // c >= 0, so truncation is floor
  weight = c - T(index);
}

struct Shapes {
  int64_t batch, heads, groups, rows, cols, keys, dims, th, tw, padded;
  int64_t queries() const { return rows * cols; }
};

Shapes shapes_of(const at::Tensor& query, const at::Tensor& key, const at::Tensor& ys,
                 const at::Tensor& xs, const at::Tensor& positions, const at::Tensor& table) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4, "query and key must be (B, heads, N, d)");
  Shapes s;
  s.batch = query.size(0);
  s.heads = query.size(1);
  s.dims = query.size(3);
  s.rows = ys.size(0);
  s.cols = xs.size(0);
  s.keys = key.size(2);
  s.groups = positions.size(0) / s.batch;
  s.th = table.size(1);
  s.tw = table.size(2);
  s.padded = s.tw + 2 * PAD + 1;
  TORCH_CHECK(query.size(2) == s.queries(), "query count must be len(ys) * len(xs)");
  TORCH_CHECK(s.groups > 0 && positions.size(0) == s.batch * s.groups && s.heads % s.groups == 0,
              "positions must be (B * groups, Nk, 2) with groups dividing heads");
  TORCH_CHECK(positions.size(1) == s.keys && positions.size(2) == 2, "positions must be (B * groups, Nk, 2)");
  TORCH_CHECK(table.size(0) == s.heads, "table must be (heads, Th, Tw)");
  return s;
}

// Table coordinates, pre-scaled: query rows/columns (with the centring term) and keys.
template <typename T>
struct Coords {
  std::vector<T> qy, qx, ky, kx;  // ky, kx: (B * groups, Nk)
};

template <typename T>
Coords<T> coords_of(const Shapes& s, const at::Tensor& ys, const at::Tensor& xs,
                    const at::Tensor& positions) {
  Coords<T> c;
  const T sy = T(s.th - 1) / 4, sx = T(s.tw - 1) / 4;
  const T* y = ys.data_ptr<T>();
  const T* x = xs.data_ptr<T>();
  const T* p = positions.data_ptr<T>();
  for (int64_t r = 0; r < s.rows; ++r) c.qy.push_back(y[r] * sy + T(s.th - 1) / 2);
  for (int64_t q = 0; q < s.cols; ++q) c.qx.push_back(x[q] * sx + T(s.tw - 1) / 2);
  const int64_t n = s.batch * s.groups * s.keys;
  c.ky.resize(n);
  c.kx.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    c.ky[i] = p[2 * i] * sy;
    c.kx[i] = p[2 * i + 1] * sx;
  }
  return c;
}

// Rows of the table interpolated along y for every key at one query row, stored as pairs of
// neighbours: pairs[(n * padded + i) * 2 + {0, 1}] = row_n[i], row_n[i + 1] of the zero-padded
// row, so that the x interpolation reads both corners with one (vectorisable) 64-bit load.
// Also returns each key's padded row index and weight (for backward).
template <typename T>
void interpolate_rows(const Shapes& s, const T* table, T qy, const T* ky, T* pairs, int64_t* y0,
                      T* wy) {
  std::vector<T> line(s.padded + 1, T(0));  // the pads (and one past the end) stay zero
  for (int64_t n = 0; n < s.keys; ++n) {
    int64_t i;
    T w;
    locate(qy - ky[n], s.th, i, w);
    y0[n] = i;
    wy[n] = w;
    const int64_t r0 = i - PAD, r1 = r0 + 1;
    const bool in0 = r0 >= 0 && r0 < s.th, in1 = r1 >= 0 && r1 < s.th;
    const T w0 = in0 ? T(1) - w : T(0), w1 = in1 ? w : T(0);
    const T* t0 = table + (in0 ? r0 : 0) * s.tw;
    const T* t1 = table + (in1 ? r1 : 0) * s.tw;
    T* out = line.data() + PAD;
    for (int64_t j = 0; j < s.tw; ++j) out[j] = w0 * t0[j] + w1 * t1[j];
    T* p = pairs + n * s.padded * 2;
    for (int64_t j = 0; j < s.padded; ++j) {
      p[2 * j] = line[j];
      p[2 * j + 1] = line[j + 1];
    }
  }
}

// The two corners (row[i], row[i + 1]) of pair `at`.
template <typename T>
inline void corners(const T* __restrict pairs, int32_t at, T& t0, T& t1) {
  if constexpr (sizeof(T) == 4) {
    uint64_t both;  // one 64-bit load (a gather when vectorised) instead of two 32-bit ones
    std::memcpy(&both, pairs + 2 * static_cast<int64_t>(at), 8);
    const uint32_t lo = static_cast<uint32_t>(both), hi = static_cast<uint32_t>(both >> 32);
    std::memcpy(&t0, &lo, 4);
    std::memcpy(&t1, &hi, 4);
  } else {
    t0 = pairs[2 * static_cast<int64_t>(at)];
    t1 = pairs[2 * static_cast<int64_t>(at) + 1];
  }
}

// scores (Wq, Nk) <- scores * scale + bias, for one query row. Written for the compiler to
// vectorise (32-bit indices, no aliasing): two gathers per (query, key).
template <typename T>
void add_bias(const Shapes& s, const T* qx, const T* __restrict kx, const T* __restrict ty, T scale,
              T* __restrict scores) {
  const T low = T(-PAD), high = T(s.tw + 1);
  const int32_t padded = static_cast<int32_t>(s.padded);
  const int32_t keys = static_cast<int32_t>(s.keys);
  for (int64_t c = 0; c < s.cols; ++c) {
    T* __restrict row = scores + c * s.keys;
    const T ax = qx[c];
    for (int32_t n = 0; n < keys; ++n) {
      const T coord = std::min(std::max(ax - kx[n], low), high) + T(PAD);
      const int32_t i = static_cast<int32_t>(coord);
      const T w = coord - T(i);
      T t0, t1;
      corners(ty, n * padded + i, t0, t1);
      row[n] = row[n] * scale + (t0 + w * (t1 - t0));
    }
  }
}

// Probabilities of one query row: softmax(q k^T * scale + bias), (Wq, Nk).
template <typename T>
at::Tensor row_probabilities(const Shapes& s, const at::Tensor& q_row, const at::Tensor& k,
                             const Coords<T>& co, int64_t row, int64_t group, const T* table,
                             T scale, std::vector<T>& ty, std::vector<int64_t>& y0,
                             std::vector<T>& wy) {
  interpolate_rows<T>(s, table, co.qy[row], co.ky.data() + group * s.keys, ty.data(), y0.data(),
                      wy.data());
  at::Tensor scores = at::mm(q_row, k.t());
  add_bias<T>(s, co.qx.data(), co.kx.data() + group * s.keys, ty.data(), scale,
              scores.data_ptr<T>());
  return at::_softmax(scores, 1, false);
}

at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   const at::Tensor& ys, const at::Tensor& xs, const at::Tensor& positions,
                   const at::Tensor& table) {
  const Shapes s = shapes_of(query, key, ys, xs, positions, table);
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "deformable_attention_cpu_forward", [&] {
    using T = scalar_t;
    const Coords<T> co = coords_of<T>(s, ys, xs, positions);
    const T scale = T(1) / std::sqrt(T(s.dims));
    const int64_t heads_per_group = s.heads / s.groups;
    at::parallel_for(0, s.batch * s.heads * s.rows, 1, [&](int64_t begin, int64_t end) {
      // Grad and inference modes are per thread and not passed to the workers; nothing in here
      // is differentiated (the caller's autograd function owns the gradients).
      const c10::InferenceMode guard;
      std::vector<T> ty(s.keys * s.padded * 2), wy(s.keys);
      std::vector<int64_t> y0(s.keys);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / s.rows, row = task % s.rows;
        const int64_t b = bh / s.heads, h = bh % s.heads;
        const int64_t group = b * s.groups + h / heads_per_group;
        const at::Tensor q_row = query[b][h].narrow(0, row * s.cols, s.cols);
        const at::Tensor probs = row_probabilities<T>(
            s, q_row, key[b][h], co, row, group, table[h].data_ptr<T>(), scale, ty, y0, wy);
        at::Tensor out_row = out[b][h].narrow(0, row * s.cols, s.cols);
        at::mm_out(out_row, probs, value[b][h]);
      }
    });
  });
  return out;
}

// Returns (grad_query, grad_key, grad_value, grad_positions per (b, head): (B, heads, Nk, 2),
// grad_table per (b, head): (B, heads, Th, Tw)).
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query,
                                 const at::Tensor& key, const at::Tensor& value,
                                 const at::Tensor& out, const at::Tensor& ys, const at::Tensor& xs,
                                 const at::Tensor& positions, const at::Tensor& table) {
  const Shapes s = shapes_of(query, key, ys, xs, positions, table);
  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::zeros_like(key);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_positions = at::zeros({s.batch, s.heads, s.keys, 2}, query.options());
  at::Tensor grad_table = at::zeros({s.batch, s.heads, s.th, s.tw}, query.options());
  const at::Tensor delta = (grad_out * out).sum(-1);  // rowsum(dO * O): (B, heads, Nq)
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "deformable_attention_cpu_backward", [&] {
    using T = scalar_t;
    const Coords<T> co = coords_of<T>(s, ys, xs, positions);
    const T scale = T(1) / std::sqrt(T(s.dims));
    const int64_t heads_per_group = s.heads / s.groups;
    at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
      const c10::InferenceMode guard;
      std::vector<T> ty(s.keys * s.padded * 2), dty(s.keys * s.padded, T(0)), wy(s.keys);
      std::vector<int64_t> y0(s.keys);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / s.heads, h = bh % s.heads;
        const int64_t group = b * s.groups + h / heads_per_group;
        const T* tab = table[h].data_ptr<T>();
        const T* kx = co.kx.data() + group * s.keys;
        const at::Tensor k = key[b][h], v = value[b][h];
        at::Tensor dk = grad_key[b][h], dv = grad_value[b][h];
        T* dpos = grad_positions[b][h].data_ptr<T>();
        T* dtab = grad_table[b][h].data_ptr<T>();
        for (int64_t row = 0; row < s.rows; ++row) {
          const at::Tensor q_row = query[b][h].narrow(0, row * s.cols, s.cols);
          const at::Tensor do_row = grad_out[b][h].narrow(0, row * s.cols, s.cols);
          const at::Tensor probs =
              row_probabilities<T>(s, q_row, k, co, row, group, tab, scale, ty, y0, wy);
          const at::Tensor dscores =
              probs * (at::mm(do_row, v.t()) - delta[b][h].narrow(0, row * s.cols, s.cols).unsqueeze(1));
          at::Tensor dq_row = grad_query[b][h].narrow(0, row * s.cols, s.cols);
          at::mm_out(dq_row, dscores, k);
          dq_row.mul_(scale);
          dk.addmm_(dscores.t(), q_row, 1, scale);
          dv.addmm_(probs.t(), do_row);

          // d(bias) = dscores, through the x interpolation into dty and the key x positions
          const T* ds = dscores.data_ptr<T>();
          for (int64_t c = 0; c < s.cols; ++c) {
            const T ax = co.qx[c];
            const T* g_row = ds + c * s.keys;
            for (int64_t n = 0; n < s.keys; ++n) {
              int64_t i;
              T w;
              locate(ax - kx[n], s.tw, i, w);
              const T g = g_row[n];
              T t0, t1;
              corners(ty.data(), static_cast<int32_t>(n * s.padded + i), t0, t1);
              T* dt = dty.data() + n * s.padded + i;
              dt[0] += g * (T(1) - w);
              dt[1] += g * w;
              dpos[2 * n + 1] -= g * (t1 - t0);
            }
          }
          // ... and through the y interpolation into the table and the key y positions
          for (int64_t n = 0; n < s.keys; ++n) {
            const int64_t r0 = y0[n] - PAD, r1 = r0 + 1;
            const bool in0 = r0 >= 0 && r0 < s.th, in1 = r1 >= 0 && r1 < s.th;
            const T w = wy[n];
            T* dt = dty.data() + n * s.padded;
            T dw = T(0);
            for (int64_t j = 0; j < s.tw; ++j) {
              const T g = dt[j + PAD];
              if (in0) {
                dtab[r0 * s.tw + j] += (T(1) - w) * g;
                dw -= g * tab[r0 * s.tw + j];
              }
              if (in1) {
                dtab[r1 * s.tw + j] += w * g;
                dw += g * tab[r1 * s.tw + j];
              }
            }
            dpos[2 * n] -= dw;
            std::fill(dt, dt + s.padded, T(0));
          }
        }
        // d(coordinate)/d(position) = -(size - 1) / 4; the sign is already in dpos
        for (int64_t n = 0; n < s.keys; ++n) {
          dpos[2 * n] *= T(s.th - 1) / 4;
          dpos[2 * n + 1] *= T(s.tw - 1) / 4;
        }
      }
    });
  });
  return {grad_query, grad_key, grad_value, grad_positions, grad_table};
}

}  // namespace

TORCH_LIBRARY(mmdat_deformable_cpu, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, Tensor ys, Tensor xs, Tensor positions, "
        "Tensor table) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor ys, "
        "Tensor xs, Tensor positions, Tensor table) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mmdat_deformable_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
