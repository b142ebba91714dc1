#pragma once
// The CPU backend: the primitives of backend/concept.hpp with the backend's own vector kernels
// inside a row (cpu/kernels.hpp: SSE2, AVX2 or AVX-512, chosen at run time, cpu/level.hpp) and
// OpenMP across rows; for the fused lm_head's matrix products (cpu/matmul.hpp) Eigen, register
// blocks of its own for float, the AMX tile unit for a bf16 head's products where the CPU has
// one (cpu/amx.hpp), AVX512-BF16's dot products where it has those alone, and where the build
// links oneDNN (tpo::onednn) oneDNN's sgemm for float and its bf16 matmul in place of the dot
// products. Needs Eigen 3.4 and (for more than one thread) OpenMP.
//
// Rows are independent and each row is reduced in a fixed order (cpu/kernels.inl), so every
// result is bit-identical for any thread count at one level, and the policy and the reference
// logits go through the same code: identical logits give h = 0 exactly (docs/formulas.md#numerics).
// Scratch is O(S·L) row statistics, and for the fused lm_head path its chunks, kept between
// steps (cpu/scratch.hpp); the O(S·L·V) memory is the caller's inputs and gradients.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#  include <omp.h>
#endif

#include "tpo/backend/concept.hpp"
#include "tpo/backend/cpu/matmul.hpp"
#include "tpo/backend/cpu/kernels.hpp"
#include "tpo/backend/cpu/level.hpp"
#include "tpo/backend/cpu/scratch.hpp"
#include "tpo/core/error.hpp"
#include "tpo/reward/row_stats.hpp"

TPO_BEGIN_NAMESPACE
namespace corrupt {
template <class TIn, class TOut>
struct diffusion_noise_pass;
}  // namespace corrupt

namespace backend {

class cpu {
public:
    /// Blocks of 1 MiB or more come from the program's scratch pool (cpu/scratch.hpp), so the fused
    /// path's chunks are not mapped and faulted in every step. allocate() zeroes a buffer;
    /// allocate_for_overwrite() does not.
    template <class T>
    using buffer = cpu_detail::scratch_vector<T>;

    /// `threads` ≤ 0 takes OpenMP's default (omp_get_max_threads()); without OpenMP, one thread.
    /// The kernels' instruction-set level is default_cpu_level() (the CPU's best, or TPO_CPU_LEVEL).
    explicit cpu(int threads = 0) : threads_(resolve(threads)), level_(default_cpu_level()) {}

    /// With the kernels' level given: an error if this CPU (or build) lacks it.
    cpu(int threads, cpu_level level) : threads_(resolve(threads)), level_(level) {
        cpu_level_detail::require_supported(level);
    }

    /// With the products' form given too: an error if it is cpu_products::onednn and the build
    /// does not link oneDNN (tpo::onednn).
    cpu(int threads, cpu_level level, cpu_products products) : cpu(threads, level) {
        detail::require<value_error>(products != cpu_products::onednn || onednn_linked,
                                     "cpu backend: cpu_products::onednn asked, but this build does not link oneDNN "
                                     "(link the CMake target tpo::onednn)");
        products_ = products;
    }

    int threads() const { return threads_; }

    /// What runs the matrix products oneDNN could run (cpu/matmul.hpp, cpu_products): oneDNN when
    /// the build links it, unless the constructor said otherwise; the backend's own otherwise.
    cpu_products products() const { return products_; }

    /// The instruction-set level this backend's kernels run at.
    cpu_level level() const { return level_; }

    /// n zero-initialised T; a large buffer is zeroed by all the backend's threads.
    template <class T>
    buffer<T> allocate(index_t n) const {
        buffer<T> b(static_cast<std::size_t>(n));
        if constexpr (std::is_trivially_default_constructible_v<T> && std::is_trivially_copyable_v<T>) {
            // Pieces of 1 MiB (the last one shorter), in any order: the result is zeros.
            constexpr std::size_t piece = std::size_t(1) << 20;
            const std::size_t bytes = b.size() * sizeof(T), pieces = (bytes + piece - 1) / piece;
            auto* first = reinterpret_cast<unsigned char*>(b.data());
            [[maybe_unused]] const bool parallel = threads_ > 1 && pieces > 1;
#if defined(_OPENMP)
#  pragma omp parallel for num_threads(threads_) schedule(static) if (parallel)
#endif
            for (std::size_t i = 0; i < pieces; ++i)
                std::memset(first + i * piece, 0, std::min(piece, bytes - i * piece));
        } else {
            for (T& x : b) x = T{};
        }
        return b;
    }

    /// n T left as the pool hands them out, for scratch its caller writes in full before it
    /// reads it (the fused head's chunks).
    template <class T>
    buffer<T> allocate_for_overwrite(index_t n) const {
        return buffer<T>(static_cast<std::size_t>(n));
    }
    template <class T>
    T* raw(buffer<T>& b) const {
        return b.data();
    }
    template <class T>
    std::vector<T> to_host(const buffer<T>& b) const {
        return std::vector<T>(b.begin(), b.end());
    }

