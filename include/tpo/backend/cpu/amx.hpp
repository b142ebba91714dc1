#pragma once
// The fused head's bf16 products on packed panels, multiplied by the AMX tile unit where the CPU
// has AMX-BF16 and the operating system lets the process use it (Linux: one arch_prctl request
// for the tile data, made once), or by AVX512-BF16's dot products in vector registers where the
// CPU has those but no tile unit.
//
// One call computes a block C (m×n, float, m and n ≤ 256) += op(A)·op(B) over a k block (≤ 512)
// with a bf16 B: the logits H·Wᵀ (A bf16), and the backward's ∂L/∂u·W and ∂L/∂uᵀ·H, whose A is
// float. A is copied into rows padded to 32 values, B into the tile unit's pair-interleaved
// layout (16 columns × 2 values of k per 64-byte row); the edges are padded with zeros. A float A
// enters as two bf16 operands, its rounding to bf16 and the rounding of the rest, both against the
// same packed B: each value keeps 16 significant bits (within 2^-18 relative), where rounding it
// to bf16 once, as a 16-bit trainer's backward does, keeps 8. Both units multiply bf16 exactly
// and add in float (subnormal inputs and results count as zero, far below any value that
// matters), in a fixed order of k per block of C, so a block's result depends on nothing but its
// operands: bit-identical for any thread count, as the rest of cpu/matmul.hpp (the two units'
// orders differ, so their last bits do). The vector form holds 8 rows × 32 columns of C in 16
// registers; per pair of k values it broadcasts each row's pair of A against the two column
// groups' 16 pairs of B (vdpbf16ps: 32 products per instruction, twice a float fused
// multiply-add's). Compiled for the units by per-function target attributes, like the level
// kernels, so translation units built with any flags share one definition.

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tpo/backend/cpu/level.hpp"
#include "tpo/backend/cpu/scratch.hpp"
#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"
#include "tpo/core/views.hpp"

#if TPO_CPU_DISPATCH && defined(__linux__)
#  define TPO_CPU_AMX 1
#  include <immintrin.h>
#  include <sys/syscall.h>
#  include <unistd.h>
#else
#  define TPO_CPU_AMX 0
#endif

TPO_BEGIN_NAMESPACE
namespace backend::cpu_detail {

/// Whether the bf16 tile products can run: AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and
/// 22), the tile state enabled by the operating system (XCR0 bits 17 and 18) and the process's
/// permission to use it (asked for once; Linux 5.16 or later).
inline bool amx_bf16_usable() {
#if TPO_CPU_AMX
    static const bool usable = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
        if (((d >> 22) & 1u) == 0 || ((d >> 24) & 1u) == 0) return false;
        if (__get_cpuid_count(7, 1, &a, &b, &c, &d) == 0 || ((a >> 5) & 1u) == 0) return false;  // AVX512-BF16
        if (__get_cpuid(1, &a, &b, &c, &d) == 0 || ((c >> 27) & 1u) == 0) return false;  // OSXSAVE
        unsigned lo = 0, hi = 0;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & (3u << 17)) != (3u << 17)) return false;
        constexpr long request_permission = 0x1023, tile_data = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        return syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
    }();
    return usable;
#else
    return false;
#endif
}

/// Whether AVX512-BF16's dot products can multiply the packed panels: the CPU has them (the
/// operating system's consent to the wide registers is the avx512 level's own condition).
inline bool bf16_vectors_usable() { return TPO_CPU_AMX && cpu_level_detail::cpu_has_bf16(); }

/// What multiplies the packed panels (amx_product).
enum class bf16_unit { tiles, vectors };

inline constexpr index_t amx_block = 256;  // the largest m and n of one call
inline constexpr index_t amx_depth = 512;  // the largest k of one call

