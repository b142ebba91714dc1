#pragma once
// The O(S·L) and O(P) stages of the objective, as host/device functors that any backend runs
// with its for_each: they read the row statistics of the O(S·L·V) row pass and never touch
// logits. One functor instance serves every backend, so the math exists exactly once.
//
//   sequence_pass    one pair per group of lanes: token terms → sequence scores, counts, metrics
//   reward_pass      one index: rewards, accuracy and margin; clears the loss accumulators
//   loss_term_pass   one index, once per loss term: that term over the batch (aot sorts the
//                    batch) → loss and ∂L/∂A per sequence
//   rank_share_pass  one index per pair: a data-parallel rank's share of a batch that every rank's
//                    pairs make up (its pairs' ∂L/∂A times R)
//   coefficient_pass one pair per group of lanes: ∂L/∂A → (alpha, beta) of every scored row
//                    (docs/math.md)
//
// The two O(S·L) passes run through backend::for_each_group (backend/lanes.hpp): one lane per
// pair on the host, where they are plain loops over the rows, a block of lanes per pair on a GPU.

#include <cmath>
#include <cstdint>

#include "tpo/backend/lanes.hpp"
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

/// The first input problem of a sequence: the lowest row wins (the reference score, which has
/// no row, comes before every row); within a row the first tensor, then the caller weight.
struct problem_record {
    index_t row = 0;
    input_problem problem = input_problem::none;
    tensor_role tensor = tensor_role::policy;
    double value = 0;  // the label or weight found there, or the reference score
};

/// A sequence's valid rows and its first input problem.
struct row_scan {
    index_t valid = 0;
    problem_record first{};
};

struct combine_scans {
    TPO_HOST_DEVICE row_scan operator()(const row_scan& a, const row_scan& b) const {
        row_scan c{a.valid + b.valid, a.first};
        const bool take_b = b.first.problem != input_problem::none &&
                            (a.first.problem == input_problem::none || b.first.row < a.first.row);
        if (take_b) c.first = b.first;
        return c;
    }
};

/// Counts the valid rows of one sequence and finds its first input problem, each lane over its
/// rows, then across the lanes.
template <class Lanes>
TPO_HOST_DEVICE row_scan scan_rows(const token_settings& ts, const side_rows& side, index_t s, const Lanes& lanes) {
    row_scan mine{};
    problem_record& first = mine.first;
    const bool noisy = ts.weighting == token_weighting::self_calibrated;
    const bool reference_rows = side.reference_scores == nullptr;
    if (!reference_rows && !math::is_finite(side.reference_scores[s]))
        first = {-1, input_problem::non_finite_reference_score, tensor_role::reference, side.reference_scores[s]};
    for (index_t t = lanes.lane(); t < side.scored; t += lanes.size()) {
        const index_t r = s * side.scored + t;
        const row_stats* rows[4] = {side.policy + r, noisy ? side.policy_noisy + r : nullptr,
                                    reference_rows ? side.reference + r : nullptr,
                                    reference_rows && noisy ? side.reference_noisy + r : nullptr};
        for (int k = 0; k < 4; ++k) {
            if (!rows[k]) continue;
            const row_status st = rows[k]->status;
            if (st == row_status::ok || st == row_status::masked) continue;
            if (first.problem == input_problem::none)
                first = {t,
                         st == row_status::label_out_of_range ? input_problem::label_out_of_range
                                                              : input_problem::non_finite_logits,
                         static_cast<tensor_role>(k), static_cast<double>(rows[k]->label)};
        }
        if (side.policy[r].status == row_status::masked) continue;
        if (ts.weighting == token_weighting::caller && first.problem == input_problem::none) {
            const float w = side.weights[s * side.length + ts.alignment.label_position(t)];
            const bool bad = !math::is_finite(w) || (ts.form == sequence_form::additive ? !(w > 0.0f) : false);
            if (bad) first = {t, input_problem::bad_weight, tensor_role::weights, static_cast<double>(w)};
        }
        ++mine.valid;
    }
    return lanes.reduce(mine, combine_scans{});
}

/// What summarise adds up over a sequence's rows.
struct sequence_sums {
    double policy_score = 0, reference_score = 0, visual_score_sum = 0, sft_logp_sum = 0, wpo_log_weight = 0;
};

