#pragma once
// The objective: TPO, plain DPO or caller-weighted DPO with any loss of the family, forward and
// exact analytic backward down to the policy logits, on any tensor backend.
//
//   forward:  row_statistics over each logits tensor (the O(S·L·V) pass)
//             → sequence_pass → batch_pass (O(S·L), O(P))
//   backward: coefficient_pass → row_gradient over each requested gradient tensor
//
// The forward keeps only O(S·L) row statistics; the backward re-reads the logits once and
// recomputes the exponentials instead of storing a softmax.

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/loss/passes.hpp"

TPO_BEGIN_NAMESPACE

/// One side (chosen or rejected) of a preference batch: `(P, L, V)` logits and `(P, L)` labels.
/// The noisy tensors are needed with self-calibrated weights only; `weights` with caller weights only.
/// The reference model enters either through its logits or, precomputed, through its sequence
/// scores A_ref (`reference_scores`, one per sequence, in backend memory): a reference model that
/// does not train gives the same A_ref every epoch, so a trainer may compute them once (as
/// objective_result::reference_*_scores of a forward under the same options and labels) and spare
/// two reference forwards and their logits each step. Give one or the other, not both.
template <class T, class I, class R = T>
struct side_batch {
    logits_view<const T> policy{};
    logits_view<const T> policy_noisy{};
    logits_view<const R> reference{};
    logits_view<const R> reference_noisy{};
    labels_view<const I> labels{};
    token_values_view<const float> weights{};
    sequence_values_view<const double> reference_scores{};
};

template <class T, class I, class R = T>
struct preference_batch {
    side_batch<T, I, R> chosen;
    side_batch<T, I, R> rejected;
};

/// Where to write ∂L/∂(policy logits); an empty view is not computed.
template <class G>
struct side_gradients {
    logits_view<G> policy{};
    logits_view<G> policy_noisy{};
};

template <class G>
struct preference_gradients {
    side_gradients<G> chosen;
    side_gradients<G> rejected;
};

/// Everything the forward reports (SPEC §4): the batch loss and per-pair values.
struct objective_result {
    double loss = 0;
    double reward_accuracy = 0;
    double reward_margin = 0;
    std::vector<double> losses;
    std::vector<double> chosen_rewards, rejected_rewards;
    std::vector<double> policy_chosen_scores, policy_rejected_scores;        // sequence scores A_θ
    std::vector<double> reference_chosen_scores, reference_rejected_scores;  // A_ref
    std::vector<double> mean_visual_score_chosen, mean_visual_score_rejected;
    std::vector<double> chosen_tokens, rejected_tokens;
    /// ∂L/∂A_θ of each sequence (what the chain of SPEC §5 starts from).
    std::vector<double> grad_policy_chosen_scores, grad_policy_rejected_scores;
};

namespace detail {

template <class T>
void check_logits(const logits_view<const T>& z, const char* side, const char* role) {
    require<shape_error>(z.data != nullptr || z.size() == 0, side, " ", role, ": null data for shape ",
                         shape_string(z));
    require<shape_error>(z.sequences >= 1, side, " ", role, ": shape ", shape_string(z),
                         " has no sequence (empty batch)");
    require<shape_error>(z.length >= 1 && z.vocab >= 1, side, " ", role, ": shape ", shape_string(z),
                         ", expected L >= 1 and V >= 1");
    require<shape_error>(z.data != nullptr, side, " ", role, ": null data pointer");
}

template <class A, class B>
void check_same_shape(const logits_view<const A>& a, const logits_view<const B>& b, const char* side,
                      const char* role_a, const char* role_b) {
    require<shape_error>(a.sequences == b.sequences && a.length == b.length && a.vocab == b.vocab, side, " ", role_b,
                         ": shape ", shape_string(b), " differs from ", role_a, " shape ", shape_string(a));
}

inline const char* role_name(loss::tensor_role r) {
    switch (r) {
    case loss::tensor_role::policy: return "policy logits";
    case loss::tensor_role::policy_noisy: return "policy noisy logits";
    case loss::tensor_role::reference: return "reference logits";
    case loss::tensor_role::reference_noisy: return "reference noisy logits";
    case loss::tensor_role::weights: return "token weights";
    }
    return "?";
}

}  // namespace detail

