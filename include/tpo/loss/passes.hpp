#pragma once
// The O(S·L) and O(P) stages of the objective, as host/device functors that any backend runs
// with its for_each: they read the row statistics of the O(S·L·V) row pass and never touch
// logits. One functor instance serves every backend, so the math exists exactly once.
//
//   sequence_pass    one pair per index: token terms → sequence scores, counts, metrics
//   reward_pass      one index: rewards, accuracy and margin; clears the loss accumulators
//   loss_term_pass   one index, once per loss term: that term over the batch (aot sorts the
//                    batch) → loss and ∂L/∂A per sequence
//   coefficient_pass one pair per index: ∂L/∂A → (alpha, beta) of every scored row (docs/math.md)

#include <cmath>
#include <cstdint>

#include "tpo/core/views.hpp"
#include "tpo/loss/family.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/reward/token.hpp"

TPO_BEGIN_NAMESPACE
namespace loss {

/// Which of a side's tensors an input error was found in.
enum class tensor_role : std::int32_t { policy, policy_noisy, reference, reference_noisy, weights };

enum class input_problem : std::int32_t {
    none = 0,
    label_out_of_range,
    non_finite_logits,
    bad_weight,
    non_finite_reference_score
};

struct sequence_summary {
    double tokens = 0;             // valid (scored) tokens n
    double policy_score = 0;       // A_θ
    double reference_score = 0;    // A_ref
    double visual_score_sum = 0;   // Σ m·s (policy)
    double wpo_log_weight = 0;     // mean over valid tokens of ℓ − (LSE(2z) − 2·LSE(z))
    double sft_logp_sum = 0;       // Σ m·ℓ of the clean policy logits
    input_problem problem = input_problem::none;
    tensor_role problem_tensor = tensor_role::policy;
    index_t problem_position = 0;  // label position t
    double problem_value = 0;      // the label or weight found there
};

/// A side's (chosen or rejected) row statistics and weights, as raw pointers in backend memory.
struct side_rows {
    index_t length = 0;       // L (label positions)
    index_t scored = 0;       // rows per sequence that are scored (L−1 with the shift)
    const row_stats* policy = nullptr;
    const row_stats* policy_noisy = nullptr;
    const row_stats* reference = nullptr;  // unused when the reference scores are given
    const row_stats* reference_noisy = nullptr;
    const float* weights = nullptr;  // caller weights (P, L), indexed at the label position
    const double* reference_scores = nullptr;  // precomputed A_ref (P), instead of reference rows
};

/// Options the O(S·L) stages need, flattened for device capture.
struct token_settings {
    token_weighting weighting;
    score_kind score;
    sequence_form form;
    double a;
    bool average;
    bool detach;
    bool use_ld;
    double ld_alpha;
    row_alignment alignment;

