// The CPU backend's kernels, written once over one level's vectors (f32, f64, stream64,
// store_fence: vectors_*.inl). cpu/kernels.hpp includes this file once per level, inside the
// level's namespace and compiler target options, so every function here exists once per level
// under a name that says which (no pragma guard: included on purpose more than once).
//
// Row statistics. A row is read block by block (block_size elements, which stay in L1) by a
// row_accumulator: one sweep of the block finds its maximum, a second sweep over the cached block
// sums exp(x − running max) (NaN and +∞ make the sum NaN) and finds the minimum (the −∞ probe).
// The running state is the online log-sum-exp (docs/formulas.md#token-log-probability) taken per
// block, so there is one exponential per element and memory is read once. Block sums accumulate
// in the element's accumulation type (float for 16/32-bit inputs, a few hundred terms per lane)
// and the row total in double, so rows of 150k entries keep float-epsilon accuracy.
//
// Every reduction runs in a fixed order inside one row, and rows never share state: results are
// bit-identical whatever the thread count. Levels differ in vector width (so in the order of the
// block sums) and the baseline level has no fused multiply-add: they agree to the last bits only.
//
// The exponentials. Every logit costs one, and on one core they, not memory, bound the row passes.
// - fast_exp (values written out: float and double gradients). n = round(x / ln 2),
//   r = x − n·ln 2 with ln 2 in two parts, exp(x) = 2^n · p(r): float with a degree-6 p (within
//   about one ulp of exp), double with the degree-13 Taylor polynomial (its remainder is below
//   2^−57 on |r| ≤ ln 2 / 2).
// - shifted_exp (the terms exp(x − m) of a log-sum-exp, m fixed for a block; 16-bit gradient
//   entries). For float, 2^t for t = (x − m)·log2 e: f = t − floor(t) (vreduceps on AVX-512), a
//   degree-5 p(f) ≈ 2^f on [0, 1], times 2^floor(t). Rounding t adds |x − m|·eps/2 relative error,
//   as rounding x − m itself can; the terms that dominate a sum are those near the maximum, where
//   that is small. Double uses fast_exp(x − m).
// 2^n is applied with vscalefps on AVX-512 and in two exact halves elsewhere, so subnormal
// results are rounded once, not flushed. The float coefficients come from
// scripts/fit-exp-polynomial (minimax fits of the relative error, rounded to float). NaN
// propagates; −∞ gives 0.

template <class A>
using ops = std::conditional_t<std::is_same_v<A, double>, f64, f32>;

template <class O, class A, std::size_t N>
TPO_FORCE_INLINE typename O::vec horner(typename O::vec r, const A (&highest_first)[N]) {
    typename O::vec p = O::set1(highest_first[0]);
    for (std::size_t k = 1; k < N; ++k) p = O::fmadd(p, r, O::set1(highest_first[k]));
    return p;
}

template <class A>
TPO_FORCE_INLINE typename ops<A>::vec fast_exp(typename ops<A>::vec x) {
    using O = ops<A>;
    x = O::exp_domain(x);
    if constexpr (std::is_same_v<A, float>) {
        const auto n = O::round(O::mul(x, O::set1(0x1.715476p+0f)));  // log2 e
        // ln 2 = 0x1.62e4p-1 + 0x1.7f7d1cp-20 (the first part has 16 significant bits, so n·hi is exact).
        auto r = O::fnmadd(n, O::set1(0x1.62e4p-1f), x);
        r = O::fnmadd(n, O::set1(0x1.7f7d1cp-20f), r);
        static constexpr float degree6[] = {0x1.6ae73p-10f, 0x1.126782p-7f, 0x1.555822p-5f, 0x1.55541ap-3f,
                                            0x1.fffffcp-2f, 1.0f,           1.0f};
        return O::scale(horner<O>(r, degree6), n);
    } else {
        const auto n = O::round(O::mul(x, O::set1(0x1.71547652b82fep+0)));  // log2 e
        // ln 2 = hi + lo with 32 significant bits in hi, so n·hi is exact for |n| < 2^21.
        auto r = O::fnmadd(n, O::set1(6.93147180369123816490e-01), x);
        r = O::fnmadd(n, O::set1(1.90821492927058770002e-10), r);
        // 1/k! for k = 13 … 2, then 1, 1.
        static constexpr double taylor13[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                              1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                              1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                              1.0 / 24.0,         1.0 / 6.0,         0.5,
                                              1.0,                1.0};
        return O::scale(horner<O>(r, taylor13), n);
    }
}

/// exp(x − m) for a fixed finite m; exp(0) is exactly 1, so a row's largest term is.
template <class A>
class shifted_exp {
    using O = ops<A>;
    using vec = typename O::vec;

public:
    explicit shifted_exp(A m) : shift_(O::set1(m)) {}

    TPO_FORCE_INLINE vec operator()(vec x) const {
        if constexpr (std::is_same_v<A, float>) {
            // x − m first, so that x = m gives t = 0 and exactly 1 (a one-entry row's lse is its logit).
            const vec t = O::mul(O::sub(x, shift_), O::set1(0x1.715476p+0f));  // log2 e
            vec f, e;
            O::exp2_split(t, f, e);
            static constexpr float degree5[] = {0x1.e974fep-10f, 0x1.277854p-7f, 0x1.c91ce6p-5f,
                                                0x1.ebdb56p-3f,  0x1.62e4bap-1f, 1.0f};
            return O::scale(horner<O>(f, degree5), e);
        } else {
            return fast_exp<A>(O::sub(x, shift_));
        }
    }

private:
    vec shift_;
};