struct add_sums {
    TPO_HOST_DEVICE sequence_sums operator()(const sequence_sums& a, const sequence_sums& b) const {
        return {a.policy_score + b.policy_score, a.reference_score + b.reference_score,
                a.visual_score_sum + b.visual_score_sum, a.sft_logp_sum + b.sft_logp_sum,
                a.wpo_log_weight + b.wpo_log_weight};
    }
};

/// One pair per group of lanes; the lanes split each sequence's rows, in rounds of consecutive rows
/// so that a row's rank among the valid ones (LD-DPO) is a count within the round.
struct sequence_pass {
    token_settings ts;
    side_rows chosen, rejected;
    index_t pairs;
    sequence_summary* out;  // [0, P): chosen; [P, 2P): rejected

    template <class Lanes>
    TPO_HOST_DEVICE void operator()(const Lanes& lanes) const {
        const index_t i = lanes.group();
        const row_scan scan_w = scan_rows(ts, chosen, i, lanes);
        const row_scan scan_l = scan_rows(ts, rejected, i, lanes);
        sequence_summary w{}, l{};
        if (scan_w.first.problem != input_problem::none || scan_l.first.problem != input_problem::none) {
            note_problem(scan_w.first, w);
            note_problem(scan_l.first, l);
        } else {
            // LD-DPO: the first min(n_w, n_l) valid tokens count fully (docs/formulas.md#ld-dpo).
            const index_t shared = scan_w.valid < scan_l.valid ? scan_w.valid : scan_l.valid;
            w = summarise(chosen, response_side::chosen, i, scan_w.valid, shared, lanes);
            l = summarise(rejected, response_side::rejected, i, scan_l.valid, shared, lanes);
        }
        if (lanes.lane() == 0) {
            out[i] = w;
            out[pairs + i] = l;
        }
    }

    TPO_HOST_DEVICE void note_problem(const problem_record& p, sequence_summary& out) const {
        if (p.problem == input_problem::none) return;
        out.problem = p.problem;
        out.problem_tensor = p.tensor;
        out.problem_position = p.row < 0 ? 0 : ts.alignment.label_position(p.row);
        out.problem_value = p.value;
    }

