#pragma once
// The two O(V) row kernels of the CPU backend, vectorised with Eigen's packet math.
//
// A row is read block by block (cpu_detail::block_size elements, which stay in L1) by a
// row_accumulator: one sweep of the block finds its maximum, a second sweep over the cached block
// sums exp(x − running max) (NaN and +∞ make the sum NaN) and finds the minimum (the −∞ probe).
// The running state is the online log-sum-exp (docs/formulas.md#token-log-probability) taken per
// block, so there is one exponential per element and memory is read once.
// Block sums accumulate in the element's accumulation type (float for 16/32-bit inputs, a few
// hundred terms per lane) and the row total in double, so rows of 150k entries keep float-epsilon
// accuracy.
//
// Every reduction runs in a fixed order inside one row, and rows never share state: results are
// bit-identical whatever the thread count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "tpo/backend/cpu/fast_exp.hpp"
#include "tpo/backend/cpu/simd.hpp"
#include "tpo/math/online_logsumexp.hpp"
#include "tpo/reward/row_stats.hpp"
#include "tpo/rows/rules.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

namespace ei = Eigen::internal;

/// What a row pass accumulates, block by block, for one row_reduction: nothing for `label`, the
/// finiteness probe for `finiteness`, the online log-sum-exp (of z, and of 2z) with the probe
/// otherwise. Blocks arrive in order and each is reduced in a fixed order, so a row's result does
/// not depend on the thread or on what else runs.
template <row_reduction Reduction, class T>
class row_accumulator {
    using A = accumulate_t<T>;
    using P = packet_t<A>;
    static constexpr index_t W = packet_width<A>;
    static constexpr bool doubled = Reduction == row_reduction::logsumexp_and_doubled;
    static constexpr A neg_inf = -std::numeric_limits<A>::infinity();

public:
    /// Folds elements [start, start + n) of the row, n ≤ block_size.
    void add(const T* row, index_t start, index_t n) {
        if constexpr (Reduction == row_reduction::label) {
            return;
        } else {
            if constexpr (Reduction == row_reduction::finiteness && sizeof(T) == 2) {
                non_finite_bits_ |= non_finite_bits(row + start, n);
                return;
            }
            const A* x = load_block(row + start, n, buffer_);
            if constexpr (Reduction == row_reduction::finiteness)
                add_probe(x, n);
            else
                add_logsumexp(x, n, row + start);
        }
    }

