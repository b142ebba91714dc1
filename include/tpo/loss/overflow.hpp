#pragma once
// A non-finite result is an error, never a number handed back. The inputs are checked before any
// arithmetic (labels, NaN/Inf logits, weights, hyperparameters), so what is left is overflow of
// finite values: logits near the float64 limit, or hyperparameters such as β = 1e-300 with ipo.
// Both checks read only what the objective has on the host or computes anyway, O(P) values after
// the forward and O(1) per scored row in the coefficient pass, never the O(S·L·V) tensors.

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/loss/passes.hpp"

TPO_BEGIN_NAMESPACE
namespace loss {

/// The settings that scale a result, for the message of an overflow.
inline std::string overflow_settings(const objective_options& o) {
    std::string losses;
    for (const loss_term& t : o.losses) {
        if (!losses.empty()) losses += ',';
        losses += name(t.type);
    }
    return detail::concat("loss ", losses, ", beta = ", o.hyper.beta);
}

/// Throws overflow_error naming the first non-finite value the forward would report, in the order
/// the values are computed (sequence scores, rewards, per-pair losses and slopes, batch values).
inline void check_finite_forward(const std::vector<sequence_summary>& summaries, const std::vector<pair_result>& pairs,
                                 const batch_result& batch, const objective_options& o) {
    auto require = [&](double value, const char* hint, auto&&... what) {
        if (!std::isfinite(value))
            throw overflow_error(detail::concat("result: ", what..., " is ", value,
                                                ", expected a finite value: it overflowed (", overflow_settings(o),
                                                ")", hint));
    };
    const char* const none = "";
    const char* const scores = "; its token log-probabilities or weights exceed float64";
    const auto count = static_cast<index_t>(pairs.size());
    for (index_t i = 0; i < count; ++i) {
        for (const bool chosen : {true, false}) {
            const sequence_summary& s = summaries[static_cast<std::size_t>(chosen ? i : count + i)];
            const char* side = chosen ? "chosen" : "rejected";
            require(s.policy_score, scores, side, " policy sequence score of pair ", i);
            require(s.reference_score, scores, side, " reference sequence score of pair ", i);
            require(s.visual_score_sum, none, side, " visual score sum of pair ", i);
            if (o.use_weighting) require(s.wpo_log_weight, none, side, " WPO log-weight of pair ", i);
        }
        const pair_result& p = pairs[static_cast<std::size_t>(i)];
        require(p.chosen_reward, none, "chosen reward of pair ", i);
        require(p.rejected_reward, none, "rejected reward of pair ", i);
        require(p.loss, none, "loss of pair ", i);
        require(p.grad_chosen, none, "gradient of the chosen policy score of pair ", i);
        require(p.grad_rejected, none, "gradient of the rejected policy score of pair ", i);
    }
    require(batch.loss, none, "batch loss");
    require(batch.reward_margin, none, "reward margin");
    require(batch.reward_accuracy, none, "reward accuracy");
    require(batch.sft_logp_coefficient, none, "sft coefficient");
}

/// The limits of coefficient_pass for logits of type T and gradients of type G. The margin below
/// the largest finite value covers the rounding of the row pass's own arithmetic.
template <class T, class G>
gradient_limits gradient_limits_for() {
    constexpr double margin = 1.0 - 1.0 / 1024;
    const double accumulate = largest_finite<std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>,
                                                                double, float>>();
    const double output = largest_finite<G>();
    return {accumulate * margin, (output < accumulate ? output : accumulate) * margin};
}

/// Throws overflow_error for the first sequence whose gradient rows would not be finite.
template <class T, class G>
void report_gradient_overflow(const std::vector<gradient_overflow>& found, index_t pairs, const objective_options& o) {
    const gradient_limits limits = gradient_limits_for<T, G>();
    for (std::size_t k = 0; k < found.size(); ++k) {
        const gradient_overflow& f = found[k];
        if (!f.found) continue;
        const bool chosen = static_cast<index_t>(k) < pairs;
        const index_t sequence = chosen ? static_cast<index_t>(k) : static_cast<index_t>(k) - pairs;
        const std::string where = detail::concat("gradient of the ", chosen ? "chosen" : "rejected", " policy ",
                                                 f.noisy ? "noisy " : "", "logits at sequence ", sequence,
                                                 ", position ", f.position);
        const std::string settings = overflow_settings(o);
        if (!std::isfinite(f.alpha) || !std::isfinite(f.beta))
            throw overflow_error(detail::concat(where, ": coefficients alpha = ", f.alpha, ", beta = ", f.beta,
                                                ", expected finite values: they overflowed (", settings, ")"));
        if (!(std::fabs(f.beta) <= limits.beta))
            throw overflow_error(detail::concat(where, ": coefficient beta = ", f.beta, " exceeds what the row pass over ",
                                                element_name<T>(), " logits holds (up to ", limits.beta,
                                                "): it overflowed (", settings, ")"));
        throw overflow_error(detail::concat(where, ": entries up to ", f.bound, " in magnitude (alpha = ", f.alpha,
                                            ", beta = ", f.beta, ") exceed what ", element_name<G>(),
                                            " gradients of ", element_name<T>(), " logits hold (up to ",
                                            limits.entry, "): it overflowed (", settings, ")"));
    }
}

/// Throws overflow_error when the `size` values at `data` (backend memory) hold a NaN or an Inf.
/// For outputs whose entries are sums the coefficient bounds do not cover (the fused lm_head
/// path's hidden-state and head gradients): one read of O(S·L·H + V·H) values, as rows of 2^16
/// values (and one shorter row) through the backend's own finiteness scan, which reads rows as
/// fast as it can.
template <class Backend, class G>
void require_finite_output(Backend& backend, const G* data, index_t size, const std::string& what,
                           const objective_options& o) {
    if (!data || size <= 0) return;
    constexpr index_t width = index_t{1} << 16;
    const index_t rows = size / width, tail = size % width;
    const row_alignment unshifted{false, -1};
    auto labels = backend.template allocate<std::int64_t>(rows > 0 ? rows : 1);  // 0: every row is read
    auto stats = backend.template allocate<row_stats>(rows + (tail > 0 ? 1 : 0));
    if (rows > 0)
        backend.row_statistics(logits_view<const G>{data, 1, rows, width},
                               labels_view<const std::int64_t>{backend.raw(labels), 1, rows}, unshifted,
                               row_reduction::finiteness, backend.raw(stats));
    if (tail > 0)
        backend.row_statistics(logits_view<const G>{data + rows * width, 1, 1, tail},
                               labels_view<const std::int64_t>{backend.raw(labels), 1, 1}, unshifted,
                               row_reduction::finiteness, backend.raw(stats) + rows);
    for (const row_stats& s : backend.to_host(stats))
        if (s.status != row_status::ok)
            throw overflow_error(detail::concat(what, ": a value is not finite: it overflowed (", overflow_settings(o),
                                                ")"));
}

}  // namespace loss
TPO_END_NAMESPACE
