// Deformable attention with the sampled relative position bias on CPU, without an N x N tensor.
//
// For batch b, head h of offset group g, query (r, c) of a separable grid (ys[r], xs[c]) and key n
// at positions[b * groups + g, n] = (py, px), the bias is the bilinear sample (zero outside,
// align_corners=True) of table[h] at half the query-key displacement. In table pixels:
//
//     iy = ys[r] * (Th - 1) / 4 + (Th - 1) / 2 - py * (Th - 1) / 4     (ix alike with xs, px, Tw)
//
// so both coordinates are one subtraction of pre-scaled query and key coordinates.
//
// Layout: one task is one query row (its W queries) of one (batch, head), and everything is kept
// transposed, keys x queries, with the queries along the vector lanes (W padded to a multiple of
// L = 16). For a key n, all W queries of the row share iy, so they read the same table row
// interpolated along y (`ty`, zero-padded); only the x lerp differs per query, and it is a
// contiguous vector operation: with AVX-512 the two corners come from register permutes, not
// memory gathers, of the whole row when it has <= 32 entries, else of a 32-entry window of it.
//
// Forward is a flash-attention loop over blocks of FORWARD_KEYS keys: scores^T =
// K_blk (Q * scale)^T, the bias added in place, an online softmax down the columns
// (running max and sum per query, rescaling the accumulated output), and out^T += V_blk^T P^T.
// It also returns the log-sum-exp per query, so backward recomputes each block's probabilities
// with one exp and no second pass. Forward runs one task per query row of a (batch, head);
// backward cuts the rows of all (batch, head) into one run per thread and adds up the key-side
// gradients of the (batch, head) that a cut splits (see backward).
//
// The block products are one register-tiled micro-kernel (`tile`). With AVX-512 (float) it is
// written with intrinsics, as are the bias lerp, the exp and the x-lerp gradient (prefix sums
// over runs of queries in one table cell, for queries sorted by x); otherwise (double, machines
// without AVX-512) portable code: GCC/Clang vector types for the tile, and loops over the
// queries written for the compiler's vectoriser (a polynomial exp for float). Tests also build it
// with AVX-512 off (the code of CPUs with AVX2 only), so both are checked on machines with
// AVX-512.
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

#if defined(__AVX512F__)
#define MMDAT_DA_AVX512 1
#include <immintrin.h>
#else
#define MMDAT_DA_AVX512 0
#endif

// The operator namespace; tests build a variant without AVX-512 under another one.
#ifndef MMDAT_LIBRARY
#define MMDAT_LIBRARY mmdat_deformable_cpu
#endif

namespace {

// Coordinates are clamped to [-PAD, size + 1] and shifted by PAD, so every corner index lies in a
// zero-padded row of size + 2 * PAD + 1 entries. Clamping changes neither values nor gradients:
// beyond -1 and size both corners are outside the table.
constexpr int PAD = 2;
constexpr int64_t L = 16;   // queries per vector (one AVX-512 register of floats)
// Keys per block. Forward: each block rescales and adds to the running output (dims x W), so
// larger blocks read it less often. Backward: a 32 x W block of each of its scratch matrices stays
// in L1.
constexpr int64_t FORWARD_KEYS = 128;
constexpr int64_t BACKWARD_KEYS = 32;
// Micro-kernel tiles: MR rows x NV vectors of L lanes, sized to the register file. With AVX-512,
// 8 x 3: 24 accumulators, 3 row vectors of B and a broadcast take 28 of the 32 registers, and
// each step loads 3 vectors and broadcasts 8 scalars for 24 FMAs.
#ifdef __AVX512F__
constexpr int MR = 8, NV = 3;
#else
constexpr int MR = 6, NV = 1;  // 12 accumulators of 16 AVX registers (floats: 2 per vector)
#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline void locate(T coord, int64_t size, int64_t& index, T& weight) {
  const T c = std::min(std::max(coord, T(-PAD)), T(size + 1)) + T(PAD);
  index = static_cast<int64_t>(c);  // c >= 0, so truncation is floor
  weight = c - T(index);
}

struct Shapes {
  int64_t batch, heads, groups, rows, cols, keys, dims, th, tw, padded;
  int64_t wp;      // cols rounded up to whole vectors
  int64_t stride;  // of a padded table row in `ty`: >= padded + 1, whole vectors, >= 32
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
  s.wp = round_up(s.cols, L);
  s.stride = std::max<int64_t>(round_up(s.padded + 1, L), 32);
  TORCH_CHECK(query.size(2) == s.queries(), "query count must be len(ys) * len(xs)");
  TORCH_CHECK(s.groups > 0 && positions.size(0) == s.batch * s.groups && s.heads % s.groups == 0,
              "positions must be (B * groups, Nk, 2) with groups dividing heads");
  TORCH_CHECK(positions.size(1) == s.keys && positions.size(2) == 2, "positions must be (B * groups, Nk, 2)");
  TORCH_CHECK(table.size(0) == s.heads, "table must be (heads, Th, Tw)");
  return s;
}

// A vector of queries whose x coordinates span at most this many table cells finds both corners
// of every lane in the 32 row entries from its lowest lane's (see row_corners).
constexpr float WINDOW_SPAN = 29;

