#pragma once
// What one pass over a logits row leaves behind: everything the forward and the gradient need
// from the V entries of the row, in O(1) space (SPEC §3.1, §5, and WPO's LSE(2z) of §6).

#include <cstdint>

#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/math/scalar.hpp"

TPO_BEGIN_NAMESPACE

enum class row_status : std::int32_t {
    ok = 0,
    masked = 1,            // label is the ignore index: the row is never read
    label_out_of_range = 2,
    non_finite = 3,        // a NaN or ±Inf in the row
};

/// What a pass over a logits row must find besides the label's logit. Only rows whose
/// probabilities enter the objective need the log-sum-exp: with the `logit` score the noisy rows
/// contribute z̃[y] alone (SPEC §3.2, §5), so their pass can skip every exponential, or the whole row.
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

/// Per-row gradient coefficients: ∂L/∂z[v] = alpha·δ(v = label) − beta·softmax(z)[v] (SPEC §5).
/// A row with beta = 0 is written without reading its logits (its lse may not have been computed).
struct row_coefficients {
    double alpha = 0;
    double beta = 0;
    double lse = 0;
    std::int64_t label = -1;  // < 0: the row's gradient is zero
};

/// Label classification shared by every backend, done before any gather so that an out-of-range
/// label never becomes an out-of-bounds read.
TPO_HOST_DEVICE inline row_status classify_label(std::int64_t label, index_t vocab, std::int64_t ignore_index) {
    if (label == ignore_index) return row_status::masked;
    if (label < 0 || label >= vocab) return row_status::label_out_of_range;
    return row_status::ok;
}

/// The statistics of a row taken without its log-sum-exp (row_reduction::label or
/// row_reduction::finiteness).
/// `finite_probe` is Σ (x − x) over the entries that were read (0 when only z[y] was).
TPO_HOST_DEVICE inline row_stats row_without_logsumexp(double label_logit, double finite_probe, std::int64_t label) {
    row_stats r;
    r.label = label;
    r.label_logit = label_logit;
    r.status = (finite_probe == 0.0 && math::is_finite(label_logit)) ? row_status::ok : row_status::non_finite;
    return r;
}

/// Finish a row's statistics from its accumulated state. `finite_probe` is Σ (x − x): 0 unless
/// some entry was NaN or ±Inf.
template <class Acc>
TPO_HOST_DEVICE inline row_stats finish_row(const math::online_logsumexp<Acc>& lse,
                                            const math::online_logsumexp<Acc>& lse_doubled, Acc label_logit,
                                            Acc finite_probe, std::int64_t label) {
    row_stats r;
    r.label = label;
    r.lse = static_cast<double>(lse.value());
    r.lse_doubled = static_cast<double>(lse_doubled.value());
    r.label_logit = static_cast<double>(label_logit);
    r.status = (finite_probe == Acc(0) && math::is_finite(r.lse)) ? row_status::ok : row_status::non_finite;
    return r;
}

TPO_END_NAMESPACE
