#pragma once
// The row rules, written once for every backend.
//
// Which rows of an (S, L, ·) tensor are scored, which label each row is scored against (the
// causal shift), what a label means (the ignore index, the range [0, V)), which rows are read at
// all, what a finished row's status is, and which gradient rows are written without a read: all of
// it lives here. A backend supplies only how to reduce one row (its vectorised or block-parallel
// log-sum-exp) and how to write one row (its gradient kernel), and runs these plans over its rows.
//
//   scored_rows      scored row r = s·(rows per sequence) + t → the tensor row (s, t), its label and
//                    status; statistics_of() decides what a backend's row reduction is asked to do
//   gradient_rows    tensor row r = s·L + t → zero row, label-only row (β = 0: not read), or a
//                    softmax row α·δ(v = y) − β·exp(z[v] − lse)

#include <cstdint>

#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/math/scalar.hpp"
#include "tpo/reward/row_stats.hpp"

TPO_BEGIN_NAMESPACE
namespace rows {

/// What a label says about its row, decided before any gather so that an out-of-range label never
/// becomes an out-of-bounds read. Labels are vocabulary ids in [0, V); the ignore index masks a row.
TPO_HOST_DEVICE inline row_status classify_label(std::int64_t label, index_t vocab, std::int64_t ignore_index) {
    if (label == ignore_index) return row_status::masked;
    if (label < 0 || label >= vocab) return row_status::label_out_of_range;
    return row_status::ok;
}

/// One scored row: where it lives in the tensor and what its label says.
struct scored_row {
    index_t sequence = 0;
    index_t position = 0;  // the tensor row t of sequence s (its label sits at the aligned position)
    std::int64_t label = 0;
    row_status status = row_status::masked;

    TPO_HOST_DEVICE bool valid() const { return status == row_status::ok; }
};

/// The scored rows of a tensor whose rows pair with `labels` under `align`, numbered
/// r = s·per_sequence + t, t < per_sequence (L − 1 with the shift, L without).
template <class I>
struct scored_rows {
    labels_view<const I> labels{};
    row_alignment align{};
    index_t vocab = 0;         // V of the whole vocabulary: a label must lie in [0, V)
    index_t per_sequence = 0;  // scored rows per sequence

    static scored_rows of(labels_view<const I> labels, row_alignment align, index_t vocab) {
        return {labels, align, vocab, align.scored_rows(labels.length)};
    }

    TPO_HOST_DEVICE index_t count() const { return labels.sequences * per_sequence; }

    TPO_HOST_DEVICE scored_row operator()(index_t r) const {
        scored_row row;
        row.sequence = r / per_sequence;
        row.position = r % per_sequence;
        row.label = static_cast<std::int64_t>(labels.at(row.sequence, align.label_position(row.position)));
        row.status = classify_label(row.label, vocab, align.ignore_index);
        return row;
    }
};

/// The status-only statistics of a row that is not read (masked or out-of-range label).
TPO_HOST_DEVICE inline row_stats unread_row(const scored_row& row) {
    row_stats r{};
    r.label = row.label;
    r.status = row.status;
    return r;
}

/// The statistics of a row taken without its log-sum-exp (row_reduction::label or
/// row_reduction::finiteness). `finite_probe` is Σ (x − x) over the entries that were read (0 when
/// only z[y] was): 0 unless one of them was NaN or ±∞.
TPO_HOST_DEVICE inline row_stats row_without_logsumexp(double label_logit, double finite_probe, std::int64_t label) {
    row_stats r;
    r.label = label;
    r.label_logit = label_logit;
    r.status = (finite_probe == 0.0 && math::is_finite(label_logit)) ? row_status::ok : row_status::non_finite;
    return r;
}

/// A row's statistics from its accumulated online log-sum-exp states. A row holding a NaN or ±∞
/// is non-finite (−∞ adds exactly 0 to the sums, but the row is still marked).
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

/// Whether a backend's row reduction runs for this row: only valid rows whose reduction reads more
/// than the label's entry.
TPO_HOST_DEVICE inline bool reduces(const scored_row& row, row_reduction reduction) {
    return row.valid() && reads_row(reduction);
}

/// The statistics of a row that a backend does not reduce (see reduces()): its status alone, or
/// the label's logit alone under row_reduction::label.
template <class T>
TPO_HOST_DEVICE row_stats statistics_without_reduction(const scored_row& row, const T* data) {
    if (!row.valid()) return unread_row(row);
    return row_without_logsumexp(widen<double>(data[row.label]), 0.0, row.label);
}

/// Row r's statistics: `reduce(row_data, label)` is the backend's pass over one valid row for
/// `reduction`; every other row is settled here.
template <class T, class I, class Reduce>
TPO_HOST_DEVICE row_stats statistics_of(const scored_rows<I>& plan, logits_view<const T> z, index_t r,
                                        row_reduction reduction, Reduce&& reduce) {
    const scored_row row = plan(r);
    if (!row.valid()) return unread_row(row);
    const T* data = z.row(row.sequence, row.position);
    if (!reads_row(reduction)) return statistics_without_reduction(row, data);
    return reduce(data, row.label);
}

enum class gradient_row_kind : std::int32_t {
    zero,        // not scored, or a scored row whose label is not valid: all zeros
    label_only,  // β = 0: α at the label, zeros elsewhere, the logits are not read (their lse may not exist)
    softmax,     // α·δ(v = y) − β·exp(z[v] − lse)
};

/// What a scored row's gradient coefficients make of it.
TPO_HOST_DEVICE inline gradient_row_kind kind_of(const row_coefficients& c) {
    if (c.label < 0) return gradient_row_kind::zero;
    return c.beta == 0 ? gradient_row_kind::label_only : gradient_row_kind::softmax;
}

struct gradient_row {
    index_t sequence = 0;
    index_t position = 0;
    gradient_row_kind kind = gradient_row_kind::zero;
    row_coefficients coefficients{};  // meaningful unless kind is zero
};

/// Every row of a gradient tensor `(S, L, V)`, numbered r = s·L + t; `coefficients` holds one entry
/// per scored row (s·per_sequence + t), as the coefficient pass writes them.
struct gradient_rows {
    index_t sequences = 0;
    index_t length = 0;        // L
    index_t per_sequence = 0;  // scored rows per sequence
    const row_coefficients* coefficients = nullptr;

    TPO_HOST_DEVICE index_t count() const { return sequences * length; }

    TPO_HOST_DEVICE gradient_row operator()(index_t r) const {
        gradient_row row;
        row.sequence = r / length;
        row.position = r % length;
        if (row.position >= per_sequence) return row;
        row.coefficients = coefficients[row.sequence * per_sequence + row.position];
        row.kind = kind_of(row.coefficients);
        return row;
    }
};

}  // namespace rows
TPO_END_NAMESPACE
