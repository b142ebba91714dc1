#pragma once
// The CPU backend's matrix product for the fused lm_head: Eigen's, over a fixed tiling.
//
// C (m×n) = op(A)·op(B) + beta·C is cut into fixed 256×256 tiles of C. A product with few tiles
// and a long k (the hidden states' gradient: m = a chunk's rows, n = H, k = V) also cuts k into a
// few spans, computed into their own partial tiles and added afterwards in span order, so that
// more threads than tiles have work. Each task (tile, span) is computed by Eigen on one thread
// alone, and inside a task the k blocks are added in order. The tiling and the spans depend on
// (m, n, k) only, never on the thread count, so every result is bit-identical for any number of
// threads. Operands already in the accumulation type are read in place (Eigen maps with strides);
// 16-bit operands are widened block by block into the task's own buffers, so no widened copy of a
// whole head ever exists. The products of a bf16 head (the logits H·Wᵀ, and the backward's
// ∂L/∂u·W and ∂L/∂uᵀ·H with a float ∂L/∂u; float out) run on the AMX tile unit instead where the
// caller allows it and the CPU has it (cpu/amx.hpp), in the same tiles (matmul_bf16), and a bf16
// H·Wᵀ on AVX512-BF16's dot products where the CPU has those but no tile unit; the other
// products with a float C at the avx2 and avx512 levels (float operands, or 16-bit ones widened a
// block at a time) run in register blocks of our own (cpu/tiles_f32.hpp, matmul_f32), in the same
// tiles and spans. Where the build links oneDNN, float products go to oneDNN's sgemm on larger
// tiles of the same grid (matmul_onednn), and a bf16 head's products, where the CPU has
// AVX512-BF16 but no tile unit, to its bf16 matmul on those tiles (matmul_onednn_bf16).

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "tpo/backend/cpu/amx.hpp"
#include "tpo/backend/cpu/kernels.hpp"
#include "tpo/backend/cpu/level.hpp"
#include "tpo/backend/cpu/scratch.hpp"
#include "tpo/backend/cpu/tiles_f32.hpp"

#if defined(_OPENMP)
#  include <omp.h>
#endif
#if defined(TPO_CPU_ONEDNN)
#  include <oneapi/dnnl/dnnl.h>
#  include <oneapi/dnnl/dnnl.hpp>
#endif

#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/error.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend {

/// What runs the CPU backend's products where oneDNN could: its own (register blocks, AVX512-BF16
/// dot products, Eigen's product at the baseline level), or oneDNN (tpo::onednn, then the
/// default): its sgemm for float products, and its bf16 matmul for a bf16 head's products where
/// the CPU has AVX512-BF16 but no usable tile unit. oneDNN multiplies operands of one type, so
/// there the backward's ∂L/∂u is rounded to bf16 once, as a 16-bit trainer's backward does; the
/// backend's own products keep it in float (docs/design.md).
enum class cpu_products { own, onednn };

#if defined(TPO_CPU_ONEDNN)
inline constexpr bool onednn_linked = true;
#else
inline constexpr bool onednn_linked = false;
#endif
inline constexpr cpu_products default_cpu_products = onednn_linked ? cpu_products::onednn : cpu_products::own;

inline const char* to_string(cpu_products products) { return products == cpu_products::onednn ? "onednn" : "own"; }

}  // namespace backend

