#pragma once
// The float exponentials of the CPU backend's row kernels. Every logit costs one exponential, and
// on one core the exponentials, not memory, bound the row passes; so where AVX-512 is available
// the kernels use these forms instead of Eigen's pexp (about 18 instructions):
//
//   n = round(x / ln 2), r = x − n·ln 2, exp(x) = 2^n · p(r) with p(0) = 1, 2^n applied by
//   vscalefps (which also rounds subnormal results correctly; Eigen clamps them to ~1e-38).
//
// - fast_exp (values that are written out, the gradient): ln 2 in two parts, degree-6 p; within
//   about one ulp of exp, like Eigen's.
// - fast_exp_summand (terms of a log-sum-exp, x ≤ 0; 16-bit gradient entries): ln 2 as one float,
//   degree-5 p, two fewer multiply-adds (with the minimum probe of row_kernels.hpp, the LSE pass
//   went from 11.7 to 10.0 ms on the llava shape). The one-part ln 2 adds |n|·2e-9 relative error,
//   which grows only where the term is below e^-20 of the row's largest and so cannot reach the sum
//   at float precision; near the maximum the error is within 2 eps, like the rounding of the float
//   block sums themselves.
//
// The coefficients come from scripts/fit-exp-polynomial (minimax fits of the relative error,
// rounded to float). NaN propagates; −∞ and anything below −104 give 0.
// Other targets and double use Eigen's pexp for both.

#include <cstddef>

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

template <class Packet>
inline Packet fast_exp_summand(const Packet& x) {
    return Eigen::internal::pexp(x);
}

#if defined(__AVX512F__)
namespace avx512_exp {

// n = round(x / ln 2) of x clamped at −104: below it exp(x) is under half the smallest subnormal,
// and the clamp keeps r finite for −∞. max(lower, x) returns x when x is NaN, so NaN stays NaN.
struct split {
    __m512 clamped, n;
    explicit split(__m512 x)
        : clamped(_mm512_max_ps(_mm512_set1_ps(-104.0f), x)),
          n(_mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)) {}
};

// p(r) by Horner's scheme, highest coefficient first: one fused multiply-add per degree.
template <std::size_t N>
inline __m512 horner(__m512 r, const float (&highest_first)[N]) {
    __m512 p = _mm512_set1_ps(highest_first[0]);
    for (std::size_t k = 1; k < N; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(highest_first[k]));
    return p;
}

}  // namespace avx512_exp

template <>
inline __m512 fast_exp<__m512>(const __m512& x) {
    const avx512_exp::split s(x);
    // ln 2 = 0x1.62e4p-1 + 0x1.7f7d1cp-20 (the first part has 16 significant bits, so n·hi is exact).
    __m512 r = _mm512_fnmadd_ps(s.n, _mm512_set1_ps(0x1.62e4p-1f), s.clamped);
    r = _mm512_fnmadd_ps(s.n, _mm512_set1_ps(0x1.7f7d1cp-20f), r);
    static constexpr float degree6[] = {0x1.6ae73p-10f, 0x1.126782p-7f, 0x1.555822p-5f, 0x1.55541ap-3f,
                                        0x1.fffffcp-2f, 1.0f,           1.0f};
    return _mm512_scalef_ps(avx512_exp::horner(r, degree6), s.n);
}

template <>
inline __m512 fast_exp_summand<__m512>(const __m512& x) {
    const avx512_exp::split s(x);
    const __m512 r = _mm512_fnmadd_ps(s.n, _mm512_set1_ps(0x1.62e43p-1f), s.clamped);  // float(ln 2)
    static constexpr float degree5[] = {0x1.0fa832p-7f, 0x1.573a54p-5f, 0x1.555a6ap-3f,
                                        0x1.fffdc6p-2f, 0x1.fffff6p-1f, 1.0f};
    return _mm512_scalef_ps(avx512_exp::horner(r, degree5), s.n);
}
#endif

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