    row_stats finish(const T* row, std::int64_t label) const {
        const double label_logit = widen<double>(row[label]);
        if constexpr (!needs_logsumexp(Reduction)) {
            const double probe = static_cast<double>(ei::predux(probe_)) + static_cast<double>(probe_tail_) +
                                 ((non_finite_bits_ & non_finite_bit) != 0 ? 1.0 : 0.0);
            return rows::row_without_logsumexp(label_logit, probe, label);
        } else {
            const A lowest = std::min(ei::predux_min(lowest_), lowest_tail_);
            const double probe = lowest == neg_inf ? 1.0 : 0.0;
            math::online_logsumexp<double> lse, lse_doubled;
            lse.max = static_cast<double>(running_max_);
            lse.sum = sum_;
            if constexpr (doubled) {
                lse_doubled.max = 2.0 * static_cast<double>(running_max_);
                lse_doubled.sum = sum_doubled_;
            }
            return rows::finish_row(lse, lse_doubled, label_logit, probe, label);
        }
    }

private:
    // Packet members are may_alias types: every reduction runs on locals, stored back once per block.
    void add_probe(const A* x, index_t n) {
        const index_t full = n - n % W;
        P p0 = probe_, p1 = ei::pset1<P>(A(0));
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            const P v0 = ei::ploadu<P>(x + i), v1 = ei::ploadu<P>(x + i + W);
            p0 = ei::padd(p0, ei::psub(v0, v0));  // 0 unless v holds a NaN or an Inf
            p1 = ei::padd(p1, ei::psub(v1, v1));
        }
        for (; i < full; i += W) {
            const P v = ei::ploadu<P>(x + i);
            p0 = ei::padd(p0, ei::psub(v, v));
        }
        probe_ = ei::padd(p0, p1);
        A tail_probe = probe_tail_;
        for (; i < n; ++i) tail_probe += x[i] - x[i];
        probe_tail_ = tail_probe;
    }

    // One sweep of the cached block finds its maximum, a second sums exp(x − running max) and keeps
    // the minimum: one exponential per element, memory read once. A NaN or +∞ anywhere makes the
    // sum NaN, so the only non-finite value left to detect is −∞, which the minimum shows.
    // `source`: the block in the row (x may be its widened copy), whose memory ahead is asked for
    // while the exponentials run.
    void add_logsumexp(const A* x, index_t n, const T* source) {
        alignas(64) A tail[W];
        const index_t full = n - n % W;
        const index_t rest = n - full;
        for (index_t k = 0; k < W; ++k) tail[k] = k < rest ? x[full + k] : neg_inf;

        // Two accumulators: a maximum waits on the one before it.
        P max0 = ei::pset1<P>(neg_inf), max1 = max0;
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            max0 = ei::pmax(max0, ei::ploadu<P>(x + i));
            max1 = ei::pmax(max1, ei::ploadu<P>(x + i + W));
        }
        for (; i < full; i += W) max0 = ei::pmax(max0, ei::ploadu<P>(x + i));
        const P v_tail = ei::pload<P>(tail);
        const A m = ei::predux_max(ei::pmax(ei::pmax(max0, max1), v_tail));
        if (m == neg_inf) {
            add_block_without_finite_values(x, n);
            return;
        }
        if (m > running_max_) {
            const double scale = std::exp(static_cast<double>(running_max_) - static_cast<double>(m));
            sum_ *= scale;
            sum_doubled_ *= scale * scale;
            running_max_ = m;
            exp_shifted_ = shifted_exp<A>(m);
        }

        const P zero = ei::pset1<P>(A(0));
        P s0 = zero, s1 = zero, d0 = zero, d1 = zero;
        P lowest0 = lowest_, lowest1 = lowest_;
        for (i = 0; i + 2 * W <= full; i += 2 * W) {
            prefetch_ahead(source + i, 2 * W);
            const P v0 = ei::ploadu<P>(x + i), v1 = ei::ploadu<P>(x + i + W);
            lowest0 = ei::pmin(lowest0, v0);
            lowest1 = ei::pmin(lowest1, v1);
            const P e0 = exp_shifted_(v0), e1 = exp_shifted_(v1);
            s0 = ei::padd(s0, e0);
            s1 = ei::padd(s1, e1);
            if constexpr (doubled) {
                d0 = ei::padd(d0, ei::pmul(e0, e0));
                d1 = ei::padd(d1, ei::pmul(e1, e1));
            }
        }
        for (; i < full; i += W) {
            const P v = ei::ploadu<P>(x + i);
            lowest0 = ei::pmin(lowest0, v);
            const P e = exp_shifted_(v);
            s0 = ei::padd(s0, e);
            if constexpr (doubled) d0 = ei::padd(d0, ei::pmul(e, e));
        }
        lowest_ = ei::pmin(lowest0, lowest1);
        if (rest > 0) {
            for (index_t k = 0; k < rest; ++k) lowest_tail_ = std::min(lowest_tail_, tail[k]);
            // Padding lanes are zeroed rather than left to exp(−∞), which is not exactly 0 on every target.
            ei::pstore(tail, exp_shifted_(v_tail));
            for (index_t k = rest; k < W; ++k) tail[k] = A(0);
            const P e = ei::pload<P>(tail);
            s1 = ei::padd(s1, e);
            if constexpr (doubled) d1 = ei::padd(d1, ei::pmul(e, e));
        }
        sum_ += static_cast<double>(ei::predux(ei::padd(s0, s1)));
        if constexpr (doubled) sum_doubled_ += static_cast<double>(ei::predux(ei::padd(d0, d1)));
    }

    // A block whose maximum is −∞ holds only −∞ and NaN (the packet maximum passes over NaN): −∞
    // adds nothing to the sums (even before any finite value), NaN must still reach them. Rare, so
    // scalar.
    void add_block_without_finite_values(const A* x, index_t n) {
        for (index_t k = 0; k < n; ++k) {
            if (std::isnan(x[k]))
                sum_ = std::numeric_limits<double>::quiet_NaN();
            else
                lowest_tail_ = neg_inf;
        }
    }

    alignas(64) A buffer_[std::is_same_v<T, A> ? 1 : block_size];  // widened 16-bit block
    A running_max_ = neg_inf;
    shifted_exp<A> exp_shifted_{A(0)};  // exp(x − running_max_), set with it once that is finite
    double sum_ = 0, sum_doubled_ = 0;  // Σ exp(x − max), Σ exp(2x − 2·max)
    P probe_ = ei::pset1<P>(A(0));  // Σ (x − x) of the finiteness scan: 0 unless a NaN or ±∞ was read
    A probe_tail_ = 0;
    std::uint16_t non_finite_bits_ = 0;  // of the scan of 16-bit rows, which reads their bits
    P lowest_ = ei::pset1<P>(A(0));  // of the log-sum-exp sweep: −∞ shows as −∞ (NaN and +∞ reach the sum)
    A lowest_tail_ = 0;
};

/// One row's statistics for `Reduction`.
template <row_reduction Reduction, class T>
row_stats row_statistics_of(const T* row, index_t vocab, std::int64_t label) {
    row_accumulator<Reduction, T> acc;
    for (index_t start = 0; start < vocab; start += block_size) acc.add(row, start, std::min(block_size, vocab - start));
    return acc.finish(row, label);
}

