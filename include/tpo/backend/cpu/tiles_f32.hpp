#pragma once
// The fused head's float products at the avx512 level: one tile of C (at most 256×256) +=
// op(A)·op(B) over a k span, in 512-bit registers whatever flags the translation unit was built
// with. Eigen's product takes its vector width from those flags, so a consumer built for a
// baseline ISA would multiply in SSE2: the fp32 fused step took 3.9× as long as with
// -march=native (docs/performance.md).
//
// A block of 8 rows × 32 columns of C lives in 16 registers while k runs: per k, two vectors of B
// and eight broadcasts of A feed sixteen fused multiply-adds. k goes in blocks of 256. For each
// block, B is copied into panels of 32 columns ([k][32], zeros past the tile's columns) that stay
// in L1 while the 8-row panels of A pass over them; A is read in place where it is stored by rows,
// and copied into [k][8] panels where it is stored transposed (the head's gradient, Gᵀ·H) or the
// panel runs past the tile's rows. Each value of C is a sum in a fixed order of k that depends on
// the tile alone, so results are bit-identical for any thread count, as the rest of
// cpu/matmul.hpp. Compiled by per-function target attributes, like cpu/amx.hpp, so translation
// units built with any flags share one definition.

#include <algorithm>
#include <climits>

#include "tpo/backend/cpu/level.hpp"
#include "tpo/backend/cpu/scratch.hpp"
#include "tpo/core/config.hpp"
#include "tpo/core/views.hpp"

#if TPO_CPU_DISPATCH
#  define TPO_CPU_TILES_F32 1
#  include <immintrin.h>
#else
#  define TPO_CPU_TILES_F32 0
#endif

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

inline constexpr index_t f32_block = 256;  // the largest m and n of one tile
inline constexpr index_t f32_rows = 8;     // rows of C per register block
inline constexpr index_t f32_cols = 32;    // columns of C per register block (two vectors)
inline constexpr index_t f32_depth = 256;  // k block

/// One thread's packed operands: up to 256 rows of A and 256 columns of B for one k block.
struct f32_scratch {
    scratch_vector<float> a = scratch_vector<float>(static_cast<std::size_t>(f32_block * f32_depth));
    scratch_vector<float> b = scratch_vector<float>(static_cast<std::size_t>(f32_block * f32_depth));
};

#if TPO_CPU_TILES_F32
TPO_CPU_INTRINSICS_BEGIN
#  define TPO_F32_TARGET __attribute__((target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")))
// The register block's loops over its 8 rows must be unrolled, or the 16 accumulators live in
// memory: GCC unrolls them at -O3 on its own, not at -O2.
#  if defined(__clang__)
#    define TPO_F32_UNROLL _Pragma("clang loop unroll(full)")
#  else
#    define TPO_F32_UNROLL _Pragma("GCC unroll 8")
#  endif

TPO_F32_TARGET inline __mmask16 f32_mask(index_t valid) {
    return valid >= 16 ? __mmask16(0xFFFF) : valid <= 0 ? __mmask16(0) : __mmask16((1u << valid) - 1);
}

/// C (rows × cols of an 8 × 32 block, row stride ldc) (+)= A·B over kc values of k. A is an
/// [k][8] panel (`packed`) or 8 rows read in place with row stride lda; B is a [k][32] panel.
/// `fresh`: C is written without being read.
template <bool Packed>
TPO_F32_TARGET inline void f32_block_product(index_t kc, const float* a, index_t lda, const float* b, float* c,
                                             index_t ldc, index_t rows, index_t cols, bool fresh) {
    constexpr int r_max = static_cast<int>(f32_rows);
    __m512 left[r_max], right[r_max];
    TPO_F32_UNROLL
    for (int r = 0; r < r_max; ++r) left[r] = right[r] = _mm512_setzero_ps();
    for (index_t p = 0; p < kc; ++p) {
        const __m512 b0 = _mm512_load_ps(b + p * f32_cols), b1 = _mm512_load_ps(b + p * f32_cols + 16);
        TPO_F32_UNROLL
        for (int r = 0; r < r_max; ++r) {
            const __m512 x = _mm512_set1_ps(Packed ? a[p * f32_rows + r] : a[r * lda + p]);
            left[r] = _mm512_fmadd_ps(x, b0, left[r]);
            right[r] = _mm512_fmadd_ps(x, b1, right[r]);
        }
    }
    const __mmask16 m0 = f32_mask(cols), m1 = f32_mask(cols - 16);
    TPO_F32_UNROLL
    for (int r = 0; r < r_max; ++r) {
        if (r >= rows) break;
        float* row = c + r * ldc;
        if (!fresh) {
            left[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), left[r]);
            right[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), right[r]);
        }
        _mm512_mask_storeu_ps(row, m0, left[r]);
        _mm512_mask_storeu_ps(row + 16, m1, right[r]);
    }
}

