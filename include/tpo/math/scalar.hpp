#pragma once
// Numerically stable scalar functions used by every formula (docs/formulas.md#numerics lists the
// failure modes: log(σ(x)) underflowing to −∞, exp overflowing). Host/device, float or double.

#include <cmath>

#include "tpo/core/config.hpp"

TPO_BEGIN_NAMESPACE
namespace math {

/// Exponents are clamped here before exp() where a formula can overflow, at 80 as TRL clamps its
/// α-divergence, safe in float32 since e^80 ≈ 5.5e34 < FLT_MAX (`docs/formulas.md#numerics`).
inline constexpr double exp_clamp = 80.0;

template <class R>
TPO_HOST_DEVICE TPO_FORCE_INLINE R sigmoid(R x) {
    using std::exp;
    if (x >= R(0)) return R(1) / (R(1) + exp(-x));
    const R e = exp(x);
    return e / (R(1) + e);
}

/// log σ(x) = −softplus(−x), exact for large |x| in both directions.
template <class R>
TPO_HOST_DEVICE TPO_FORCE_INLINE R log_sigmoid(R x) {
    using std::exp;
    using std::log1p;
    return x >= R(0) ? -log1p(exp(-x)) : x - log1p(exp(x));
}

/// σ(x)·σ(−x) = σ'(x), without cancellation.
template <class R>
TPO_HOST_DEVICE TPO_FORCE_INLINE R sigmoid_derivative(R x) {
    return sigmoid(x) * sigmoid(-x);
}

/// exp(min(x, 80)) and whether the clamp was active (its derivative is then 0).
template <class R>
struct clamped_exp {
    R value;
    bool clamped;
};
template <class R>
TPO_HOST_DEVICE TPO_FORCE_INLINE clamped_exp<R> exp_clamped(R x) {
    using std::exp;
    if (x > R(exp_clamp)) return {exp(R(exp_clamp)), true};
    return {exp(x), false};
}

template <class R>
TPO_HOST_DEVICE TPO_FORCE_INLINE bool is_finite(R x) {
    return x - x == R(0);  // false for ±Inf and NaN, and cheap enough to sit in a hot loop
}

}  // namespace math
TPO_END_NAMESPACE
