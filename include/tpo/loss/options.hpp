#pragma once
// Everything that selects an objective: which token weights, which losses, which modifiers.
// validate() is the single place hyperparameter ranges are checked.

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/core/parse.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/family.hpp"
#include "tpo/reward/options.hpp"
#include "tpo/rows/transform.hpp"

TPO_BEGIN_NAMESPACE

/// Where the per-token weights c come from.
enum class token_weighting {
    self_calibrated,  // TPO: c from clean vs noisy logits (docs/formulas.md#self-calibrated-weight)
    none,             // plain DPO: c ≡ 1, no noisy logits needed
    caller,           // caller-supplied weights (RLHF-V's DDPO segment weights, TIS-DPO, ...)
};

/// One term of the objective: the batch loss is Σ_k weight_k · mean over pairs of loss_k, with as
/// many terms as the caller lists (`docs/formulas.md#combined-losses`).
struct loss_term {
    loss_type type = loss_type::sigmoid;
    double weight = 1.0;
};

struct objective_options {
    token_weighting weighting = token_weighting::self_calibrated;
    std::vector<loss_term> losses{loss_term{}};
    loss_hyperparameters hyper{};

    // Token rewards (docs/formulas.md#token-rewards).
    score_kind score = score_kind::logit;
    sequence_form form = sequence_form::additive;
    double a = 0.5;  // calibration margin: c ∈ (a, 1 + a)
    bool average = false;
    bool detach_weights = false;
    row_alignment alignment{};

    // Modifiers (docs/formulas.md#modifiers).
    bool use_weighting = false;     // WPO
    std::optional<double> ld_alpha; // LD-DPO

    /// Check labels, non-finite logits and caller weights (costs one small device→host copy).
    bool check_inputs = true;
    /// With the `logit` score the loss and its gradients depend on the noisy logits only through
    /// z̃[y] (`docs/math.md`). true: every noisy row is still scanned for NaN/Inf, so a broken
    /// corrupted-image pass is reported even where it does not change the result (one read of each
    /// noisy tensor, no exponential). false: only the label entries of the noisy tensors are read
    /// and checked, which saves two of the seven tensor-sized memory transfers of a TPO step.
    bool check_unused_logits = true;

    // The logit transform between the lm_head and the softmax (rows/transform.hpp):
    // z = softcap·tanh(logit_scale·u / softcap) / temperature, the soft-cap only when set. With
    // hidden states in it applies to h·Wᵀ + b; with logits inputs to the logits given (through a
    // transformed copy of each tensor, the gradients chained back to the logits given).
    double logit_scale = 1.0;
    std::optional<double> logit_softcap;
    double temperature = 1.0;
    /// Scored rows per chunk of the fused lm_head path; unset: the backend's default, as many as
    /// keep a chunk of logits near 2^24 values (64 MiB in float) on the CPU and the host systems,
    /// 2^27 on CUDA, and on the CPU at least 256 rows.
    std::optional<index_t> chunk_tokens;

    logit_transform transform() const { return {logit_scale, logit_softcap.value_or(0.0), temperature}; }
};

inline void validate(const objective_options& o) {
    using detail::require;
    const auto& h = o.hyper;
    require(std::isfinite(h.beta) && h.beta > 0, "beta = ", h.beta, ", expected a finite value > 0");
    require(!o.losses.empty(), "loss_type: empty list, expected at least one loss");
    const double eps = h.label_smoothing;
    require(std::isfinite(eps), "label_smoothing = ", eps, ", expected a finite value");
    for (const loss_term& term : o.losses) {
        require(std::isfinite(term.weight) && term.weight >= 0, "loss_weights: weight of ", name(term.type), " is ",
                term.weight, ", expected a finite value >= 0");
        switch (term.type) {
        case loss_type::sigmoid:
        case loss_type::aot:
        case loss_type::aot_unpaired:
            require(eps >= 0 && eps <= 0.5, "label_smoothing = ", eps, " for loss ", name(term.type),
                    ", expected 0 <= label_smoothing <= 0.5");
            break;
        case loss_type::robust:
            require(eps >= 0 && eps < 0.5, "label_smoothing = ", eps,
                    " for loss robust, expected 0 <= label_smoothing < 0.5");
            break;
        case loss_type::exo_pair:
            require(eps > 0 && eps < 1, "label_smoothing = ", eps,
                    " for loss exo_pair, expected 0 < label_smoothing < 1");
            break;
        case loss_type::discopop:
            require(std::isfinite(h.discopop_tau) && h.discopop_tau > 0, "discopop_tau = ", h.discopop_tau,
                    ", expected a finite value > 0");
            break;
        default: break;
        }
        if (o.use_weighting)
            require(term.type != loss_type::aot && term.type != loss_type::aot_unpaired,
                    "use_weighting: WPO weighting is not defined for loss ", name(term.type));
        if (h.divergence != f_divergence::reverse_kl)
            require(takes_f_divergence(term.type), "f_divergence_type = ", name(h.divergence), " for loss ",
                    name(term.type), ", expected reverse_kl: only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, "
                    "robust, discopop and sft take an f-divergence");
    }
    // α < 0 is no f-divergence the DPO derivation holds for (f' stays finite at 0); α = 0 and
    // α = 1 are the limits forward_kl and reverse_kl.
    require(std::isfinite(h.f_alpha_divergence_coef) && h.f_alpha_divergence_coef >= 0, "f_alpha_divergence_coef = ",
            h.f_alpha_divergence_coef, ", expected a finite value >= 0");
    require(std::isfinite(o.a) && o.a >= 0, "a = ", o.a, ", expected a finite margin >= 0");
    if (o.ld_alpha)
        require(*o.ld_alpha >= 0 && *o.ld_alpha <= 1, "ld_alpha = ", *o.ld_alpha, ", expected 0 <= ld_alpha <= 1");
    require(std::isfinite(o.logit_scale) && o.logit_scale > 0, "logit_scale = ", o.logit_scale,
            ", expected a finite value > 0");
    if (o.logit_softcap)
        require(std::isfinite(*o.logit_softcap) && *o.logit_softcap > 0, "logit_softcap = ", *o.logit_softcap,
                ", expected a finite value > 0");
    require(std::isfinite(o.temperature) && o.temperature > 0, "temperature = ", o.temperature,
            ", expected a finite value > 0");
    if (o.chunk_tokens) require(*o.chunk_tokens >= 1, "chunk_tokens = ", *o.chunk_tokens, ", expected at least 1");
}

/// "sigmoid,bco_pair,sft" with "0.8,0.2,1.0" (weights default to 1).
inline std::vector<loss_term> parse_loss_terms(std::string_view types, std::string_view weights = {}) {
    auto split = [](std::string_view s) {
        std::vector<std::string_view> parts;
        while (!s.empty()) {
            const auto comma = s.find(',');
            parts.push_back(s.substr(0, comma));
            if (comma == std::string_view::npos) break;
            s.remove_prefix(comma + 1);
        }
        return parts;
    };
    std::vector<loss_term> terms;
    for (std::string_view t : split(types)) terms.push_back({parse_loss_type(t), 1.0});
    if (!weights.empty()) {
        const auto w = split(weights);
        detail::require(w.size() == terms.size(), "loss_weights: ", w.size(), " weights for ", terms.size(),
                        " losses");
        for (std::size_t i = 0; i < w.size(); ++i) {
            const std::optional<double> value = parse_real(w[i]);
            detail::require(value.has_value(), "loss_weights: '", w[i], "' is not a decimal number");
            terms[i].weight = *value;
        }
    }
    return terms;
}

TPO_END_NAMESPACE