/// One thread's packed operands: A as up to 256 padded rows (twice for a float A: its high and
/// low bf16 parts), B interleaved, with the shapes they were packed for. Not zeroed: a packing
/// writes every value the tile unit reads, the padding included.
struct amx_scratch {
    // 64-byte aligned (scratch_allocator), so that no 64-byte tile row straddles two cache lines,
    // and kept by the pool between calls.
    scratch_vector<std::uint16_t> a = scratch_vector<std::uint16_t>(static_cast<std::size_t>(2 * amx_block * amx_depth));
    scratch_vector<std::uint32_t> b = scratch_vector<std::uint32_t>(static_cast<std::size_t>(amx_block * amx_depth / 2));
    index_t m = 0, n = 0, k = 0;  // op(A) m×k as packed in a, op(B) k×n in b
    bool split = false;           // a holds a float A's two parts
};

#if TPO_CPU_AMX
TPO_CPU_INTRINSICS_BEGIN
#  define TPO_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#  define TPO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

struct alignas(64) amx_config {
    std::uint8_t palette = 1;
    std::uint8_t start_row = 0;
    std::uint8_t reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {};
    std::uint8_t rows[16] = {};
};

/// A's rows as the tile unit reads them: mp rows of kp values, zeros past m and k.
TPO_BF16_TARGET inline void amx_pack_a(index_t m, index_t k, index_t mp, index_t kp, const bfloat16* a, index_t lda,
                                      std::uint16_t* panel) {
    static_assert(sizeof(bfloat16) == 2);
    for (index_t i = 0; i < mp; ++i) {
        std::uint16_t* dst = panel + i * kp;
        const index_t valid = i < m ? k : 0;
        if (valid) std::memcpy(dst, a + i * lda, static_cast<std::size_t>(k) * 2);
        std::memset(dst + valid, 0, static_cast<std::size_t>(kp - valid) * 2);
    }
}

/// Rounds 32 floats (x0: the first 16) to bf16 `high` and the rest, x − high (exact in float),
/// to bf16 `low`: high + low is x within 2^-18·|x|, where bf16 alone is within 2^-9·|x|.
TPO_BF16_TARGET inline void amx_split(__m512 x0, __m512 x1, std::uint16_t* high, std::uint16_t* low) {
    const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
    const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
    const __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    _mm512_storeu_si512(high, h);
    _mm512_storeu_si512(low, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0)));
}

/// A float A (m×k, or stored k×m when `trans`) as two panels of the tile unit's rows: its high
/// bf16 parts and the bf16 rounding of the rest.
TPO_BF16_TARGET inline void amx_pack_a(index_t m, index_t k, index_t mp, index_t kp, const float* a, index_t lda,
                                      bool trans, std::uint16_t* high, std::uint16_t* low) {
    auto mask = [&](index_t p) {
        return p >= k ? __mmask16(0) : k - p >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - p)) - 1);
    };
    for (index_t i = m; i < mp; ++i) {
        std::memset(high + i * kp, 0, static_cast<std::size_t>(kp) * 2);
        std::memset(low + i * kp, 0, static_cast<std::size_t>(kp) * 2);
    }
    if (!trans) {
        for (index_t i = 0; i < m; ++i)
            for (index_t p = 0; p < kp; p += 32) {
                const float* src = a + i * lda + p;
                amx_split(_mm512_maskz_loadu_ps(mask(p), src), _mm512_maskz_loadu_ps(mask(p + 16), src + 16),
                          high + i * kp + p, low + i * kp + p);
            }
        return;
    }
    // Column i of the stored rows p.., 16 rows per gather; 32 rows at a time keep the lines they
    // touch (32 rows × 256 columns) in L1 while i moves along them.
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(lda)));
    for (index_t p = 0; p < kp; p += 32) {
        const __mmask16 m0 = mask(p), m1 = mask(p + 16);
        for (index_t i = 0; i < m; ++i) {
            const float* column = a + p * lda + i;
            const __m512 x0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, rows, column, 4);
            const __m512 x1 = m1 ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, rows, column + 16 * lda, 4)
                                 : _mm512_setzero_ps();
            amx_split(x0, x1, high + i * kp + p, low + i * kp + p);
        }
    }
}

