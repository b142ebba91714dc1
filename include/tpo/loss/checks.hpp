#pragma once
// The objective's checks: shapes and pointers before anything is read, and the input problems the
// passes found (bad labels, non-finite rows, bad weights or reference scores) turned into errors
// that name the tensor, the sequence, the position and the value.

#include <string>
#include <vector>

#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/loss/batch.hpp"
#include "tpo/loss/options.hpp"
#include "tpo/loss/passes.hpp"

TPO_BEGIN_NAMESPACE
namespace detail {

template <class T>
void check_logits(const logits_view<const T>& z, const char* side, const char* role) {
    require<shape_error>(z.data != nullptr || z.size() == 0, side, " ", role, ": null data for shape ",
                         shape_string(z));
    require<shape_error>(z.sequences >= 1, side, " ", role, ": shape ", shape_string(z),
                         " has no sequence (empty batch)");
    require<shape_error>(z.length >= 1 && z.vocab >= 1, side, " ", role, ": shape ", shape_string(z),
                         ", expected L >= 1 and V >= 1");
}

template <class A, class B>
void check_same_shape(const logits_view<const A>& a, const logits_view<const B>& b, const char* side,
                      const char* role_a, const char* role_b) {
    require<shape_error>(a.sequences == b.sequences && a.length == b.length && a.vocab == b.vocab, side, " ", role_b,
                         ": shape ", shape_string(b), " differs from ", role_a, " shape ", shape_string(a));
}

/// The tensor a role names; with hidden states in, the logits the head computed from them.
inline const char* role_name(loss::tensor_role r, bool hidden = false) {
    switch (r) {
    case loss::tensor_role::policy: return hidden ? "policy logits (from the hidden states)" : "policy logits";
    case loss::tensor_role::policy_noisy:
        return hidden ? "policy noisy logits (from the hidden states)" : "policy noisy logits";
    case loss::tensor_role::reference: return hidden ? "reference logits (from the hidden states)" : "reference logits";
    case loss::tensor_role::reference_noisy:
        return hidden ? "reference noisy logits (from the hidden states)" : "reference noisy logits";
    case loss::tensor_role::weights: return "token weights";
    }
    return "?";
}

template <class T>
void check_hidden(const hidden_view<const T>& h, const char* side, const char* role, index_t hidden,
                  const char* head = "lm_head") {
    require<shape_error>(h.data != nullptr, side, " ", role, ": missing (null data pointer)");
    require<shape_error>(h.sequences >= 1, side, " ", role, ": shape ", shape_string(h),
                         " has no sequence (empty batch)");
    require<shape_error>(h.length >= 1, side, " ", role, ": shape ", shape_string(h), ", expected L >= 1");
    require<shape_error>(h.hidden == hidden, side, " ", role, ": shape ", shape_string(h), ", hidden size ", h.hidden,
                         " differs from the ", head, "'s H = ", hidden);
}

template <class T>
void check_head_shape(const head_view<const T>& w, const char* what) {
    require<shape_error>(w.weight != nullptr, what, ": missing weight (null data pointer)");
    require<shape_error>(w.vocab >= 1 && w.hidden >= 1, what, ": weight shape ", shape_string(w),
                         ", expected V >= 1 and H >= 1");
}

/// Every shape and pointer of a batch against the options, before anything is read.
template <class T, class I, class R>
void check_batch(const objective_options& options, const preference_batch<T, I, R>& batch) {
    const bool noisy = options.weighting == token_weighting::self_calibrated;
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
        if (options.weighting == token_weighting::caller) {
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
void check_gradient(const logits_view<const T>& z, const logits_view<G>& g, const char* side, const char* role) {
    if (g.empty()) return;
    detail::require<shape_error>(g.sequences == z.sequences && g.length == z.length && g.vocab == z.vocab, side,
                                 " ", role, ": shape ", shape_string(g), ", expected ", shape_string(z));
}

/// Every shape and pointer of a hidden-state batch against the options, before anything is read.
template <class T, class I, class R>
void check_hidden_batch(const objective_options& options, const hidden_preference_batch<T, I, R>& batch) {
    const bool noisy = options.weighting == token_weighting::self_calibrated;
    check_head_shape(batch.head, "lm_head");
    const index_t H = batch.head.hidden;
    const bool given_scores = !batch.chosen.reference_scores.empty() || !batch.rejected.reference_scores.empty();
    if (!given_scores) {
        check_head_shape(batch.reference_head, "reference lm_head");
        require<shape_error>(batch.reference_head.vocab == batch.head.vocab, "reference lm_head: weight shape ",
                             shape_string(batch.reference_head), ", vocabulary differs from the lm_head's V = ",
                             batch.head.vocab);
    }
    auto check_side = [&](const hidden_side_batch<T, I, R>& s, const char* side) {
        check_hidden(s.policy, side, "policy hidden states", H);
        auto same_rows = [&](index_t sequences, index_t length, const char* role) {
            require<shape_error>(sequences == s.policy.sequences && length == s.policy.length, side, " ", role,
                                 ": (", sequences, ", ", length, ") sequences and positions, expected (",
                                 s.policy.sequences, ", ", s.policy.length, ") as the policy hidden states ",
                                 shape_string(s.policy));
        };
        if (!s.reference_scores.empty()) {
            require<shape_error>(s.reference.empty() && s.reference_noisy.empty(), side,
                                 " reference: both hidden states and precomputed scores given; give one");
            require<shape_error>(s.reference_scores.sequences == s.policy.sequences, side, " reference scores: ",
                                 s.reference_scores.sequences, " values, expected one per sequence (",
                                 s.policy.sequences, ")");
        } else {
            require<shape_error>(!given_scores, side,
                                 " reference: hidden states on one side and precomputed scores on the other");
            check_hidden(s.reference, side, "reference hidden states", batch.reference_head.hidden,
                         "reference lm_head");
            same_rows(s.reference.sequences, s.reference.length, "reference hidden states");
        }
        if (noisy) {
            check_hidden(s.policy_noisy, side, "policy noisy hidden states", H);
            same_rows(s.policy_noisy.sequences, s.policy_noisy.length, "policy noisy hidden states");
            if (s.reference_scores.empty()) {
                check_hidden(s.reference_noisy, side, "reference noisy hidden states", batch.reference_head.hidden,
                             "reference lm_head");
                same_rows(s.reference_noisy.sequences, s.reference_noisy.length, "reference noisy hidden states");
            }
        }
        require<shape_error>(s.labels.data != nullptr, side, " labels: null data pointer");
        same_rows(s.labels.sequences, s.labels.length, "labels");
        if (options.weighting == token_weighting::caller) {
            require<shape_error>(s.weights.data != nullptr, side,
                                 " token weights: missing, required with caller-supplied weights");
            same_rows(s.weights.sequences, s.weights.length, "token weights");
        }
    };
    check_side(batch.chosen, "chosen");
    check_side(batch.rejected, "rejected");
    require<shape_error>(batch.chosen.policy.sequences == batch.rejected.policy.sequences,
                         "rejected policy hidden states: ", batch.rejected.policy.sequences,
                         " sequences, expected one per chosen sequence (", batch.chosen.policy.sequences, ")");
}

template <class T, class I, class R, class G>
void check_hidden_gradients(const objective_options& options, const hidden_preference_batch<T, I, R>& batch,
                            const hidden_gradients<G>& grads) {
    const bool noisy = options.weighting == token_weighting::self_calibrated;
    auto check = [&](const hidden_view<const T>& h, const hidden_view<G>& g, const char* side, const char* role) {
        if (g.empty()) return;
        require<shape_error>(g.sequences == h.sequences && g.length == h.length && g.hidden == h.hidden, side, " ",
                             role, ": shape ", shape_string(g), ", expected ", shape_string(h));
    };
    check(batch.chosen.policy, grads.chosen.policy, "chosen", "gradient of policy hidden states");
    check(batch.rejected.policy, grads.rejected.policy, "rejected", "gradient of policy hidden states");
    if (noisy) {
        check(batch.chosen.policy_noisy, grads.chosen.policy_noisy, "chosen", "gradient of policy noisy hidden states");
        check(batch.rejected.policy_noisy, grads.rejected.policy_noisy, "rejected",
              "gradient of policy noisy hidden states");
    }
    require<shape_error>(!grads.head_bias || batch.head.bias, "gradient of the lm_head bias: asked for, but the "
                                                             "lm_head has no bias");
}

/// The first input problem the sequence pass found, as the error that names it: summaries[k] is
/// chosen sequence k for k < pairs, rejected sequence k − pairs after.
inline void report_input_problems(const objective_options& options,
                                  const std::vector<loss::sequence_summary>& summaries, index_t pairs,
                                  index_t vocab, bool hidden = false) {
    for (std::size_t k = 0; k < summaries.size(); ++k) {
        const loss::sequence_summary& s = summaries[k];
        if (s.problem == loss::input_problem::none) continue;
        const bool chosen = static_cast<index_t>(k) < pairs;
        const index_t sequence = chosen ? static_cast<index_t>(k) : static_cast<index_t>(k) - pairs;
        const char* side = chosen ? "chosen" : "rejected";
        const std::string where = detail::concat(side, " ", detail::role_name(s.problem_tensor, hidden), " at sequence ",
                                                 sequence, ", position ", s.problem_position);
        switch (s.problem) {
        case loss::input_problem::label_out_of_range:
            throw value_error(detail::concat(side, " labels: label ", static_cast<std::int64_t>(s.problem_value),
                                             " at sequence ", sequence, ", position ", s.problem_position,
                                             " is outside [0, ", vocab, ") and is not the ignore index ",
                                             options.alignment.ignore_index));
        case loss::input_problem::non_finite_logits:
            throw value_error(detail::concat(where, ": the row holds a NaN or an infinite logit"));
        case loss::input_problem::non_finite_reference_score:
            throw value_error(detail::concat(side, " reference scores: ", s.problem_value, " at sequence ",
                                             sequence, " is not finite"));
        case loss::input_problem::bad_weight:
            throw value_error(detail::concat(where, ": weight ", s.problem_value, ", expected a finite value",
                                             options.form == sequence_form::additive ? " > 0" : ""));
        case loss::input_problem::none: break;
        }
    }
}

}  // namespace detail

TPO_END_NAMESPACE
