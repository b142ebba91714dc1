#pragma once
// The per-row work of the Thrust backend, as host/device code shared by every Thrust system.
//
// A row's state is the online log-sum-exp of z and of 2z plus the finiteness probe (SPEC §3.1,
// reward/row_stats.hpp). Values are folded in short runs: the run's maximum first, then one
// exponential per value, and exp(2x − 2m) is the square of exp(x − m), so the WPO statistic
// costs no second exponential. Runs are merged with online_logsumexp::merge, which is what a
// CUDA thread does with its packs and what a block reduction does with its threads' states.
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

TPO_BEGIN_NAMESPACE
namespace backend::thrust_detail {

/// float for 16- and 32-bit inputs (SPEC §1: at least float32), double for double.
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

/// A row's statistics from its accumulated state (finish_row decides the status).
template <row_reduction Reduction, class Acc, class T>
TPO_HOST_DEVICE TPO_FORCE_INLINE row_stats finish(const lse_state<Acc>& state, const T* row, std::int64_t label) {
    const lse_state<double> w = state.widened();
    if constexpr (needs_logsumexp(Reduction))
        return finish_row(w.lse, w.doubled, widen<double>(row[label]), w.probe, label);
    else
        return row_without_logsumexp(widen<double>(row[label]), w.probe, label);
}

/// The status-only statistics of a row that is not read (masked or out-of-range label).
TPO_HOST_DEVICE TPO_FORCE_INLINE row_stats skipped_row(std::int64_t label, row_status status) {
    row_stats r{};
    r.label = label;
    r.status = status;
    return r;
}

/// One scored row's statistics on a host system: runs of `run_length` in the accumulation type,
/// merged into a double total so that rows of 150k entries keep float accuracy.
template <class T, class I>
struct row_statistics_op {
    static constexpr int run_length = 16;
    static constexpr index_t runs_per_chunk = 32;  // 512 values per float partial sum

    logits_view<const T> z;
    labels_view<const I> labels;
    row_alignment align;
    index_t scored;
    row_reduction reduction;
    row_stats* out;

    TPO_HOST_DEVICE void operator()(index_t r) const {
        const index_t s = r / scored, t = r % scored;
        const auto label = static_cast<std::int64_t>(labels.at(s, align.label_position(t)));
        const row_status status = classify_label(label, z.vocab, align.ignore_index);
        if (status != row_status::ok) {
            out[r] = skipped_row(label, status);
            return;
        }
        const T* row = z.row(s, t);
        switch (reduction) {
        case row_reduction::label: out[r] = row_without_logsumexp(widen<double>(row[label]), 0.0, label); break;
        case row_reduction::finiteness: out[r] = statistics<row_reduction::finiteness>(row, label); break;
        case row_reduction::logsumexp: out[r] = statistics<row_reduction::logsumexp>(row, label); break;
        case row_reduction::logsumexp_and_doubled:
            out[r] = statistics<row_reduction::logsumexp_and_doubled>(row, label);
            break;
        }
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

/// ∂L/∂z[v] = alpha·δ(v = y) − beta·exp(z[v] − lse) of one row, zero for unscored rows (SPEC §5).
template <class T, class G>
struct row_gradient_op {
    logits_view<const T> z;
    const row_coefficients* coefficients;
    index_t scored;
    logits_view<G> grad;

    TPO_HOST_DEVICE void operator()(index_t r) const {
        using C = gradient_t<T, G>;
        using std::exp;
        const index_t s = r / z.length, t = r % z.length;
        G* out = grad.row(s, t);
        const row_coefficients* c = t < scored ? coefficients + s * scored + t : nullptr;
        if (!c || c->label < 0) {
            for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(C(0));
            return;
        }
        if (c->beta == 0) {  // written without reading the row: its lse may not have been computed
            for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(C(0));
            out[c->label] = narrow<G>(static_cast<C>(c->alpha));
            return;
        }
        const T* row = z.row(s, t);
        const C lse = static_cast<C>(c->lse), beta = static_cast<C>(c->beta);
        for (index_t v = 0; v < z.vocab; ++v) out[v] = narrow<G>(-beta * exp(widen<C>(row[v]) - lse));
        out[c->label] = narrow<G>(static_cast<C>(c->alpha) - beta * exp(widen<C>(row[c->label]) - lse));
    }
};

}  // namespace backend::thrust_detail
TPO_END_NAMESPACE