/// B in the tile unit's pair-interleaved layout: group g holds B's columns 16g..; its row p is
/// the 16 pairs (B[2p][j], B[2p+1][j]) of op(B) (k×n). B is stored n×k when `trans`, k×n
/// otherwise; zeros past n and k.
TPO_BF16_TARGET inline void amx_pack_b(index_t n, index_t k, index_t np, index_t kp, const bfloat16* b, index_t ldb,
                                      bool trans, std::uint32_t* packed) {
    const index_t groups = np / 16, pairs = kp / 2;
    if (!trans) {
        // Stored k×n: a group's row p interleaves 16 values of stored rows 2p and 2p + 1.
        for (index_t p = 0; p < pairs; ++p) {
            const bfloat16* even = 2 * p < k ? b + 2 * p * ldb : nullptr;
            const bfloat16* odd = 2 * p + 1 < k ? b + (2 * p + 1) * ldb : nullptr;
            for (index_t g = 0; g < groups; ++g) {
                const index_t first = g * 16;
                const __mmask16 cols = first >= n ? __mmask16(0) : n - first >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - first)) - 1);
                const __m256i lo = even ? _mm256_maskz_loadu_epi16(cols, even + first) : _mm256_setzero_si256();
                const __m256i hi = odd ? _mm256_maskz_loadu_epi16(cols, odd + first) : _mm256_setzero_si256();
                _mm512_storeu_si512(packed + (g * pairs + p) * 16,
                                    _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16)));
            }
        }
        return;
    }
    // Stored n×k: a group's row p is one 32-bit pair from each of 16 stored rows, gathered when
    // the rows keep pairs 4-byte aligned relative to each other (even ldb).
    for (index_t g = 0; g < groups; ++g) {
        std::uint32_t* dst = packed + g * pairs * 16;
        const index_t first = g * 16;
        if (first + 16 <= n && k % 2 == 0 && ldb % 2 == 0) {
            const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                    _mm512_set1_epi32(static_cast<int>(ldb / 2)));
            const int* base = reinterpret_cast<const int*>(b + first * ldb);
            for (index_t p = 0; p < k / 2; ++p)
                _mm512_storeu_si512(dst + p * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), __mmask16(0xFFFF), rows, base + p, 4));
            for (index_t p = k / 2; p < pairs; ++p) std::memset(dst + p * 16, 0, 64);
            continue;
        }
        for (index_t j = 0; j < 16; ++j) {
            const index_t col = first + j;
            for (index_t p = 0; p < pairs; ++p) {
                std::uint16_t pair[2] = {0, 0};
                for (index_t t = 0; t < 2; ++t)
                    if (col < n && 2 * p + t < k) std::memcpy(&pair[t], b + col * ldb + 2 * p + t, 2);
                std::uint32_t value;
                std::memcpy(&value, pair, 4);
                dst[p * 16 + j] = value;
            }
        }
    }
}