template <tensor_backend B>
class objective {
public:
    objective(B& backend, objective_options options) : backend_(backend), options_(std::move(options)) {
        validate(options_);
    }

    const objective_options& options() const { return options_; }

    /// Computes the loss and metrics and keeps what backward() needs.
    template <class T, class I, class R>
    objective_result forward(const preference_batch<T, I, R>& batch) {
        check(batch);
        const index_t pairs = batch.chosen.policy.sequences;
        pairs_ = pairs;
        vocab_ = batch.chosen.policy.vocab;
        prepare(chosen_, batch.chosen);
        prepare(rejected_, batch.rejected);
        summaries_ = backend_.template allocate<loss::sequence_summary>(2 * pairs);
        pair_results_ = backend_.template allocate<loss::pair_result>(pairs);
        batch_result_ = backend_.template allocate<loss::batch_result>(1);
        scratch_ = backend_.template allocate<double>(2 * pairs);
        order_scratch_ = backend_.template allocate<index_t>(2 * pairs);

        const loss::token_settings ts = loss::token_settings::from(options_);
        backend_.for_each(pairs, loss::sequence_pass{ts, rows(chosen_), rows(rejected_), pairs,
                                                     backend_.raw(summaries_)});
        std::vector<loss::sequence_summary> summaries = backend_.to_host(summaries_);
        if (options_.check_inputs) report_input_problems(summaries);

        backend_.for_each(1, loss::batch_pass{options_.hyper, loss::loss_list::from(options_),
                                              options_.use_weighting, pairs, backend_.raw(summaries_),
                                              backend_.raw(pair_results_), backend_.raw(batch_result_),
                                              backend_.raw(scratch_), backend_.raw(order_scratch_)});
        forward_done_ = true;
        return collect(summaries);
    }

    /// Writes ∂(batch loss)/∂(policy logits) into the given views (dtype G, shapes of the inputs).
    template <class T, class I, class R, class G>
    void backward(const preference_batch<T, I, R>& batch, const preference_gradients<G>& grads) {
        detail::require<error>(forward_done_, "backward: forward() must run first on the same batch");
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        check_gradient(batch.chosen.policy, grads.chosen.policy, "chosen", "gradient of policy logits");
        check_gradient(batch.rejected.policy, grads.rejected.policy, "rejected", "gradient of policy logits");
        if (noisy) {
            check_gradient(batch.chosen.policy_noisy, grads.chosen.policy_noisy, "chosen",
                           "gradient of policy noisy logits");
            check_gradient(batch.rejected.policy_noisy, grads.rejected.policy_noisy, "rejected",
                           "gradient of policy noisy logits");
        }
        auto coefficients = [&](const side_state& s) {
            return std::pair{backend_.template allocate<row_coefficients>(pairs_ * s.scored),
                             backend_.template allocate<row_coefficients>(noisy ? pairs_ * s.scored : 0)};
        };
        auto [chosen_clean, chosen_noisy] = coefficients(chosen_);
        auto [rejected_clean, rejected_noisy] = coefficients(rejected_);
        backend_.for_each(pairs_, loss::coefficient_pass{
                                      loss::token_settings::from(options_), rows(chosen_), rows(rejected_),
                                      {backend_.raw(chosen_clean), noisy ? backend_.raw(chosen_noisy) : nullptr},
                                      {backend_.raw(rejected_clean), noisy ? backend_.raw(rejected_noisy) : nullptr},
                                      backend_.raw(summaries_), backend_.raw(pair_results_),
                                      backend_.raw(batch_result_), pairs_});
        auto write = [&](const auto& z, auto& coef, const logits_view<G>& out, index_t scored) {
            if (!out.empty()) backend_.row_gradient(z, backend_.raw(coef), scored, out);
        };
        write(batch.chosen.policy, chosen_clean, grads.chosen.policy, chosen_.scored);
        write(batch.rejected.policy, rejected_clean, grads.rejected.policy, rejected_.scored);
        if (noisy) {
            write(batch.chosen.policy_noisy, chosen_noisy, grads.chosen.policy_noisy, chosen_.scored);
            write(batch.rejected.policy_noisy, rejected_noisy, grads.rejected.policy_noisy, rejected_.scored);
        }
    }

private:
    using stats_buffer = typename B::template buffer<row_stats>;