    static token_settings from(const objective_options& o) {
        return {o.weighting, o.score, o.form, o.a, o.average, o.detach_weights,
                o.ld_alpha.has_value(), o.ld_alpha.value_or(1.0), o.alignment};
    }
};

/// The token term of one scored row and everything its gradient needs.
struct scored_token {
    double logp;
    double score;
    reward::token_term term;
};

TPO_HOST_DEVICE inline scored_token score_token(const token_settings& ts, response_side side, const row_stats& clean,
                                                const row_stats* noisy, const float* weight) {
    const double logp = clean.log_prob();
    double score = 0;
    reward::calibrated_weight c = reward::constant_weight(1.0);
    if (ts.weighting == token_weighting::self_calibrated) {
        score = reward::visual_score(ts.score, clean, *noisy);
        c = reward::calibrate(side, score, ts.a);
    } else if (ts.weighting == token_weighting::caller) {
        c = reward::constant_weight(static_cast<double>(*weight));
    }
    return {logp, score, reward::sequence_term(ts.form, logp, c)};
}

/// Count the valid rows of one sequence and find the first input problem.
TPO_HOST_DEVICE inline index_t count_valid_rows(const token_settings& ts, const side_rows& side, index_t s,
                                                sequence_summary& out) {
    index_t valid = 0;
    const bool noisy = ts.weighting == token_weighting::self_calibrated;
    const bool reference_rows = side.reference_scores == nullptr;
    if (!reference_rows && !math::is_finite(side.reference_scores[s])) {
        out.problem = input_problem::non_finite_reference_score;
        out.problem_tensor = tensor_role::reference;
        out.problem_value = side.reference_scores[s];
    }
    for (index_t t = 0; t < side.scored; ++t) {
        const index_t r = s * side.scored + t;
        const row_stats* rows[4] = {side.policy + r, noisy ? side.policy_noisy + r : nullptr,
                                    reference_rows ? side.reference + r : nullptr,
                                    reference_rows && noisy ? side.reference_noisy + r : nullptr};
        for (int k = 0; k < 4; ++k) {
            if (!rows[k]) continue;
            const row_status st = rows[k]->status;
            if (st == row_status::ok || st == row_status::masked) continue;
            if (out.problem == input_problem::none) {
                out.problem = st == row_status::label_out_of_range ? input_problem::label_out_of_range
                                                                  : input_problem::non_finite_logits;
                out.problem_tensor = static_cast<tensor_role>(k);
                out.problem_position = ts.alignment.label_position(t);
                out.problem_value = static_cast<double>(rows[k]->label);
            }
        }
        if (side.policy[r].status == row_status::masked) continue;
        if (ts.weighting == token_weighting::caller && out.problem == input_problem::none) {
            const float w = side.weights[s * side.length + ts.alignment.label_position(t)];
            const bool bad = !math::is_finite(w) || (ts.form == sequence_form::additive ? !(w > 0.0f) : false);
            if (bad) {
                out.problem = input_problem::bad_weight;
                out.problem_tensor = tensor_role::weights;
                out.problem_position = ts.alignment.label_position(t);
                out.problem_value = static_cast<double>(w);
            }
        }
        ++valid;
    }
    return valid;
}

struct sequence_pass {
    token_settings ts;
    side_rows chosen, rejected;
    index_t pairs;
    sequence_summary* out;  // [0, P): chosen; [P, 2P): rejected

    TPO_HOST_DEVICE void operator()(index_t i) const {
        sequence_summary& w = out[i];
        sequence_summary& l = out[pairs + i];
        w = sequence_summary{};
        l = sequence_summary{};
        const index_t n_w = count_valid_rows(ts, chosen, i, w);
        const index_t n_l = count_valid_rows(ts, rejected, i, l);
        if (w.problem != input_problem::none || l.problem != input_problem::none) return;
        // LD-DPO: the first min(n_w, n_l) valid tokens count fully (docs/formulas.md#ld-dpo).
        const index_t shared = n_w < n_l ? n_w : n_l;
        summarise(chosen, response_side::chosen, i, n_w, shared, w);
        summarise(rejected, response_side::rejected, i, n_l, shared, l);
    }

    TPO_HOST_DEVICE void summarise(const side_rows& side, response_side which, index_t s, index_t valid,
                                   index_t shared, sequence_summary& out) const {
        const bool noisy = ts.weighting == token_weighting::self_calibrated;
        index_t rank = 0;
        for (index_t t = 0; t < side.scored; ++t) {
            const index_t r = s * side.scored + t;
            if (side.policy[r].status == row_status::masked) continue;
            const double lambda = (ts.use_ld && rank >= shared) ? ts.ld_alpha : 1.0;
            ++rank;
            const float* weight =
                side.weights ? side.weights + s * side.length + ts.alignment.label_position(t) : nullptr;
            const scored_token pol =
                score_token(ts, which, side.policy[r], noisy ? side.policy_noisy + r : nullptr, weight);
            out.policy_score += lambda * pol.term.value;
            if (!side.reference_scores) {
                const scored_token ref =
                    score_token(ts, which, side.reference[r], noisy ? side.reference_noisy + r : nullptr, weight);
                out.reference_score += lambda * ref.term.value;
            }
            out.visual_score_sum += pol.score;
            out.sft_logp_sum += pol.logp;
            const row_stats& z = side.policy[r];
            out.wpo_log_weight += pol.logp - (z.lse_doubled - 2.0 * z.lse);
        }
        out.tokens = static_cast<double>(valid);
        if (valid > 0) {
            out.wpo_log_weight /= static_cast<double>(valid);
            if (ts.average) {
                out.policy_score /= static_cast<double>(valid);
                out.reference_score /= static_cast<double>(valid);
            }
        }
        if (side.reference_scores) out.reference_score = side.reference_scores[s];  // final A_ref, as given
    }
};

struct pair_result {
    double loss = 0;            // Σ_k weight_k · loss_k (sft's batch scalar included)
    double grad_chosen = 0;     // ∂L/∂A_θ(y^w) of the batch loss (mean over pairs)
    double grad_rejected = 0;   // ∂L/∂A_θ(y^l)
    double chosen_reward = 0;   // β Δ_w
    double rejected_reward = 0; // β Δ_l
};

struct batch_result {
    double loss = 0;
    double reward_accuracy = 0;
    double reward_margin = 0;
    double sft_logp_coefficient = 0;  // ∂L/∂ℓ for every valid chosen token (the sft term)
};

/// Stable insertion sort of indices by key: deterministic for ties, and small enough to run in a
/// single device thread (P is a batch of pairs, tens at most).
TPO_HOST_DEVICE inline void sort_indices(const double* key, index_t* order, index_t n) {
    for (index_t i = 0; i < n; ++i) order[i] = i;
    for (index_t i = 1; i < n; ++i) {
        const index_t moving = order[i];
        index_t j = i;
        while (j > 0 && key[order[j - 1]] > key[moving]) {
            order[j] = order[j - 1];
            --j;
        }
        order[j] = moving;
    }
}

/// Per-pair rewards, reward accuracy and margin; clears what the loss terms add to. Runs once
/// per forward, before the loss_term_pass of every term.
struct reward_pass {
    double beta;
    index_t pairs;
    const sequence_summary* summaries;
    pair_result* pair_out;
    batch_result* batch_out;

