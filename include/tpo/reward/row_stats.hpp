#pragma once
// What one pass over a logits row leaves behind: everything the forward and the gradient need
// from the V entries of the row, in O(1) space (docs/math.md: the online log-sum-exp, the
// gradient of a row, WPO's LSE(2z)). The rules that produce them live in rows/rules.hpp.

#include <cstdint>

#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE

enum class row_status : std::int32_t {
    ok = 0,
    masked = 1,            // label is the ignore index: the row is never read
    label_out_of_range = 2,
    non_finite = 3,        // a NaN or ±Inf in the row
};

/// What a pass over a logits row must find besides the label's logit. Only rows whose
/// probabilities enter the objective need the log-sum-exp: with the `logit` score the noisy rows
/// contribute z̃[y] alone (`docs/formulas.md#visual-anchored-score`, `docs/math.md`), so their
/// pass can skip every exponential, or the whole row.
enum class row_reduction : std::int32_t {
    label = 0,                  // z[y] only (and its finiteness): the rest of the row is not read
    finiteness = 1,             // z[y] and a NaN/Inf scan of the row, no exponential
    logsumexp = 2,              // z[y], the scan and log Σ exp z
    logsumexp_and_doubled = 3,  // ... and log Σ exp 2z (WPO)
};

TPO_HOST_DEVICE constexpr bool reads_row(row_reduction r) { return r != row_reduction::label; }
TPO_HOST_DEVICE constexpr bool needs_logsumexp(row_reduction r) {
    return r == row_reduction::logsumexp || r == row_reduction::logsumexp_and_doubled;
}

struct row_stats {
    double lse = 0;           // log Σ_v exp z[v] (0 unless the reduction asked for it)
    double label_logit = 0;   // z[y]
    double lse_doubled = 0;   // log Σ_v exp 2z[v] (only when asked: WPO)
    std::int64_t label = 0;
    row_status status = row_status::masked;

    TPO_HOST_DEVICE double log_prob() const { return label_logit - lse; }
};

/// Per-row gradient coefficients: ∂L/∂z[v] = alpha·δ(v = label) − beta·softmax(z)[v] (`docs/math.md`).
/// A row with beta = 0 is written without reading its logits (its lse may not have been computed).
struct row_coefficients {
    double alpha = 0;
    double beta = 0;
    double lse = 0;
    std::int64_t label = -1;  // < 0: the row's gradient is zero
};

TPO_END_NAMESPACE