    struct side_state {
        index_t length = 0;
        index_t scored = 0;
        stats_buffer policy, policy_noisy, reference, reference_noisy;
        const float* weights = nullptr;
        const double* reference_scores = nullptr;  // given A_ref; the reference buffers are then unused
    };

    template <class T, class I, class R>
    void check(const preference_batch<T, I, R>& batch) const {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        auto check_side = [&](const side_batch<T, I, R>& s, const char* side) {
            detail::check_logits(s.policy, side, "policy logits");
            const bool given_scores = !s.reference_scores.empty();
            if (given_scores) {
                detail::require<shape_error>(s.reference.empty() && s.reference_noisy.empty(), side,
                                             " reference: both logits and precomputed scores given; give one");
                detail::require<shape_error>(s.reference_scores.sequences == s.policy.sequences, side,
                                             " reference scores: ", s.reference_scores.sequences,
                                             " values, expected one per sequence (", s.policy.sequences, ")");
            } else {
                detail::check_logits(s.reference, side, "reference logits");
                detail::check_same_shape(s.policy, s.reference, side, "policy logits", "reference logits");
            }
            if (noisy) {
                detail::check_logits(s.policy_noisy, side, "policy noisy logits");
                detail::check_same_shape(s.policy, s.policy_noisy, side, "policy logits", "policy noisy logits");
                if (!given_scores) {
                    detail::check_logits(s.reference_noisy, side, "reference noisy logits");
                    detail::check_same_shape(s.policy, s.reference_noisy, side, "policy logits",
                                             "reference noisy logits");
                }
            }
            detail::require<shape_error>(s.labels.data != nullptr, side, " labels: null data pointer");
            detail::require<shape_error>(s.labels.sequences == s.policy.sequences && s.labels.length == s.policy.length,
                                         side, " labels: shape ", shape_string(s.labels), ", expected (",
                                         s.policy.sequences, ", ", s.policy.length, ") to match the logits ",
                                         shape_string(s.policy));
            if (options_.weighting == token_weighting::caller) {
                detail::require<shape_error>(s.weights.data != nullptr, side,
                                             " token weights: missing, required with caller-supplied weights");
                detail::require<shape_error>(
                    s.weights.sequences == s.policy.sequences && s.weights.length == s.policy.length, side,
                    " token weights: shape (", s.weights.sequences, ", ", s.weights.length, "), expected (",
                    s.policy.sequences, ", ", s.policy.length, ")");
            }
        };
        check_side(batch.chosen, "chosen");
        check_side(batch.rejected, "rejected");
        detail::require<shape_error>(batch.chosen.policy.sequences == batch.rejected.policy.sequences,
                                     "rejected policy logits: ", batch.rejected.policy.sequences,
                                     " sequences, expected one per chosen sequence (", batch.chosen.policy.sequences,
                                     ")");
        detail::require<shape_error>(batch.chosen.policy.vocab == batch.rejected.policy.vocab,
                                     "rejected policy logits: vocabulary ", batch.rejected.policy.vocab,
                                     " differs from the chosen one (", batch.chosen.policy.vocab, ")");
    }