// Table coordinates, pre-scaled: query rows/columns (with the centring term) and keys. Per vector
// of L queries: the lane of its lowest x, and whether its x span fits a 32-entry row window.
template <typename T>
struct Coords {
  std::vector<T> qy, qx, ky, kx;  // qx padded to wp (by repeating the last); ky, kx: (B * groups, Nk)
  std::vector<int32_t> low_lane;
  std::vector<uint8_t> narrow;
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
  for (int64_t q = 0; q < s.wp; ++q) c.qx.push_back(x[std::min(q, s.cols - 1)] * sx + T(s.tw - 1) / 2);
  for (auto v = c.qx.begin(); v != c.qx.end(); v += L) {
    const auto [low, high] = std::minmax_element(v, v + L);
    c.low_lane.push_back(static_cast<int32_t>(low - v));
    c.narrow.push_back(*high - *low <= T(WINDOW_SPAN));
  }
  const int64_t n = s.batch * s.groups * s.keys;
  c.ky.resize(n);
  c.kx.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    c.ky[i] = p[2 * i] * sy;
    c.kx[i] = p[2 * i + 1] * sx;
  }
  return c;
}

// A zeroed, 64-byte aligned scratch buffer (ATen's allocator aligns).
template <typename T>
T* scratch(std::vector<at::Tensor>& keep, int64_t size) {
  keep.push_back(at::zeros({size}, at::CppTypeToScalarType<T>::value));
  return keep.back().data_ptr<T>();
}

// ---------------------------------------------------------------------------------------------
// Bytes of the machine's vector registers: the portable tile uses GCC/Clang vector types of
// this size (larger ones the compiler keeps in memory).
#if defined(__AVX512F__)
constexpr int VECTOR_BYTES = 64;
#elif defined(__AVX__)
constexpr int VECTOR_BYTES = 32;
#else
constexpr int VECTOR_BYTES = 16;
#endif
template <typename T>
struct Native;
template <>
struct Native<float> {
  typedef float type __attribute__((vector_size(VECTOR_BYTES)));
};
template <>
struct Native<double> {
  typedef double type __attribute__((vector_size(VECTOR_BYTES)));
};

// C[r * ldc + x] (+)= sum_t A[r * ars + t * acs] * B[t * ldb + x], r < R, x < V * L: one tile of
// the block products, kept in registers.
template <typename T, int R, int V>
void tile(int64_t depth, const T* A, int64_t ars, int64_t acs, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool add) {
#if MMDAT_DA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    __m512 acc[R][V];
    if (add) {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_loadu_ps(C + r * ldc + v * L);
    } else {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < depth; ++t) {
      __m512 b[V];
      for (int v = 0; v < V; ++v) {
        b[v] = _mm512_loadu_ps(B + t * ldb + v * L);
        // keep b in a register: otherwise GCC folds the load into every row's FMA, R loads per
        // vector instead of one
        __asm__("" : "+v"(b[v]));
      }
      for (int r = 0; r < R; ++r) {
        const __m512 a = _mm512_set1_ps(A[r * ars + t * acs]);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(C + r * ldc + v * L, acc[r][v]);
    return;
  }
#endif
  using Vec = typename Native<T>::type;
  constexpr int P = V * L * sizeof(T) / sizeof(Vec);  // registers per tile row
  constexpr int64_t S = sizeof(Vec) / sizeof(T);      // lanes per register
  Vec acc[R][P], b[P];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) {
      if (add)
        std::memcpy(&acc[r][v], C + r * ldc + v * S, sizeof(Vec));
      else
        acc[r][v] = Vec{};
    }
  for (int64_t t = 0; t < depth; ++t) {
    for (int v = 0; v < P; ++v) std::memcpy(&b[v], B + t * ldb + v * S, sizeof(Vec));
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + t * acs];
      for (int v = 0; v < P; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < P; ++v) std::memcpy(C + r * ldc + v * S, &acc[r][v], sizeof(Vec));
}

template <typename T>
using TileFn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool);

template <typename T, int R>
TileFn<T> tile_of_width(int64_t v) {
  switch (v) {
    case 1: return &tile<T, R, 1>;
    case 2: return &tile<T, R, 2>;
    default: return &tile<T, R, NV>;
  }
}

template <typename T>
TileFn<T> tile_of(int64_t r, int64_t v) {
  switch (r) {
    case 1: return tile_of_width<T, 1>(v);
    case 2: return tile_of_width<T, 2>(v);
    case 3: return tile_of_width<T, 3>(v);
    case 4: return tile_of_width<T, 4>(v);
    case 5: return tile_of_width<T, 5>(v);
    case 6: return tile_of_width<T, 6>(v);
    case 7: return tile_of_width<T, 7>(v);
    default: return tile_of_width<T, MR>(v);
  }
}

// C (M x vectors * L, row stride ldc) (+)= A (M x depth, strides ars, acs) B (depth x vectors * L).
template <typename T>
void gemm(int64_t M, int64_t depth, int64_t vectors, const T* A, int64_t ars, int64_t acs,
          const T* B, int64_t ldb, T* C, int64_t ldc, bool add) {
  // split the vectors into near-equal chunks of at most NV, e.g. 7 -> 2 + 2 + 3 with NV = 3
  const int64_t chunks = (vectors + NV - 1) / NV;
  for (int64_t c = 0, v0 = 0; c < chunks; ++c) {
    const int64_t v = (vectors - v0) / (chunks - c);
    for (int64_t r0 = 0; r0 < M;) {
      const int64_t r = std::min<int64_t>(MR, M - r0);
      tile_of<T>(r, v)(depth, A + r0 * ars, ars, acs, B + v0 * L, ldb, C + r0 * ldc + v0 * L, ldc, add);
      r0 += r;
    }
    v0 += v;
  }
}