    TPO_HOST_DEVICE void operator()(index_t) const {
        double accuracy = 0, margin = 0;
        for (index_t i = 0; i < pairs; ++i) {
            const sequence_summary& w = summaries[i];
            const sequence_summary& l = summaries[pairs + i];
            pair_result& p = pair_out[i];
            p = pair_result{};
            p.chosen_reward = beta * (w.policy_score - w.reference_score);
            p.rejected_reward = beta * (l.policy_score - l.reference_score);
            accuracy += p.chosen_reward > p.rejected_reward ? 1.0 : 0.0;
            margin += p.chosen_reward - p.rejected_reward;
        }
        batch_result b{};
        b.reward_accuracy = accuracy / static_cast<double>(pairs);
        b.reward_margin = margin / static_cast<double>(pairs);
        *batch_out = b;
    }
};

/// One term of the combined loss (`docs/formulas.md#combined-losses`): adds weight · loss_k(i) to
/// every pair's loss and its derivatives to ∂L/∂A_θ, then leaves in batch_out the batch loss of
/// the terms added so far. The objective runs one such pass per term, each carrying its term by
/// value, so any number of terms reaches a device without a list in device memory.
struct loss_term_pass {
    loss_hyperparameters hyper;
    loss_term term;
    bool use_weighting;
    index_t pairs;
    const sequence_summary* summaries;
    pair_result* pair_out;
    batch_result* batch_out;
    double* scratch;        // 2P doubles (aot keys)
    index_t* order_scratch; // 2P indices (aot sort orders)

    TPO_HOST_DEVICE void operator()(index_t) const {
        const double inv_pairs = 1.0 / static_cast<double>(pairs);
        if (term.type == loss_type::sft) {
            add_sft(inv_pairs);
        } else if (term.type == loss_type::aot || term.type == loss_type::aot_unpaired) {
            add_aot(inv_pairs);
        } else {
            for (index_t i = 0; i < pairs; ++i) {
                const sequence_summary& w = summaries[i];
                const sequence_summary& l = summaries[pairs + i];
                const pair_loss_value v =
                    pair_loss(term.type, hyper, w.policy_score - w.reference_score, l.policy_score - l.reference_score,
                              w.tokens > 1 ? w.tokens : 1.0, l.tokens > 1 ? l.tokens : 1.0);
                const double scale = term.weight * pair_weight(i);
                pair_out[i].loss += scale * v.value;
                pair_out[i].grad_chosen += scale * v.d_chosen * inv_pairs;
                pair_out[i].grad_rejected += scale * v.d_rejected * inv_pairs;
            }
        }
        double loss = 0;
        for (index_t i = 0; i < pairs; ++i) loss += pair_out[i].loss;
        batch_out->loss = loss * inv_pairs;
    }

