#pragma once
// The fused head's bf16 logits product on AMX tiles, where the CPU has AMX-BF16 and the operating
// system lets the process use it (Linux: one arch_prctl request for the tile data, made once).
//
// One call computes a block C (m×n, float, m and n ≤ 256) += A·Bᵀ over a k block (≤ 512), with A
// (m×k) and B (n×k) bf16 stored by rows, the form of the logits H·Wᵀ. A is copied into rows padded
// to 32 values, B into the tile unit's pair-interleaved layout (16 columns × 2 values of k per
// 64-byte row); the edges are padded with zeros. The tile unit multiplies bf16 exactly and adds in
// float (subnormal inputs and results count as zero, far below any logit that matters), four
// 16×16 blocks of C at a time, in a fixed order of k, so a block's result depends on
// nothing but its operands: bit-identical for any thread count, as the rest of cpu/matmul.hpp.
// Compiled for the tile unit by per-function target attributes, like the level kernels, so
// translation units built with any flags share one definition.

#include <cstdint>
#include <cstring>
#include <memory>

#include "tpo/backend/cpu/level.hpp"
#include "tpo/core/config.hpp"
#include "tpo/core/element.hpp"

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

inline constexpr index_t amx_block = 256;  // the largest m and n of one call
inline constexpr index_t amx_depth = 512;  // the largest k of one call

/// Packing space of one thread's calls: A as 256 padded rows, B interleaved. Not zeroed: a call
/// writes every value it reads, the padding included.
struct amx_scratch {
    std::unique_ptr<std::uint16_t[]> a{new std::uint16_t[static_cast<std::size_t>(amx_block * amx_depth)]};
    std::unique_ptr<std::uint32_t[]> b{new std::uint32_t[static_cast<std::size_t>(amx_block * amx_depth / 2)]};
};

#if TPO_CPU_AMX
struct alignas(64) amx_config {
    std::uint8_t palette = 1;
    std::uint8_t start_row = 0;
    std::uint8_t reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {};
    std::uint8_t rows[16] = {};
};

/// C (m×n, row stride ldc) += A·Bᵀ, A m×k (stride lda), B n×k (stride ldb); m, n ≤ 256, k ≤ 512.
__attribute__((target("amx-tile,amx-bf16,avx512f"))) inline void amx_product_bt(
    index_t m, index_t n, index_t k, const bfloat16* a, index_t lda, const bfloat16* b, index_t ldb, float* c,
    index_t ldc, amx_scratch& scratch) {
    const index_t kp = (k + 31) / 32 * 32, mp = (m + 31) / 32 * 32, np = (n + 31) / 32 * 32;
    std::uint16_t* ap = scratch.a.get();
    std::uint32_t* bp = scratch.b.get();
    static_assert(sizeof(bfloat16) == 2);
    for (index_t i = 0; i < mp; ++i) {
        std::uint16_t* dst = ap + i * kp;
        const index_t valid = i < m ? k : 0;
        if (valid) std::memcpy(dst, a + i * lda, static_cast<std::size_t>(k) * 2);
        std::memset(dst + valid, 0, static_cast<std::size_t>(kp - valid) * 2);
    }
    // Group g holds columns 16g.. of B: row p of the group is the 16 pairs (B[j][2p], B[j][2p+1]).
    for (index_t g = 0; g < np / 16; ++g) {
        std::uint32_t* dst = bp + g * (kp / 2) * 16;
        const index_t first = g * 16;
        if (first + 16 <= n && k % 2 == 0) {
            const __m512i rows = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(static_cast<int>(ldb / 2)));
            if (ldb % 2 == 0) {
                const int* base = reinterpret_cast<const int*>(b + first * ldb);
                for (index_t p = 0; p < k / 2; ++p)
                    _mm512_storeu_si512(dst + p * 16, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), __mmask16(0xFFFF), rows, base + p, 4));
                for (index_t p = k / 2; p < kp / 2; ++p) std::memset(dst + p * 16, 0, 64);
                continue;
            }
        }
        for (index_t j = 0; j < 16; ++j) {
            const index_t col = first + j;
            for (index_t p = 0; p < kp / 2; ++p) {
                std::uint16_t pair[2] = {0, 0};
                for (index_t t = 0; t < 2; ++t)
                    if (col < n && 2 * p + t < k) std::memcpy(&pair[t], b + col * ldb + 2 * p + t, 2);
                std::uint32_t packed;
                std::memcpy(&packed, pair, 4);
                dst[p * 16 + j] = packed;
            }
        }
    }

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
            // Tiles 0–3: C's 32×32 block as four 16×16 parts, read and written in place when the
            // block lies inside C, else through `edge` (zeros beyond C); 4, 5: A's rows i..,
            // i+16..; 6, 7: B's column groups j/16 and j/16 + 1.
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
                std::memset(edge, 0, sizeof edge);
                each_edge_value([](float& e, const float& x) { e = x; });
                for (int q = 0; q < 4; ++q) part[q] = edge[q];
                stride = 64;
            }
            _tile_loadd(0, part[0], stride);
            _tile_loadd(1, part[1], stride);
            _tile_loadd(2, part[2], stride);
            _tile_loadd(3, part[3], stride);
            const std::uint16_t* a0 = ap + i * kp;
            const std::uint32_t* b0 = bp + (j / 16) * (kp / 2) * 16;
            const std::uint32_t* b1 = b0 + (kp / 2) * 16;
            for (index_t s = 0; s < kp; s += 32) {
                _tile_loadd(4, a0 + s, a_stride);
                _tile_loadd(5, a0 + 16 * kp + s, a_stride);
                _tile_loadd(6, b0 + (s / 2) * 16, 64);
                _tile_loadd(7, b1 + (s / 2) * 16, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, part[0], stride);
            _tile_stored(1, part[1], stride);
            _tile_stored(2, part[2], stride);
            _tile_stored(3, part[3], stride);
            if (!inside) each_edge_value([](const float& e, float& x) { x = e; });
        }
    _tile_release();
}
#else
inline void amx_product_bt(index_t, index_t, index_t, const bfloat16*, index_t, const bfloat16*, index_t, float*,
                           index_t, amx_scratch&) {
    throw error("cpu backend: the AMX product was called on a build without it");
}
#endif

}  // namespace backend::cpu_detail
TPO_END_NAMESPACE