    template <class T, class G>
    static void check_gradient(const logits_view<const T>& z, const logits_view<G>& g, const char* side,
                               const char* role) {
        if (g.empty()) return;
        detail::require<shape_error>(g.sequences == z.sequences && g.length == z.length && g.vocab == z.vocab, side,
                                     " ", role, ": shape ", shape_string(g), ", expected ", shape_string(z));
    }

    template <class T, class I, class R>
    void prepare(side_state& state, const side_batch<T, I, R>& s) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const row_alignment align = options_.alignment;
        state.length = s.policy.length;
        state.scored = align.scored_rows(s.policy.length);
        const index_t rows = s.policy.sequences * state.scored;
        auto pass = [&](auto z, row_reduction reduction) {
            stats_buffer out = backend_.template allocate<row_stats>(rows);
            if (rows > 0) backend_.row_statistics(z, s.labels, align, reduction, backend_.raw(out));
            return out;
        };
        const row_reduction policy_reduction =
            options_.use_weighting ? row_reduction::logsumexp_and_doubled : row_reduction::logsumexp;
        const bool reference_rows = s.reference_scores.empty();
        state.reference_scores = s.reference_scores.data;
        state.reference = stats_buffer{};
        state.reference_noisy = stats_buffer{};
        if (noisy) {
            clean_and_noisy(s.policy, policy_reduction, state.policy, s.policy_noisy, state.policy_noisy, s.labels,
                            rows);
            if (reference_rows)
                clean_and_noisy(s.reference, row_reduction::logsumexp, state.reference, s.reference_noisy,
                                state.reference_noisy, s.labels, rows);
        } else {
            state.policy = pass(s.policy, policy_reduction);
            if (reference_rows) state.reference = pass(s.reference, row_reduction::logsumexp);
            state.policy_noisy = stats_buffer{};
        }
        state.weights = options_.weighting == token_weighting::caller ? s.weights.data : nullptr;
    }

    /// A model's clean and noisy logits, in one pass where the backend can fuse them.
    template <class Z, class I>
    void clean_and_noisy(logits_view<const Z> clean, row_reduction clean_reduction, stats_buffer& clean_out,
                         logits_view<const Z> noisy, stats_buffer& noisy_out, labels_view<const I> labels,
                         index_t rows) {
        const row_alignment align = options_.alignment;
        clean_out = backend_.template allocate<row_stats>(rows);
        noisy_out = backend_.template allocate<row_stats>(rows);
        if (rows == 0) return;
        if constexpr (fused_row_statistics<B, Z, Z, I>) {
            backend_.row_statistics_pair(clean, clean_reduction, backend_.raw(clean_out), noisy, noisy_reduction(),
                                         backend_.raw(noisy_out), labels, align);
        } else {
            backend_.row_statistics(clean, labels, align, clean_reduction, backend_.raw(clean_out));
            backend_.row_statistics(noisy, labels, align, noisy_reduction(), backend_.raw(noisy_out));
        }
    }

    /// The noisy rows need their log-sum-exp only when the score uses probabilities.
    row_reduction noisy_reduction() const {
        if (options_.score != score_kind::logit) return row_reduction::logsumexp;
        return options_.check_inputs && options_.check_unused_logits ? row_reduction::finiteness
                                                                     : row_reduction::label;
    }

    loss::side_rows rows(side_state& s) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const bool reference_rows = s.reference_scores == nullptr;
        return {s.length,
                s.scored,
                backend_.raw(s.policy),
                noisy ? backend_.raw(s.policy_noisy) : nullptr,
                reference_rows ? backend_.raw(s.reference) : nullptr,
                reference_rows && noisy ? backend_.raw(s.reference_noisy) : nullptr,
                s.weights,
                s.reference_scores};
    }

    void report_input_problems(const std::vector<loss::sequence_summary>& summaries) const {
        for (std::size_t k = 0; k < summaries.size(); ++k) {
            const loss::sequence_summary& s = summaries[k];
            if (s.problem == loss::input_problem::none) continue;
            const bool chosen = static_cast<index_t>(k) < pairs_;
            const index_t sequence = chosen ? static_cast<index_t>(k) : static_cast<index_t>(k) - pairs_;
            const char* side = chosen ? "chosen" : "rejected";
            const std::string where = detail::concat(side, " ", detail::role_name(s.problem_tensor), " at sequence ",
                                                     sequence, ", position ", s.problem_position);
            switch (s.problem) {
            case loss::input_problem::label_out_of_range:
                throw value_error(detail::concat(side, " labels: label ", static_cast<std::int64_t>(s.problem_value),
                                                 " at sequence ", sequence, ", position ", s.problem_position,
                                                 " is outside [0, ", vocab_, ") and is not the ignore index ",
                                                 options_.alignment.ignore_index));
            case loss::input_problem::non_finite_logits:
                throw value_error(detail::concat(where, ": the row holds a NaN or an infinite logit"));
            case loss::input_problem::non_finite_reference_score:
                throw value_error(detail::concat(side, " reference scores: ", s.problem_value, " at sequence ",
                                                 sequence, " is not finite"));
            case loss::input_problem::bad_weight:
                throw value_error(detail::concat(where, ": weight ", s.problem_value, ", expected a finite value",
                                                 options_.form == sequence_form::additive ? " > 0" : ""));
            case loss::input_problem::none: break;
            }
        }
    }

    objective_result collect(const std::vector<loss::sequence_summary>& summaries) {
        const std::vector<loss::pair_result> pairs = backend_.to_host(pair_results_);
        const loss::batch_result batch = backend_.to_host(batch_result_).front();
        objective_result r;
        r.loss = batch.loss;
        r.reward_accuracy = batch.reward_accuracy;
        r.reward_margin = batch.reward_margin;
        for (index_t i = 0; i < pairs_; ++i) {
            const loss::pair_result& p = pairs[i];
            const loss::sequence_summary& w = summaries[i];
            const loss::sequence_summary& l = summaries[pairs_ + i];
            r.losses.push_back(p.loss);
            r.chosen_rewards.push_back(p.chosen_reward);
            r.rejected_rewards.push_back(p.rejected_reward);
            r.policy_chosen_scores.push_back(w.policy_score);
            r.policy_rejected_scores.push_back(l.policy_score);
            r.reference_chosen_scores.push_back(w.reference_score);
            r.reference_rejected_scores.push_back(l.reference_score);
            // The metric the official code logs: Σ m·s / (Σ m + 1e-8).
            r.mean_visual_score_chosen.push_back(w.visual_score_sum / (w.tokens + 1e-8));
            r.mean_visual_score_rejected.push_back(l.visual_score_sum / (l.tokens + 1e-8));
            r.chosen_tokens.push_back(w.tokens);
            r.rejected_tokens.push_back(l.tokens);
            r.grad_policy_chosen_scores.push_back(p.grad_chosen);
            r.grad_policy_rejected_scores.push_back(p.grad_rejected);
        }
        return r;
    }

    B& backend_;
    objective_options options_;
    index_t pairs_ = 0;
    index_t vocab_ = 0;
    bool forward_done_ = false;
    side_state chosen_, rejected_;
    typename B::template buffer<loss::sequence_summary> summaries_;
    typename B::template buffer<loss::pair_result> pair_results_;
    typename B::template buffer<loss::batch_result> batch_result_;
    typename B::template buffer<double> scratch_;
    typename B::template buffer<index_t> order_scratch_;
};

/// One call: forward, and backward into `grads` when given.
template <tensor_backend B, class T, class I, class R, class G = float>
objective_result evaluate(B& backend, const objective_options& options, const preference_batch<T, I, R>& batch,
                          const preference_gradients<G>* grads = nullptr) {
    objective<B> obj(backend, options);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

TPO_END_NAMESPACE