namespace backend::cpu_detail {

inline constexpr index_t tile_rows = 256;
inline constexpr index_t tile_cols = 256;
inline constexpr index_t tile_depth = 512;  // k block of 16-bit operands
// A product with fewer tiles than this splits k, into spans of at least split_depth_min.
inline constexpr index_t split_tasks = 16;
inline constexpr index_t split_depth_min = 2048;
static_assert(tile_rows <= amx_block && tile_cols <= amx_block, "an AMX call covers a whole tile");
static_assert(tile_rows == f32_block && tile_cols == f32_block, "f32_line cuts C into the same tiles");

/// How matmul cuts k: `spans` spans of `depth` (the last may be shorter). One span unless the
/// product has fewer tiles than `tasks` and a long k.
struct k_split {
    index_t spans = 1;
    index_t depth = 0;
};

inline k_split split_of(index_t tiles, index_t k, index_t tasks = split_tasks) {
    if (tiles >= tasks || k < 2 * split_depth_min) return {1, k};
    const index_t wanted = (tasks + tiles - 1) / tiles;
    const index_t spans = std::min(wanted, k / split_depth_min);
    const index_t depth = (k + spans - 1) / spans;
    return {(k + depth - 1) / depth, depth};
}

template <class Acc>
using matrix_t = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using map_t = Eigen::Map<const matrix_t<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// One tile of C: its first row and column, and its size.
struct tile_box {
    index_t i0, j0, rows, cols;
};

/// The tiles of C (m×n) and the partial tiles of a k split: span 0 of a tile goes straight into
/// C, span s ≥ 1 into a partial tile of its own, added to C afterwards in span order.
template <class Acc>
struct tile_grid {
    using tile_map = Eigen::Map<matrix_t<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

    index_t m, n, rows_per_tile, cols_per_tile, tiles_m, tiles_n, tiles;
    // A product with fewer tiles (or lines) than this cuts k (split_of).
    index_t tasks_min;
    k_split split{};
    // From the scratch pool: at a large k the partial tiles take megabytes, which the C library
    // would hand out as fresh pages on every call.
    scratch_vector<Acc> partials;

    tile_grid(index_t rows, index_t cols, index_t tile_m = tile_rows, index_t tile_n = tile_cols,
              index_t tasks = split_tasks)
        : m(rows), n(cols), rows_per_tile(tile_m), cols_per_tile(tile_n), tiles_m((rows + tile_m - 1) / tile_m),
          tiles_n((cols + tile_n - 1) / tile_n), tiles(tiles_m * tiles_n), tasks_min(tasks) {}

    /// Cuts k as split_of() does for `units` parallel units, with room for the spans' partial tiles.
    void split_k(index_t k, index_t units) {
        split = split_of(units, k, tasks_min);
        if (split.spans > 1) partials.resize(static_cast<std::size_t>(tiles * (split.spans - 1) * partial_size()));
    }

    /// The values of one partial tile: a whole tile, or all of C when C is smaller.
    index_t partial_size() const { return std::min(rows_per_tile, m) * std::min(cols_per_tile, n); }

    tile_box box(index_t tile) const {
        const index_t i0 = (tile / tiles_n) * rows_per_tile, j0 = (tile % tiles_n) * cols_per_tile;
        return {i0, j0, std::min(rows_per_tile, m - i0), std::min(cols_per_tile, n - j0)};
    }

    /// Span `span` (≥ 1) of `tile`, stored with row stride box(tile).cols.
    Acc* partial(index_t tile, index_t span) {
        return partials.data() + (tile * (split.spans - 1) + span - 1) * partial_size();
    }

    /// C += every tile's partial tiles, in span order: a work-sharing loop of the enclosing
    /// parallel region (and the plain loop outside one).
    void add_partials(Acc* c, index_t ldc) {
        if (split.spans <= 1) return;
#if defined(_OPENMP)
#  pragma omp for schedule(static)
#endif
        for (index_t tile = 0; tile < tiles; ++tile) {
            const tile_box t = box(tile);
            tile_map out(c + t.i0 * ldc + t.j0, t.rows, t.cols, Eigen::OuterStride<>(ldc));
            for (index_t span = 1; span < split.spans; ++span)
                out += tile_map(partial(tile, span), t.rows, t.cols, Eigen::OuterStride<>(t.cols));
        }
    }

    /// Runs f(task, scratch) for task in [0, tasks) on `threads` threads (a dynamic schedule),
    /// scratch being the calling thread's own Scratch, then adds the partial tiles.
    template <class Scratch, class F>
    void run_tasks(int threads, index_t tasks, Acc* c, index_t ldc, F&& f) {
        [[maybe_unused]] const bool parallel = threads > 1 && tasks > 1;
#if defined(_OPENMP)
#  pragma omp parallel num_threads(threads) if (parallel)
#endif
        {
#if defined(_OPENMP)
            // Eigen would split a product over threads of its own when it runs outside a parallel
            // region, with a blocking that depends on their number; one thread per task, always,
            // keeps every task's summation order the same for any thread count.
            omp_set_num_threads(1);
#endif
            Scratch scratch;
#if defined(_OPENMP)
#  pragma omp for schedule(dynamic, 1)
#endif
            for (index_t task = 0; task < tasks; ++task) f(task, scratch);
            add_partials(c, ldc);
        }
    }