/// The same with the reduction chosen at run time, once per row.
template <class T>
row_stats row_statistics_of(row_reduction reduction, const T* row, index_t vocab, std::int64_t label) {
    switch (reduction) {
    case row_reduction::label: return row_statistics_of<row_reduction::label>(row, vocab, label);
    case row_reduction::finiteness: return row_statistics_of<row_reduction::finiteness>(row, vocab, label);
    case row_reduction::logsumexp: return row_statistics_of<row_reduction::logsumexp>(row, vocab, label);
    case row_reduction::logsumexp_and_doubled:
        return row_statistics_of<row_reduction::logsumexp_and_doubled>(row, vocab, label);
    }
    return {};
}

/// A row of zeros (a row that is not scored), written without reading its logits.
template <class G>
void zero_row(G* out, index_t vocab, bool stream) {
    if (!stream) {
        std::memset(static_cast<void*>(out), 0, static_cast<std::size_t>(vocab) * sizeof(G));
        return;
    }
    alignas(64) static constexpr unsigned char zeros[4096] = {};
    std::size_t bytes = static_cast<std::size_t>(vocab) * sizeof(G);
    auto* d = reinterpret_cast<unsigned char*>(out);
    for (; bytes > 0;) {
        const std::size_t n = std::min(bytes, sizeof zeros);
        stream_copy(d, zeros, n);
        d += n;
        bytes -= n;
    }
}

/// α at the label and zeros elsewhere (a row whose β is 0), written without reading its logits.
template <class G>
void label_only_row(G* out, index_t vocab, const row_coefficients& c, bool stream) {
    zero_row(out, vocab, stream);
    if (stream) store_fence();
    out[c.label] = narrow<G>(c.alpha);
}

/// ∂L/∂z[v] = alpha·δ(v = label) − beta·exp(z[v] − lse) for one scored row with β ≠ 0.
template <class T, class G>
void gradient_row(const T* row, index_t vocab, const row_coefficients& c, G* out, bool stream) {
    using A = accumulate_t<T>;
    using P = packet_t<A>;
    constexpr index_t W = packet_width<A>;

    const index_t label = c.label;
    // The label's entry in double from the logit itself, as the oracle computes it.
    const G at_label = narrow<G>(c.alpha - c.beta * std::exp(widen<double>(row[label]) - c.lse));

    // lse split in two: x − hi − lo keeps the exponent's argument accurate to float epsilon
    // even when lse itself is large.
    const A hi = static_cast<A>(c.lse);
    const A lo = static_cast<A>(c.lse - static_cast<double>(hi));
    const auto gradient = [&] {
        if constexpr (sizeof(G) == 2) {
            // A 16-bit output keeps 8 (bf16) or 11 (fp16) significant bits, so the log-sum-exp
            // terms' exponential (a few float ulps, exp(−lo) folded into the factor) cannot show in
            // it; only float and double outputs need fast_exp's ≤ 1 ulp.
            const shifted_exp<A> exp_shifted(hi);
            const P factor = ei::pset1<P>(static_cast<A>(-c.beta * std::exp(-static_cast<double>(lo))));
            return [=](const P& v) { return ei::pmul(factor, exp_shifted(v)); };
        } else {
            const P p_hi = ei::pset1<P>(hi), p_lo = ei::pset1<P>(lo);
            const P minus_beta = ei::pset1<P>(static_cast<A>(-c.beta));
            return [=](const P& v) { return ei::pmul(minus_beta, fast_exp(ei::psub(ei::psub(v, p_hi), p_lo))); };
        }
    }();

    alignas(64) A buffer[block_size];
    alignas(64) A values[block_size + W];
    alignas(64) G narrowed[std::is_same_v<G, A> ? 1 : block_size];
    for (index_t start = 0; start < vocab; start += block_size) {
        const index_t n = std::min(block_size, vocab - start);
        const A* x = load_block(row + start, n, buffer);
        const index_t full = n - n % W;
        auto write = [&](index_t i) { ei::pstore(values + i, gradient(ei::ploadu<P>(x + i))); };
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            // As in the log-sum-exp sweep (docs/design.md: the gradient pass asks for memory ahead).
            prefetch_ahead(row + start + i, 2 * W);
            write(i);
            write(i + W);
        }
        for (; i < full; i += W) write(i);
        if (full < n) {
            alignas(64) A tail[W];
            for (index_t k = 0; k < W; ++k) tail[k] = full + k < n ? x[full + k] : A(0);
            ei::pstore(values + full, gradient(ei::pload<P>(tail)));
        }
        G* block_out;
        if constexpr (std::is_same_v<G, A>) {
            block_out = values;
        } else {
            narrow_block(values, n, narrowed);
            block_out = narrowed;
        }
        if (label >= start && label < start + n) block_out[label - start] = at_label;
        if (stream)
            stream_copy(out + start, block_out, static_cast<std::size_t>(n) * sizeof(G));
        else
            std::memcpy(static_cast<void*>(out + start), block_out, static_cast<std::size_t>(n) * sizeof(G));
    }
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