// 16-bit inputs are widened block by block; a full block has a constant length, which lets the
// compiler vectorise these loops at -O2 too.
TPO_FORCE_INLINE void widen_block(const bfloat16* src, index_t n, float* dst) {
    for (index_t i = 0; i < n; ++i) {
        const std::uint32_t u = static_cast<std::uint32_t>(src[i].bits) << 16;
        std::memcpy(dst + i, &u, sizeof u);
    }
}

TPO_FORCE_INLINE void widen_block(const float16* src, index_t n, float* dst) {
    for (index_t i = 0; i < n; ++i) {
        const std::uint16_t h = src[i].bits;
        const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
        const std::uint32_t magnitude = h & 0x7fffu;
        // Shifted into binary32 position, normals and subnormals alike are off by exactly 2^112;
        // the multiplication by a power of two is exact.
        std::uint32_t shifted = magnitude << 13;
        float f;
        std::memcpy(&f, &shifted, sizeof f);
        f *= 5.192296858534828e+33f;  // 2^112
        std::uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        const std::uint32_t special = 0x7f800000u | ((magnitude & 0x3ffu) << 13);  // Inf, NaN
        u = (magnitude >= 0x7c00u ? special : u) | sign;
        std::memcpy(dst + i, &u, sizeof u);
    }
}

template <class T>
TPO_FORCE_INLINE void widen_any_block(const T* src, index_t n, float* dst) {
    if (n == block_size)
        widen_block(src, block_size, dst);
    else
        widen_block(src, n, dst);
}

/// For 16-bit floats, whose NaN/Inf test needs no widening: the OR over the block of each
/// element's magnitude bits plus one exponent step. Bit 15 of the result (non_finite_bit) is set
/// exactly when some element has an all-ones exponent (NaN or ±Inf).
template <class T>
TPO_FORCE_INLINE std::uint16_t non_finite_bits_of(const T* src, index_t n) {
    static_assert(std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>);
    constexpr std::uint16_t exponent_step = std::is_same_v<T, bfloat16> ? 0x0080u : 0x0400u;
    std::uint16_t acc = 0;
    for (index_t i = 0; i < n; ++i) acc |= static_cast<std::uint16_t>((src[i].bits & 0x7fffu) + exponent_step);
    return acc;
}

template <class T>
std::uint16_t non_finite_bits(const T* src, index_t n) {
    return n == block_size ? non_finite_bits_of(src, block_size) : non_finite_bits_of(src, n);
}

template <class T, class A>
TPO_FORCE_INLINE const A* load_block(const T* src, index_t n, A* buffer) {
    if constexpr (std::is_same_v<T, A>) {
        return src;
    } else {
        widen_any_block(src, n, buffer);
        return buffer;
    }
}

template <class G, class A>
void narrow_block(const A* src, index_t n, G* dst) {
    if constexpr (std::is_same_v<G, bfloat16>) {
        index_t i = 0;
        if constexpr (std::is_same_v<A, float> && has_bf16_narrowing) {
            if (cpu_level_detail::cpu_has_bf16()) i = narrow_bf16_vcvt(src, n, dst);
        }
        narrow_bf16_scalar(src + i, n - i, dst + i);
    } else {
        for (index_t i = 0; i < n; ++i) dst[i] = narrow<G>(src[i]);
    }
}

/// Copies `bytes` to `dst` with non-temporal stores where the target supports them: a gradient
/// tensor is far larger than the caches, and streaming saves reading every line before writing it.
/// The caller issues store_fence() before anyone else reads `dst`.
inline void stream_copy(void* dst, const void* src, std::size_t bytes) {
    auto* d = static_cast<char*>(dst);
    const auto* s = static_cast<const char*>(src);
    if constexpr (has_stream) {
        std::size_t head = static_cast<std::size_t>(-reinterpret_cast<std::uintptr_t>(d)) & 63u;
        head = std::min(head, bytes);
        std::memcpy(d, s, head);
        d += head;
        s += head;
        bytes -= head;
        for (; bytes >= 64; bytes -= 64, d += 64, s += 64) stream64(d, s);
    }
    std::memcpy(d, s, bytes);
}

/// What a row pass accumulates, block by block, for one row_reduction: nothing for `label`, the
/// finiteness probe for `finiteness`, the online log-sum-exp (of z, and of 2z) with the probe
/// otherwise. Blocks arrive in order and each is reduced in a fixed order, so a row's result does
/// not depend on the thread or on what else runs.
template <row_reduction Reduction, class T>
class row_accumulator {
    using A = accumulate_t<T>;
    using O = ops<A>;
    using P = typename O::vec;
    static constexpr index_t W = O::width;
    static constexpr bool doubled = Reduction == row_reduction::logsumexp_and_doubled;
    static constexpr A neg_inf = -std::numeric_limits<A>::infinity();

public:
    // Written out so that it, too, is compiled for this level (the members hold its vectors).
    row_accumulator() {}

