#pragma once
// Per-token reward math (docs/formulas.md#token-rewards) and its partial derivatives
// (docs/math.md), written once for every backend. Inputs are the row statistics of the clean and
// the noisy rows.

#include <cmath>

#include "tpo/math/scalar.hpp"
#include "tpo/reward/options.hpp"
#include "tpo/reward/row_stats.hpp"

TPO_BEGIN_NAMESPACE
namespace reward {

/// s = g(z)[y] − g(z̃)[y].
TPO_HOST_DEVICE inline double visual_score(score_kind kind, const row_stats& clean, const row_stats& noisy) {
    using std::exp;
    switch (kind) {
    case score_kind::logit: return clean.label_logit - noisy.label_logit;
    case score_kind::prob: return exp(clean.log_prob()) - exp(noisy.log_prob());
    case score_kind::logprob: return clean.log_prob() - noisy.log_prob();
    }
    return 0;
}

/// The self-calibrated weight c, log c, and their slopes in s (`docs/formulas.md#self-calibrated-weight`).
struct calibrated_weight {
    double value;      // c
    double log_value;  // log c
    double slope;      // dc/ds
    double log_slope;  // d log c/ds  (D of docs/math.md)
};

TPO_HOST_DEVICE inline calibrated_weight calibrate(response_side side, double s, double a) {
    using std::log;
    // Rejected tokens use 1 − σ(s) = σ(−s): one formula in the signed score.
    const double sign = side == response_side::chosen ? 1.0 : -1.0;
    const double signed_score = sign * s;
    const double sig = math::sigmoid(signed_score);
    const double slope = sign * math::sigmoid_derivative(signed_score);
    if (a == 0.0) {
        // c = σ(±s) can underflow; log σ and its slope σ(∓s) stay exact.
        return {sig, math::log_sigmoid(signed_score), slope, sign * math::sigmoid(-signed_score)};
    }
    const double c = sig + a;
    return {c, log(c), slope, slope / c};
}

/// A token's term in the sequence score and its partials.
struct token_term {
    double value;     // additive: ℓ + log c; multiplicative: c·ℓ
    double d_logp;    // ∂term/∂ℓ
    double d_weight;  // ∂term/∂s through c (0 when weights are detached or constant)
};

TPO_HOST_DEVICE inline token_term additive_term(double logp, const calibrated_weight& c) {
    return {logp + c.log_value, 1.0, c.log_slope};
}
TPO_HOST_DEVICE inline token_term multiplicative_term(double logp, const calibrated_weight& c) {
    return {c.value * logp, c.value, logp * c.slope};
}
TPO_HOST_DEVICE inline token_term sequence_term(sequence_form form, double logp, const calibrated_weight& c) {
    return form == sequence_form::additive ? additive_term(logp, c) : multiplicative_term(logp, c);
}

/// A constant weight (plain DPO: c ≡ 1; caller-supplied weights).
TPO_HOST_DEVICE inline calibrated_weight constant_weight(double c) {
    using std::log;
    return {c, log(c), 0.0, 0.0};
}

/// Gradient coefficients of one scored row pair (clean row z, noisy row z̃), given the chain
/// factors g_logp = ∂L/∂ℓ and g_score = ∂L/∂s (`docs/math.md`). Every case has the form
/// ∂L/∂z[v] = alpha·δ(v=y) − beta·p[v].
struct row_pair_coefficients {
    double clean_alpha, clean_beta;
    double noisy_alpha, noisy_beta;
};

TPO_HOST_DEVICE inline row_pair_coefficients chain_to_logits(score_kind kind, double g_logp, double g_score,
                                                             const row_stats& clean, const row_stats& noisy) {
    using std::exp;
    // ∂ℓ/∂z = δ − p contributes (g_logp, g_logp).
    switch (kind) {
    case score_kind::logit:  // ∂s/∂z = δ, ∂s/∂z̃ = −δ
        return {g_logp + g_score, g_logp, -g_score, 0.0};
    case score_kind::prob: {  // ∂s/∂z = p_y(δ − p), ∂s/∂z̃ = −p̃_y(δ − p̃)
        const double clean_part = g_logp + g_score * exp(clean.log_prob());
        const double noisy_part = -g_score * exp(noisy.log_prob());
        return {clean_part, clean_part, noisy_part, noisy_part};
    }
    case score_kind::logprob:  // ∂s/∂z = δ − p, ∂s/∂z̃ = −(δ − p̃)
        return {g_logp + g_score, g_logp + g_score, -g_score, -g_score};
    }
    return {0, 0, 0, 0};
}

}  // namespace reward
TPO_END_NAMESPACE
