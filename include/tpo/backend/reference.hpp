#pragma once
// The reference backend: plain sequential loops, double accumulation, no dependencies.
// It is the oracle: every other backend is tested against it on the same random inputs.

#include <cmath>
#include <cstdint>
#include <vector>

#include "tpo/backend/concept.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"

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

    template <class T>
    buffer<T> upload(const std::vector<T>& host) const {
        return host;
    }

    template <class F>
    void for_each(index_t n, F&& f) const {
        for (index_t i = 0; i < n; ++i) f(i);
    }

    /// C (m×n, row stride ldc) = op(A)·op(B) + beta·C with op(A) m×k and op(B) k×n; A is stored
    /// m×k (k×m when trans_a) with row stride lda, B likewise. Sums in double, in order of k.
    template <class X, class Y, class Acc>
    void matmul(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a, index_t lda, const Y* b,
                index_t ldb, Acc* c, index_t ldc, Acc beta) const {
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < n; ++j) {
                double sum = 0;
                for (index_t p = 0; p < k; ++p)
                    sum += widen<double>(trans_a ? a[p * lda + i] : a[i * lda + p]) *
                           widen<double>(trans_b ? b[j * ldb + p] : b[p * ldb + j]);
                Acc& out = c[i * ldc + j];
                out = static_cast<Acc>(beta == Acc(0) ? sum : static_cast<double>(beta) * out + sum);
            }
    }

    template <class T, class I>
    void row_statistics(logits_view<const T> z, labels_view<const I> labels, row_alignment align,
                        row_reduction reduction, row_stats* out) const {
        const auto plan = rows::scored_rows<I>::of(labels, align, z.vocab);
        for (index_t r = 0; r < plan.count(); ++r)
            out[r] = rows::statistics_of(plan, z, r, reduction, [&](const T* row, std::int64_t label) {
                return reduce(row, z.vocab, label, reduction);
            });
    }

    template <class T, class G>
    void row_gradient(logits_view<const T> z, const row_coefficients* coefficients, index_t scored,
                      logits_view<G> grad) const {
        const rows::gradient_rows plan{z.sequences, z.length, scored, coefficients};
        for (index_t r = 0; r < plan.count(); ++r) {
            const rows::gradient_row row = plan(r);
            G* out = grad.row(row.sequence, row.position);
            const row_coefficients& c = row.coefficients;
            const T* in = z.row(row.sequence, row.position);
            for (index_t v = 0; v < z.vocab; ++v) {
                double value = 0;
                if (row.kind != rows::gradient_row_kind::zero) value = v == c.label ? c.alpha : 0.0;
                if (row.kind == rows::gradient_row_kind::softmax)
                    value -= c.beta * std::exp(widen<double>(in[v]) - c.lse);
                out[v] = narrow<G>(value);
            }
        }
    }

private:
    /// One valid row, in double, one entry at a time.
    template <class T>
    static row_stats reduce(const T* row, index_t vocab, std::int64_t label, row_reduction reduction) {
        math::online_logsumexp<double> lse, lse_doubled;
        double probe = 0;
        for (index_t v = 0; v < vocab; ++v) {
            const double x = widen<double>(row[v]);
            if (needs_logsumexp(reduction)) lse.add(x);
            if (reduction == row_reduction::logsumexp_and_doubled) lse_doubled.add(2.0 * x);
            probe += x - x;
        }
        const double label_logit = widen<double>(row[label]);
        return needs_logsumexp(reduction) ? rows::finish_row(lse, lse_doubled, label_logit, probe, label)
                                          : rows::row_without_logsumexp(label_logit, probe, label);
    }
};

static_assert(tensor_backend<reference>);

}  // namespace backend
TPO_END_NAMESPACE