/// op(B)[p0.., j0..] (kc × cols) into [cols/32][kc][32] panels, zeros past cols.
TPO_F32_TARGET inline void f32_pack_b(bool trans, const float* b, index_t ldb, index_t p0, index_t j0, index_t kc,
                                      index_t cols, float* panels) {
    for (index_t jp = 0; jp < cols; jp += f32_cols) {
        float* dst = panels + (jp / f32_cols) * kc * f32_cols;
        const index_t width = std::min(f32_cols, cols - jp);
        if (!trans) {
            const __mmask16 m0 = f32_mask(width), m1 = f32_mask(width - 16);
            for (index_t p = 0; p < kc; ++p) {
                const float* src = b + (p0 + p) * ldb + j0 + jp;
                _mm512_store_ps(dst + p * f32_cols, _mm512_maskz_loadu_ps(m0, src));
                _mm512_store_ps(dst + p * f32_cols + 16, _mm512_maskz_loadu_ps(m1, src + 16));
            }
        } else if (width == f32_cols && ldb <= INT_MAX / static_cast<index_t>(f32_cols)) {
            // Column j of op(B) is row j of the stored B: sixteen rows per gather.
            const __m512i rows = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(static_cast<int>(ldb)));
            const float* first = b + (j0 + jp) * ldb + p0;
            for (index_t p = 0; p < kc; ++p) {
                _mm512_store_ps(dst + p * f32_cols, _mm512_i32gather_ps(rows, first + p, 4));
                _mm512_store_ps(dst + p * f32_cols + 16, _mm512_i32gather_ps(rows, first + 16 * ldb + p, 4));
            }
        } else {
            for (index_t j = 0; j < f32_cols; ++j) {
                const float* src = b + (j0 + jp + j) * ldb + p0;
                for (index_t p = 0; p < kc; ++p) dst[p * f32_cols + j] = j < width ? src[p] : 0.0f;
            }
        }
    }
}

/// Rows i0.. (at most 8) of op(A) over k in [p0, p0 + kc) into an [kc][8] panel, zeros past `rows`.
TPO_F32_TARGET inline void f32_pack_a(bool trans, const float* a, index_t lda, index_t i0, index_t p0, index_t rows,
                                      index_t kc, float* panel) {
    for (index_t p = 0; p < kc; ++p)
        for (index_t r = 0; r < f32_rows; ++r)
            panel[p * f32_rows + r] =
                r >= rows ? 0.0f : trans ? a[(p0 + p) * lda + i0 + r] : a[(i0 + r) * lda + p0 + p];
}

/// C (rows × cols ≤ 256 × 256, row stride ldc: the tile at op(A) row i0, op(B) column j0) (+)=
/// op(A)·op(B) over k in [k0, k0 + span); `fresh`: C starts from zero instead of its values.
TPO_F32_TARGET inline void f32_tile(bool trans_a, bool trans_b, index_t i0, index_t j0, index_t rows, index_t cols,
                                    index_t k0, index_t span, const float* a, index_t lda, const float* b,
                                    index_t ldb, float* c, index_t ldc, bool fresh, f32_scratch& scratch) {
    if (span <= 0) {
        if (fresh)
            for (index_t i = 0; i < rows; ++i) std::fill(c + i * ldc, c + i * ldc + cols, 0.0f);
        return;
    }
    const index_t full = trans_a ? 0 : rows / f32_rows * f32_rows;  // rows read in place
    for (index_t p0 = k0; p0 < k0 + span; p0 += f32_depth) {
        const index_t kc = std::min(f32_depth, k0 + span - p0);
        f32_pack_b(trans_b, b, ldb, p0, j0, kc, cols, scratch.b.data());
        for (index_t i = full; i < rows; i += f32_rows)
            f32_pack_a(trans_a, a, lda, i0 + i, p0, std::min(f32_rows, rows - i), kc, scratch.a.data() + i * kc);
        const bool first = fresh && p0 == k0;
        for (index_t jp = 0; jp < cols; jp += f32_cols) {
            const float* panel = scratch.b.data() + (jp / f32_cols) * kc * f32_cols;
            const index_t width = std::min(f32_cols, cols - jp);
            for (index_t i = 0; i < rows; i += f32_rows) {
                float* out = c + i * ldc + jp;
                if (i < full)
                    f32_block_product<false>(kc, a + (i0 + i) * lda + p0, lda, panel, out, ldc, f32_rows, width, first);
                else
                    f32_block_product<true>(kc, scratch.a.data() + i * kc, 0, panel, out, ldc, rows - i, width, first);
            }
        }
    }
}

#  undef TPO_F32_UNROLL
#  undef TPO_F32_TARGET
TPO_CPU_INTRINSICS_END
#endif  // TPO_CPU_TILES_F32

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