/// C (m×n, row stride ldc) += A·B from packed panels: A's rows (`low`, when not null, adds a
/// second A with the same B: a float A's rest), B interleaved; `fresh`: C = A·B, C not read.
TPO_AMX_TARGET inline void amx_multiply(index_t m, index_t n, index_t mp, index_t np, index_t kp,
                                        const std::uint16_t* high, const std::uint16_t* low,
                                        const std::uint32_t* packed, float* c, index_t ldc, bool fresh) {
    amx_config config;
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
    alignas(64) float edge[4][16 * 16];
    const int a_stride = static_cast<int>(kp * 2);
    for (index_t i = 0; i < mp; i += 32)
        for (index_t j = 0; j < np; j += 32) {
            // Tiles 0–3: C's 32×32 block as four 16×16 parts (zero when `fresh`, else read), read
            // and written in place when the block lies inside C, else through `edge` (zeros
            // beyond C); 4, 5: A's rows i.., i+16..; 6, 7: B's column groups j/16 and j/16 + 1.
            const bool inside = i + 32 <= m && j + 32 <= n;
            auto each_edge_value = [&](auto&& f) {
                for (int q = 0; q < 4; ++q)
                    for (index_t r = 0; r < 16; ++r)
                        for (index_t s = 0; s < 16; ++s) {
                            const index_t row = i + (q / 2) * 16 + r, col = j + (q % 2) * 16 + s;
                            if (row < m && col < n) f(edge[q][r * 16 + s], c[row * ldc + col]);
                        }
            };
            float* const c00 = c + i * ldc + j;
            float* part[4] = {c00, c00 + 16, c00 + 16 * ldc, c00 + 16 * ldc + 16};
            int stride = static_cast<int>(ldc * 4);
            if (!inside) {
                for (int q = 0; q < 4; ++q) part[q] = edge[q];
                stride = 64;
            }
            if (fresh) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
            } else {
                if (!inside) {
                    std::memset(edge, 0, sizeof edge);
                    each_edge_value([](float& e, const float& x) { e = x; });
                }
                _tile_loadd(0, part[0], stride);
                _tile_loadd(1, part[1], stride);
                _tile_loadd(2, part[2], stride);
                _tile_loadd(3, part[3], stride);
            }
            const std::uint32_t* b0 = packed + (j / 16) * (kp / 2) * 16;
            const std::uint32_t* b1 = b0 + (kp / 2) * 16;
            for (index_t s = 0; s < kp; s += 32) {
                _tile_loadd(4, high + i * kp + s, a_stride);
                _tile_loadd(5, high + (i + 16) * kp + s, a_stride);
                _tile_loadd(6, b0 + (s / 2) * 16, 64);
                _tile_loadd(7, b1 + (s / 2) * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
                if (low) {
                    _tile_loadd(4, low + i * kp + s, a_stride);
                    _tile_loadd(5, low + (i + 16) * kp + s, a_stride);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, part[0], stride);
            _tile_stored(1, part[1], stride);
            _tile_stored(2, part[2], stride);
            _tile_stored(3, part[3], stride);
            if (!inside) each_edge_value([](const float& e, float& x) { x = e; });
        }
    _tile_release();
}

/// Rows [i, i + rows) (rows ≤ 8) and 32 columns of C (+)= A·B over the packed panels with
/// AVX512-BF16's dot products: `high` (and `low`, when not null) A's rows of kp values from row
/// i, b0 and b1 the two column groups' pairs; `m0` and `m1` the columns of each group inside C.
/// A call of its own, so that the sixteen accumulators stay in registers.
TPO_BF16_TARGET __attribute__((noinline)) inline void dpbf16_block(index_t kp, const std::uint16_t* high,
                                                                    const std::uint16_t* low, const std::uint32_t* b0,
                                                                    const std::uint32_t* b1, float* c, index_t ldc,
                                                                    index_t rows, __mmask16 m0, __mmask16 m1,
                                                                    bool fresh) {
    constexpr int R = 8;
    __m512 left[R], right[R];
    for (int r = 0; r < R; ++r) left[r] = right[r] = _mm512_setzero_ps();
    const index_t pairs = kp / 2;
    for (int pass = 0; pass < (low ? 2 : 1); ++pass) {
        const std::uint16_t* a = pass == 0 ? high : low;
        for (index_t q = 0; q < pairs; ++q) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(b0 + q * 16);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(b1 + q * 16);
#  if defined(__GNUC__) && !defined(__clang__)
#    pragma GCC unroll 8
#  endif
            for (int r = 0; r < R; ++r) {
                std::uint32_t pair;
                std::memcpy(&pair, a + r * kp + 2 * q, sizeof pair);
                const __m512bh y = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
                left[r] = _mm512_dpbf16_ps(left[r], y, x0);
                right[r] = _mm512_dpbf16_ps(right[r], y, x1);
            }
        }
    }
    for (int r = 0; r < R && r < rows; ++r) {
        float* row = c + r * ldc;
        if (!fresh) {
            left[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), left[r]);
            right[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row + 16), right[r]);
        }
        _mm512_mask_storeu_ps(row, m0, left[r]);
        _mm512_mask_storeu_ps(row + 16, m1, right[r]);
    }
}