    /// Where span `span` of tile (ti, tj) goes: the tile in C for span 0, else its partial tile
    /// (row stride box.cols).
    tile_target<Acc> target(index_t ti, index_t tj, index_t span, Acc* c, index_t ldc) {
        if (span == 0) return {c + ti * rows_per_tile * ldc + tj * cols_per_tile, ldc};
        const index_t tile = ti * tiles_n + tj;
        return {partial(tile, span), box(tile).cols};
    }

    /// C (+)= op(A)·op(B) a line of tiles at a time (the float and AMX forms): `lines` rows or
    /// columns of tiles, k cut for that many units, then f(line, span, k0, depth, scratch) for
    /// every (line, span) through run_tasks.
    template <class Scratch, class F>
    void for_each_line(int threads, index_t lines, index_t k, Acc* c, index_t ldc, F&& f) {
        split_k(k, lines);
        run_tasks<Scratch>(threads, lines * split.spans, c, ldc, [&](index_t task, Scratch& scratch) {
            const index_t line = task / split.spans, span = task % split.spans;
            const index_t k0 = span * split.depth;
            f(line, span, k0, std::min(split.depth, k - k0), scratch);
        });
    }

    /// C (+)= op(A)·op(B) task by task: cuts k for the tiles, then calls
    /// f(tile_box, k0, depth, out, ld, fresh, scratch) for every (tile, span) through run_tasks,
    /// where out is the tile in C (span 0, fresh when `overwrite`) or its partial tile (row stride
    /// box.cols, always fresh: written without being read).
    template <class Scratch, class F>
    void for_each_task(int threads, index_t k, Acc* c, index_t ldc, bool overwrite, F&& f) {
        for_each_line<Scratch>(threads, tiles, k, c, ldc,
                               [&](index_t tile, index_t span, index_t k0, index_t depth, Scratch& scratch) {
                                   const tile_target<Acc> out = target(tile / tiles_n, tile % tiles_n, span, c, ldc);
                                   f(box(tile), k0, depth, out.c, out.ldc, span > 0 || overwrite, scratch);
                               });
    }
};

/// Calls f with op(M)[rows r0.., cols c0..] (r × c) of a matrix M stored with row stride ld: a
/// map of M in place when M is stored in Acc, a block widened into `buffer` otherwise. Either way
/// the block keeps M's layout (for op(M) = Mᵀ, a transposed view, which Eigen's product reads as
/// it is), so the widening reads and writes memory in order and the compiler vectorises it.
template <class Acc, class M, class F>
void with_block(const M* data, index_t ld, bool trans, index_t r0, index_t c0, index_t r, index_t c,
                matrix_t<Acc>& buffer, F&& f) {
    // The block as M stores it: c × r from row c0, column r0 for op(M) = Mᵀ.
    const index_t rows = trans ? c : r, cols = trans ? r : c;
    const M* first = data + (trans ? c0 * ld + r0 : r0 * ld + c0);
    if constexpr (std::is_same_v<M, Acc>) {
        const map_t<Acc> block(first, rows, cols, Eigen::OuterStride<>(ld));
        if (trans)
            f(block.transpose());
        else
            f(block);
    } else {
        buffer.resize(rows, cols);
        for (index_t i = 0; i < rows; ++i) {
            const M* src = first + i * ld;
            Acc* dst = buffer.data() + i * cols;
            for (index_t j = 0; j < cols; ++j) dst[j] = widen<Acc>(src[j]);
        }
        if (trans)
            f(buffer.transpose());
        else
            f(buffer);
    }
}

/// C[tile] (+)= op(A)·op(B) over k in [k0, k0 + span), the k blocks added in order.
template <class Acc, class X, class Y, class Out>
void tile_product(bool trans_a, bool trans_b, index_t i0, index_t j0, index_t rows, index_t cols, index_t k0,
                  index_t span, const X* a, index_t lda, const Y* b, index_t ldb, Out& out) {
    const bool widened = !std::is_same_v<X, Acc> || !std::is_same_v<Y, Acc>;
    const index_t depth = widened ? tile_depth : std::max<index_t>(span, 1);
    matrix_t<Acc> a_buffer, b_buffer;
    for (index_t p0 = k0; p0 < k0 + span; p0 += depth) {
        const index_t d = std::min(depth, k0 + span - p0);
        with_block<Acc>(a, lda, trans_a, i0, p0, rows, d, a_buffer, [&](const auto& a_block) {
            with_block<Acc>(b, ldb, trans_b, p0, j0, d, cols, b_buffer,
                            [&](const auto& b_block) { out.noalias() += a_block * b_block; });
        });
    }
}

/// The packed bf16 form of matmul (cpu/amx.hpp), on the tile unit or AVX512-BF16's vectors: the
/// same tiles and partial sums, but a task is a row or a column of tiles and one k span, so that
/// the operand that is dearer to pack is packed once per 512-deep k block for all the task's
/// tiles: a float A (rounded into two parts) for a row, else B for a column. The k split counts
/// tasks, not tiles. A tile starts from zeros in registers unless it adds to C.
template <class X>
void matmul_bf16(int threads, bf16_unit unit, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a,
                 index_t lda, const bfloat16* b, index_t ldb, float* c, index_t ldc, float beta) {
    constexpr bool by_rows = std::is_same_v<X, float>;
    tile_grid<float> grid(m, n);
    const index_t tiles_m = grid.tiles_m, tiles_n = grid.tiles_n, lines = by_rows ? tiles_m : tiles_n;
    grid.for_each_line<amx_scratch>(threads, lines, k, c, ldc, [&](index_t line, index_t span, index_t k0, index_t depth,
                                                                   amx_scratch& scratch) {
        const index_t end = k0 + depth;
        for (index_t p0 = k0; p0 < end; p0 += amx_depth) {
            const index_t d = std::min(amx_depth, end - p0);
            const bool fresh = p0 == k0 && (span > 0 || beta == 0.0f);
            auto pack_a = [&](index_t ti) {
                const index_t i0 = ti * tile_rows;
                amx_pack_a(std::min(tile_rows, m - i0), d, trans_a ? a + p0 * lda + i0 : a + i0 * lda + p0, lda,
                           trans_a, scratch);
            };
            auto pack_b = [&](index_t tj) {
                const index_t j0 = tj * tile_cols;
                amx_pack_b(std::min(tile_cols, n - j0), d, trans_b ? b + j0 * ldb + p0 : b + p0 * ldb + j0, ldb,
                           trans_b, scratch);
            };
            auto multiply = [&](index_t ti, index_t tj) {
                const tile_target<float> out = grid.target(ti, tj, span, c, ldc);
                amx_product(out.c, out.ldc, fresh, scratch, unit);
            };
            if (by_rows) {
                pack_a(line);
                for (index_t tj = 0; tj < tiles_n; ++tj) {
                    pack_b(tj);
                    multiply(line, tj);
                }
            } else {
                pack_b(line);
                for (index_t ti = 0; ti < tiles_m; ++ti) {
                    pack_a(ti);
                    multiply(ti, line);
                }
            }
        }
    });
}

#if defined(TPO_CPU_ONEDNN)
/// The float form through oneDNN's sgemm, where the build links oneDNN (CMake target tpo::onednn,
/// which defines TPO_CPU_ONEDNN): its kernels are faster than matmul_f32's register blocks on the
/// fused head's shapes (docs/design.md). The threads and the summation order stay the backend's:
/// C is cut into fixed onednn_tile × onednn_tile tiles, and k into spans when there are fewer
/// than onednn_tasks tiles (∂L/∂h: one tile, k = V), by the same grid as the other forms; each task
/// is one sgemm call on one thread (run_tasks limits oneDNN, an OpenMP program, to the calling
/// thread), and the partial tiles are added in span order. Large tiles keep the calls few, so the
/// operand all tiles of a row share (the chunk's rows) is packed a few times per product.
inline constexpr index_t onednn_tile = 2048;
inline constexpr index_t onednn_tasks = 8;

/// C (m×n) (+)= products on onednn_tile × onednn_tile tiles of C and the k spans of the grid:
/// call(tile_box, k0, depth, out, ld, fresh, scratch) → dnnl_status_t for every (tile, span) with
/// depth > 0, on `threads` threads (scratch being the thread's own Scratch); a tile with an empty
/// k is zeroed where it is fresh. An error naming `what` if a call failed.
template <class Scratch, class F>
void onednn_products(int threads, index_t m, index_t n, index_t k, float* c, index_t ldc, float beta, const char* what,
                  F&& call) {
    tile_grid<float> grid(m, n, onednn_tile, onednn_tile, onednn_tasks);
    // Set by a task that failed; each task must finish inside the parallel region, so the error
    // is raised after it.
    std::atomic<int> failed{static_cast<int>(dnnl_success)};
    grid.for_each_task<Scratch>(
        threads, k, c, ldc, beta == 0.0f,
        [&](const tile_box& t, index_t k0, index_t depth, float* out, index_t ld, bool fresh, Scratch& scratch) {
            if (depth == 0) {  // C = beta·C, and oneDNN is not asked what an empty k gives
                for (index_t i = 0; fresh && i < t.rows; ++i) std::fill(out + i * ld, out + i * ld + t.cols, 0.0f);
                return;
            }
            const dnnl_status_t status = call(t, k0, depth, out, ld, fresh, scratch);
            if (status != dnnl_success) failed.store(static_cast<int>(status));
        });
    const int status = failed.load();
    detail::require<error>(status == static_cast<int>(dnnl_success), "oneDNN ", what, " of a ", m, "×", n, "×", k,
                           " product failed with status ", status);
}

/// C (m×n) = op(A)·op(B) + beta·C in float through oneDNN's sgemm; beta is 0 or 1.
inline void matmul_onednn(int threads, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const float* a,
                          index_t lda, const float* b, index_t ldb, float* c, index_t ldc, float beta) {
    struct no_scratch {};
    onednn_products<no_scratch>(
        threads, m, n, k, c, ldc, beta, "sgemm",
        [&](const tile_box& t, index_t k0, index_t depth, float* out, index_t ld, bool fresh, no_scratch&) {
            const float* a_block = trans_a ? a + k0 * lda + t.i0 : a + t.i0 * lda + k0;
            const float* b_block = trans_b ? b + t.j0 * ldb + k0 : b + k0 * ldb + t.j0;
            return dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', t.rows, t.cols, depth, 1.0f, a_block, lda,
                              b_block, ldb, fresh ? 0.0f : 1.0f, out, ld);
        });
}