    /// Folds elements [start, start + n) of the row, n ≤ block_size.
    void add(const T* row, index_t start, index_t n) {
        if constexpr (Reduction == row_reduction::label) {
            return;
        } else {
            if constexpr (Reduction == row_reduction::finiteness && sizeof(T) == 2) {
                prefetch_ahead(row + start, n);
                non_finite_bits_ |= non_finite_bits(row + start, n);
                return;
            }
            const A* x = load_block(row + start, n, buffer_);
            if constexpr (Reduction == row_reduction::finiteness)
                add_probe(x, n, row + start);
            else
                add_logsumexp(x, n, row + start);
        }
    }

    row_stats finish(const T* row, std::int64_t label) const {
        const double label_logit = widen<double>(row[label]);
        if constexpr (!needs_logsumexp(Reduction)) {
            const double probe = static_cast<double>(O::reduce_add(probe_)) + static_cast<double>(probe_tail_) +
                                 ((non_finite_bits_ & non_finite_bit) != 0 ? 1.0 : 0.0);
            return rows::row_without_logsumexp(label_logit, probe, label);
        } else {
            const A lowest = std::min(O::reduce_min(lowest_), lowest_tail_);
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
    // Every reduction runs on locals, stored back once per block.
    // `source`: as for add_logsumexp; the scan, too, runs faster asking for memory ahead.
    void add_probe(const A* x, index_t n, const T* source) {
        const index_t full = n - n % W;
        P p0 = probe_, p1 = O::set1(A(0));
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            prefetch_ahead(source + i, 2 * W);
            const P v0 = O::loadu(x + i), v1 = O::loadu(x + i + W);
            p0 = O::add(p0, O::sub(v0, v0));  // 0 unless v holds a NaN or an Inf
            p1 = O::add(p1, O::sub(v1, v1));
        }
        for (; i < full; i += W) {
            const P v = O::loadu(x + i);
            p0 = O::add(p0, O::sub(v, v));
        }
        probe_ = O::add(p0, p1);
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

        // Two accumulators: a maximum waits on the one before it. The maximum passes over NaN.
        P max0 = O::set1(neg_inf), max1 = max0;
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            max0 = O::max(max0, O::loadu(x + i));
            max1 = O::max(max1, O::loadu(x + i + W));
        }
        for (; i < full; i += W) max0 = O::max(max0, O::loadu(x + i));
        const P v_tail = O::load(tail);
        const A m = O::reduce_max(O::max(O::max(max0, max1), v_tail));
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

        const P zero = O::set1(A(0));
        P s0 = zero, s1 = zero, d0 = zero, d1 = zero;
        P lowest0 = lowest_, lowest1 = lowest_;
        for (i = 0; i + 2 * W <= full; i += 2 * W) {
            prefetch_ahead(source + i, 2 * W);
            const P v0 = O::loadu(x + i), v1 = O::loadu(x + i + W);
            lowest0 = O::min(lowest0, v0);
            lowest1 = O::min(lowest1, v1);
            const P e0 = exp_shifted_(v0), e1 = exp_shifted_(v1);
            s0 = O::add(s0, e0);
            s1 = O::add(s1, e1);
            if constexpr (doubled) {
                d0 = O::add(d0, O::mul(e0, e0));
                d1 = O::add(d1, O::mul(e1, e1));
            }
        }
        for (; i < full; i += W) {
            const P v = O::loadu(x + i);
            lowest0 = O::min(lowest0, v);
            const P e = exp_shifted_(v);
            s0 = O::add(s0, e);
            if constexpr (doubled) d0 = O::add(d0, O::mul(e, e));
        }
        lowest_ = O::min(lowest0, lowest1);
        if (rest > 0) {
            for (index_t k = 0; k < rest; ++k) lowest_tail_ = std::min(lowest_tail_, tail[k]);
            // Padding lanes are zeroed rather than left to exp(−∞).
            O::store(tail, exp_shifted_(v_tail));
            for (index_t k = rest; k < W; ++k) tail[k] = A(0);
            const P e = O::load(tail);
            s1 = O::add(s1, e);
            if constexpr (doubled) d1 = O::add(d1, O::mul(e, e));
        }
        sum_ += static_cast<double>(O::reduce_add(O::add(s0, s1)));
        if constexpr (doubled) sum_doubled_ += static_cast<double>(O::reduce_add(O::add(d0, d1)));
    }

    // A block whose maximum is −∞ holds only −∞ and NaN: −∞ adds nothing to the sums (even before
    // any finite value), NaN must still reach them. Rare, so scalar.
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
    P probe_ = O::set1(A(0));  // Σ (x − x) of the finiteness scan: 0 unless a NaN or ±∞ was read
    A probe_tail_ = 0;
    std::uint16_t non_finite_bits_ = 0;  // of the scan of 16-bit rows, which reads their bits
    P lowest_ = O::set1(A(0));  // of the log-sum-exp sweep: −∞ shows as −∞ (NaN and +∞ reach the sum)
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
    using O = ops<A>;
    using P = typename O::vec;
    constexpr index_t W = O::width;

    const index_t label = c.label;
    // The label's entry in double from the logit itself, as the oracle computes it.
    const G at_label = narrow<G>(c.alpha - c.beta * std::exp(widen<double>(row[label]) - c.lse));