// ---------------------------------------------------------------------------------------------
// exp: exp_of (scalar) and exp_ps (AVX-512 float vectors) are in vector_math.h.
using mmdat_math::exp_of;
#if MMDAT_DA_AVX512
using mmdat_math::exp_ps;
#endif


// Rows of table[h] interpolated along y at query row coordinate qy for keys n < count (y
// coordinates ky): ty[n * stride + PAD + j], j < tw (the rest of each row stays zero). Also each
// key's padded row index and weight, for backward.
template <typename T>
void interpolate_rows(const Shapes& s, const T* table, T qy, const T* ky, int64_t count, T* ty,
                      int64_t* y0, T* wy) {
  for (int64_t n = 0; n < count; ++n) {
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
    T* out = ty + n * s.stride + PAD;
    for (int64_t j = 0; j < s.tw; ++j) out[j] = w0 * t0[j] + w1 * t1[j];
  }
}

#if MMDAT_DA_AVX512
// The corners t0 = row[i], t1 = row[i + 1] of each lane of the queries' vector `vec`. A padded row
// of at most 32 entries is in two registers (lo, hi: loaded once per key; i + 1 <= padded - 1 <=
// 31). A longer row (a table made for a larger map than the one attended, as DAT++'s first
// stages at detection size) is read through the 32 entries from the lowest lane's index, which
// hold every lane's corners when the vector is narrow (i - i0 + 1 <= WINDOW_SPAN + 2), and is
// gathered otherwise. Rows in `ty` are followed by >= 2 * L readable entries (see ty_size).
inline void row_corners(const Shapes& s, const Coords<float>& co, int64_t vec, const float* row,
                        __m512 lo, __m512 hi, __m512i i, __m512& t0, __m512& t1) {
  const __m512i one = _mm512_set1_epi32(1);
  if (s.padded <= 32) {
    t0 = _mm512_permutex2var_ps(lo, i, hi);
    t1 = _mm512_permutex2var_ps(lo, _mm512_add_epi32(i, one), hi);
  } else if (co.narrow[vec]) {
    // the lowest x has the lowest index (clamping and truncation keep the order)
    const int32_t i0 = _mm_cvtsi128_si32(
        _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_set1_epi32(co.low_lane[vec]), i)));
    const __m512i j = _mm512_sub_epi32(i, _mm512_set1_epi32(i0));
    const __m512 a = _mm512_loadu_ps(row + i0), b = _mm512_loadu_ps(row + i0 + L);
    t0 = _mm512_permutex2var_ps(a, j, b);
    t1 = _mm512_permutex2var_ps(a, _mm512_add_epi32(j, one), b);
  } else {
    t0 = _mm512_i32gather_ps(i, row, 4);
    t1 = _mm512_i32gather_ps(_mm512_add_epi32(i, one), row, 4);
  }
}
#endif

// Entries of the `ty` scratch (`keys` rows): a window read from a row's last corner may run 2 * L
// entries past it.
inline int64_t ty_size(const Shapes& s, int64_t keys) { return keys * s.stride + 2 * L; }

// scores (count x wp) += bias of keys n < count (x coordinates kx, rows ty) for the row's queries.
template <typename T>
void add_bias(const Shapes& s, const Coords<T>& co, const T* __restrict kx, const T* __restrict ty,
              int64_t count, T* __restrict scores) {
  const T* __restrict qx = co.qx.data();
#if MMDAT_DA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    const __m512 low = _mm512_set1_ps(-PAD), high = _mm512_set1_ps(float(s.tw + 1));
    const __m512 pad = _mm512_set1_ps(PAD);
    for (int64_t n = 0; n < count; ++n) {
      const float* row = ty + n * s.stride;
      const __m512 lo = _mm512_loadu_ps(row), hi = _mm512_loadu_ps(row + L);
      const __m512 k = _mm512_set1_ps(kx[n]);
      float* out = scores + n * s.wp;
      for (int64_t x = 0; x < s.wp; x += L) {
        const __m512 c = _mm512_add_ps(
            _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(qx + x), k), low), high), pad);
        const __m512i i = _mm512_cvttps_epi32(c);
        const __m512 w = _mm512_sub_ps(c, _mm512_cvtepi32_ps(i));
        __m512 t0, t1;
        row_corners(s, co, x / L, row, lo, hi, i, t0, t1);
        _mm512_storeu_ps(out + x, _mm512_add_ps(_mm512_loadu_ps(out + x),
                                                _mm512_fmadd_ps(w, _mm512_sub_ps(t1, t0), t0)));
      }
    }
    return;
  }
#endif
  // written for the compiler's vectoriser: no aliasing, sizes in locals, clamps by value
  const T low = T(-PAD), high = T(s.tw + 1);
  const int64_t wp = s.wp, stride = s.stride;
  for (int64_t n = 0; n < count; ++n) {
    const T* row = ty + n * stride;
    const T k = kx[n];
    T* out = scores + n * wp;
    for (int64_t x = 0; x < wp; ++x) {
      T c = qx[x] - k;
      c = c < low ? low : c;
      c = (c > high ? high : c) + T(PAD);
      const int32_t i = static_cast<int32_t>(c);
      const T w = c - T(i);
      const T t0 = row[i], t1 = row[i + 1];
      out[x] += t0 + w * (t1 - t0);
    }
  }
}

