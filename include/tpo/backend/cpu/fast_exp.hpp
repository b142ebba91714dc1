#pragma once
// The float exponentials of the CPU backend's row kernels. Every logit costs one exponential, and
// on one core the exponentials, not memory, bound the row passes; so where AVX-512 is available
// the kernels use these forms instead of Eigen's pexp (about 18 instructions). Both apply the
// power of two with vscalefps, which also rounds subnormal results correctly (Eigen clamps them
// to ~1e-38).
//
// - fast_exp (values that are written out: float and double gradients). n = round(x / ln 2),
//   r = x − n·ln 2 with ln 2 in two parts, exp(x) = 2^n · p(r), degree-6 p: within about one ulp
//   of exp, like Eigen's.
// - shifted_exp (the terms exp(x − m) of a log-sum-exp, m fixed for a block; 16-bit gradient
//   entries). With AVX-512DQ, 2^t for t = (x − m)·log2 e: vreduceps splits off the fraction
//   f = t − floor(t), a degree-5 p(f) ≈ 2^f on [0, 1], and vscalefps applies 2^floor(t) (and takes
//   t = −∞ to 0). Nine vector operations with the subtraction; the classical form with degree 5
//   and a one-part ln 2 needs eleven (a clamp for −∞, and rounding to n then r = x − n·ln 2 where
//   vreduceps is one operation). Rounding t adds |x − m|·eps/2 relative error, as rounding x − m
//   itself can; the terms that dominate a sum are those near the maximum, where that is small.
//   With it the log-sum-exp pass reads memory as fast as a plain scan at one thread
//   (docs/performance.md).
//
// The coefficients come from scripts/fit-exp-polynomial (minimax fits of the relative error,
// rounded to float). NaN propagates; −∞ gives 0. Other targets and double use Eigen's pexp for both.

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

/// exp(x − m) for a fixed finite m, on packets of A; exp(0) is exactly 1, so a row's largest
/// term is. (Templated on the scalar: a packet type's vector attributes do not survive as a
/// template argument.)
template <class A>
class shifted_exp {
    using Packet = typename Eigen::internal::packet_traits<A>::type;

public:
    explicit shifted_exp(A m) : shift_(Eigen::internal::pset1<Packet>(m)) {}
    Packet operator()(const Packet& x) const { return Eigen::internal::pexp(Eigen::internal::psub(x, shift_)); }

private:
    Packet shift_;
};

#if defined(__AVX512F__)
namespace avx512_exp {

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
    // x clamped at −104: below it exp(x) is under half the smallest subnormal, and the clamp keeps
    // r finite for −∞. max(lower, x) returns x when x is NaN, so NaN stays NaN.
    const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(0x1.715476p+0f)),  // log2 e
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln 2 = 0x1.62e4p-1 + 0x1.7f7d1cp-20 (the first part has 16 significant bits, so n·hi is exact).
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-1f), clamped);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.7f7d1cp-20f), r);
    static constexpr float degree6[] = {0x1.6ae73p-10f, 0x1.126782p-7f, 0x1.555822p-5f, 0x1.55541ap-3f,
                                        0x1.fffffcp-2f, 1.0f,           1.0f};
    return _mm512_scalef_ps(avx512_exp::horner(r, degree6), n);
}

#  if defined(__AVX512DQ__) && defined(EIGEN_VECTORIZE_AVX512)  // Eigen's float packet is __m512
template <>
class shifted_exp<float> {
public:
    explicit shifted_exp(float m) : shift_(_mm512_set1_ps(m)) {}

    __m512 operator()(const __m512& x) const {
        // x − m first, so that x = m gives t = 0 and exactly 1 (a one-entry row's lse is its logit).
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(x, shift_), _mm512_set1_ps(0x1.715476p+0f));  // log2 e
        // imm 0x09: no fraction bits kept, round down, precision exception suppressed: f ∈ [0, 1].
        const __m512 f = _mm512_reduce_ps(t, 0x09);
        static constexpr float degree5[] = {0x1.e974fep-10f, 0x1.277854p-7f, 0x1.c91ce6p-5f,
                                            0x1.ebdb56p-3f,  0x1.62e4bap-1f, 1.0f};
        return _mm512_scalef_ps(avx512_exp::horner(f, degree5), t);
    }

private:
    __m512 shift_;
};
#  endif
#endif

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
