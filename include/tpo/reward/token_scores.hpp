#pragma once
// Per-token values of one side of a preference pair, for inspecting which tokens TPO rewards: the
// log-probability ℓ, the visual score s and the self-calibrated weight c of every scored row
// (docs/formulas.md#token-rewards), from the same row statistics and reward functions the objective
// uses.

#include <cstdint>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"
#include "tpo/reward/options.hpp"
#include "tpo/reward/token.hpp"

TPO_BEGIN_NAMESPACE

/// One side's per-token values, `(sequences, rows)` row-major (rows = scored rows per sequence),
/// zero where the aligned label is the ignore index (mask 0).
struct token_score_table {
    index_t sequences = 0;
    index_t rows = 0;
    std::vector<double> logps, scores, weights;
    std::vector<std::uint8_t> mask;
};

/// `clean` and `noisy`: one model's logits `(S, L, V)` on the clean and on the corrupted image;
/// `labels` `(S, L)`. Bad labels and non-finite logits in a scored row are reported as value_error.
template <tensor_backend B, class T, class I>
token_score_table token_scores(B& backend, logits_view<const T> clean, logits_view<const T> noisy,
                               labels_view<const I> labels, response_side side, score_kind score, double a,
                               row_alignment alignment = {}) {
    detail::require<shape_error>(clean.data != nullptr && noisy.data != nullptr && labels.data != nullptr,
                                 "token scores: null data pointer");
    detail::require<shape_error>(clean.sequences >= 1 && clean.length >= 1 && clean.vocab >= 1,
                                 "token scores: clean logits shape ", shape_string(clean),
                                 ", expected (S, L, V) with every dimension at least 1");
    detail::require<shape_error>(noisy.sequences == clean.sequences && noisy.length == clean.length &&
                                     noisy.vocab == clean.vocab,
                                 "token scores: noisy logits shape ", shape_string(noisy), " differs from clean shape ",
                                 shape_string(clean));
    detail::require<shape_error>(labels.sequences == clean.sequences && labels.length == clean.length,
                                 "token scores: labels shape ", shape_string(labels), ", expected (", clean.sequences,
                                 ", ", clean.length, ") to match the logits ", shape_string(clean));
    detail::require(math::is_finite(a) && a >= 0, "token scores: a = ", a, ", expected a finite margin >= 0");

    token_score_table t;
    t.sequences = clean.sequences;
    t.rows = alignment.scored_rows(clean.length);
    const index_t rows = t.sequences * t.rows;
    const auto n = static_cast<std::size_t>(rows);
    t.logps.assign(n, 0.0);
    t.scores.assign(n, 0.0);
    t.weights.assign(n, 0.0);
    t.mask.assign(n, 0);
    if (rows == 0) return t;

    auto clean_buffer = backend.template allocate<row_stats>(rows);
    auto noisy_buffer = backend.template allocate<row_stats>(rows);
    backend.row_statistics(clean, labels, alignment, row_reduction::logsumexp, backend.raw(clean_buffer));
    backend.row_statistics(noisy, labels, alignment, row_reduction::logsumexp, backend.raw(noisy_buffer));
    const std::vector<row_stats> clean_stats = backend.to_host(clean_buffer);
    const std::vector<row_stats> noisy_stats = backend.to_host(noisy_buffer);
    for (std::size_t r = 0; r < n; ++r) {
        const auto sequence = static_cast<index_t>(r) / t.rows, row = static_cast<index_t>(r) % t.rows;
        for (const row_stats* s : {&clean_stats[r], &noisy_stats[r]}) {
            const char* which = s == &clean_stats[r] ? "clean" : "noisy";
            detail::require(s->status != row_status::label_out_of_range, "token scores: label ", s->label,
                            " at sequence ", sequence, ", position ", alignment.label_position(row),
                            " is outside [0, ", clean.vocab, ") and is not the ignore index ", alignment.ignore_index);
            detail::require(s->status != row_status::non_finite, "token scores: ", which, " logits at sequence ",
                            sequence, ", position ", alignment.label_position(row),
                            ": the row holds a NaN or an infinite logit");
        }
        if (clean_stats[r].status != row_status::ok) continue;  // masked
        const double s = reward::visual_score(score, clean_stats[r], noisy_stats[r]);
        t.logps[r] = clean_stats[r].log_prob();
        t.scores[r] = s;
        t.weights[r] = reward::calibrate(side, s, a).value;
        t.mask[r] = 1;
    }
    return t;
}

TPO_END_NAMESPACE