// One block of the online softmax: m, l (wp) the running max and sum per query, out (dims x wp)
// the running output; scores (count x wp) become the block's probabilities. work: 3 * wp scratch.
template <typename T>
void softmax_block(const Shapes& s, int64_t count, T* scores, T* m, T* l, T* out, T* work) {
#if MMDAT_DA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t x = 0; x < s.wp; x += L) {
      __m512 mb = _mm512_loadu_ps(m + x);
      for (int64_t n = 0; n < count; ++n) mb = _mm512_max_ps(mb, _mm512_loadu_ps(scores + n * s.wp + x));
      const __m512 alpha = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(m + x), mb));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t n = 0; n < count; ++n) {
        const __m512 p = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + n * s.wp + x), mb));
        _mm512_storeu_ps(scores + n * s.wp + x, p);
        sum = _mm512_add_ps(sum, p);
      }
      _mm512_storeu_ps(m + x, mb);
      _mm512_storeu_ps(l + x, _mm512_fmadd_ps(_mm512_loadu_ps(l + x), alpha, sum));
      for (int64_t k = 0; k < s.dims; ++k)
        _mm512_storeu_ps(out + k * s.wp + x, _mm512_mul_ps(_mm512_loadu_ps(out + k * s.wp + x), alpha));
    }
    return;
  }
#endif
  // rows of wp queries at a time, so that the loops over the queries vectorise
  T* __restrict mb = work;
  T* __restrict sum = work + s.wp;
  for (int64_t x = 0; x < s.wp; ++x) {
    mb[x] = m[x];
    sum[x] = T(0);
  }
  for (int64_t n = 0; n < count; ++n) {
    const T* __restrict row = scores + n * s.wp;
    for (int64_t x = 0; x < s.wp; ++x) mb[x] = std::max(mb[x], row[x]);
  }
  for (int64_t n = 0; n < count; ++n) {
    T* __restrict row = scores + n * s.wp;
    for (int64_t x = 0; x < s.wp; ++x) {
      row[x] = exp_of(row[x] - mb[x]);
      sum[x] += row[x];
    }
  }
  for (int64_t x = 0; x < s.wp; ++x) {
    const T alpha = exp_of(m[x] - mb[x]);
    m[x] = mb[x];
    l[x] = l[x] * alpha + sum[x];
    work[2 * s.wp + x] = alpha;
  }
  for (int64_t k = 0; k < s.dims; ++k) {
    T* __restrict o = out + k * s.wp;
    const T* __restrict alpha = work + 2 * s.wp;
    for (int64_t x = 0; x < s.wp; ++x) o[x] *= alpha[x];
  }
}

// scores (count x wp) <- exp(scores - lse): the probabilities, from the forward's log-sum-exp.
template <typename T>
void probabilities(const Shapes& s, int64_t count, const T* lse, T* scores) {
#if MMDAT_DA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t n = 0; n < count; ++n)
      for (int64_t x = 0; x < s.wp; x += L) {
        float* p = scores + n * s.wp + x;
        _mm512_storeu_ps(p, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(lse + x))));
      }
    return;
  }
#endif
  for (int64_t n = 0; n < count; ++n) {
    T* __restrict row = scores + n * s.wp;
    const T* __restrict base = lse;
    for (int64_t x = 0; x < s.wp; ++x) row[x] = exp_of(row[x] - base[x]);
  }
}

#if MMDAT_DA_AVX512
// Inclusive prefix sum over the 16 lanes.
inline __m512 prefix_sum(__m512 x) {
  const __m512i zero = _mm512_setzero_si512();
  x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 15)));
  x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 14)));
  x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 12)));
  return _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(x), zero, 8)));
}
#endif

// Backward of the x lerp for keys n < count of a block: dS (count x wp) into the padded rows
// of dty and into dpos[2 * n + 1] (-= dS * slope). The gradient of padded entry i of key n's row
// is dty[n * stride + i] + dty[(BACKWARD_KEYS + n) * stride + i - 1]: the second half takes the
// right corners' shares where that makes the updates of one row independent. `sorted`: qx is
// nondecreasing.
template <typename T>
void bias_backward_x(const Shapes& s, const Coords<T>& co, const T* kx, const T* ty, const T* dscores,
                     int64_t count, bool sorted, T* dty, T* dpos) {
  const T* qx = co.qx.data();
#if MMDAT_DA_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (sorted) {
      // Sorted queries fall into nondecreasing table cells, so each vector's corner updates are
      // runs of equal cells: a prefix sum over the lanes and one scalar update per run (at its
      // last lane), instead of a read-modify-write per (query, key) that waits on the previous.
      const __m512 low = _mm512_set1_ps(-PAD), high = _mm512_set1_ps(float(s.tw + 1));
      const __m512 pad = _mm512_set1_ps(PAD);
      alignas(64) float sa[L], sb[L];
      alignas(64) int32_t cell[L];
      for (int64_t n = 0; n < count; ++n) {
        const float* row = ty + n * s.stride;
        const __m512 lo = _mm512_loadu_ps(row), hi = _mm512_loadu_ps(row + L);
        const __m512 k = _mm512_set1_ps(kx[n]);
        float* dt = dty + n * s.stride;
        float* dt_right = dty + (BACKWARD_KEYS + n) * s.stride;
        __m512 dx = _mm512_setzero_ps();
        for (int64_t x = 0; x < s.wp; x += L) {
          const __mmask16 valid = s.cols - x >= L ? __mmask16(0xFFFF) : __mmask16((1u << (s.cols - x)) - 1);
          const __m512 g = _mm512_maskz_loadu_ps(valid, dscores + n * s.wp + x);
          const __m512 c = _mm512_add_ps(
              _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(qx + x), k), low), high), pad);
          const __m512i i = _mm512_cvttps_epi32(c);
          const __m512 w = _mm512_sub_ps(c, _mm512_cvtepi32_ps(i));
          __m512 t0, t1;
          row_corners(s, co, x / L, row, lo, hi, i, t0, t1);
          dx = _mm512_fmadd_ps(g, _mm512_sub_ps(t1, t0), dx);
          const __m512 gw = _mm512_mul_ps(g, w);
          _mm512_store_ps(sa, prefix_sum(_mm512_sub_ps(g, gw)));
          _mm512_store_ps(sb, prefix_sum(gw));
          _mm512_store_epi32(cell, i);
          // last lane of each run: the next lane's cell differs, or the vector ends
          uint32_t ends = _mm512_cmpneq_epi32_mask(i, _mm512_alignr_epi32(i, i, 1)) | 0x8000u;
          float pa = 0.f, pb = 0.f;
          while (ends) {
            const int j = __builtin_ctz(ends);
            ends &= ends - 1;
            dt[cell[j]] += sa[j] - pa;
            dt_right[cell[j]] += sb[j] - pb;
            pa = sa[j];
            pb = sb[j];
          }
        }
        dpos[2 * n + 1] -= _mm512_reduce_add_ps(dx);
      }
      return;
    }
  }