    template <class Lanes>
    TPO_HOST_DEVICE sequence_summary summarise(const side_rows& side, response_side which, index_t s, index_t valid,
                                               index_t shared, const Lanes& lanes) const {
        const bool noisy = ts.weighting == token_weighting::self_calibrated;
        sequence_sums sums{};
        index_t before = 0;  // valid rows of the earlier rounds
        for (index_t first = 0; first < side.scored; first += lanes.size()) {
            const index_t t = first + lanes.lane();
            const index_t r = s * side.scored + t;
            const bool counted = t < side.scored && side.policy[r].status != row_status::masked;
            index_t in_round = 0;
            const index_t rank = before + lanes.exclusive_count(counted, in_round);
            before += in_round;
            if (!counted) continue;
            const double lambda = (ts.use_ld && rank >= shared) ? ts.ld_alpha : 1.0;
            const float* weight =
                side.weights ? side.weights + s * side.length + ts.alignment.label_position(t) : nullptr;
            const scored_token pol =
                score_token(ts, which, side.policy[r], noisy ? side.policy_noisy + r : nullptr, weight);
            sums.policy_score += lambda * pol.term.value;
            if (!side.reference_scores) {
                const scored_token ref =
                    score_token(ts, which, side.reference[r], noisy ? side.reference_noisy + r : nullptr, weight);
                sums.reference_score += lambda * ref.term.value;
            }
            sums.visual_score_sum += pol.score;
            sums.sft_logp_sum += pol.logp;
            const row_stats& z = side.policy[r];
            sums.wpo_log_weight += pol.logp - (z.lse_doubled - 2.0 * z.lse);
        }
        sums = lanes.reduce(sums, add_sums{});
        sequence_summary out{};
        out.policy_score = sums.policy_score;
        out.reference_score = sums.reference_score;
        out.visual_score_sum = sums.visual_score_sum;
        out.sft_logp_sum = sums.sft_logp_sum;
        out.wpo_log_weight = sums.wpo_log_weight;
        out.tokens = static_cast<double>(valid);
        if (valid > 0) {
            out.wpo_log_weight /= static_cast<double>(valid);
            if (ts.average) {
                out.policy_score /= static_cast<double>(valid);
                out.reference_score /= static_cast<double>(valid);
            }
        }
        if (side.reference_scores) out.reference_score = side.reference_scores[s];  // final A_ref, as given
        return out;
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

/// One rank's share of a batch that data-parallel ranks evaluate together (dist/data_parallel.hpp,
/// `docs/distributed.md#data-parallelism`): the batch stage ran on every rank's pairs at once, and
/// rank r keeps its pairs [first, first + pairs) of that batch with ∂L/∂A and the sft coefficient
/// times `scale` = R. A data-parallel trainer averages its R ranks' gradients, and each rank's
/// gradient reaches only its own pairs' logits, so R·∂L/∂(its logits) averages to the gradient of
/// the whole batch's loss L. One index per pair of this rank.
struct rank_share_pass {
    double scale;
    index_t first;
    const pair_result* batch_pairs;  // every rank's pairs, in rank order
    const batch_result* batch;
    pair_result* pair_out;  // this rank's
    batch_result* batch_out;

    TPO_HOST_DEVICE void operator()(index_t i) const {
        pair_result p = batch_pairs[first + i];
        p.grad_chosen *= scale;
        p.grad_rejected *= scale;
        pair_out[i] = p;
        if (i == 0) {
            batch_result b = *batch;
            b.sft_logp_coefficient *= scale;
            *batch_out = b;
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

/// The lower of two rows' overflows: the lowest label position, the clean row before the noisy.
struct first_overflow {
    TPO_HOST_DEVICE gradient_overflow operator()(const gradient_overflow& a, const gradient_overflow& b) const {
        if (!b.found) return a;
        if (!a.found) return b;
        const bool b_first = b.position < a.position || (b.position == a.position && b.noisy < a.noisy);
        return b_first ? b : a;
    }
};

/// One pair per group of lanes, in rounds of consecutive rows like sequence_pass.
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

    template <class Lanes>
    TPO_HOST_DEVICE void operator()(const Lanes& lanes) const {
        const index_t i = lanes.group();
        const sequence_summary& w = summaries[i];
        const sequence_summary& l = summaries[pairs + i];
        const index_t shared = w.tokens < l.tokens ? static_cast<index_t>(w.tokens) : static_cast<index_t>(l.tokens);
        const gradient_overflow problem_w = write(chosen, chosen_out, response_side::chosen, i,
                                                  pair_results[i].grad_chosen, w.tokens, shared,
                                                  batch->sft_logp_coefficient, lanes);
        const gradient_overflow problem_l = write(rejected, rejected_out, response_side::rejected, i,
                                                  pair_results[i].grad_rejected, l.tokens, shared, 0.0, lanes);
        if (lanes.lane() == 0) {
            overflow[i] = problem_w;
            overflow[pairs + i] = problem_l;
        }
    }

    template <class Lanes>
    TPO_HOST_DEVICE gradient_overflow write(const side_rows& side, const side_coefficients& out, response_side which,
                                            index_t s, double grad_score, double tokens, index_t shared, double sft,
                                            const Lanes& lanes) const {
        gradient_overflow problem{};  // this lane's first
        auto check = [&](double alpha, double beta, const row_stats& row, bool noisy_row, index_t t) {
            double bound = 0;
            if (gradient_fits(alpha, beta, row, limits, bound) || problem.found) return;
            problem = {1, noisy_row ? 1 : 0, ts.alignment.label_position(t), alpha, beta, bound};
        };
        const bool noisy = ts.weighting == token_weighting::self_calibrated;
        // ∂A/∂(term) is 1, or 1/n with the average option.
        const double per_token = (ts.average && tokens > 0) ? grad_score / tokens : grad_score;
        index_t before = 0;  // scored rows of the earlier rounds
        for (index_t first = 0; first < side.scored; first += lanes.size()) {
            const index_t t = first + lanes.lane();
            const index_t r = s * side.scored + t;
            const bool inside = t < side.scored;
            const bool counted = inside && side.policy[r].status == row_status::ok;
            index_t in_round = 0;
            const index_t rank = before + lanes.exclusive_count(counted, in_round);
            before += in_round;
            if (!inside) continue;
            const row_stats& clean = side.policy[r];
            row_coefficients& c = out.clean[r];
            c = row_coefficients{};
            if (noisy) out.noisy[r] = row_coefficients{};
            if (!counted) continue;
            const double lambda = (ts.use_ld && rank >= shared) ? ts.ld_alpha : 1.0;
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
        return lanes.reduce(problem, first_overflow{});
    }
};

}  // namespace loss
TPO_END_NAMESPACE