/// C (m×n, row stride ldc) = op(A)·op(B), plus C when `accumulate`, on the calling thread through
/// oneDNN's matmul primitive: bf16 operands stored by rows with strides lda and ldb (op = the
/// transpose when trans_*), float C. Each call describes its shape again: oneDNN's primitive
/// cache returns the compiled kernel of a shape it has seen, at a cost far below a tile's product.
inline dnnl_status_t onednn_bf16_product(bool trans_a, bool trans_b, index_t m, index_t n, index_t k,
                                         const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float* c,
                                         index_t ldc, bool accumulate) noexcept {
    using md = dnnl::memory::desc;
    using dims = dnnl::memory::dims;
    try {
        static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
        const md a_md(dims{m, k}, dnnl::memory::data_type::bf16, trans_a ? dims{1, lda} : dims{lda, 1});
        const md b_md(dims{k, n}, dnnl::memory::data_type::bf16, trans_b ? dims{1, ldb} : dims{ldb, 1});
        const md c_md(dims{m, n}, dnnl::memory::data_type::f32, dims{ldc, 1});
        dnnl::primitive_attr attr;
        if (accumulate) {
            dnnl::post_ops ops;
            ops.append_sum(1.0f);
            attr.set_post_ops(ops);
        }
#  if DNNL_VERSION_MAJOR >= 3
        const dnnl::matmul::primitive_desc pd(engine, a_md, b_md, c_md, attr);
#  else
        const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), attr, engine);
