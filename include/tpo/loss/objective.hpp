#pragma once
// The objective: TPO, plain DPO or caller-weighted DPO with any loss of the family, forward and
// exact analytic backward down to the policy logits, on any tensor backend.
//
//   forward:  row_statistics over each logits tensor (the O(S·L·V) pass, rows/rules.hpp)
//             → sequence_pass → reward_pass → loss_term_pass per loss term (O(S·L), O(P))
//   backward: coefficient_pass → row_gradient over each requested gradient tensor
//
// The forward keeps only O(S·L) row statistics; the backward re-reads the logits once and
// recomputes the exponentials instead of storing a softmax. What the objective reads and writes is
// in loss/batch.hpp, its checks in loss/checks.hpp.

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/batch.hpp"
#include "tpo/loss/checks.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/loss/overflow.hpp"
#include "tpo/loss/passes.hpp"
#include "tpo/rows/fused.hpp"

TPO_BEGIN_NAMESPACE

namespace dist {
template <class B, class C>
class sharded_objective;
template <class B, class C>
class data_parallel_objective;
}

namespace detail {

/// The objective's result from its O(P) buffers read back to the host; a non-finite value throws
/// overflow_error.
inline objective_result collect_result(const std::vector<loss::sequence_summary>& summaries,
                                       const std::vector<loss::pair_result>& pairs, const loss::batch_result& batch,
                                       index_t pair_count, const objective_options& options) {
    loss::check_finite_forward(summaries, pairs, batch, options);
    objective_result r;
    r.loss = batch.loss;
    r.reward_accuracy = batch.reward_accuracy;
    r.reward_margin = batch.reward_margin;
    for (index_t i = 0; i < pair_count; ++i) {
        const loss::pair_result& p = pairs[i];
        const loss::sequence_summary& w = summaries[i];
        const loss::sequence_summary& l = summaries[pair_count + i];
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

}  // namespace detail

namespace detail {

// Element-wise functors of the logit transform on logits inputs; at namespace scope, since nvcc's
// kernel stubs must name them from outside the objective.

/// ∂L/∂u of the caller's logits from ∂L/∂z (in place) and the transformed logits z.
template <class T, class G>
struct chain_logits_op {
    const T* z;
    G* grad;
    logit_transform transform;
    TPO_HOST_DEVICE void operator()(index_t e) const {
        grad[e] = narrow<G>(widen<double>(grad[e]) * transform.derivative_at(widen<double>(z[e])));
    }
};

template <class T>
struct transform_op {
    const T* in;
    T* out;
    logit_transform transform;
    TPO_HOST_DEVICE void operator()(index_t e) const { out[e] = narrow<T>(transform.apply(widen<double>(in[e]))); }
};

}  // namespace detail

template <tensor_backend B>
class objective {
public:
    objective(B& backend, objective_options options) : backend_(backend), options_(std::move(options)) {
        validate(options_);
        row_align_ = options_.alignment;
    }

    const objective_options& options() const { return options_; }

    /// Computes the loss and metrics and keeps what backward() needs.
    template <class T, class I, class R>
    objective_result forward(const preference_batch<T, I, R>& batch) {
        launch_forward(batch);
        deferred_ = false;
        return read_forward();
    }

    /// The forward without reading anything back: the loss, the metrics and the input statuses stay
    /// in backend memory (results()), so on a device nothing waits for it and the calls can be
    /// captured in a CUDA graph. Input problems and overflow are not reported here but by
    /// read_results() (and, for a backward() that follows, by loss::report_gradient_overflow on
    /// results().gradient_overflow); backward() may follow at once and then writes whatever the
    /// batch gives, without checking first.
    template <class T, class I, class R>
    void launch_forward(const preference_batch<T, I, R>& batch) {
        prepare_rows(batch);
        launch_passes(batch.chosen.policy.sequences);
        deferred_ = true;
    }

    /// The last forward's results on the host (waits for the backend); with check_inputs an input
    /// problem throws value_error naming it, and a non-finite result throws overflow_error.
    objective_result read_results() {
        detail::require<error>(forward_done_, "read_results: no forward has run");
        const std::vector<loss::sequence_summary> summaries = backend_.to_host(summaries_);
        if (options_.check_inputs)
            detail::report_input_problems(options_, summaries, pairs_, vocab_, hidden_input_);
        return detail::collect_result(summaries, backend_.to_host(pair_results_),
                                      backend_.to_host(batch_result_).front(), pairs_, options_);
    }

    /// Where the last forward's results lie in backend memory (valid until the next forward or the
    /// objective's end), for a caller that keeps them on its device; read them back as
    /// read_results() does. `gradient_overflow` (2P, chosen then rejected) is set by a backward()
    /// after launch_forward(), which leaves its check to the caller.
    struct result_buffers {
        const loss::sequence_summary* summaries;  // 2P: chosen, then rejected
        const loss::pair_result* pairs;           // P
        const loss::batch_result* batch;          // 1
        const loss::gradient_overflow* gradient_overflow;
        index_t pair_count;
        index_t vocab;
    };
    result_buffers results() {
        detail::require<error>(forward_done_, "results: no forward has run");
        return {backend_.raw(summaries_), backend_.raw(pair_results_), backend_.raw(batch_result_),
                overflow_.empty() ? nullptr : backend_.raw(overflow_), pairs_, vocab_};
    }

public:
    /// The same with hidden states in: the logits transform(h·Wᵀ + b) are computed chunk by chunk
    /// and never stored whole (rows/fused.hpp). The chosen policy's last chunk (and the rejected
    /// policy's, when both policies' rows fit in one chunk) stays in backend memory for backward()
    /// (which starts from it) until backward(), the next forward() or release_kept_chunk().
    template <class T, class I, class R>
    objective_result forward(const hidden_preference_batch<T, I, R>& batch)
        requires head_backend<B>
    {
        prepare_rows(batch);
        launch_passes(batch.chosen.policy.sequences);
        deferred_ = false;
        return read_forward();
    }

    /// Frees the chunks of logits a hidden-state forward() keeps for backward(): for a forward that
    /// no backward follows (evaluation) on a long-lived objective. A backward() after it still
    /// works, computing those chunks again.
    void release_kept_chunk() { kept_.reset(); }

    /// Writes ∂(batch loss)/∂(policy logits) into the given views (dtype G, shapes of the inputs).
    template <class T, class I, class R, class G>
    void backward(const preference_batch<T, I, R>& batch, const preference_gradients<G>& grads) {
        auto [chosen, rejected] = backward_coefficients<T>(batch, grads);
        write_gradients(batch, grads, chosen, rejected);
    }

    /// With hidden states in: ∂(batch loss)/∂(policy hidden states), and ∂/∂W and ∂/∂b of the
    /// policy's lm_head when `grads` asks for them (accumulated over the clean and the noisy pass of
    /// both sides in the accumulation type, then written in G).
    template <class T, class I, class R, class G>
    void backward(const hidden_preference_batch<T, I, R>& batch, const hidden_gradients<G>& grads)
        requires head_backend<B>
    {
        auto [chosen, rejected] = backward_coefficients<T>(batch, grads);
        write_gradients(batch, grads, chosen, rejected);
    }

private:
    template <class, class>
    friend class dist::sharded_objective;
    template <class, class>
    friend class dist::data_parallel_objective;

    using stats_buffer = typename B::template buffer<row_stats>;
    using coefficient_buffer = typename B::template buffer<row_coefficients>;

    struct side_coefficients {
        coefficient_buffer clean, noisy;
    };

    /// The forward up to the row statistics of both sides (checks, the logit transform's copies,
    /// the O(S·L·V) row pass); the O(S·L) passes follow in launch_passes().
    template <class T, class I, class R>
    void prepare_rows(const preference_batch<T, I, R>& batch) {
        detail::check_batch(options_, batch);
        transformed_.reset();
        kept_.reset();
        const preference_batch<T, I, R>* rows_of = &batch;
        if (!options_.transform().identity()) {
            // Logits inputs under a logit transform: the transformed logits, once, in backend memory;
            // backward() writes their gradient and chains it through the transform.
            auto copies = std::make_shared<transformed_logits<T, I, R>>(backend_, batch, options_.transform());
            transformed_ = copies;
            rows_of = &copies->batch;
        }
        hidden_input_ = false;
        vocab_ = batch.chosen.policy.vocab;
        prepare(chosen_, rows_of->chosen);
        prepare(rejected_, rows_of->rejected);
    }

    /// The same with hidden states in; `first_vocab_row` is the head's first row in the whole
    /// vocabulary (a shard's offset), for the messages of its checks.
    template <class T, class I, class R>
    void prepare_rows(const hidden_preference_batch<T, I, R>& batch, index_t first_vocab_row = 0)
        requires head_backend<B>
    {
        detail::check_hidden_batch(options_, batch);
        transformed_.reset();
        kept_.reset();
        hidden_input_ = true;
        vocab_ = batch.head.vocab;
        if (options_.check_inputs) {
            rows::check_head(backend_, batch.head, "lm_head", first_vocab_row);
            if (batch.chosen.reference_scores.empty())
                rows::check_head(backend_, batch.reference_head, "reference lm_head", first_vocab_row);
        }
        // Each kind of tensor goes through the head in one pass over both sides, so that a chunk
        // holds both policies' rows where they fit; the policies' pass runs last and keeps its
        // last chunk, where the backward starts.
        auto keep = std::make_shared<rows::kept_chunk<B, T>>();
        prepare_hidden(batch, keep.get());
        kept_ = std::move(keep);
        kept_type_ = type_tag<rows::kept_chunk<B, T>>();
    }

    /// The backward up to the row coefficients (gradient shapes checked, the coefficient pass and
    /// its overflow check); the gradients are written by write_gradients().
    template <class T, class I, class R, class G>
    std::pair<side_coefficients, side_coefficients> backward_coefficients(const preference_batch<T, I, R>& batch,
                                                                            const preference_gradients<G>& grads) {
        detail::require<error>(forward_done_ && !hidden_input_, "backward: forward() must run first on the same batch");
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        detail::check_gradient(batch.chosen.policy, grads.chosen.policy, "chosen", "gradient of policy logits");
        detail::check_gradient(batch.rejected.policy, grads.rejected.policy, "rejected", "gradient of policy logits");
        if (noisy) {
            detail::check_gradient(batch.chosen.policy_noisy, grads.chosen.policy_noisy, "chosen",
                                   "gradient of policy noisy logits");
            detail::check_gradient(batch.rejected.policy_noisy, grads.rejected.policy_noisy, "rejected",
                                   "gradient of policy noisy logits");
        }
        side_coefficients chosen = coefficients(chosen_), rejected = coefficients(rejected_);
        run_coefficient_pass<T, G>(chosen, rejected);
        return {std::move(chosen), std::move(rejected)};
    }

    template <class T, class I, class R, class G>
    void write_gradients(const preference_batch<T, I, R>& batch, const preference_gradients<G>& grads,
                         side_coefficients& chosen, side_coefficients& rejected) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        // Under a logit transform the rows are the transformed copies, and ∂L/∂z is chained to the
        // caller's logits: ∂L/∂u = ∂L/∂z · dz/du, dz/du taken at z.
        const auto* copies = static_cast<const transformed_logits<T, I, R>*>(transformed_.get());
        const preference_batch<T, I, R>& rows_of = copies ? copies->batch : batch;
        auto write = [&](logits_view<const T> z, coefficient_buffer& coef, const logits_view<G>& out, index_t scored) {
            if (out.empty()) return;
            backend_.row_gradient(z, backend_.raw(coef), scored, out);
            if (copies)
                backend_.for_each(out.size(), detail::chain_logits_op<T, G>{z.data, out.data, options_.transform()});
        };
        write(rows_of.chosen.policy, chosen.clean, grads.chosen.policy, chosen_.scored);
        write(rows_of.rejected.policy, rejected.clean, grads.rejected.policy, rejected_.scored);
        if (noisy) {
            write(rows_of.chosen.policy_noisy, chosen.noisy, grads.chosen.policy_noisy, chosen_.scored);
            write(rows_of.rejected.policy_noisy, rejected.noisy, grads.rejected.policy_noisy, rejected_.scored);
        }
    }

    template <class T, class I, class R, class G>
    std::pair<side_coefficients, side_coefficients> backward_coefficients(const hidden_preference_batch<T, I, R>& batch,
                                                                            const hidden_gradients<G>& grads) {
        detail::require<error>(forward_done_ && hidden_input_, "backward: forward() must run first on the same batch");
        detail::check_hidden_gradients(options_, batch, grads);
        side_coefficients chosen = coefficients(chosen_), rejected = coefficients(rejected_);
        run_coefficient_pass<T, G>(chosen, rejected);
        return {std::move(chosen), std::move(rejected)};
    }

    template <class T, class I, class R, class G>
    void write_gradients(const hidden_preference_batch<T, I, R>& batch, const hidden_gradients<G>& grads,
                         side_coefficients& chosen, side_coefficients& rejected)
        requires head_backend<B>
    {
        using A = rows::fused_accumulate_t<T>;
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const index_t V = batch.head.vocab, H = batch.head.hidden;
        // The head's gradient accumulates in A: in the caller's buffer when G is A, else in scratch.
        // Neither is zeroed first: the first share written overwrites it (rows::head_gradient).
        constexpr bool in_place = std::is_same_v<G, A>;
        typename B::template buffer<A> weight_scratch, bias_scratch;
        rows::head_gradient<A> head;
        if (grads.head_weight) {
            if constexpr (in_place) {
                head.weight = grads.head_weight;
            } else {
                weight_scratch = rows::fused_detail::overwritten<A>(backend_, V * H);
                head.weight = backend_.raw(weight_scratch);
            }
        }
        if (grads.head_bias) {
            if constexpr (in_place) {
                head.bias = grads.head_bias;
            } else {
                bias_scratch = rows::fused_detail::overwritten<A>(backend_, V);
                head.bias = backend_.raw(bias_scratch);
            }
        }
        A* const grad_weight = head.weight;
        A* const grad_bias = head.bias;
        const rows::fused_settings fs = fused_settings();
        // What the forward kept of the policies' pass, if this batch's T made it.
        auto* kept = kept_ && kept_type_ == type_tag<rows::kept_chunk<B, T>>()
                         ? static_cast<rows::kept_chunk<B, T>*>(kept_.get())
                         : nullptr;
        // Both sides' tensors of one kind in one pass, as the forward took them.
        auto write = [&](const hidden_view<const T>& chosen_states, const hidden_view<const T>& rejected_states,
                         coefficient_buffer& chosen_coefficients, coefficient_buffer& rejected_coefficients,
                         const hidden_view<G>& chosen_out, const hidden_view<G>& rejected_out,
                         rows::kept_chunk<B, T>* from) {
            if (chosen_out.empty() && rejected_out.empty() && !grad_weight && !grad_bias) return;
            const std::vector<rows::fused_gradient_part<B, T, I, G>> parts{
                {chosen_states, batch.chosen.labels, &chosen_coefficients, chosen_out},
                {rejected_states, batch.rejected.labels, &rejected_coefficients, rejected_out}};
            rows::fused_row_gradient(backend_, batch.head, parts, row_align_, fs, head, from);
        };
        write(batch.chosen.policy, batch.rejected.policy, chosen.clean, rejected.clean, grads.chosen.policy,
              grads.rejected.policy, kept);
        kept_.reset();
        if (noisy)
            write(batch.chosen.policy_noisy, batch.rejected.policy_noisy, chosen.noisy, rejected.noisy,
                  grads.chosen.policy_noisy, grads.rejected.policy_noisy, nullptr);
        head.finish(backend_, V, H);
        if constexpr (!in_place) {
            if (grad_weight)
                backend_.for_each(V * H, rows::fused_detail::narrow_op<A, G>{grad_weight, grads.head_weight});
            if (grad_bias) backend_.for_each(V, rows::fused_detail::narrow_op<A, G>{grad_bias, grads.head_bias});
        }
        // These gradients are sums over the vocabulary or the batch, beyond what the coefficient
        // bounds cover: their values are checked once written (O(S·L·H + V·H), not O(S·L·V)).
        auto finite = [&](const G* data, index_t size, const char* what) {
            loss::require_finite_output(backend_, data, size, what, options_);
        };
        finite(grads.chosen.policy.data, grads.chosen.policy.size(), "gradient of the chosen policy hidden states");
        finite(grads.rejected.policy.data, grads.rejected.policy.size(), "gradient of the rejected policy hidden states");
        if (noisy) {
            finite(grads.chosen.policy_noisy.data, grads.chosen.policy_noisy.size(),
                   "gradient of the chosen policy noisy hidden states");
            finite(grads.rejected.policy_noisy.data, grads.rejected.policy_noisy.size(),
                   "gradient of the rejected policy noisy hidden states");
        }
        finite(grads.head_weight, grads.head_weight ? V * H : 0, "gradient of the lm_head weight");
        finite(grads.head_bias, grads.head_bias ? V : 0, "gradient of the lm_head bias");
    }

    struct side_state {
        index_t length = 0;
        index_t scored = 0;
        stats_buffer policy, policy_noisy, reference, reference_noisy;
        const float* weights = nullptr;
        const double* reference_scores = nullptr;  // given A_ref; the reference buffers are then unused
    };

    /// The O(S·L) and O(P) passes over the row statistics of both sides, results left in backend
    /// memory.
    void launch_passes(index_t pairs) {
        launch_sequence_pass(pairs);
        launch_batch_passes(pairs, backend_.raw(summaries_), backend_.raw(pair_results_), backend_.raw(batch_result_));
        forward_done_ = true;
    }

    /// The per-pair stage: the sequence summaries of `pairs` pairs, and the buffers the batch
    /// stage writes.
    void launch_sequence_pass(index_t pairs) {
        forward_done_ = false;
        pairs_ = pairs;
        overflow_ = {};
        summaries_ = backend_.template allocate<loss::sequence_summary>(2 * pairs);
        pair_results_ = backend_.template allocate<loss::pair_result>(pairs);
        batch_result_ = backend_.template allocate<loss::batch_result>(1);
        const loss::token_settings ts = loss::token_settings::from(options_);
        backend::for_each_group(backend_, pairs,
                                loss::sequence_pass{ts, rows(chosen_), rows(rejected_), pairs, backend_.raw(summaries_)});
    }

    /// The batch stage over `pairs` summaries (2·pairs: chosen, then rejected) in backend memory:
    /// rewards, then one pass per loss term. A data-parallel objective runs it on every rank's
    /// summaries at once (dist/data_parallel.hpp).
    void launch_batch_passes(index_t pairs, const loss::sequence_summary* summaries, loss::pair_result* pair_out,
                             loss::batch_result* batch_out) {
        scratch_ = backend_.template allocate<double>(2 * pairs);
        order_scratch_ = backend_.template allocate<index_t>(2 * pairs);
        backend_.for_each(1, loss::reward_pass{options_.hyper.beta, pairs, summaries, pair_out, batch_out});
        for (const loss_term& term : options_.losses)
            backend_.for_each(1, loss::loss_term_pass{options_.hyper, term, options_.use_weighting, pairs, summaries,
                                                      pair_out, batch_out, backend_.raw(scratch_),
                                                      backend_.raw(order_scratch_)});
    }

    /// read_results() for forward(): a batch whose results are an error gets no backward.
    objective_result read_forward() {
        try {
            return read_results();
        } catch (...) {
            forward_done_ = false;
            throw;
        }
    }

    side_coefficients coefficients(const side_state& s) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        return {backend_.template allocate<row_coefficients>(pairs_ * s.scored),
                backend_.template allocate<row_coefficients>(noisy ? pairs_ * s.scored : 0)};
    }

