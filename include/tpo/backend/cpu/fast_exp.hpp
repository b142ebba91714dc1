#pragma once
// The float exponential of the CPU backend's row kernels. Every logit costs one exponential, and
// on one core the exponentials, not memory, bound the row passes; so where AVX-512 is available
// the kernels use this 12-instruction form instead of Eigen's pexp (about 18):
//
//   n = round(x / ln 2), r = x − n·ln 2 (two-part ln 2, |r| ≤ ln2/2),
//   exp(x) = 2^n · p(r) with p a degree-6 polynomial, p(0) = 1, and 2^n applied by vscalefps,
//
// which also rounds subnormal results correctly (Eigen clamps them to ~1e-38). The coefficients
// come from scripts/fit-exp-polynomial (a minimax fit of the relative error, rounded to float);
// over [−ln2/2, ln2/2] the polynomial is within 0.84 float epsilon of exp, so the result is within
// about one ulp, like Eigen's. NaN propagates; −∞ and anything below −104 give 0.
// Other targets and double use Eigen's pexp.

#include <Eigen/Core>

#if defined(__AVX512F__)
#  include <immintrin.h>
#endif

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

template <class Packet>
inline Packet fast_exp(const Packet& x) {
    return Eigen::internal::pexp(x);
}

#if defined(__AVX512F__)
template <>
inline __m512 fast_exp<__m512>(const __m512& x) {
    // Below −104, exp(x) is under half the smallest subnormal; the clamp keeps r finite for −∞.
    // max(lower, x) returns x when x is NaN, so a NaN stays a NaN.
    const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln 2 = 0x1.62e4p-1 + 0x1.7f7d1cp-20 (the first part has 16 significant bits, so n·hi is exact).
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f), r);
    __m512 p = _mm512_set1_ps(0x1.6ae73p-10f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.126782p-7f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.555822p-5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.55541ap-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0x1.fffffcp-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