#  endif
        dnnl::stream stream(engine);
        dnnl::memory a_mem(a_md, engine, const_cast<bfloat16*>(a)), b_mem(b_md, engine, const_cast<bfloat16*>(b)),
            c_mem(c_md, engine, c);
        dnnl::matmul(pd).execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
        stream.wait();
        return dnnl_success;
    } catch (const dnnl::error& e) {
        return e.status;
    } catch (...) {
        return dnnl_runtime_error;
    }
}

/// The bf16 form through oneDNN's matmul primitive, where the build links oneDNN and the CPU has
/// AVX512-BF16 but no usable tile unit: bf16 B (the head, or a chunk's gathered states) and a bf16
/// or float A. A float A (∂L/∂u) is rounded to bf16 first, a task's block at a time into its own
/// scratch, as a 16-bit trainer's backward and the CUDA path's cuBLAS products do (oneDNN, like
/// cuBLAS, multiplies operands of one type). The grid, the threads and the summation order are
/// matmul_onednn's: one call per (tile, span) on one thread, partial tiles added in span order.
template <class X>
void matmul_onednn_bf16(int threads, cpu_level level, bool trans_a, bool trans_b, index_t m, index_t n, index_t k,
                        const X* a, index_t lda, const bfloat16* b, index_t ldb, float* c, index_t ldc,
                        float beta) {
    struct rounded {
        scratch_vector<bfloat16> a;
    };
    onednn_products<rounded>(
        threads, m, n, k, c, ldc, beta, "bf16 matmul",
        [&](const tile_box& t, index_t k0, index_t depth, float* out, index_t ld, bool fresh, rounded& scratch) {
            const X* a_block = trans_a ? a + k0 * lda + t.i0 : a + t.i0 * lda + k0;
            const bfloat16* a16 = nullptr;
            index_t ld16 = lda;
            if constexpr (std::is_same_v<X, bfloat16>) {
                a16 = a_block;
            } else {
                // The block as A stores it: depth rows of t.rows values for op(A) = Aᵀ.
                const index_t rows = trans_a ? depth : t.rows, cols = trans_a ? t.rows : depth;
                scratch.a.resize(static_cast<std::size_t>(rows * cols));
                for (index_t r = 0; r < rows; ++r)
                    kernels::narrow_values(level, a_block + r * lda, cols, scratch.a.data() + r * cols);
                a16 = scratch.a.data();
                ld16 = cols;
            }
            const bfloat16* b_block = trans_b ? b + t.j0 * ldb + k0 : b + k0 * ldb + t.j0;
            return onednn_bf16_product(trans_a, trans_b, t.rows, t.cols, depth, a16, ld16, b_block, ldb, out, ld,
                                       !fresh);
        });
}