    // lse split in two: x − hi − lo keeps the exponent's argument accurate to float epsilon
    // even when lse itself is large.
    const A hi = static_cast<A>(c.lse);
    const A lo = static_cast<A>(c.lse - static_cast<double>(hi));
    // A 16-bit output keeps 8 (bf16) or 11 (fp16) significant bits, so the log-sum-exp terms'
    // exponential (a few float ulps, exp(−lo) folded into the factor) cannot show in it; only float
    // and double outputs need fast_exp's ≤ 1 ulp.
    constexpr bool narrow_output = sizeof(G) == 2;
    const shifted_exp<A> exp_shifted(hi);
    const P factor = O::set1(static_cast<A>(-c.beta * std::exp(-static_cast<double>(lo))));
    const P p_hi = O::set1(hi), p_lo = O::set1(lo);
    const P minus_beta = O::set1(static_cast<A>(-c.beta));
    auto gradient = [&](P v) {
        if constexpr (narrow_output)
            return O::mul(factor, exp_shifted(v));
        else
            return O::mul(minus_beta, fast_exp<A>(O::sub(O::sub(v, p_hi), p_lo)));
    };

    alignas(64) A buffer[block_size];
    alignas(64) A values[block_size + W];
    alignas(64) G narrowed[std::is_same_v<G, A> ? 1 : block_size];
    for (index_t start = 0; start < vocab; start += block_size) {
        const index_t n = std::min(block_size, vocab - start);
        const A* x = load_block(row + start, n, buffer);
        const index_t full = n - n % W;
        index_t i = 0;
        for (; i + 2 * W <= full; i += 2 * W) {
            // As in the log-sum-exp sweep (docs/design.md: the gradient pass asks for memory ahead).
            prefetch_ahead(row + start + i, 2 * W);
            O::store(values + i, gradient(O::loadu(x + i)));
            O::store(values + i + W, gradient(O::loadu(x + i + W)));
        }
        for (; i < full; i += W) O::store(values + i, gradient(O::loadu(x + i)));
        if (full < n) {
            alignas(64) A tail[W];
            for (index_t k = 0; k < W; ++k) tail[k] = full + k < n ? x[full + k] : A(0);
            O::store(values + full, gradient(O::load(tail)));
        }
        G* block_out;
        if constexpr (std::is_same_v<G, A>) {
            block_out = values;
        } else {
            if (n == block_size)
                narrow_block(values, block_size, narrowed);
            else
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

/// f(i) for i in [begin, end): the loop of the backend's for_each, compiled for this level so that
/// the element functions the compiler inlines into it are too (the fused lm_head's epilogues:
/// bias, logit transform and its derivative, bias gradient).
template <class F>
void for_range(index_t begin, index_t end, F& f) {
    for (index_t i = begin; i < end; ++i) f(i);
}

// --- The diffusion noise generator: Philox4x32-10 and Box–Muller for many consecutive blocks at
// once (docs/formulas.md#reproducible-noise). The integer rounds run over structure-of-arrays lanes
// the compiler turns into vector multiplies (a fixed count, so at -O2 too); the integer stream is
// bit-identical to math::philox4x32_10. The float formulas are those of
// math::philox_stream::normals operation for operation, with this file's own log, sin and cos
// (within a few ulps of libm's, which docs/formulas.md#reproducible-noise allows). Each block's
// normals depend only on its index: the result is the same for any thread count.

/// The raw outputs x[k][lane] of blocks first … first + philox_lanes − 1.
inline void philox_blocks(const math::philox_stream& rng, std::uint64_t first, std::uint32_t (&x)[4][philox_lanes]) {
    constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
    constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
    std::uint32_t c0[philox_lanes], c1[philox_lanes], c2[philox_lanes], c3[philox_lanes];
    for (int l = 0; l < philox_lanes; ++l) {
        const std::uint64_t b = first + static_cast<std::uint64_t>(l);
        c0[l] = static_cast<std::uint32_t>(b);
        c1[l] = static_cast<std::uint32_t>(b >> 32);
        c2[l] = static_cast<std::uint32_t>(rng.stream);
        c3[l] = static_cast<std::uint32_t>(rng.stream >> 32);
    }
    std::uint32_t k0 = static_cast<std::uint32_t>(rng.seed), k1 = static_cast<std::uint32_t>(rng.seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += w0;
            k1 += w1;
        }
        for (int l = 0; l < philox_lanes; ++l) {
            const std::uint64_t p0 = static_cast<std::uint64_t>(m0) * c0[l];
            const std::uint64_t p1 = static_cast<std::uint64_t>(m1) * c2[l];
            const std::uint32_t n0 = static_cast<std::uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
            const std::uint32_t n1 = static_cast<std::uint32_t>(p1);
            const std::uint32_t n2 = static_cast<std::uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
            const std::uint32_t n3 = static_cast<std::uint32_t>(p0);
            c0[l] = n0;
            c1[l] = n1;
            c2[l] = n2;
            c3[l] = n3;
        }
    }
    for (int l = 0; l < philox_lanes; ++l) {
        x[0][l] = c0[l];
        x[1][l] = c1[l];
        x[2][l] = c2[l];
        x[3][l] = c3[l];
    }
}

/// log(u) for normal u > 0 (the uniforms are in (0, 1]): u = 2^e·m with m ∈ [√½, √2), and
/// log m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172, by its series to s^9 (the next term is
/// below 2^−28 of the sum).
TPO_FORCE_INLINE f32::vec log_of(f32::vec u) {
    using O = f32;
    const O::ivec b = O::bits(u);
    const O::ivec exponent = O::isub(O::shift_right<23>(b), O::iset1(127));
    O::vec m = O::from_bits(O::ior(O::iand(b, O::iset1(0x007fffff)), O::iset1(0x3f800000)));  // [1, 2)
    O::vec e = O::to_float(exponent);
    const O::vec big = O::set1(1.41421356f);
    e = O::select_greater(m, big, O::add(e, O::set1(1.0f)), e);
    m = O::select_greater(m, big, O::mul(m, O::set1(0.5f)), m);
    const O::vec s = O::div(O::sub(m, O::set1(1.0f)), O::add(m, O::set1(1.0f)));
    const O::vec s2 = O::mul(s, s);
    static constexpr float series[] = {2.0f / 9.0f, 2.0f / 7.0f, 2.0f / 5.0f, 2.0f / 3.0f, 2.0f};
    const O::vec log_m = O::mul(s, horner<O>(s2, series));
    // ln 2 in two parts: e·hi is exact (|e| < 2^8, hi has 16 significant bits).
    return O::fmadd(e, O::set1(0x1.62e4p-1f), O::fmadd(e, O::set1(0x1.7f7d1cp-20f), log_m));
}

/// sin and cos of an angle in [0, 2π]: k = round(angle / (π/2)), r = angle − k·π/2 with π/2 in
/// three parts (exact for these k), Taylor polynomials on |r| ≤ π/4 (remainders below 2^−28 of
/// the value), then the quadrant's swap and signs.
TPO_FORCE_INLINE void sin_cos_of(f32::vec angle, f32::vec& sine, f32::vec& cosine) {
    using O = f32;
    const O::vec k = O::round(O::mul(angle, O::set1(0.636619772f)));  // 2/π
    O::vec r = O::fnmadd(k, O::set1(1.5703125f), angle);
    r = O::fnmadd(k, O::set1(4.837512969970703125e-4f), r);
    r = O::fnmadd(k, O::set1(7.54978995489188216e-8f), r);
    const O::vec r2 = O::mul(r, r);
    // 1/k! with alternating signs.
    static constexpr float sin_odd[] = {1.0f / 362880.0f, -1.0f / 5040.0f, 1.0f / 120.0f, -1.0f / 6.0f, 1.0f};
    static constexpr float cos_even[] = {-1.0f / 3628800.0f, 1.0f / 40320.0f, -1.0f / 720.0f, 1.0f / 24.0f, -0.5f,
                                         1.0f};
    const O::vec s = O::mul(r, horner<O>(r2, sin_odd));
    const O::vec c = horner<O>(r2, cos_even);
    const O::ivec q = O::to_int(k);
    const O::ivec swap = O::iand(q, O::iset1(1));
    const O::ivec sin_sign = O::shift_left<30>(O::iand(q, O::iset1(2)));
    const O::ivec cos_sign = O::shift_left<30>(O::iand(O::iadd(q, O::iset1(1)), O::iset1(2)));
    sine = O::from_bits(O::ixor(O::bits(O::select_nonzero(swap, c, s)), sin_sign));
    cosine = O::from_bits(O::ixor(O::bits(O::select_nonzero(swap, s, c)), cos_sign));
}

/// The four normals of each block first … first + count − 1, block-major: out[4·(b − first) + k].
inline void philox_normals(const math::philox_stream& rng, std::uint64_t first, index_t count, float* out) {
    using O = f32;
    constexpr index_t W = O::width;
    static_assert(philox_lanes % W == 0);
    constexpr float two_pi = 6.2831853071795865f;  // as math::philox_stream::normals

    for (index_t base = 0; base < count; base += philox_lanes) {
        std::uint32_t x[4][philox_lanes];
        philox_blocks(rng, first + static_cast<std::uint64_t>(base), x);
        alignas(64) float u[4][philox_lanes];
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < philox_lanes; ++l) u[k][l] = math::uniform_open_closed(x[k][l]);
        alignas(64) float n[4][philox_lanes];
        for (int pair = 0; pair < 2; ++pair)
            for (index_t l = 0; l < philox_lanes; l += W) {
                const O::vec radius = O::sqrt(O::mul(O::set1(-2.0f), log_of(O::load(u[2 * pair] + l))));
                const O::vec angle = O::mul(O::set1(two_pi), O::load(u[2 * pair + 1] + l));
                O::vec sine, cosine;
                sin_cos_of(angle, sine, cosine);
                O::store(n[2 * pair] + l, O::mul(radius, sine));
                O::store(n[2 * pair + 1] + l, O::mul(radius, cosine));
            }
        const index_t lanes = std::min<index_t>(philox_lanes, count - base);
        for (index_t l = 0; l < lanes; ++l)
            for (int k = 0; k < 4; ++k) out[4 * (base + l) + k] = n[k][l];
    }
}

/// dst[i] = src[i] rounded to bf16 (to nearest even, NaN kept quiet): the float operand of a
/// product that takes bf16 operands only (cpu/matmul.hpp, matmul_onednn_bf16).
inline void narrow_array(const float* src, index_t n, bfloat16* dst) { narrow_block(src, n, dst); }

// --- For the tests of each level's pieces (tests/test_cpu_threads.cpp): the same code as the
// kernels', callable from code compiled for any target.

inline void widen_array(const bfloat16* src, index_t n, float* dst) { widen_block(src, n, dst); }
inline void widen_array(const float16* src, index_t n, float* dst) { widen_block(src, n, dst); }

/// y[i] = fast_exp(x[i]), or exp(x[i] − m) by shifted_exp(m) when `shift` is set.
inline void exp_array(const float* x, index_t n, float* y, bool shift = false, float m = 0.0f) {
    using O = f32;
    const shifted_exp<float> exp_shifted(m);
    alignas(64) float in[O::width], out[O::width];
    for (index_t i = 0; i < n; i += O::width) {
        for (index_t k = 0; k < O::width; ++k) in[k] = i + k < n ? x[i + k] : 0.0f;
        const O::vec v = O::load(in);
        O::store(out, shift ? exp_shifted(v) : fast_exp<float>(v));
        for (index_t k = 0; k < O::width && i + k < n; ++k) y[i + k] = out[k];
    }
}

// --- The fused head's float products (cpu/tiles_f32.hpp): one tile of C (+)= op(A)·op(B).

/// C's register block at this level: two vectors of columns per row, and as many rows as leave
/// registers for two vectors of B and a broadcast (16 accumulators of 32 registers with AVX-512,
/// 12 of 16 with AVX2).
inline constexpr index_t tile_block_rows = f32::width >= 16 ? 8 : 6;
inline constexpr index_t tile_block_cols = 2 * f32::width;
inline constexpr bool tile_wide = f32::width >= 16;  // 32 registers: outlined block, prefetched operands

/// C (rows × cols of one register block, row stride ldc) (+)= A·B over kc values of k. A is a
/// [k][tile_block_rows] panel (`Packed`) or tile_block_rows rows read in place with row stride lda;
/// B is a [k][tile_block_cols] panel. `fresh`: C is written without being read.
template <bool Packed>
TPO_FORCE_INLINE void tile_block(index_t kc, const float* a, index_t lda, const float* b, float* c, index_t ldc,
                                 index_t rows, index_t cols, bool fresh) {
    using O = f32;
    constexpr int R = static_cast<int>(tile_block_rows);
    constexpr index_t W = O::width;
    typename O::vec left[R], right[R];
    TPO_CPU_UNROLL
    for (int r = 0; r < R; ++r) left[r] = right[r] = O::set1(0.0f);
    const auto address = [](const float* x) { return reinterpret_cast<std::uintptr_t>(x); };
    for (index_t p = 0; p < kc; ++p) {
        if constexpr (tile_wide) {
            // Eight iterations ahead for B; A's rows in turn, two lines ahead of where they are read.
            prefetch_line_l1(address(b) + static_cast<std::uintptr_t>((p + 8) * 2 * W) * sizeof(float));
            prefetch_line_l1(address(b) + static_cast<std::uintptr_t>((p + 8) * 2 * W + W) * sizeof(float));
            if constexpr (Packed)
                prefetch_line_l1(address(a) + static_cast<std::uintptr_t>((p + 16) * R) * sizeof(float));
            else if (const index_t r = p & 7; r < R)
                prefetch_line_l1(address(a) + static_cast<std::uintptr_t>(r * lda + p + 32) * sizeof(float));
        }
        const typename O::vec b0 = O::load(b + p * 2 * W), b1 = O::load(b + p * 2 * W + W);
        TPO_CPU_UNROLL
        for (int r = 0; r < R; ++r) {
            const typename O::vec x = O::set1(Packed ? a[p * R + r] : a[r * lda + p]);
            left[r] = O::fmadd(x, b0, left[r]);
            right[r] = O::fmadd(x, b1, right[r]);
        }
    }
    alignas(64) float edge[2 * W];
    TPO_CPU_UNROLL
    for (int r = 0; r < R; ++r) {
        if (r >= rows) break;
        float* row = c + r * ldc;
        if (cols == 2 * W) {
            if (!fresh) {
                left[r] = O::add(O::loadu(row), left[r]);
                right[r] = O::add(O::loadu(row + W), right[r]);
            }
            O::storeu(row, left[r]);
            O::storeu(row + W, right[r]);
        } else {
            O::store(edge, left[r]);
            O::store(edge + W, right[r]);
            for (index_t j = 0; j < cols; ++j) row[j] = fresh ? edge[j] : row[j] + edge[j];
        }
    }
}

/// tile_block where the level has 32 vector registers, as a call of its own: inlined into its caller,
/// GCC keeps one of the sixteen accumulators on the stack, so that every k step waits on a store
/// and a reload (docs/design.md).
template <bool Packed>
#if defined(__GNUC__)
__attribute__((noinline))
#endif
void tile_block_call(index_t kc, const float* a, index_t lda, const float* b, float* c, index_t ldc, index_t rows,
                     index_t cols, bool fresh) {
    tile_block<Packed>(kc, a, lda, b, c, ldc, rows, cols, fresh);
}

/// The level's register block: a call of its own with 32 registers, inline with 16.
template <bool Packed>
TPO_FORCE_INLINE void tile_block_run(index_t kc, const float* a, index_t lda, const float* b, float* c, index_t ldc,
                                     index_t rows, index_t cols, bool fresh) {
    if constexpr (tile_wide)
        tile_block_call<Packed>(kc, a, lda, b, c, ldc, rows, cols, fresh);
    else
        tile_block<Packed>(kc, a, lda, b, c, ldc, rows, cols, fresh);
}

/// op(B)[p0.., j0..] (kc × cols) into [⌈cols / tile_block_cols⌉][kc][tile_block_cols] panels,
/// zeros past cols.
inline void tile_pack_b(bool trans, const float* b, index_t ldb, index_t p0, index_t j0, index_t kc, index_t cols,
                        float* panels) {
    constexpr index_t N = tile_block_cols;
    for (index_t jp = 0; jp < cols; jp += N) {
        float* dst = panels + (jp / N) * kc * N;
        const index_t width = std::min(N, cols - jp);
        if (!trans) {
            using O = f32;
            for (index_t p = 0; p < kc; ++p) {
                const float* src = b + (p0 + p) * ldb + j0 + jp;
                float* out = dst + p * N;
                if (width == N) {
                    O::store(out, O::loadu(src));
                    O::store(out + O::width, O::loadu(src + O::width));
                } else {
                    for (index_t j = 0; j < width; ++j) out[j] = src[j];
                    for (index_t j = width; j < N; ++j) out[j] = 0.0f;
                }
            }
            continue;
        }
        // Column j of op(B) is row j of the stored B: a full panel gathers a vector of columns at
        // a time; otherwise eight values of k from each of the panel's rows at a time, so the lines
        // written stay in L1.
        if (width == N && ldb <= index_t{INT_MAX} / N) {
            using O = f32;
            const float* first = b + (j0 + jp) * ldb + p0;
            for (index_t p = 0; p < kc; ++p) {
                O::store(dst + p * N, O::gather(first + p, ldb));
                O::store(dst + p * N + O::width, O::gather(first + O::width * ldb + p, ldb));
            }
            continue;
        }
        for (index_t q = 0; q < kc; q += 8) {
            const index_t end = std::min(kc, q + 8);
            for (index_t j = 0; j < N; ++j) {
                if (j < width) {
                    const float* src = b + (j0 + jp + j) * ldb + p0;
                    for (index_t p = q; p < end; ++p) dst[p * N + j] = src[p];
                } else {
                    for (index_t p = q; p < end; ++p) dst[p * N + j] = 0.0f;
                }
            }
        }
    }
}

/// Rows i0.. (at most tile_block_rows) of op(A) over k in [p0, p0 + kc) into a
/// [kc][tile_block_rows] panel, zeros past `rows`.
inline void tile_pack_a(bool trans, const float* a, index_t lda, index_t i0, index_t p0, index_t rows, index_t kc,
                        float* panel) {
    constexpr index_t R = tile_block_rows;
    for (index_t p = 0; p < kc; ++p)
        for (index_t r = 0; r < R; ++r)
            panel[p * R + r] = r >= rows ? 0.0f : trans ? a[(p0 + p) * lda + i0 + r] : a[(i0 + r) * lda + p0 + p];
}

/// The first `rows` rows of op(A) that a tile's register blocks read where A stores them: the
/// whole row panels of an A stored by rows; the others come from the scratch (f32_pack_a).
inline index_t f32_rows_in_place(bool trans_a, index_t rows) {
    return trans_a ? 0 : rows / tile_block_rows * tile_block_rows;
}

/// Rows [i0, i0 + rows) of op(A) over the k block [p0, p0 + kc) into the scratch's row panels
/// where A is not read in place (a transposed A, and the rows past the last whole panel).
inline void f32_pack_a(bool trans_a, const float* a, index_t lda, index_t i0, index_t rows, index_t p0, index_t kc,
                       f32_scratch& scratch) {
    constexpr index_t R = tile_block_rows;
    float* panels = scratch.a.data();
    index_t packed = f32_rows_in_place(trans_a, rows);
    if (trans_a && R == 8) {
        // op(A)'s rows are columns of the stored A: read each stored row once, in order, and deal
        // its values out to the row panels, instead of 8 values of every stored row per panel.
        packed = rows / R * R;
        for (index_t p = 0; p < kc; ++p) {
            const float* src = a + (p0 + p) * lda + i0;
            for (index_t i = 0; i < packed; i += R) std::memcpy(panels + i * kc + p * R, src + i, R * sizeof(float));
        }
    }
    for (index_t i = packed; i < rows; i += R)
        tile_pack_a(trans_a, a, lda, i0 + i, p0, std::min(R, rows - i), kc, panels + i * kc);
}

/// One tile of C (rows × cols ≤ f32_block × f32_block, op(A) row i0) (+)= op(A)·op(B) over the k
/// block [p0, p0 + kc), from B's panels and A's (f32_pack_a) in the scratch; `fresh`: C starts
/// from zero instead of its values.
inline void f32_multiply(bool trans_a, const float* a, index_t lda, index_t i0, index_t rows, index_t cols, index_t p0,
                         index_t kc, f32_target out, bool fresh, f32_scratch& scratch) {
    constexpr index_t R = tile_block_rows, N = tile_block_cols;
    const index_t in_place = f32_rows_in_place(trans_a, rows);
    for (index_t jp = 0; jp < cols; jp += N) {
        const float* panel = scratch.b.data() + (jp / N) * kc * N;
        const index_t width = std::min(N, cols - jp);
        for (index_t i = 0; i < rows; i += R) {
            float* c = out.c + i * out.ldc + jp;
            if (i < in_place)
                tile_block_run<false>(kc, a + (i0 + i) * lda + p0, lda, panel, c, out.ldc, R, width, fresh);
            else
                tile_block_run<true>(kc, scratch.a.data() + i * kc, 0, panel, c, out.ldc, rows - i, width, fresh);
        }
    }
}

/// The stored block of op(M)[r0.., c0..] (r × c; rows c0.. and columns r0.. of M for op(M) = Mᵀ)
/// as floats: M in place where it stores floats, else the block widened into `buffer` with the
/// row stride of its own width. Returns where op(M)[r0, c0] is stored and the row stride, so that
/// the float packers read the block as they read M with the offsets (r0, c0) set to zero.
template <class T>
TPO_FORCE_INLINE std::pair<const float*, index_t> f32_block_of(bool trans, const T* m, index_t ld, index_t r0,
                                                              index_t c0, index_t r, index_t c,
                                                              scratch_vector<float>& buffer) {
    const index_t rows = trans ? c : r, cols = trans ? r : c;
    const T* first = m + (trans ? c0 * ld + r0 : r0 * ld + c0);
    if constexpr (std::is_same_v<T, float>) {
        return {first, ld};
    } else {
        if (buffer.size() < static_cast<std::size_t>(f32_block * f32_depth))
            buffer.resize(static_cast<std::size_t>(f32_block * f32_depth));
        // Pieces of a constant length, which the compiler vectorises at -O2 too (widen_block).
        constexpr index_t piece = f32_block;
        for (index_t i = 0; i < rows; ++i) {
            const T* src = first + i * ld;
            float* dst = buffer.data() + i * cols;
            index_t j = 0;
            for (; j + piece <= cols; j += piece) widen_block(src + j, piece, dst + j);
            widen_block(src + j, cols - j, dst + j);
        }
        return {buffer.data(), cols};
    }
}

/// One task of the float product C (m×n) (+)= op(A)·op(B): the tiles (f32_block × f32_block) of
/// one row of tiles (`by_rows`) or one column, over k in [k0, k0 + span). For each k block of
/// f32_depth the operand the line shares is packed once (A for a row, B for a column) and the
/// other once per tile. out(ti, tj) says where tile (ti, tj) goes; `fresh`: it starts from zero.
/// 16-bit operands (X or Y bf16 or fp16) are widened block by block first (f32_block_of), so the
/// products are those of the widened values, summed in the same order as floats.
template <class X, class Y, class Out>
void f32_line(bool by_rows, bool trans_a, bool trans_b, index_t line, index_t m, index_t n, index_t k0, index_t span,
              const X* a, index_t lda, const Y* b, index_t ldb, bool fresh, const Out& out, f32_scratch& scratch) {
    constexpr index_t T = f32_block;
    static_assert(f32_block % tile_block_cols == 0 && f32_scratch::a_rows >= f32_block + tile_block_rows,
                  "a tile's panels fit the scratch");
    const index_t tiles_m = (m + T - 1) / T, tiles_n = (n + T - 1) / T;
    const index_t count = by_rows ? tiles_n : tiles_m;
    const auto rows_of = [&](index_t ti) { return std::min(T, m - ti * T); };
    const auto cols_of = [&](index_t tj) { return std::min(T, n - tj * T); };
    if (span <= 0) {
        if (!fresh) return;
        for (index_t t = 0; t < count; ++t) {
            const index_t ti = by_rows ? line : t, tj = by_rows ? t : line;
            const f32_target target = out(ti, tj);
            for (index_t i = 0; i < rows_of(ti); ++i)
                std::fill(target.c + i * target.ldc, target.c + i * target.ldc + cols_of(tj), 0.0f);
        }
        return;
    }
    // op(A)'s tile ti and op(B)'s tile tj over the k block: where each is read as floats.
    const auto a_block = [&](index_t ti, index_t p0, index_t kc) {
        return f32_block_of(trans_a, a, lda, ti * T, p0, rows_of(ti), kc, scratch.wide_a);
    };
    const auto b_block = [&](index_t tj, index_t p0, index_t kc) {
        return f32_block_of(trans_b, b, ldb, p0, tj * T, kc, cols_of(tj), scratch.wide_b);
    };
    for (index_t p0 = k0; p0 < k0 + span; p0 += f32_depth) {
        const index_t kc = std::min(f32_depth, k0 + span - p0);
        const bool first = fresh && p0 == k0;
        if (by_rows) {
            const auto [fa, ld_a] = a_block(line, p0, kc);
            f32_pack_a(trans_a, fa, ld_a, 0, rows_of(line), 0, kc, scratch);
            for (index_t tj = 0; tj < tiles_n; ++tj) {
                const auto [fb, ld_b] = b_block(tj, p0, kc);
                tile_pack_b(trans_b, fb, ld_b, 0, 0, kc, cols_of(tj), scratch.b.data());
                f32_multiply(trans_a, fa, ld_a, 0, rows_of(line), cols_of(tj), 0, kc, out(line, tj), first, scratch);
            }
        } else {
            const auto [fb, ld_b] = b_block(line, p0, kc);
            tile_pack_b(trans_b, fb, ld_b, 0, 0, kc, cols_of(line), scratch.b.data());
            for (index_t ti = 0; ti < tiles_m; ++ti) {
                const auto [fa, ld_a] = a_block(ti, p0, kc);
                f32_pack_a(trans_a, fa, ld_a, 0, rows_of(ti), 0, kc, scratch);
                f32_multiply(trans_a, fa, ld_a, 0, rows_of(ti), cols_of(line), 0, kc, out(ti, line), first, scratch);
            }
        }
    }
}