/// amx_multiply's product with AVX512-BF16's dot products instead of the tile unit: C's 32-column
/// strips in turn, each over A's rows 8 at a time, so a strip's packed B is read from cache by
/// every row block.
TPO_BF16_TARGET inline void dpbf16_multiply(index_t m, index_t n, index_t np, index_t kp, const std::uint16_t* high,
                                            const std::uint16_t* low, const std::uint32_t* packed, float* c,
                                            index_t ldc, bool fresh) {
    auto mask = [](index_t count) {
        return count <= 0 ? __mmask16(0) : count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    };
    const index_t pairs = kp / 2;
    for (index_t j = 0; j < np && j < n; j += 32) {
        const std::uint32_t* b0 = packed + (j / 16) * pairs * 16;
        const __mmask16 m0 = mask(n - j), m1 = mask(n - j - 16);
        for (index_t i = 0; i < m; i += 8)
            dpbf16_block(kp, high + i * kp, low ? low + i * kp : nullptr, b0, b0 + pairs * 16, c + i * ldc + j, ldc,
                         m - i, m0, m1, fresh);
    }
}
#  undef TPO_BF16_TARGET
#  undef TPO_AMX_TARGET
TPO_CPU_INTRINSICS_END
#endif

// A product block on the tile unit: amx_pack_a and amx_pack_b put op(A) (m×k) and op(B) (k×n),
// m, n ≤ 256, k ≤ 512, into a thread's scratch, then amx_product adds op(A)·op(B) to C. Either
// packing serves every product with the other operand's blocks of the same k block.

/// op(A) m×k: bf16 stored by rows (lda), or float stored m×k or, when `trans_a`, k×m. A float A
/// enters as its high bf16 parts plus the bf16 rounding of the rest (amx_product then makes two
/// passes of the tile unit over the packed B).
template <class X>
void amx_pack_a(index_t m, index_t k, const X* a, index_t lda, bool trans_a, amx_scratch& scratch) {
    static_assert(std::is_same_v<X, bfloat16> || std::is_same_v<X, float>);
#if TPO_CPU_AMX
    const index_t kp = (k + 31) / 32 * 32, mp = (m + 31) / 32 * 32;
    scratch.m = m;
    scratch.k = k;
    scratch.split = std::is_same_v<X, float>;
    if constexpr (std::is_same_v<X, float>) {
        amx_pack_a(m, k, mp, kp, a, lda, trans_a, scratch.a.data(), scratch.a.data() + amx_block * amx_depth);
    } else {
        if (trans_a) throw error("cpu backend: the AMX product reads a bf16 A by rows only");
        amx_pack_a(m, k, mp, kp, a, lda, scratch.a.data());
    }
#else
    (void)m, (void)k, (void)a, (void)lda, (void)trans_a, (void)scratch;
    throw error("cpu backend: the AMX product was called on a build without it");
#endif
}

/// op(B) k×n, bf16, stored n×k when `trans_b`, k×n otherwise.
inline void amx_pack_b(index_t n, index_t k, const bfloat16* b, index_t ldb, bool trans_b, amx_scratch& scratch) {
#if TPO_CPU_AMX
    scratch.n = n;
    amx_pack_b(n, k, (n + 31) / 32 * 32, (k + 31) / 32 * 32, b, ldb, trans_b, scratch.b.data());
#else
    (void)n, (void)k, (void)b, (void)ldb, (void)trans_b, (void)scratch;
    throw error("cpu backend: the AMX product was called on a build without it");
#endif
}

/// C (m×n, row stride ldc) += op(A)·op(B) as packed in `scratch` (the same k), or = when `fresh`,
/// on the tile unit or in vector registers.
inline void amx_product(float* c, index_t ldc, bool fresh, const amx_scratch& scratch, bf16_unit unit) {
#if TPO_CPU_AMX
    const index_t kp = (scratch.k + 31) / 32 * 32, np = (scratch.n + 31) / 32 * 32;
    const std::uint16_t* low = scratch.split ? scratch.a.data() + amx_block * amx_depth : nullptr;
    if (unit == bf16_unit::vectors)
        dpbf16_multiply(scratch.m, scratch.n, np, kp, scratch.a.data(), low, scratch.b.data(), c, ldc, fresh);
    else
        amx_multiply(scratch.m, scratch.n, (scratch.m + 31) / 32 * 32, np, kp, scratch.a.data(), low,
                     scratch.b.data(), c, ldc, fresh);
#else
    (void)c, (void)ldc, (void)fresh, (void)scratch, (void)unit;
    throw error("cpu backend: the AMX product was called on a build without it");
#endif
}

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