#endif

#if TPO_CPU_DISPATCH
/// The float form at the avx2 and avx512 levels (cpu/tiles_f32.hpp): the same tiles, spans and
/// partial tiles as Eigen's form below, but, as in matmul_bf16, a task is a line of tiles and one k
/// span, so that the operand the line shares is packed once per k block for all its tiles. A
/// transposed A (the head's gradient, Gᵀ·h: m = V) is copied out of the stored rows of G, the
/// dearer operand, so its tasks are rows of tiles; otherwise A is read where it is stored and a
/// task is a column of tiles, packing B (the head, in the logits product and in ∂L/∂u·W) once for all
/// of the chunk's rows. 16-bit operands (a bf16 or fp16 head and states where no tile unit takes
/// them) are widened a block at a time into the task's scratch before packing, so they run at the
/// float form's speed with exact products of the widened values.
template <class X, class Y>
void matmul_f32(int threads, cpu_level level, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a,
                index_t lda, const Y* b, index_t ldb, float* c, index_t ldc, float beta) {
    const bool by_rows = trans_a;
    tile_grid<float> grid(m, n);
    grid.for_each_line<f32_scratch>(
        threads, by_rows ? grid.tiles_m : grid.tiles_n, k, c, ldc,
        [&](index_t line, index_t span, index_t k0, index_t depth, f32_scratch& scratch) {
            const auto out = [&](index_t ti, index_t tj) { return grid.target(ti, tj, span, c, ldc); };
            kernels::f32_line(level, by_rows, trans_a, trans_b, line, m, n, k0, depth, a, lda, b, ldb,
                              span > 0 || beta == 0.0f, out, scratch);
        });
}
#endif

