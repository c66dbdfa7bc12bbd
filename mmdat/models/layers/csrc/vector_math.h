// Elementwise math for the CPU kernels, written so that the compiler vectorises loops over it
// (std::exp and std::erf do not vectorise). Float uses polynomials; double calls the standard
// library (the tests' float64 checks).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mmdat_math {

// exp(x) = 2^n p(r), n = round(x / ln2), r = x - n ln2 in [-ln2 / 2, ln2 / 2] (ln2 in two parts),
// p Cephes' degree-6 polynomial for expf (about 1 ulp).
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;
constexpr float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

template <typename T>
inline T exp_of(T x) {
  return std::exp(x);
}

template <>
inline float exp_of<float>(float x) {
  // exp(-87) = 1.6e-38 is still normal, so 2^n below is a normal float; it stands for 0 here
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = (x * LOG2E + 12582912.f) - 12582912.f;  // round to nearest: 1.5 * 2^23
  float r = x - n * LN2_HI;
  r = r - n * LN2_LO;
  float p = EXP_POLY[0];
  for (int i = 1; i < 6; ++i) p = p * r + EXP_POLY[i];
  p = p * (r * r) + (r + 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// The standard normal's CDF, 0.5 (1 + erf(x / sqrt(2))), the factor of the exact GELU. For float,
// erfc(|x| / sqrt(2)) by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, the
// approximation PyTorch's vectorised float erf uses), taken as is for x < 0 rather than as 1 + erf,
// so the small values of the negative side keep their precision.
template <typename T>
inline T normal_cdf(T x) {
  return T(0.5) * std::erfc(-x * T(M_SQRT1_2));
}

template <>
inline float normal_cdf<float>(float x) {
  const float a = std::fabs(x) * float(M_SQRT1_2);
  const float t = 1.f / (1.f + 0.3275911f * a);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                           t * 1.061405429f))));
  const float half_erfc = 0.5f * poly * exp_of(-a * a);
  return x < 0.f ? half_erfc : 1.f - half_erfc;
}

// The standard normal's density.
template <typename T>
inline T normal_pdf(T x) {
  return T(0.3989422804014327) * exp_of(T(-0.5) * x * x);
}

#if defined(__AVX512F__)
// For float vectors; x below -104 gives 0 (scalef underflows exactly).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
  __m512 p = _mm512_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// normal_cdf<float> above for float vectors (the same formula and constants).
inline __m512 normal_cdf_ps(__m512 x) {
  const __m512 a = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(float(M_SQRT1_2)));
  const __m512 t =
      _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 half_erfc = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), poly),
                                         exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a)));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.f), half_erfc), half_erfc);
}

// normal_pdf for float vectors.
inline __m512 normal_pdf_ps(__m512 x) {
  return _mm512_mul_ps(_mm512_set1_ps(0.3989422804014327f),
                       exp_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), x), x)));
}
#endif

}  // namespace mmdat_math
