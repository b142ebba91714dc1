#pragma once
// The per-row work of the Thrust backend, as host/device code shared by every Thrust system.
//
// A row's state is the online log-sum-exp of z and of 2z plus the finiteness probe
// (docs/formulas.md#token-log-probability, reward/row_stats.hpp). Values are folded in short runs:
// the run's maximum first, then one exponential per value, and exp(2x − 2m) is the square of
// exp(x − m), so the WPO statistic costs no second exponential. Runs are merged with
// online_logsumexp::merge, which is what a CUDA thread does with its packs and what a block
// reduction does with its threads' states.
//
// The host systems (OpenMP, TBB, C++) run row_statistics_op / row_gradient_op once per row
// through thrust::for_each; the CUDA system uses the kernels of thrust/cuda_rows.cuh, which are
// built from the same fold_run and lse_state.

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail {

/// float for 16- and 32-bit inputs (`docs/formulas.md#notation-and-data-layout`: at least float32), double for double.
template <class T>
using accumulate_t = std::conditional_t<std::is_same_v<std::remove_const_t<T>, double>, double, float>;

/// Gradient arithmetic: double as soon as the input or the output is double.
template <class T, class G>
using gradient_t = std::conditional_t<std::is_same_v<accumulate_t<T>, double> || std::is_same_v<G, double>, double,
                                      float>;

/// Running statistics of a (part of a) row.
template <class Acc>
struct lse_state {
    math::online_logsumexp<Acc> lse;
    math::online_logsumexp<Acc> doubled;  // of 2z, kept only when asked (WPO)
    Acc probe = Acc(0);                   // Σ (x − x): 0 unless a NaN or ±Inf was seen

    TPO_HOST_DEVICE TPO_FORCE_INLINE void merge(const lse_state& other) {
        lse.merge(other.lse);
        doubled.merge(other.doubled);
        probe += other.probe;
    }

    /// The same state in double, so that the row total and log() are taken in double.
    TPO_HOST_DEVICE TPO_FORCE_INLINE lse_state<double> widened() const {
        lse_state<double> w;
        w.lse.max = static_cast<double>(lse.max);
        w.lse.sum = static_cast<double>(lse.sum);
        w.doubled.max = static_cast<double>(doubled.max);
        w.doubled.sum = static_cast<double>(doubled.sum);
        w.probe = static_cast<double>(probe);
        return w;
    }
};

/// A merge functor for block and warp reductions.
struct merge_states {
    template <class Acc>
    TPO_HOST_DEVICE TPO_FORCE_INLINE lse_state<Acc> operator()(lse_state<Acc> a, const lse_state<Acc>& b) const {
        a.merge(b);
        return a;
    }
};

/// Folds n already widened values into `state`: one exponential per value.
template <bool Doubled, class Acc>
TPO_HOST_DEVICE TPO_FORCE_INLINE void fold_run(lse_state<Acc>& state, const Acc* x, int n) {
    using std::exp;
    Acc m = x[0];
    Acc probe = Acc(0);
    for (int k = 0; k < n; ++k) {
        m = x[k] > m ? x[k] : m;
        probe += x[k] - x[k];
    }
    Acc sum = Acc(0), sum_doubled = Acc(0);
    for (int k = 0; k < n; ++k) {
        // −∞ (a masked vocabulary entry) adds 0, also to a run with no finite value (m = −∞).
        const Acc e = x[k] == -std::numeric_limits<Acc>::infinity() ? Acc(0) : exp(x[k] - m);
        sum += e;
        if constexpr (Doubled) sum_doubled += e * e;
    }
    state.probe += probe;
    math::online_logsumexp<Acc> run;
    run.max = m;
    run.sum = sum;
    state.lse.merge(run);
    if constexpr (Doubled) {
        run.max = Acc(2) * m;
        run.sum = sum_doubled;
        state.doubled.merge(run);
    }
}

/// Folds n widened values into `state` as the reduction asks: the finiteness probe alone, or the
/// log-sum-exp (and that of 2z) with it.
template <row_reduction Reduction, class Acc>
TPO_HOST_DEVICE TPO_FORCE_INLINE void fold(lse_state<Acc>& state, const Acc* x, int n) {
    if constexpr (Reduction == row_reduction::finiteness) {
        Acc probe = Acc(0);
        for (int k = 0; k < n; ++k) probe += x[k] - x[k];
        state.probe += probe;
    } else {
        fold_run<Reduction == row_reduction::logsumexp_and_doubled>(state, x, n);
    }
}

/// A row's statistics from its accumulated state (rows::finish_row decides the status).
template <row_reduction Reduction, class Acc, class T>
TPO_HOST_DEVICE TPO_FORCE_INLINE row_stats finish(const lse_state<Acc>& state, const T* row, std::int64_t label) {
    const lse_state<double> w = state.widened();
    if constexpr (needs_logsumexp(Reduction))
        return rows::finish_row(w.lse, w.doubled, widen<double>(row[label]), w.probe, label);
    else
        return rows::row_without_logsumexp(widen<double>(row[label]), w.probe, label);
}

/// One scored row's statistics on a host system: runs of `run_length` in the accumulation type,
/// merged into a double total so that rows of 150k entries keep float accuracy.
template <class T, class I>
struct row_statistics_op {
    static constexpr int run_length = 16;
    static constexpr index_t runs_per_chunk = 32;  // 512 values per float partial sum

    logits_view<const T> z;
    rows::scored_rows<I> plan;
    row_reduction reduction;
    row_stats* out;

    TPO_HOST_DEVICE void operator()(index_t r) const {
        out[r] = rows::statistics_of(plan, z, r, reduction, [this](const T* row, std::int64_t label) {
            switch (reduction) {
            case row_reduction::finiteness: return statistics<row_reduction::finiteness>(row, label);
            case row_reduction::logsumexp_and_doubled:
                return statistics<row_reduction::logsumexp_and_doubled>(row, label);
            default: return statistics<row_reduction::logsumexp>(row, label);
            }
        });
    }

    template <row_reduction Reduction>
    TPO_HOST_DEVICE row_stats statistics(const T* row, std::int64_t label) const {
        using Acc = accumulate_t<T>;
        lse_state<double> total;
        Acc x[run_length];
        for (index_t chunk = 0; chunk < z.vocab; chunk += run_length * runs_per_chunk) {
            lse_state<Acc> partial;
            const index_t chunk_end =
                z.vocab - chunk < run_length * runs_per_chunk ? z.vocab : chunk + run_length * runs_per_chunk;
            for (index_t v = chunk; v < chunk_end; v += run_length) {
                const int n = chunk_end - v < run_length ? static_cast<int>(chunk_end - v) : run_length;
                for (int k = 0; k < n; ++k) x[k] = widen<Acc>(row[v + k]);
                fold<Reduction>(partial, x, n);
            }
            total.merge(partial.widened());
        }
        return finish<Reduction>(total, row, label);
    }
};

/// One row of a gradient plan (rows::gradient_rows) on a host system: zeros, α at the label alone,
/// or α·δ(v = y) − β·exp(z[v] − lse).
template <class T, class G>
struct row_gradient_op {
    logits_view<const T> z;
    rows::gradient_rows plan;
    logits_view<G> grad;

    TPO_HOST_DEVICE void operator()(index_t r) const {
        using C = gradient_t<T, G>;
        using std::exp;
        const rows::gradient_row row = plan(r);
        G* out = grad.row(row.sequence, row.position);
        const row_coefficients& c = row.coefficients;
        if (row.kind != rows::gradient_row_kind::softmax) {
            for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(C(0));
            if (row.kind == rows::gradient_row_kind::label_only) out[c.label] = narrow<G>(static_cast<C>(c.alpha));
            return;
        }
        const T* in = z.row(row.sequence, row.position);
        const C lse = static_cast<C>(c.lse), beta = static_cast<C>(c.beta);
        // The label's entry first: the output may be the input row itself (written in place).
        const G at_label = narrow<G>(static_cast<C>(c.alpha) - beta * exp(widen<C>(in[c.label]) - lse));
        for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(-beta * exp(widen<C>(in[v]) - lse));
        out[c.label] = at_label;
    }
};

/// One entry of C = op(A)·op(B) + beta·C (beta 0 or 1) per index, summed in Acc in order of k:
/// the host systems' matrix product for the fused lm_head path.
template <class X, class Y, class Acc>
struct matmul_op {
    bool trans_a, trans_b;
    index_t n, k;
    const X* a;
    index_t lda;
    const Y* b;
    index_t ldb;
    Acc* c;
    index_t ldc;
    Acc beta;

    TPO_HOST_DEVICE void operator()(index_t e) const {
        const index_t i = e / n, j = e % n;
        Acc sum = Acc(0);
        for (index_t p = 0; p < k; ++p)
            sum += widen<Acc>(trans_a ? a[p * lda + i] : a[i * lda + p]) *
                   widen<Acc>(trans_b ? b[j * ldb + p] : b[p * ldb + j]);
        Acc& out = c[i * ldc + j];
        out = beta == Acc(0) ? sum : out + sum;
    }
};

}  // namespace backend::thrust_detail
TPO_END_NAMESPACE
