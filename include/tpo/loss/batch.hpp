#pragma once
// What the objective reads and writes: a preference batch of logits views, the gradient views it
// fills, and the result it reports.

#include <vector>

#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"

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

/// One side of a preference batch with hidden states in: `(P, L, H)` last hidden states that the
/// batch's lm_head turns into logits, `(P, L)` labels; as side_batch otherwise (noisy states with
/// self-calibrated weights only, the reference as hidden states or as precomputed scores).
template <class T, class I, class R = T>
struct hidden_side_batch {
    hidden_view<const T> policy{};
    hidden_view<const T> policy_noisy{};
    hidden_view<const R> reference{};
    hidden_view<const R> reference_noisy{};
    labels_view<const I> labels{};
    token_values_view<const float> weights{};
    sequence_values_view<const double> reference_scores{};
};

/// A preference batch with hidden states in: the policy's lm_head `(V, H)` (+ bias), the reference
/// model's own (frozen, possibly different) head when the reference enters as hidden states.
template <class T, class I, class R = T>
struct hidden_preference_batch {
    head_view<const T> head{};
    head_view<const R> reference_head{};
    hidden_side_batch<T, I, R> chosen;
    hidden_side_batch<T, I, R> rejected;
};

/// Where to write ∂L/∂(policy hidden states) of one side; an empty view is not computed.
template <class G>
struct hidden_side_gradients {
    hidden_view<G> policy{};
    hidden_view<G> policy_noisy{};
};

/// The gradients of a hidden-state batch: the hidden states of each side, the head's weight
/// `(V, H)` and bias `(V)` (null: not computed).
template <class G>
struct hidden_gradients {
    hidden_side_gradients<G> chosen;
    hidden_side_gradients<G> rejected;
    G* head_weight = nullptr;
    G* head_bias = nullptr;
};

/// Everything the forward reports: the batch loss and per-pair values
/// (`docs/formulas.md#log-ratios-rewards-and-the-batch-loss`).
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
    /// ∂L/∂A_θ of each sequence (what the chain of `docs/math.md` starts from).
    std::vector<double> grad_policy_chosen_scores, grad_policy_rejected_scores;
};

TPO_END_NAMESPACE
