#pragma once
// The reference backend: plain sequential loops, double accumulation, no dependencies.
// It is the oracle: every other backend is tested against it on the same random inputs.

#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/reward/row_stats.hpp"

TPO_BEGIN_NAMESPACE
namespace backend {

class reference {
public:
    template <class T>
    using buffer = std::vector<T>;

    template <class T>
    buffer<T> allocate(index_t n) const {
        return buffer<T>(static_cast<std::size_t>(n));
    }
    template <class T>
    T* raw(buffer<T>& b) const {
        return b.data();
    }
    template <class T>
    std::vector<T> to_host(const buffer<T>& b) const {
        return b;
    }

    template <class F>
    void for_each(index_t n, F&& f) const {
        for (index_t i = 0; i < n; ++i) f(i);
    }

    template <class T, class I>
    void row_statistics(logits_view<const T> z, labels_view<const I> labels, row_alignment align,
                        row_reduction reduction, row_stats* out) const {
        const index_t scored = align.scored_rows(z.length);
        for (index_t s = 0; s < z.sequences; ++s)
            for (index_t t = 0; t < scored; ++t) {
                const auto label = static_cast<std::int64_t>(labels.at(s, align.label_position(t)));
                row_stats& r = out[s * scored + t];
                const row_status status = classify_label(label, z.vocab, align.ignore_index);
                if (status != row_status::ok) {
                    r = row_stats{};
                    r.label = label;
                    r.status = status;
                    continue;
                }
                const T* row = z.row(s, t);
                const double label_logit = widen<double>(row[label]);
                math::online_logsumexp<double> lse, lse_doubled;
                double probe = 0;
                for (index_t v = 0; v < (reads_row(reduction) ? z.vocab : 0); ++v) {
                    const double x = widen<double>(row[v]);
                    if (needs_logsumexp(reduction)) lse.add(x);
                    if (reduction == row_reduction::logsumexp_and_doubled) lse_doubled.add(2.0 * x);
                    probe += x - x;
                }
                r = needs_logsumexp(reduction) ? finish_row(lse, lse_doubled, label_logit, probe, label)
                                               : row_without_logsumexp(label_logit, probe, label);
            }
    }

    template <class T, class G>
    void row_gradient(logits_view<const T> z, const row_coefficients* coefficients, index_t scored,
                      logits_view<G> grad) const {
        for (index_t s = 0; s < z.sequences; ++s)
            for (index_t t = 0; t < z.length; ++t) {
                G* out = grad.row(s, t);
                const row_coefficients* c = t < scored ? coefficients + s * scored + t : nullptr;
                if (!c || c->label < 0) {
                    for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(0.0);
                    continue;
                }
                const T* row = z.row(s, t);
                for (index_t v = 0; v < z.vocab; ++v) {
                    const double p = c->beta == 0 ? 0.0 : std::exp(widen<double>(row[v]) - c->lse);
                    out[v] = narrow<G>((v == c->label ? c->alpha : 0.0) - c->beta * p);
                }
            }
    }
};

static_assert(tensor_backend<reference>);

}  // namespace backend
TPO_END_NAMESPACE
