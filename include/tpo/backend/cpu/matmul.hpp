#pragma once
// The CPU backend's matrix product for the fused lm_head: Eigen's, over a fixed tiling.
//
// C (m×n) = op(A)·op(B) + beta·C is cut into fixed tiles of C and fixed blocks of k; each tile is
// one task (threads take tiles) computed by Eigen on that thread alone, and inside a tile the k
// blocks are added in order. Nothing depends on the thread count, so every result is
// bit-identical for any number of threads. Operands already in the accumulation type are read in place (Eigen maps with strides);
// 16-bit operands are widened block by block into the task's own buffers, so no widened copy of a
// whole head ever exists.

#include <algorithm>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP)
#  include <omp.h>
#endif

#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

inline constexpr index_t tile_rows = 64;
inline constexpr index_t tile_cols = 256;
inline constexpr index_t tile_depth = 512;  // k block of 16-bit operands

template <class Acc>
using matrix_t = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Acc>
using map_t = Eigen::Map<const matrix_t<Acc>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Calls f with op(M)[rows r0.., cols c0..] (r × c) of a matrix M stored with row stride ld: a
/// map of M in place when M is stored in Acc (a transposed map for op(M) = Mᵀ, which Eigen's
/// product reads as it is), a block widened into `buffer` otherwise.
template <class Acc, class M, class F>
void with_block(const M* data, index_t ld, bool trans, index_t r0, index_t c0, index_t r, index_t c,
                matrix_t<Acc>& buffer, F&& f) {
    if constexpr (std::is_same_v<M, Acc>) {
        if (trans)
            f(map_t<Acc>(data + c0 * ld + r0, c, r, Eigen::OuterStride<>(ld)).transpose());
        else
            f(map_t<Acc>(data + r0 * ld + c0, r, c, Eigen::OuterStride<>(ld)));
    } else {
        buffer.resize(r, c);
        for (index_t i = 0; i < r; ++i)
            for (index_t j = 0; j < c; ++j)
                buffer(i, j) = widen<Acc>(trans ? data[(c0 + j) * ld + r0 + i] : data[(r0 + i) * ld + c0 + j]);
        f(buffer);
    }
}

/// See the file comment; beta is 0 or 1.
template <class X, class Y, class Acc>
void matmul(int threads, bool trans_a, bool trans_b, index_t m, index_t n, index_t k, const X* a, index_t lda,
            const Y* b, index_t ldb, Acc* c, index_t ldc, Acc beta) {
    const index_t tiles_m = (m + tile_rows - 1) / tile_rows, tiles_n = (n + tile_cols - 1) / tile_cols;
    const index_t tiles = tiles_m * tiles_n;
    const bool widened = !std::is_same_v<X, Acc> || !std::is_same_v<Y, Acc>;
    const index_t depth = widened ? tile_depth : std::max<index_t>(k, 1);
    [[maybe_unused]] const bool parallel = threads > 1 && tiles > 1;
#if defined(_OPENMP)
#  pragma omp parallel num_threads(threads) if (parallel)
#endif
    {
#if defined(_OPENMP)
        // Eigen would split a product over threads of its own when it runs outside a parallel
        // region, with a blocking that depends on their number; one thread per tile, always,
        // keeps every tile's summation order the same for any thread count.
        omp_set_num_threads(1);
#  pragma omp for schedule(dynamic, 1)
#endif
        for (index_t tile = 0; tile < tiles; ++tile) {
            const index_t i0 = (tile / tiles_n) * tile_rows, j0 = (tile % tiles_n) * tile_cols;
            const index_t rows = std::min(tile_rows, m - i0), cols = std::min(tile_cols, n - j0);
            Eigen::Map<matrix_t<Acc>, Eigen::Unaligned, Eigen::OuterStride<>> out(c + i0 * ldc + j0, rows, cols,
                                                                                   Eigen::OuterStride<>(ldc));
            if (beta == Acc(0)) out.setZero();
            matrix_t<Acc> a_buffer, b_buffer;
            for (index_t p0 = 0; p0 < k; p0 += depth) {
                const index_t d = std::min(depth, k - p0);
                with_block<Acc>(a, lda, trans_a, i0, p0, rows, d, a_buffer, [&](const auto& a_block) {
                    with_block<Acc>(b, ldb, trans_b, p0, j0, d, cols, b_buffer,
                                    [&](const auto& b_block) { out.noalias() += a_block * b_block; });
                });
            }
        }
    }
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