    template <class T>
    buffer<T> upload(const std::vector<T>& host) const {
        return buffer<T>(host.begin(), host.end());
    }

    /// Frees the large scratch blocks kept for the next step by every CPU backend object of the
    /// program (at most twice the most scratch that was alive at once); returns their bytes. Blocks
    /// in use are not touched. For a process that stops evaluating, or must give memory back.
    static std::size_t release_cached_scratch() noexcept { return cpu_detail::scratch().release(); }

    /// Bytes of the scratch blocks kept for reuse.
    static std::size_t cached_scratch_bytes() { return cpu_detail::scratch().kept_bytes(); }

    /// C (m×n) = op(A)·op(B) + beta·C (beta 0 or 1), A stored m×k (k×m when trans_a) with row
    /// stride lda, B likewise: cpu/matmul.hpp, bit-identical for any thread count.
    template <class X, class Y, class Acc>
    void matmul(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a, index_t lda, const Y* b,
                index_t ldb, Acc* c, index_t ldc, Acc beta) const {
        cpu_detail::matmul(threads_, level_, products_, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
    }

    /// Whether this backend's products of a T head multiply a float ∂L/∂u rounded to T once
    /// (oneDNN's bf16 matmul, cpu/matmul.hpp), so that the fused head writes ∂L/∂u in T itself.
    template <class T>
    bool rounds_gradient_to() const {
        return std::is_same_v<T, bfloat16> && cpu_detail::onednn_bf16_products(level_, products_);
    }

    /// The fused head's chunk of logits unless the caller sets a chunk size: 2^25 values (128 MiB
    /// of float), twice the library's default. Each chunk's products pack the head again and
    /// ∂L/∂W reads and writes its V×H accumulator once more, and a forward whose policies' rows
    /// fit in one chunk keeps both for the backward (docs/performance.md).
    static constexpr index_t fused_chunk_values() { return index_t{1} << 25; }

    /// The fused head's chunks hold at least this many rows unless the caller sets a chunk size,
    /// for the same reasons: at V = 152064, 2^25 values would be 220 rows, and 512 keep both
    /// policies of one 256-token pair (docs/performance.md). 512 rows of float logits at
    /// V = 152064 are 297 MiB.
    static constexpr index_t fused_chunk_rows_min() { return 512; }

    template <class F>
    void for_each(index_t n, F&& f) const {
        // Small passes (one index per pair) are not worth waking a team for. Indices go to the
        // level's loop (cpu/kernels.inl for_range) in runs, so the element function is compiled
        // for the level when the compiler inlines it.
        if (threads_ == 1 || n < 256) {
            cpu_detail::kernels::for_range(level_, 0, n, f);
            return;
        }
        const index_t runs = std::min<index_t>(n, 8 * static_cast<index_t>(threads_)), run = (n + runs - 1) / runs;
#if defined(_OPENMP)
#  pragma omp parallel for schedule(static) num_threads(threads_)
#endif
        for (index_t r = 0; r < runs; ++r)
            cpu_detail::kernels::for_range(level_, std::min(n, r * run), std::min(n, (r + 1) * run), f);
    }

    /// The diffusion noise pass (corrupt/diffusion.hpp), one index per block of four elements:
    /// the normals of many blocks are drawn at once in vector registers, then the pass's own
    /// per-element formula applies them.
    template <class TIn, class TOut>
    void for_each(index_t blocks, corrupt::diffusion_noise_pass<TIn, TOut> pass) const {
        constexpr index_t chunk = 1024;  // blocks per task: 16 KiB of normals on the stack
        const index_t chunks = (blocks + chunk - 1) / chunk;
        [[maybe_unused]] const bool parallel = threads_ > 1 && chunks > 1;
#if defined(_OPENMP)
#  pragma omp parallel for schedule(static) num_threads(threads_) if (parallel)
#endif
        for (index_t c = 0; c < chunks; ++c) {
            alignas(64) float normals[4 * chunk];
            const index_t first = c * chunk, count = std::min(chunk, blocks - first);
            cpu_detail::kernels::philox_normals(level_, pass.rng, static_cast<std::uint64_t>(first), count, normals);
            for (index_t b = 0; b < count; ++b) pass.apply(first + b, normals + 4 * b);
        }
    }

    template <class T, class I>
    void row_statistics(logits_view<const T> z, labels_view<const I> labels, row_alignment align,
                        row_reduction reduction, row_stats* out) const {
        const auto plan = rows::scored_rows<I>::of(labels, align, z.vocab);
        const index_t count = plan.count();
        [[maybe_unused]] const bool parallel = use_threads(count, reads_row(reduction) ? z.vocab : 1);
#if defined(_OPENMP)
#  pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (parallel)
#endif
        for (index_t r = 0; r < count; ++r) reduce(plan, r, z, reduction, out);
    }

    /// The statistics of two tensors of one shape (a model's clean and noisy logits) in one
    /// parallel pass over both, equal bit for bit to two row_statistics calls. Even-numbered threads
    /// take the first tensor's rows and odd-numbered ones the second's, a few rows per claim, and a
    /// thread whose tensor runs out helps with the other. The clean rows' log-sum-exp is bound by
    /// exponentials and the noisy rows' NaN/Inf scan by memory, so side by side they overlap
    /// (docs/design.md, docs/performance.md).
    template <class T, class U, class I>
    void row_statistics_pair(logits_view<const T> first, row_reduction first_reduction, row_stats* first_out,
                             logits_view<const U> second, row_reduction second_reduction, row_stats* second_out,
                             labels_view<const I> labels, row_alignment align) const {
        detail::require<shape_error>(first.sequences == second.sequences && first.length == second.length &&
                                         first.vocab == second.vocab,
                                     "row_statistics_pair: shapes ", shape_string(first), " and ", shape_string(second),
                                     " differ");
        const auto plan = rows::scored_rows<I>::of(labels, align, first.vocab);
        const index_t count = plan.count();
        const index_t work_per_row = (reads_row(first_reduction) ? first.vocab : 1) +
                                     (reads_row(second_reduction) ? second.vocab : 1);
        [[maybe_unused]] const bool parallel = use_threads(count, work_per_row);
        const index_t claim = count >= 8 * static_cast<index_t>(threads_) ? 4 : 1;
        std::atomic<index_t> next[2] = {0, 0};
        auto take = [&](int tensor) {
            for (index_t from; (from = next[tensor].fetch_add(claim, std::memory_order_relaxed)) < count;) {
                for (index_t r = from; r < std::min(count, from + claim); ++r) {
                    if (tensor == 0)
                        reduce(plan, r, first, first_reduction, first_out);
                    else
                        reduce(plan, r, second, second_reduction, second_out);
                }
            }
        };
#if defined(_OPENMP)
#  pragma omp parallel num_threads(threads_) if (parallel)
#endif
        {
            const int preferred = thread_number() % 2;
            take(preferred);
            take(1 - preferred);
        }
    }

    template <class T, class G>
    void row_gradient(logits_view<const T> z, const row_coefficients* coefficients, index_t scored,
                      logits_view<G> grad) const {
        const rows::gradient_rows plan{z.sequences, z.length, scored, coefficients};
        const index_t count = plan.count();
        // Stream only what cannot stay in the caches anyway; a small gradient is better left there.
        const bool stream = static_cast<std::size_t>(grad.size()) * sizeof(G) >= stream_threshold_bytes;
        [[maybe_unused]] const bool parallel = use_threads(count, z.vocab);
        // Dynamic, because unscored rows cost a write only; in chunks of 32 rows, because threads
        // alternating row by row were measurably slower than long contiguous runs.
#if defined(_OPENMP)
#  pragma omp parallel for schedule(dynamic, 32) num_threads(threads_) if (parallel)
#endif
        for (index_t r = 0; r < count; ++r) {
            const rows::gradient_row row = plan(r);
            G* out = grad.row(row.sequence, row.position);
            switch (row.kind) {
            case rows::gradient_row_kind::zero: cpu_detail::kernels::zero_row(level_, out, z.vocab, stream); break;
            case rows::gradient_row_kind::label_only:
                cpu_detail::kernels::label_only_row(level_, out, z.vocab, row.coefficients, stream);
                break;
            case rows::gradient_row_kind::softmax:
                cpu_detail::kernels::gradient_row(level_, z.row(row.sequence, row.position), z.vocab, row.coefficients, out, stream);
                break;
            }
            if (stream) cpu_detail::kernels::store_fence(level_);
        }
    }

private:
    /// Row r of the plan into out[r]: the plan settles rows that are not reduced.
    template <class T, class I>
    void reduce(const rows::scored_rows<I>& plan, index_t r, logits_view<const T> z, row_reduction reduction,
                row_stats* out) const {
        out[r] = rows::statistics_of(plan, z, r, reduction, [&](const T* row, std::int64_t label) {
            return cpu_detail::kernels::row_statistics_of(level_, reduction, row, z.vocab, label);
        });
    }

    static int thread_number() {
#if defined(_OPENMP)
        return omp_get_thread_num();
#else
        return 0;
#endif
    }

    static constexpr std::size_t stream_threshold_bytes = std::size_t{32} << 20;

    static int resolve(int threads) {
#if defined(_OPENMP)
        return threads > 0 ? threads : omp_get_max_threads();
#else
        detail::require<value_error>(threads <= 1, "cpu backend: ", threads,
                                     " threads requested, but this program was built without OpenMP");
        return 1;
#endif
    }

    bool use_threads(index_t rows, index_t vocab) const {
        return threads_ > 1 && rows > 1 && rows * vocab >= (index_t{1} << 16);
    }

    int threads_;
    cpu_level level_;
    cpu_products products_ = default_cpu_products;
};

static_assert(tensor_backend<cpu>);

}  // namespace backend
TPO_END_NAMESPACE