/// The operand types the float form takes (widening the 16-bit ones).
template <class T>
inline constexpr bool f32_operand =
    std::is_same_v<T, float> || std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>;

/// Whether matmul's products with a bf16 B (a bf16 head, or a chunk's bf16 states) and a float C
/// run at `level` with `products` through oneDNN's bf16 matmul (matmul_onednn_bf16), which rounds
/// a float A (∂L/∂u) to bf16 once: where the build links oneDNN, `products` is onednn, and the CPU
/// has AVX512-BF16 but no usable tile unit.
inline bool onednn_bf16_products([[maybe_unused]] cpu_level level, [[maybe_unused]] cpu_products products) {
#if defined(TPO_CPU_ONEDNN)
    return products == cpu_products::onednn && level == cpu_level::avx512 && !amx_bf16_usable() &&
           bf16_vectors_usable();
#else
    return false;
#endif
}

/// See the file comment; beta is 0 or 1. Float products go to oneDNN when `products` says so
/// (matmul_onednn, whatever the level). At the avx512 level, products with a bf16 B and a bf16
/// (by rows) or float A run on the AMX tile unit where the CPU and the system allow it, and those
/// with two bf16 operands on AVX512-BF16's dot products where the CPU has no tile unit; at the
/// avx2 and avx512 levels the other products with a float C (float, bf16 or fp16 operands) run in
/// the level's registers (matmul_f32) whatever the translation unit's flags.
template <class X, class Y, class Acc>
void matmul(int threads, cpu_level level, cpu_products products, bool trans_a, bool trans_b, index_t m, index_t n,
            index_t k, const X* a, index_t lda, const Y* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
#if defined(TPO_CPU_ONEDNN)
    if constexpr (std::is_same_v<X, float> && std::is_same_v<Y, float> && std::is_same_v<Acc, float>) {
        if (products == cpu_products::onednn) {
            matmul_onednn(threads, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
            return;
        }
    }
#else
    (void)products;
#endif
    if constexpr (std::is_same_v<Y, bfloat16> && std::is_same_v<Acc, float> &&
                  (std::is_same_v<X, bfloat16> || std::is_same_v<X, float>)) {
        if (level == cpu_level::avx512) {
            const bool tiles = amx_bf16_usable();
            if (tiles && (std::is_same_v<X, float> || !trans_a)) {
                matmul_bf16(threads, bf16_unit::tiles, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
                return;
            }
#if defined(TPO_CPU_ONEDNN)
            if (onednn_bf16_products(level, products)) {
                matmul_onednn_bf16(threads, level, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
                return;
            }
#endif
            // A float A stays with the float form: as two bf16 parts on the vectors it would cost
            // as much, for 16 significant bits instead of 24.
            if (!tiles && std::is_same_v<X, bfloat16> && !trans_a && bf16_vectors_usable()) {
                matmul_bf16(threads, bf16_unit::vectors, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
                return;
            }
        }
    }
#if TPO_CPU_DISPATCH
    if constexpr (std::is_same_v<Acc, float> && f32_operand<X> && f32_operand<Y>) {
        if (level != cpu_level::baseline) {
            matmul_f32(threads, level, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, beta);
            return;
        }
    }
#endif
    struct no_scratch {};
    tile_grid<Acc>(m, n).template for_each_task<no_scratch>(
        threads, k, c, ldc, beta == Acc(0),
        [&](const tile_box& t, index_t k0, index_t depth, Acc* out, index_t ld, bool fresh, no_scratch&) {
            typename tile_grid<Acc>::tile_map tile(out, t.rows, t.cols, Eigen::OuterStride<>(ld));
            if (fresh) tile.setZero();
            tile_product<Acc>(trans_a, trans_b, t.i0, t.j0, t.rows, t.cols, k0, depth, a, lda, b, ldb, tile);
        });
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
