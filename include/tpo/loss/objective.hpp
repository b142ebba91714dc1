#pragma once
// The objective: TPO, plain DPO or caller-weighted DPO with any loss of the family, forward and
// exact analytic backward down to the policy logits, on any tensor backend.
//
//   forward:  row_statistics over each logits tensor (the O(S·L·V) pass, rows/rules.hpp)
//             → sequence_pass → batch_pass (O(S·L), O(P))
//   backward: coefficient_pass → row_gradient over each requested gradient tensor
//
// The forward keeps only O(S·L) row statistics; the backward re-reads the logits once and
// recomputes the exponentials instead of storing a softmax. What the objective reads and writes is
// in loss/batch.hpp, its checks in loss/checks.hpp.

#include <utility>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/batch.hpp"
#include "tpo/loss/checks.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/loss/passes.hpp"

TPO_BEGIN_NAMESPACE

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
        detail::check_batch(options_, batch);
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
        if (options_.check_inputs) detail::report_input_problems(options_, summaries, pairs_, vocab_);

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
        detail::check_gradient(batch.chosen.policy, grads.chosen.policy, "chosen", "gradient of policy logits");
        detail::check_gradient(batch.rejected.policy, grads.rejected.policy, "rejected", "gradient of policy logits");
        if (noisy) {
            detail::check_gradient(batch.chosen.policy_noisy, grads.chosen.policy_noisy, "chosen",
                           "gradient of policy noisy logits");
            detail::check_gradient(batch.rejected.policy_noisy, grads.rejected.policy_noisy, "rejected",
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
