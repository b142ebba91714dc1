#pragma once
// The DPO family (docs/formulas.md#loss-types): each per-pair loss with its derivatives in the two
// log-ratios. Batch-coupled losses (aot, aot_unpaired) and the sft term are assembled over the
// batch in loss/passes.hpp (loss_term_pass).

#include <cmath>
#include <string>
#include <string_view>

#include "tpo/core/error.hpp"
#include "tpo/math/scalar.hpp"

TPO_BEGIN_NAMESPACE

enum class loss_type {
    sigmoid,
    hinge,
    ipo,
    sigmoid_norm,
    exo_pair,
    nca_pair,
    robust,
    bco_pair,
    sppo_hard,
    aot,
    aot_unpaired,
    apo_zero,
    apo_down,
    discopop,
    sft,
};

inline constexpr loss_type all_loss_types[] = {
    loss_type::sigmoid,  loss_type::hinge,    loss_type::ipo,       loss_type::sigmoid_norm, loss_type::exo_pair,
    loss_type::nca_pair, loss_type::robust,   loss_type::bco_pair,  loss_type::sppo_hard,    loss_type::aot,
    loss_type::aot_unpaired, loss_type::apo_zero, loss_type::apo_down, loss_type::discopop, loss_type::sft,
};

inline const char* name(loss_type t) {
    switch (t) {
    case loss_type::sigmoid: return "sigmoid";
    case loss_type::hinge: return "hinge";
    case loss_type::ipo: return "ipo";
    case loss_type::sigmoid_norm: return "sigmoid_norm";
    case loss_type::exo_pair: return "exo_pair";
    case loss_type::nca_pair: return "nca_pair";
    case loss_type::robust: return "robust";
    case loss_type::bco_pair: return "bco_pair";
    case loss_type::sppo_hard: return "sppo_hard";
    case loss_type::aot: return "aot";
    case loss_type::aot_unpaired: return "aot_unpaired";
    case loss_type::apo_zero: return "apo_zero";
    case loss_type::apo_down: return "apo_down";
    case loss_type::discopop: return "discopop";
    case loss_type::sft: return "sft";
    }
    return "?";
}

inline loss_type parse_loss_type(std::string_view s) {
    for (loss_type t : all_loss_types)
        if (s == name(t)) return t;
    if (s == "aot_pair") return loss_type::aot_unpaired;  // TRL's name for the same loss
    throw value_error(detail::concat("loss: unknown loss_type '", s, "'"));
}

enum class f_divergence { reverse_kl, forward_kl, js_divergence, alpha_divergence };

inline const char* name(f_divergence f) {
    switch (f) {
    case f_divergence::reverse_kl: return "reverse_kl";
    case f_divergence::forward_kl: return "forward_kl";
    case f_divergence::js_divergence: return "js_divergence";
    case f_divergence::alpha_divergence: return "alpha_divergence";
    }
    return "?";
}

inline f_divergence parse_f_divergence(std::string_view s) {
    for (f_divergence f : {f_divergence::reverse_kl, f_divergence::forward_kl, f_divergence::js_divergence,
                           f_divergence::alpha_divergence})
        if (s == name(f)) return f;
    throw value_error(detail::concat("f_divergence_type: unknown value '", s,
                                     "', expected reverse_kl, forward_kl, js_divergence or alpha_divergence"));
}

/// Whether f_divergence_type may be other than reverse_kl: the losses written in the score
/// difference f(Δ_w) − f(Δ_l) (or, for ipo and sigmoid_norm, in f(Δ)/n), and sft, which ignores it.
/// TRL 1.16 rejects the others, whose formulas use the log-ratios themselves.
constexpr bool takes_f_divergence(loss_type t) {
    switch (t) {
    case loss_type::sigmoid:
    case loss_type::sigmoid_norm:
    case loss_type::hinge:
    case loss_type::ipo:
    case loss_type::exo_pair:
    case loss_type::robust:
    case loss_type::discopop:
    case loss_type::sft: return true;
    default: return false;
    }
}