    /// WPO's w_w·w_l (`docs/formulas.md#wpo`): not capped, and a constant of the gradient; 1 without WPO.
    TPO_HOST_DEVICE double pair_weight(index_t i) const {
        using std::exp;
        return use_weighting ? exp(summaries[i].wpo_log_weight + summaries[pairs + i].wpo_log_weight) : 1.0;
    }

    // −Σ m ℓ / Σ m over the chosen clean policy logits: a batch scalar S, shown on every pair (times
    // the pair's WPO weight) so that the mean of the per-pair losses is the batch loss. Its
    // derivative in each valid chosen ℓ is the same for every token: −weight · mean_i(w_i) / N.
    TPO_HOST_DEVICE void add_sft(double inv_pairs) const {
        double tokens = 0, logp = 0;
        for (index_t i = 0; i < pairs; ++i) {
            tokens += summaries[i].tokens;
            logp += summaries[i].sft_logp_sum;
        }
        if (tokens == 0) return;  // no valid token: the term is 0, never 0/0
        double weights = 0;
        for (index_t i = 0; i < pairs; ++i) {
            const double w = pair_weight(i);
            pair_out[i].loss += term.weight * w * (-logp / tokens);
            weights += w;
        }
        batch_out->sft_logp_coefficient += -term.weight * weights * inv_pairs / tokens;
    }

    TPO_HOST_DEVICE void add_aot(double inv_pairs) const {
        const loss_type type = term.type;
        const double weight = term.weight;
        double* left = scratch;          // what is sorted on the left of d
        double* right = scratch + pairs; // what is sorted on the right
        index_t* left_order = order_scratch;
        index_t* right_order = order_scratch + pairs;
        for (index_t i = 0; i < pairs; ++i) {
            const sequence_summary& w = summaries[i];
            const sequence_summary& l = summaries[pairs + i];
            if (type == loss_type::aot) {  // policy margins vs reference margins
                left[i] = w.policy_score - l.policy_score;
                right[i] = w.reference_score - l.reference_score;
            } else {  // chosen log-ratios vs rejected log-ratios
                left[i] = w.policy_score - w.reference_score;
                right[i] = l.policy_score - l.reference_score;
            }
        }
        sort_indices(left, left_order, pairs);
        sort_indices(right, right_order, pairs);
        for (index_t j = 0; j < pairs; ++j) {
            const index_t a = left_order[j], b = right_order[j];
            const value_slope v = smoothed_sigmoid(hyper.beta * (left[a] - right[b]), hyper.label_smoothing);
            pair_out[j].loss += weight * v.value;
            const double g = weight * v.slope * hyper.beta * inv_pairs;
            if (type == loss_type::aot) {  // left = A_θ(w) − A_θ(l); right holds no policy term
                pair_out[a].grad_chosen += g;
                pair_out[a].grad_rejected -= g;
            } else {  // left = Δ_w of pair a, right = Δ_l of pair b
                pair_out[a].grad_chosen += g;
                pair_out[b].grad_rejected -= g;
            }
        }
    }
};

/// Row coefficients of the four policy tensors of one side.
struct side_coefficients {
    row_coefficients* clean = nullptr;
    row_coefficients* noisy = nullptr;  // self-calibrated weights only
};

/// How large a row's coefficients may be for its gradient to be written finite. beta is held in
/// the logits' accumulation type (float below double logits) while the row is written, and every
/// entry alpha·δ − beta·p[v] is narrowed to the gradient's element type.
struct gradient_limits {
    double beta = 0;   // largest |beta|
    double entry = 0;  // largest bound on |∂L/∂z[v]| over the row
};

/// The first row of a sequence whose gradient would not be finite.
struct gradient_overflow {
    std::int32_t found = 0;
    std::int32_t noisy = 0;  // in the noisy logits' gradient
    index_t position = 0;    // label position t
    double alpha = 0, beta = 0;
    double bound = 0;        // max over v of |∂L/∂z[v]|, bounded from the coefficients
};

/// Bounds max_v |alpha·δ(v=y) − beta·p[v]| from the row's label probability p_y alone (O(1) per
/// row, no pass over the logits): the label's entry is alpha − beta·p_y, and every other entry is
/// at most |beta|·(1 − p_y), the whole probability the other entries share. Checking it against
/// the limits is what makes a finite coefficient that would still overflow a float or 16-bit
/// gradient an error rather than an Inf in the output.
TPO_HOST_DEVICE inline bool gradient_fits(double alpha, double beta, const row_stats& row, const gradient_limits& limits,
                                          double& bound) {
    using std::exp;
    using std::fabs;
    const double p = beta == 0 ? 0.0 : exp(row.label_logit - row.lse);
    const double rest = 1.0 - p > 0.0 ? 1.0 - p : 0.0;
    const double at_label = fabs(alpha - beta * p), elsewhere = fabs(beta) * rest;
    bound = at_label > elsewhere ? at_label : elsewhere;
    // Written so that a NaN anywhere fails.
    return fabs(beta) <= limits.beta && bound <= limits.entry;
}

struct coefficient_pass {
    token_settings ts;
    side_rows chosen, rejected;
    side_coefficients chosen_out, rejected_out;
    const sequence_summary* summaries;
    const pair_result* pair_results;
    const batch_result* batch;
    index_t pairs;
    gradient_limits limits;
    gradient_overflow* overflow;  // [0, P): chosen; [P, 2P): rejected