#endif
  for (int64_t n = 0; n < count; ++n) {
    const T* g_row = dscores + n * s.wp;
    const T* t_row = ty + n * s.stride;
    T* dt = dty + n * s.stride;
    T dx = T(0);
    for (int64_t j = 0; j < s.cols; ++j) {
      int64_t i;
      T w;
      locate(qx[j] - kx[n], s.tw, i, w);
      const T g = g_row[j];
      dt[i] += g * (T(1) - w);
      dt[i + 1] += g * w;
      dx += g * (t_row[i + 1] - t_row[i]);
    }
    dpos[2 * n + 1] -= dx;
  }
}

// Backward of the y interpolation for keys n < count of a block: the padded rows' gradients
// (dty, see bias_backward_x; zeroed here for the next block) into the table (dtab) and
// dpos[2 * n].
template <typename T>
void bias_backward_y(const Shapes& s, const T* __restrict tab, const int64_t* y0, const T* wy,
                     int64_t count, T* dty, T* __restrict dtab, T* dpos) {
  std::vector<T> grad(s.tw);
  for (int64_t n = 0; n < count; ++n) {
    T* __restrict left = dty + n * s.stride;
    T* __restrict right = dty + (BACKWARD_KEYS + n) * s.stride;
    for (int64_t j = 0; j < s.tw; ++j) grad[j] = left[j + PAD] + right[j + PAD - 1];
    std::fill(left, left + s.stride, T(0));
    std::fill(right, right + s.stride, T(0));
    const int64_t r0 = y0[n] - PAD, r1 = r0 + 1;
    const T w = wy[n];
    T dw = T(0);
    for (int64_t r = r0; r <= r1; ++r) {
      if (r < 0 || r >= s.th) continue;
      const T share = r == r0 ? T(1) - w : w, sign = r == r0 ? T(-1) : T(1);
      const T* __restrict t = tab + r * s.tw;
      T* __restrict dt = dtab + r * s.tw;
      const T* __restrict g = grad.data();
      T dot = T(0);
      for (int64_t j = 0; j < s.tw; ++j) {
        dt[j] += share * g[j];
        dot += g[j] * t[j];
      }
      dw += sign * dot;
    }
    dpos[2 * n] -= dw;
  }
}

// Query row `row` of q (W x dims, queries `stride` apart), transposed and scaled into qt (dims x
// wp, zero padded).
template <typename T>
void transpose_row(const Shapes& s, const T* q, int64_t stride, T scale, T* qt) {
  for (int64_t j = 0; j < s.cols; ++j)
    for (int64_t k = 0; k < s.dims; ++k) qt[k * s.wp + j] = q[j * stride + k] * scale;
}

// A (B, heads, Nq, dims) tensor whose head dims are contiguous, with any other strides (a view of
// (B, Nq, heads, dims), as the module's heads are): the first query of each query row.
template <typename T>
struct QueryRows {
  T* data;
  int64_t batch_stride, head_stride, stride;  // stride: from one query to the next
  QueryRows(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<T>>()),
        batch_stride(t.stride(0)),
        head_stride(t.stride(1)),
        stride(t.stride(2)) {}
  T* row(const Shapes& s, int64_t bh, int64_t row) const {
    return data + bh / s.heads * batch_stride + bh % s.heads * head_stride + row * s.cols * stride;
  }
};

// A new (B, heads, Nq, dims) tensor laid out (B, Nq, heads, dims), so that merging the heads
// afterwards is a view.
at::Tensor heads_merged_like(const at::Tensor& query) {
  return at::empty({query.size(0), query.size(2), query.size(1), query.size(3)}, query.options()).permute({0, 2, 1, 3});
}