    /// The row coefficients for logits of type T and gradients of type G; throws overflow_error,
    /// before any gradient is written, when a row's gradient would not be finite in them.
    template <class T, class G>
    void run_coefficient_pass(side_coefficients& chosen, side_coefficients& rejected) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        overflow_ = backend_.template allocate<loss::gradient_overflow>(2 * pairs_);
        backend::for_each_group(backend_, pairs_, loss::coefficient_pass{
                                      loss::token_settings::from(options_), rows(chosen_), rows(rejected_),
                                      {backend_.raw(chosen.clean), noisy ? backend_.raw(chosen.noisy) : nullptr},
                                      {backend_.raw(rejected.clean), noisy ? backend_.raw(rejected.noisy) : nullptr},
                                      backend_.raw(summaries_), backend_.raw(pair_results_),
                                      backend_.raw(batch_result_), pairs_, loss::gradient_limits_for<T, G>(),
                                      backend_.raw(overflow_)});
        if (!deferred_) loss::report_gradient_overflow<T, G>(backend_.to_host(overflow_), pairs_, options_);
    }

    rows::fused_settings fused_settings() const {
        return {options_.transform(), options_.chunk_tokens.value_or(0)};
    }

    /// The row statistics of both sides' hidden states: one pass per kind of tensor (policy noisy,
    /// reference, reference noisy, policy) over both sides. The policies' pass runs last; with
    /// `keep`, it leaves its last chunk there.
    template <class T, class I, class R>
    void prepare_hidden(const hidden_preference_batch<T, I, R>& batch, rows::kept_chunk<B, T>* keep) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const row_alignment align = row_align_;
        const rows::fused_settings fs = fused_settings();
        for (auto [state, s] : {std::pair{&chosen_, &batch.chosen}, std::pair{&rejected_, &batch.rejected}}) {
            state->length = s->policy.length;
            state->scored = align.scored_rows(s->policy.length);
            state->reference_scores = s->reference_scores.data;
            state->weights = options_.weighting == token_weighting::caller ? s->weights.data : nullptr;
        }
        auto pass = [&](const auto& head, const auto& chosen_states, const auto& rejected_states,
                        row_reduction reduction, const char* role, auto* kept) {
            using E = std::remove_cv_t<std::remove_pointer_t<decltype(head.weight)>>;
            std::pair<stats_buffer, stats_buffer> out{
                backend_.template allocate<row_stats>(batch.chosen.policy.sequences * chosen_.scored),
                backend_.template allocate<row_stats>(batch.rejected.policy.sequences * rejected_.scored)};
            const std::string chosen_what = detail::concat("chosen ", role),
                              rejected_what = detail::concat("rejected ", role);
            const std::vector<rows::fused_part<E, I>> parts{
                {chosen_states, batch.chosen.labels, chosen_what.c_str(), backend_.raw(out.first)},
                {rejected_states, batch.rejected.labels, rejected_what.c_str(), backend_.raw(out.second)}};
            rows::fused_row_statistics(backend_, head, parts, align, reduction, fs, options_.check_inputs, kept);
            return out;
        };
        // A buffer a pass does not fill is left empty (move-assigned: device buffers do not copy).
        for (side_state* state : {&chosen_, &rejected_}) {
            state->policy_noisy = stats_buffer{};
            state->reference = stats_buffer{};
            state->reference_noisy = stats_buffer{};
        }
        constexpr rows::kept_chunk<B, T>* none = nullptr;
        constexpr rows::kept_chunk<B, R>* none_reference = nullptr;
        if (noisy)
            std::tie(chosen_.policy_noisy, rejected_.policy_noisy) =
                pass(batch.head, batch.chosen.policy_noisy, batch.rejected.policy_noisy, noisy_reduction(),
                     "policy noisy hidden states", none);
        // The reference as hidden states, or as given sequence scores (both sides alike: checked).
        if (batch.chosen.reference_scores.empty()) {
            std::tie(chosen_.reference, rejected_.reference) =
                pass(batch.reference_head, batch.chosen.reference, batch.rejected.reference,
                     row_reduction::logsumexp, "reference hidden states", none_reference);
            if (noisy)
                std::tie(chosen_.reference_noisy, rejected_.reference_noisy) =
                    pass(batch.reference_head, batch.chosen.reference_noisy, batch.rejected.reference_noisy,
                         noisy_reduction(), "reference noisy hidden states", none_reference);
        }
        const row_reduction policy_reduction =
            options_.use_weighting ? row_reduction::logsumexp_and_doubled : row_reduction::logsumexp;
        std::tie(chosen_.policy, rejected_.policy) = pass(batch.head, batch.chosen.policy, batch.rejected.policy,
                                                          policy_reduction, "policy hidden states", keep);
    }

    template <class T, class I, class R>
    void prepare(side_state& state, const side_batch<T, I, R>& s) {
        const bool noisy = options_.weighting == token_weighting::self_calibrated;
        const row_alignment align = row_align_;
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
        const row_alignment align = row_align_;
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

    /// A batch's logits tensors through the transform, and the batch that reads them.
    template <class T, class I, class R>
    struct transformed_logits {
        std::vector<typename B::template buffer<T>> policy;
        std::vector<typename B::template buffer<R>> reference;
        preference_batch<T, I, R> batch;

        transformed_logits(B& backend, const preference_batch<T, I, R>& b, const logit_transform& t) : batch(b) {
            policy.reserve(4);
            reference.reserve(4);
            auto copy = [&](auto& store, auto view) {
                using E = std::remove_const_t<std::remove_pointer_t<decltype(view.data)>>;
                if (view.empty()) return view;
                store.push_back(backend.template allocate<E>(view.size()));
                E* out = backend.raw(store.back());
                backend.for_each(view.size(), detail::transform_op<E>{view.data, out, t});
                return decltype(view){out, view.sequences, view.length, view.vocab};
            };
            for (auto* side : {&batch.chosen, &batch.rejected}) {
                side->policy = copy(policy, side->policy);
                side->policy_noisy = copy(policy, side->policy_noisy);
                side->reference = copy(reference, side->reference);
                side->reference_noisy = copy(reference, side->reference_noisy);
            }
        }
    };

    B& backend_;
    objective_options options_;
    // How the row passes read labels: the options' alignment, unless a sharded objective gives its
    // rows shard-local labels (dist/sharded.hpp).
    row_alignment row_align_;
    std::shared_ptr<void> transformed_;
    // The kept chunk of a hidden-state forward (rows::kept_chunk<B, T>, T named by kept_type_),
    // held until the backward takes it over or the next forward.
    std::shared_ptr<void> kept_;
    const void* kept_type_ = nullptr;

    /// An address that names type K (without RTTI, which a consumer may have turned off).
    template <class K>
    static const void* type_tag() {
        static const char tag = 0;
        return &tag;
    }
    index_t pairs_ = 0;
    index_t vocab_ = 0;
    bool forward_done_ = false;
    bool hidden_input_ = false;
    bool deferred_ = false;  // launch_forward(): the checks that read results back are the caller's
    side_state chosen_, rejected_;
    typename B::template buffer<loss::sequence_summary> summaries_;
    typename B::template buffer<loss::pair_result> pair_results_;
    typename B::template buffer<loss::batch_result> batch_result_;
    typename B::template buffer<double> scratch_;
    typename B::template buffer<index_t> order_scratch_;
    typename B::template buffer<loss::gradient_overflow> overflow_;
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

/// One call with hidden states in: forward, and backward into `grads` when given.
template <tensor_backend B, class T, class I, class R, class G = float>
    requires head_backend<B>
objective_result evaluate(B& backend, const objective_options& options, const hidden_preference_batch<T, I, R>& batch,
                          const hidden_gradients<G>* grads = nullptr) {
    objective<B> obj(backend, options);
    objective_result r = obj.forward(batch);
    if (grads) obj.backward(batch, *grads);
    return r;
}

TPO_END_NAMESPACE