/// Scalar hyperparameters every loss may read (validated in loss/options.hpp).
struct loss_hyperparameters {
    double beta = 0.1;
    double label_smoothing = 0.0;
    f_divergence divergence = f_divergence::reverse_kl;
    double f_alpha_divergence_coef = 0.5;
    double discopop_tau = 0.05;
};

namespace loss {

/// A value and its slope.
struct value_slope {
    double value;
    double slope;
};

inline constexpr double log_two = 0.69314718055994530942;

/// α-divergence within 1e-6 of α = 1 is its limit, reverse_kl (TRL 1.16's test).
TPO_HOST_DEVICE inline bool alpha_is_reverse_kl(double alpha) { return (alpha > 1.0 ? alpha - 1.0 : 1.0 - alpha) < 1e-6; }

/// The f-divergence score f(Δ) and its slope f'(Δ), constants included: they cancel in
/// f(Δ_w) − f(Δ_l) but not where each side is divided by its own length (ipo, sigmoid_norm).
/// `docs/formulas.md#f-divergences`
TPO_HOST_DEVICE inline value_slope f_transform(const loss_hyperparameters& h, double delta) {
    switch (h.divergence) {
    case f_divergence::reverse_kl: return {delta, 1.0};
    case f_divergence::forward_kl: {  // 1 − e^(−Δ), exponent capped at 80
        const auto e = math::exp_clamped(-delta);
        return {1.0 - e.value, e.clamped ? 0.0 : e.value};
    }
    case f_divergence::js_divergence: return {log_two + math::log_sigmoid(delta), math::sigmoid(-delta)};
    case f_divergence::alpha_divergence: {  // (e^((α−1)Δ) − 1)/(α−1), exponent capped at 80
        const double alpha = h.f_alpha_divergence_coef;
        if (alpha_is_reverse_kl(alpha)) return {delta, 1.0};
        const auto e = math::exp_clamped((alpha - 1.0) * delta);
        return {(e.value - 1.0) * (1.0 / (alpha - 1.0)), e.clamped ? 0.0 : e.value};
    }
    }
    return {delta, 1.0};
}

/// −(1−ε) logσ(x) − ε logσ(−x): sigmoid (cDPO) and the aot losses.
TPO_HOST_DEVICE inline value_slope smoothed_sigmoid(double x, double eps) {
    return {-(1 - eps) * math::log_sigmoid(x) - eps * math::log_sigmoid(-x),
            -(1 - eps) * math::sigmoid(-x) + eps * math::sigmoid(x)};
}

/// A pair-local loss and its derivatives in Δ_w and Δ_l.
struct pair_loss_value {
    double value;
    double d_chosen;    // ∂loss/∂Δ_w
    double d_rejected;  // ∂loss/∂Δ_l
};

/// Losses that depend on the pair alone (every type but aot, aot_unpaired and sft), each as
/// TRL 1.16 writes it: `docs/formulas.md#loss-types` has the formulas, their papers and sources.
/// n_chosen, n_rejected: valid-token counts, already clamped to at least 1.
TPO_HOST_DEVICE inline pair_loss_value pair_loss(loss_type type, const loss_hyperparameters& h, double delta_w,
                                                 double delta_l, double n_chosen, double n_rejected) {
    using std::exp;
    using std::log;
    const double beta = h.beta, eps = h.label_smoothing;
    const value_slope fw = f_transform(h, delta_w), fl = f_transform(h, delta_l);
    const double x = beta * (fw.value - fl.value);
    // A loss written in x = β(f(Δ_w) − f(Δ_l)) with slope dx: chain into both log-ratios.
    auto in_x = [&](double value, double dx) {
        return pair_loss_value{value, dx * beta * fw.slope, -dx * beta * fl.slope};
    };
    switch (type) {
    case loss_type::sigmoid: {
        const auto l = smoothed_sigmoid(x, eps);
        return in_x(l.value, l.slope);
    }
    case loss_type::hinge: return in_x(x < 1 ? 1 - x : 0.0, x < 1 ? -1.0 : 0.0);
    case loss_type::ipo: {
        const double u = fw.value / n_chosen - fl.value / n_rejected - 1.0 / (2 * beta);
        return {u * u, 2 * u * fw.slope / n_chosen, -2 * u * fl.slope / n_rejected};
    }
    case loss_type::sigmoid_norm: {
        const double u = beta * (fw.value / n_chosen - fl.value / n_rejected);
        const double slope = -math::sigmoid(-u);
        return {-math::log_sigmoid(u), slope * beta * fw.slope / n_chosen, -slope * beta * fl.slope / n_rejected};
    }
    case loss_type::exo_pair: {
        const double value = math::sigmoid(x) * (math::log_sigmoid(x) - log(1 - eps)) +
                             math::sigmoid(-x) * (math::log_sigmoid(-x) - log(eps));
        // d/dx collapses to σ(x)σ(−x)·(x − log(1−ε) + log ε) since logσ(x) − logσ(−x) = x.
        return in_x(value, math::sigmoid_derivative(x) * (x - log(1 - eps) + log(eps)));
    }
    // nca_pair, bco_pair, sppo_hard, apo_zero and apo_down are written in the log-ratios
    // themselves; options.hpp refuses an f-divergence with them, as TRL 1.16 does.
    case loss_type::nca_pair: {
        const double bw = beta * delta_w, bl = beta * delta_l;
        const double value = -math::log_sigmoid(bw) - 0.5 * math::log_sigmoid(-bw) - 0.5 * math::log_sigmoid(-bl);
        return {value, beta * (-math::sigmoid(-bw) + 0.5 * math::sigmoid(bw)), beta * 0.5 * math::sigmoid(bl)};
    }
    case loss_type::robust: {
        const double value = (-(1 - eps) * math::log_sigmoid(x) + eps * math::log_sigmoid(-x)) / (1 - 2 * eps);
        return in_x(value, (-(1 - eps) * math::sigmoid(-x) - eps * math::sigmoid(x)) / (1 - 2 * eps));
    }
    case loss_type::bco_pair: {
        const double bw = beta * delta_w, bl = beta * delta_l;
        return {-math::log_sigmoid(bw) - math::log_sigmoid(-bl), -beta * math::sigmoid(-bw), beta * math::sigmoid(bl)};
    }
    case loss_type::sppo_hard: {
        const double half = 0.5 / beta;
        const double uw = delta_w - half, ul = delta_l + half;
        return {uw * uw + ul * ul, 2 * uw, 2 * ul};
    }
    case loss_type::apo_zero: {
        const double bw = beta * delta_w, bl = beta * delta_l;
        return {1 - math::sigmoid(bw) + math::sigmoid(bl), -beta * math::sigmoid_derivative(bw),
                beta * math::sigmoid_derivative(bl)};
    }
    case loss_type::apo_down: {
        const double bw = beta * delta_w, margin = beta * (delta_w - delta_l);
        const double d_margin = -beta * math::sigmoid_derivative(margin);
        return {math::sigmoid(bw) + (1 - math::sigmoid(margin)), beta * math::sigmoid_derivative(bw) + d_margin,
                -d_margin};
    }
    case loss_type::discopop: {
        const double tau = h.discopop_tau;
        const double m = math::sigmoid(x / tau), dm = math::sigmoid_derivative(x / tau) / tau;
        const auto e = math::exp_clamped(-x);
        const double de = e.clamped ? 0.0 : -e.value;
        const double value = -math::log_sigmoid(x) * (1 - m) + e.value * m;
        const double slope = -math::sigmoid(-x) * (1 - m) + math::log_sigmoid(x) * dm + de * m + e.value * dm;
        return in_x(value, slope);
    }
    case loss_type::aot:
    case loss_type::aot_unpaired:
    case loss_type::sft: break;  // assembled over the batch
    }
    return {0, 0, 0};
}

}  // namespace loss
TPO_END_NAMESPACE