// Scores^T of keys [n0, n0 + count) for one query row, bias included: K_blk qt + bias.
template <typename T>
void block_scores(const Shapes& s, const Coords<T>& co, const T* table, int64_t row, int64_t group,
                  const T* k, const T* qt, int64_t n0, int64_t count, T* ty, int64_t* y0, T* wy,
                  T* scores) {
  interpolate_rows<T>(s, table, co.qy[row], co.ky.data() + group * s.keys + n0, count, ty, y0, wy);
  gemm<T>(count, s.dims, s.wp / L, k + n0 * s.dims, s.dims, 1, qt, s.wp, scores, s.wp, false);
  add_bias<T>(s, co, co.kx.data() + group * s.keys + n0, ty, count, scores);
}

// The work split, in one place: the kernels use these, and `work_split` reports them.
// Forward: one task per query row of each (batch, head), shared out among the threads.
int64_t forward_tasks(int64_t batch, int64_t heads, int64_t rows) { return batch * heads * rows; }

// Backward: the same query rows cut into one run per thread (at most one per row); see backward.
int64_t backward_tasks(int64_t batch, int64_t heads, int64_t rows, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, batch * heads * rows));
}

// (forward tasks, backward tasks) at these shapes and thread count, for the benchmarks.
std::vector<int64_t> work_split(int64_t batch, int64_t heads, int64_t rows, int64_t threads) {
  TORCH_CHECK(batch > 0 && heads > 0 && rows > 0 && threads > 0, "work_split: every argument must be > 0");
  return {forward_tasks(batch, heads, rows), backward_tasks(batch, heads, rows, threads)};
}

std::vector<at::Tensor> forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const at::Tensor& ys, const at::Tensor& xs, const at::Tensor& positions,
                                const at::Tensor& table) {
  const Shapes s = shapes_of(query, key, ys, xs, positions, table);
  TORCH_CHECK(query.stride(3) == 1, "query's head dims must be contiguous");
  at::Tensor out = heads_merged_like(query);
  at::Tensor lse = at::empty({s.batch, s.heads, s.queries()}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "deformable_attention_cpu_forward", [&] {
    using T = scalar_t;
    const Coords<T> co = coords_of<T>(s, ys, xs, positions);
    const T scale = T(1) / std::sqrt(T(s.dims));
    const int64_t heads_per_group = s.heads / s.groups;
    const int64_t d = s.dims, wp = s.wp;
    const QueryRows<const T> q_rows(query);
    const QueryRows<T> out_rows(out);
    const T* k_all = key.data_ptr<T>();
    const T* v_all = value.data_ptr<T>();
    const T* tab_all = table.data_ptr<T>();
    T* lse_all = lse.data_ptr<T>();
    at::parallel_for(0, forward_tasks(s.batch, s.heads, s.rows), 1, [&](int64_t begin, int64_t end) {
      const c10::InferenceMode guard;  // per thread: the scratch tensors need no autograd
      std::vector<at::Tensor> keep;
      T* qt = scratch<T>(keep, d * wp);
      T* acc = scratch<T>(keep, d * wp);
      T* scores = scratch<T>(keep, FORWARD_KEYS * wp);
      T* ty = scratch<T>(keep, ty_size(s, FORWARD_KEYS));
      T* wy = scratch<T>(keep, FORWARD_KEYS);
      T* m = scratch<T>(keep, wp);
      T* l = scratch<T>(keep, wp);
      T* work = scratch<T>(keep, 3 * wp);
      std::vector<int64_t> y0(FORWARD_KEYS);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / s.rows, row = task % s.rows;
        const int64_t b = bh / s.heads, h = bh % s.heads;
        const int64_t group = b * s.groups + h / heads_per_group;
        const int64_t first = bh * s.queries() + row * s.cols;  // the row's first query
        const T* k = k_all + bh * s.keys * d;
        const T* v = v_all + bh * s.keys * d;
        transpose_row<T>(s, q_rows.row(s, bh, row), q_rows.stride, scale, qt);
        std::fill(acc, acc + d * wp, T(0));
        // a finite start, so that the first rescaling is exp(very negative) = 0, not NaN
        std::fill(m, m + wp, -std::numeric_limits<T>::max() / 2);
        std::fill(l, l + wp, T(0));
        for (int64_t n0 = 0; n0 < s.keys; n0 += FORWARD_KEYS) {
          const int64_t count = std::min(FORWARD_KEYS, s.keys - n0);
          block_scores<T>(s, co, tab_all + h * s.th * s.tw, row, group, k, qt, n0, count, ty, y0.data(),
                          wy, scores);
          softmax_block<T>(s, count, scores, m, l, acc, work);
          gemm<T>(d, count, wp / L, v + n0 * d, 1, d, scores, wp, acc, wp, true);  // acc += V^T P^T
        }
        T* o = out_rows.row(s, bh, row);
        for (int64_t j = 0; j < s.cols; ++j) {
          const T inv = T(1) / l[j];
          for (int64_t c = 0; c < d; ++c) o[j * out_rows.stride + c] = acc[c * wp + j] * inv;
          lse_all[first + j] = m[j] + std::log(l[j]);
        }
      }
    });
  });
  return {out, lse};
}

// Gradient sums of the keys of one (batch, head) over some of its query rows: dK / scale and dV
// (keys x dp), the positions' (keys x 2, before the factor (size - 1) / 4) and the table's.
template <typename T>
struct KeySums {
  T *dk, *dv, *dpos, *dtab;
  static int64_t size(const Shapes& s, int64_t dp) { return 2 * s.keys * dp + 2 * s.keys + s.th * s.tw; }
  KeySums(const Shapes& s, int64_t dp, T* data)
      : dk(data), dv(data + s.keys * dp), dpos(data + 2 * s.keys * dp), dtab(data + 2 * s.keys * dp + 2 * s.keys) {}
};