    TPO_HOST_DEVICE void operator()(index_t i) const {
        const sequence_summary& w = summaries[i];
        const sequence_summary& l = summaries[pairs + i];
        const index_t shared = w.tokens < l.tokens ? static_cast<index_t>(w.tokens) : static_cast<index_t>(l.tokens);
        write(chosen, chosen_out, response_side::chosen, i, pair_results[i].grad_chosen, w.tokens, shared,
              batch->sft_logp_coefficient, overflow[i]);
        write(rejected, rejected_out, response_side::rejected, i, pair_results[i].grad_rejected, l.tokens, shared,
              0.0, overflow[pairs + i]);
    }

    TPO_HOST_DEVICE void write(const side_rows& side, const side_coefficients& out, response_side which, index_t s,
                               double grad_score, double tokens, index_t shared, double sft,
                               gradient_overflow& problem) const {
        problem = gradient_overflow{};
        auto check = [&](double alpha, double beta, const row_stats& row, bool noisy_row, index_t t) {
            double bound = 0;
            if (gradient_fits(alpha, beta, row, limits, bound) || problem.found) return;
            problem = {1, noisy_row ? 1 : 0, ts.alignment.label_position(t), alpha, beta, bound};
        };
        const bool noisy = ts.weighting == token_weighting::self_calibrated;
        // ∂A/∂(term) is 1, or 1/n with the average option.
        const double per_token = (ts.average && tokens > 0) ? grad_score / tokens : grad_score;
        index_t rank = 0;
        for (index_t t = 0; t < side.scored; ++t) {
            const index_t r = s * side.scored + t;
            const row_stats& clean = side.policy[r];
            row_coefficients& c = out.clean[r];
            c = row_coefficients{};
            if (noisy) out.noisy[r] = row_coefficients{};
            if (clean.status != row_status::ok) continue;
            const double lambda = (ts.use_ld && rank >= shared) ? ts.ld_alpha : 1.0;
            ++rank;
            const float* weight =
                side.weights ? side.weights + s * side.length + ts.alignment.label_position(t) : nullptr;
            const scored_token tok = score_token(ts, which, clean, noisy ? side.policy_noisy + r : nullptr, weight);
            const double g = per_token * lambda;
            const double g_logp = g * tok.term.d_logp + sft;
            const double g_score = ts.detach ? 0.0 : g * tok.term.d_weight;
            const reward::row_pair_coefficients k =
                reward::chain_to_logits(ts.score, g_logp, g_score, clean, noisy ? side.policy_noisy[r] : clean);
            c = {k.clean_alpha, k.clean_beta, clean.lse, clean.label};
            check(k.clean_alpha, k.clean_beta, clean, false, t);
            if (noisy) {
                out.noisy[r] = {k.noisy_alpha, k.noisy_beta, side.policy_noisy[r].lse, clean.label};
                check(k.noisy_alpha, k.noisy_beta, side.policy_noisy[r], true, t);
            }
        }
    }
};

}  // namespace loss
TPO_END_NAMESPACE