// Returns (grad_query, grad_key, grad_value, grad_positions per (b, head): (B, heads, Nk, 2),
// grad_table per (b, head): (B, heads, Th, Tw)).
//
// Work split: the B x heads x rows query rows, in (b, h, row) order, are cut into as many runs
// of equal length (to one row) as torch has threads, one task each, so every thread has work
// whatever B x heads is. A task owns the query gradient of its rows; the key-side sums (dK, dV,
// positions, table) of a (b, h) whose rows all lie in the task are written out directly, and
// those of a (b, h) cut by a run boundary are kept (at most two per task: its first and last
// (b, h)) and added up afterwards in task order. No atomics; the same result on every run with
// the same thread count, and with another thread count the same up to the order of those sums.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query,
                                 const at::Tensor& key, const at::Tensor& value,
                                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& ys,
                                 const at::Tensor& xs, const at::Tensor& positions,
                                 const at::Tensor& table) {
  const Shapes s = shapes_of(query, key, ys, xs, positions, table);
  TORCH_CHECK(query.stride(3) == 1 && grad_out.stride(3) == 1, "query's and grad_out's head dims must be contiguous");
  at::Tensor grad_query = heads_merged_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_positions = at::empty({s.batch, s.heads, s.keys, 2}, query.options());
  at::Tensor grad_table = at::empty({s.batch, s.heads, s.th, s.tw}, query.options());
  const at::Tensor delta = (grad_out * out).sum(-1).contiguous();  // rowsum(dO * O): (B, heads, Nq)
  const int64_t total_rows = s.batch * s.heads * s.rows;
  const int64_t tasks = backward_tasks(s.batch, s.heads, s.rows, at::get_num_threads());
  auto first_row = [&](int64_t task) { return task * total_rows / tasks; };
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "deformable_attention_cpu_backward", [&] {
    using T = scalar_t;
    const Coords<T> co = coords_of<T>(s, ys, xs, positions);
    const T scale = T(1) / std::sqrt(T(s.dims));
    const int64_t heads_per_group = s.heads / s.groups;
    const int64_t d = s.dims, wp = s.wp, dp = round_up(d, L), W = s.cols;
    const QueryRows<const T> q_rows(query), do_rows(grad_out);
    const QueryRows<T> dq_rows(grad_query);
    const T* k_all = key.data_ptr<T>();
    const T* v_all = value.data_ptr<T>();
    const T* lse_all = lse.data_ptr<T>();
    const T* delta_all = delta.data_ptr<T>();
    const T* tab_all = table.data_ptr<T>();
    const bool sorted = std::is_sorted(co.qx.begin(), co.qx.end());
    // Per task two sets of key-side sums: [0] its first (b, h) when a boundary cuts it and the
    // task goes on to another (b, h); [1] the one in progress, which ends as its last (b, h).
    const int64_t sums_size = KeySums<T>::size(s, dp);
    at::Tensor sums = at::empty({tasks, 2, sums_size}, query.options());
    auto sums_of = [&](int64_t task, int64_t which) {
      return KeySums<T>(s, dp, sums.data_ptr<T>() + (task * 2 + which) * sums_size);
    };
    // The gradients of (b, h) = bh from its key-side sums.
    auto write_key_gradients = [&](int64_t bh, const KeySums<T>& g) {
      T* gk = grad_key.data_ptr<T>() + bh * s.keys * d;
      T* gv = grad_value.data_ptr<T>() + bh * s.keys * d;
      for (int64_t n = 0; n < s.keys; ++n)
        for (int64_t c = 0; c < d; ++c) {
          gk[n * d + c] = g.dk[n * dp + c] * scale;
          gv[n * d + c] = g.dv[n * dp + c];
        }
      // d(coordinate)/d(position) = -(size - 1) / 4; the sign is already in dpos
      T* dpos = grad_positions.data_ptr<T>() + bh * s.keys * 2;
      for (int64_t n = 0; n < s.keys; ++n) {
        dpos[2 * n] = g.dpos[2 * n] * (T(s.th - 1) / 4);
        dpos[2 * n + 1] = g.dpos[2 * n + 1] * (T(s.tw - 1) / 4);
      }
      std::copy(g.dtab, g.dtab + s.th * s.tw, grad_table.data_ptr<T>() + bh * s.th * s.tw);
    };
    at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      const c10::InferenceMode guard;
      std::vector<at::Tensor> keep;
      T* qt = scratch<T>(keep, d * wp);       // Q^T * scale
      T* dot = scratch<T>(keep, d * wp);      // dO^T
      T* dqt = scratch<T>(keep, d * wp);      // dQ^T / scale
      T* qpad = scratch<T>(keep, W * dp);     // Q, rows padded to whole vectors
      T* dopad = scratch<T>(keep, W * dp);    // dO, alike
      T* probs = scratch<T>(keep, BACKWARD_KEYS * wp);   // P^T of a block
      T* dscores = scratch<T>(keep, BACKWARD_KEYS * wp); // dP^T, then dS^T
      T* ty = scratch<T>(keep, ty_size(s, BACKWARD_KEYS));
      T* dty = scratch<T>(keep, 2 * BACKWARD_KEYS * s.stride);  // two halves: see bias_backward_x
      T* wy = scratch<T>(keep, BACKWARD_KEYS);
      T* lse_row = scratch<T>(keep, wp);
      T* delta_row = scratch<T>(keep, wp);
      std::vector<int64_t> y0(BACKWARD_KEYS);
      // padded queries: probability exp(-max) = 0, so they add nothing anywhere
      std::fill(lse_row, lse_row + wp, std::numeric_limits<T>::max());
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t begin = first_row(task), end = first_row(task + 1);
        for (int64_t run = begin; run < end;) {
          const int64_t bh = run / s.rows;
          const int64_t run_end = std::min(end, (bh + 1) * s.rows);
          const int64_t b = bh / s.heads, h = bh % s.heads;
          const int64_t group = b * s.groups + h / heads_per_group;
          const T* tab = tab_all + h * s.th * s.tw;
          const T* kx = co.kx.data() + group * s.keys;
          const T* k = k_all + bh * s.keys * d;
          const T* v = v_all + bh * s.keys * d;
          const KeySums<T> g = sums_of(task, 1);
          std::fill(g.dk, g.dk + sums_size, T(0));
          for (int64_t row = run - bh * s.rows; row < run_end - bh * s.rows; ++row) {
            const int64_t first = bh * s.queries() + row * W;
            const T *q = q_rows.row(s, bh, row), *go = do_rows.row(s, bh, row);
            transpose_row<T>(s, q, q_rows.stride, scale, qt);
            transpose_row<T>(s, go, do_rows.stride, T(1), dot);
            for (int64_t j = 0; j < W; ++j) {
              std::copy(q + j * q_rows.stride, q + j * q_rows.stride + d, qpad + j * dp);
              std::copy(go + j * do_rows.stride, go + j * do_rows.stride + d, dopad + j * dp);
            }
            std::copy(lse_all + first, lse_all + first + W, lse_row);
            std::copy(delta_all + first, delta_all + first + W, delta_row);
            std::fill(dqt, dqt + d * wp, T(0));
            for (int64_t n0 = 0; n0 < s.keys; n0 += BACKWARD_KEYS) {
              const int64_t count = std::min(BACKWARD_KEYS, s.keys - n0);
              block_scores<T>(s, co, tab, row, group, k, qt, n0, count, ty, y0.data(), wy, probs);
              probabilities<T>(s, count, lse_row, probs);
              gemm<T>(count, d, wp / L, v + n0 * d, d, 1, dot, wp, dscores, wp, false);  // dP^T = V dO^T
              for (int64_t n = 0; n < count; ++n)
                for (int64_t x = 0; x < wp; ++x) {
                  T& gs = dscores[n * wp + x];
                  gs = probs[n * wp + x] * (gs - delta_row[x]);
                }
              gemm<T>(count, W, dp / L, probs, wp, 1, dopad, dp, g.dv + n0 * dp, dp, true);    // dV += P dO
              gemm<T>(count, W, dp / L, dscores, wp, 1, qpad, dp, g.dk + n0 * dp, dp, true);   // dK += dS Q
              gemm<T>(d, count, wp / L, k + n0 * d, 1, d, dscores, wp, dqt, wp, true);         // dQ^T += K^T dS^T

              bias_backward_x<T>(s, co, kx + n0, ty, dscores, count, sorted, dty, g.dpos + 2 * n0);
              bias_backward_y<T>(s, tab, y0.data(), wy, count, dty, g.dtab, g.dpos + 2 * n0);
            }
            T* dq = dq_rows.row(s, bh, row);
            for (int64_t j = 0; j < W; ++j)
              for (int64_t c = 0; c < d; ++c) dq[j * dq_rows.stride + c] = dqt[c * wp + j] * scale;
          }
          if (run == bh * s.rows && run_end == (bh + 1) * s.rows) {
            write_key_gradients(bh, g);  // all its rows are here
          } else if (run == begin && run_end < end) {
            std::copy(g.dk, g.dk + sums_size, sums_of(task, 0).dk);  // the first, cut; more follow
          }  // else the last, cut: stays in set [1]
          run = run_end;
        }
      }
    });
    // The (b, h) cut by run boundaries: add up their sums in task order.
    std::vector<int64_t> cut;
    for (int64_t task = 1; task < tasks; ++task) {
      const int64_t row = first_row(task);
      if (row % s.rows && (cut.empty() || cut.back() != row / s.rows)) cut.push_back(row / s.rows);
    }
    at::parallel_for(0, static_cast<int64_t>(cut.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = cut[i];
        std::vector<T> total(sums_size, T(0));
        for (int64_t task = 0; task < tasks; ++task) {
          const int64_t first = first_row(task), last = first_row(task + 1) - 1;
          if (first > last || first / s.rows > bh || last / s.rows < bh) continue;
          const T* part = sums_of(task, last / s.rows == bh ? 1 : 0).dk;
          for (int64_t j = 0; j < sums_size; ++j) total[j] += part[j];
        }
        write_key_gradients(bh, KeySums<T>(s, dp, total.data()));
      }
    });
  });
  return {grad_query, grad_key, grad_value, grad_positions, grad_table};
}

}  // namespace

TORCH_LIBRARY(MMDAT_LIBRARY, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, Tensor ys, Tensor xs, Tensor positions, "
        "Tensor table) -> Tensor[]");
  m.def("backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor lse, "
        "Tensor ys, Tensor xs, Tensor positions, Tensor table) -> Tensor[]");
  m.def("work_split(int batch, int heads, int rows, int threads) -> int[]", &work_split);
}

TORCH_LIBRARY_IMPL(MMDAT_LIBRARY, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
